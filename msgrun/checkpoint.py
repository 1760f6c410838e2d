"""Checkpoints that resume a run exactly, and run directories that are never damaged.

A checkpoint holds everything the next step depends on: the model at its *current* shape and
its optimizer state, the LR schedule, the counters, every RNG (torch, CUDA, numpy, python, and
the init generator that future growth events draw new weights from), the growth state (stages
done, an ongoing MSG ramp, the RaPTr path length), the partial logging window, and the resolved
config. Files are written atomically (temporary file, fsync, rename) with a SHA-256 sidecar; a
checkpoint whose bytes do not match, or which matches but does not load, is skipped for the
previous one. A write that fails (disk full, a file-size limit) removes its temporary file, keeps
the previous checkpoints and ends the run with one paragraph. Loading uses
`torch.load(weights_only=True)`, so a checkpoint cannot execute code.

Resuming truncates metrics.jsonl and growth.jsonl to what the checkpoint had logged, so a
resumed run's files equal an uninterrupted run's.

This module handles files only: the trainer assembles its state (Trainer.state_dict, a dict of
named states: the model's, the optimizer's, the LR schedule's, the growth engine's, the counters,
the RNGs) and loads it back (Trainer.load_state_dict); nothing here reads the trainer.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from msgrun import distributed
from msgrun.errors import CheckpointError
from msgrun.files import atomic_write
from msgrun.rundir import check_run_dir, different_run_message, finished_run_message


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    return sorted(d.glob("step_*.pt")) if d.is_dir() else []


def is_valid(path: Path) -> bool:
    """The bytes match the SHA-256 sidecar (necessary, not sufficient: see open_checkpoint)."""
    side = path.with_name(path.name + ".sha256")
    return side.exists() and side.read_text().strip() == sha256(path)


def load(path: Path, mmap: bool = False) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def open_checkpoint(path: Path, mmap: bool = False) -> tuple[dict | None, str | None]:
    """The one test of a good checkpoint (resume, retention and export all ask here): its bytes
    match its sidecar *and* it loads as a msgrun checkpoint. A file can match its sidecar and
    still not load: written by another torch, damaged before its sidecar was computed, or
    replaced together with it. Returns (state, None), or (None, why not). mmap=True maps the
    tensors instead of reading them, so checking a large checkpoint costs little."""
    if not is_valid(path):
        return None, "is corrupt or incomplete (checksum mismatch)"
    try:
        state = load(path, mmap=mmap)
        state["counters"]["step"], state["model_args"], state["model"]  # noqa: B018 - a msgrun checkpoint?
    except Exception as e:  # noqa: BLE001 - any failure to read it means it is not a usable checkpoint
        return None, f"does not load ({type(e).__name__}: {str(e)[:200]})"
    return state, None


def newest_loadable(run_dir: Path, warn=print, mmap: bool = False) -> tuple[Path | None, dict | None]:
    """The newest good checkpoint (open_checkpoint) and its state; each newer one is warned about."""
    for path in reversed(list_checkpoints(run_dir)):
        state, why = open_checkpoint(path, mmap=mmap)
        if state is not None:
            return path, state
        warn(f"warning: checkpoint {path} {why}; trying the previous one.")
    return None, None


def newest_valid(run_dir: Path, warn=print) -> Path | None:
    return newest_loadable(run_dir, warn, mmap=True)[0]


def last_good_message(run_dir: Path) -> str:
    good = newest_valid(run_dir, warn=lambda *_: None)
    return f"The last good checkpoint is {good}." if good else "No checkpoint has been written yet."


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:09d}.pt"


def save(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` (the trainer's named states) as the checkpoint of `step`, with the number of
    log lines written so far, and keep the newest `keep` valid ones; returns its path. Rank 0
    only (the state was gathered on every rank)."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(exist_ok=True)
    state = {"format": 1, **state,
             "log_lines": {"metrics": count_lines(run_dir / "metrics.jsonl"),
                           "growth": count_lines(run_dir / "growth.jsonl")}}
    side = path.with_name(path.name + ".sha256")
    written = False
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        written = True
        atomic_write(side, lambda f: f.write(sha256(path).encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (EFBIG, ENOSPC) as RuntimeError
        if written:  # this write replaced the file; without its sidecar it would only be skipped
            path.unlink(missing_ok=True)
        raise CheckpointError(
            f"Could not write checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). The disk may "
            f"be full or a file-size limit (ulimit -f) reached; the previous checkpoints are kept. "
            f"{last_good_message(run_dir)} Free space or raise the limit, then rerun the same command to resume."
        ) from e
    good = [p for p in list_checkpoints(run_dir) if open_checkpoint(p, mmap=True)[0] is not None]
    for old in good[:-max(1, keep)]:  # never delete the newest good ones (the only good one included)
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def truncate_lines(path: Path, n: int) -> None:
    if not path.exists():
        return
    with open(path, "rb") as f:
        lines = f.readlines()[:n]
    atomic_write(path, lambda f: f.writelines(lines))


def prepare_run_dir(run_dir: Path, config: str, data_fingerprints: dict, dist, log) -> dict | None:
    """Decide between a fresh start and a resume, refusing anything that would damage an existing
    run; on resume, return the newest good checkpoint's state (None: a fresh start) after cutting
    the logs back to it. Rank 0 decides and every rank follows (an error on rank 0 is raised on
    every rank, so none waits forever)."""
    decision, state = None, None
    if dist.rank == 0:
        try:
            path, state = choose_checkpoint(run_dir, config, data_fingerprints, dist.world_size, log)
            decision = {"path": None if path is None else str(path)}
        except CheckpointError as e:
            decision = {"error": str(e)}
    decision = distributed.broadcast(decision, dist)
    if "error" in decision:
        raise CheckpointError(decision["error"])
    if decision["path"] is None:
        return None
    state = state if state is not None else load(decision["path"])
    if dist.rank == 0:
        truncate_lines(run_dir / "metrics.jsonl", state["log_lines"]["metrics"])
        truncate_lines(run_dir / "growth.jsonl", state["log_lines"]["growth"])
        (run_dir / "summary.json").unlink(missing_ok=True)
    log(f"resuming from {decision['path']} (step {state['counters']['step']})")
    return state


def choose_checkpoint(run_dir: Path, this_config: str, data_fingerprints: dict, world_size: int,
                      log) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state ((None, None): a fresh start, after clearing an
    unresumable partial run of the same config), or a CheckpointError when the directory must not
    be touched. (The CLI has refused finished and different runs already, before anything was
    written; the check is repeated for callers other than the CLI.)"""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".msgrun_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"The run directory {run_dir} is not writable ({e.strerror}). Choose another with "
                              "hydra.run.dir=PATH (hydra.sweep.dir=PATH for multiruns).") from e
    state_of_dir = check_run_dir(run_dir, this_config)
    if state_of_dir == "finished":
        raise CheckpointError(finished_run_message(run_dir))
    had_logs = (run_dir / "metrics.jsonl").exists()
    path, state = newest_loadable(run_dir, warn=log) if state_of_dir == "resume" else (None, None)
    if path is None:
        if had_logs:
            log(f"warning: {run_dir} has no valid checkpoint; starting the run from scratch.")
        for name in ("metrics.jsonl", "growth.jsonl", "summary.json"):
            (run_dir / name).unlink(missing_ok=True)
        atomic_write(run_dir / "config.json", lambda f: f.write(this_config.encode()))
        return None, None
    if state["config"] != this_config:
        raise CheckpointError(different_run_message(run_dir))
    saved_world = len(state["rank_rng"])
    if saved_world != world_size:
        raise CheckpointError(
            f"The run in {run_dir} was trained by {saved_world} process(es) and this command starts "
            f"{world_size}: each rank's random state (dropout) is saved, so a run resumes only at the "
            f"same world size (torchrun --nproc_per_node={saved_world}). To change it, start a new run with "
            "hydra.run.dir=NEW_PATH.")
    if state["fingerprints"] != data_fingerprints:
        raise CheckpointError(
            f"The run in {run_dir} was trained on other data or with another tokenizer (fingerprints "
            f"{state['fingerprints']} then, {data_fingerprints} now): the same config now reads different "
            "files. Restore the original data/tokenizer.json to resume, or start a new run with hydra.run.dir=NEW_PATH.")
    return path, state


def rng_state(init_gen: torch.Generator, dist) -> dict:
    """Every generator the run draws from: the global ones per rank (dropout masks are seeded per
    rank; gathered, a collective), numpy's and python's, and the init generator that future growth
    events draw new weights from."""
    rank_rng = distributed.all_gather(
        {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        dist)
    np_state = np.random.get_state()
    return {"rank_rng": rank_rng,
            "rng": {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate(),
                    "init": init_gen.get_state()}}


def load_rng_state(state: dict, init_gen: torch.Generator, rank: int) -> None:
    own = state["rank_rng"][rank]  # the same world size (choose_checkpoint)
    torch.set_rng_state(own["torch"])
    if own["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda"])
    rng = state["rng"]
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
    init_gen.set_state(rng["init"])
