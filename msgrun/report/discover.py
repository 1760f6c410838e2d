"""Finding runs under the paths a user gives: run directories, multirun directories, metrics.jsonl
files and wandb offline run folders."""

from __future__ import annotations

import os
from pathlib import Path

from msgrun.report.matching import BASELINE_DIR
from msgrun.report.runs import ReportError, Run, display_name, natural_key, read_run_dir
from msgrun.report.wandb_folder import is_wandb_folder, read_wandb_folder


def load_runs(paths) -> list[Run]:
    """Read every run found under `paths`: run directories, multirun directories (searched
    recursively for metrics.jsonl), metrics.jsonl files, or wandb offline run folders."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for given in map(Path, paths):
        if not given.exists():
            raise ReportError(f"{given}: no such file or directory")
        run_dirs, wandb_dirs = _discover(given)
        if not run_dirs and not wandb_dirs:
            raise ReportError(
                f"{given}: no run found (a run directory holds metrics.jsonl; a wandb offline "
                "run folder holds a .wandb file)"
            )
        base = given.parent if given.is_dir() else given.parent.parent
        for d in run_dirs:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                runs.append(read_run_dir(d, display_name(d, base)))
        for d in wandb_dirs:
            # msgrun puts its wandb folder inside the run directory: a run already read from
            # its metrics.jsonl must not be counted twice
            if d.parent.parent.resolve() in seen:
                continue
            run = read_wandb_folder(d, display_name(d, base))
            if run.path.resolve() not in seen:
                seen.add(run.path.resolve())
                runs.append(run)
    return runs


def _nested(run_dir: Path) -> list[Path]:
    """A run's own matched baseline and frontier runs (protocol=matched trains them inside the arm's
    directory: matched_baseline/, matched_baseline_x0.25/, ...)."""
    inner = sorted(run_dir.glob(BASELINE_DIR + "*"), key=lambda p: natural_key(p.name))
    return [d for d in inner if (d / "metrics.jsonl").is_file()]


def _discover(path: Path) -> tuple[list[Path], list[Path]]:
    """Run directories and wandb run folders under `path`.

    Wandb folders found by searching are used only where no run directory is found: inside a
    run directory they duplicate its metrics.jsonl."""
    if path.is_file():
        if path.name == "metrics.jsonl":
            return [path.parent], []
        if path.suffix == ".wandb":
            return [], [path.parent]
        raise ReportError(f"{path}: expected a directory, a metrics.jsonl or a .wandb file")
    if (path / "metrics.jsonl").is_file():
        return [path] + _nested(path), []
    if is_wandb_folder(path):
        return [], [path]
    run_dirs, wandb_dirs = [], []
    for root, dirs, _files in os.walk(path):
        root = Path(root)
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=natural_key)
        if (root / "metrics.jsonl").is_file():
            run_dirs += [root] + _nested(root)
            dirs[:] = []
        elif is_wandb_folder(root):
            wandb_dirs.append(root)
            dirs[:] = []
    run_dirs.sort(key=lambda p: natural_key(str(p)))
    wandb_dirs.sort(key=lambda p: natural_key(str(p)))
    return (run_dirs, []) if run_dirs else ([], wandb_dirs)
