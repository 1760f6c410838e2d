"""Hydra callbacks (enabled in conf/config.yaml) and what a job returns to a sweeper.

`OutputDirCheck` refuses an output directory that cannot be created before Hydra tries to create
it (Hydra's own failure is a traceback), and notes whether the run directory existed before this
command, so that a refused command never removes a directory it did not create (msgrun.rundir).

A job never raises into Hydra's launcher (a failed job would stop the sweep or hide the others'
results); it records its status in summary.json / error.log and returns. `SweepSummary` (a Hydra
callback, enabled in conf/config.yaml) lists every job at the end of a multirun, says which failed
and where their logs are, writes sweep_summary.json, and makes the command exit non-zero if any
job failed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from hydra.experimental.callback import Callback


def unusable_dir_reason(path: Path) -> str | None:
    """Why `path` cannot become a run directory, without creating it (None: it can)."""
    import os
    import tempfile

    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory"
    if path.exists():
        ancestor = path
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".msgrun-write-test-"))
    except OSError as e:
        return f"{ancestor} is not writable ({e.strerror})"
    return None


class OutputDirCheck(Callback):
    def _check(self, directory: str, key: str) -> None:
        reason = unusable_dir_reason(Path(directory).absolute())
        if reason:
            print(f"msgrun: error: the output directory {directory} cannot be used: {reason}. Choose another with "
                  f"{key}=PATH.", file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config, **kwargs) -> None:
        import os

        from msgrun.rundir import CREATED_ROOT, first_missing

        self._check(config.hydra.run.dir, "hydra.run.dir")
        run_dir = os.path.abspath(config.hydra.run.dir)
        CREATED_ROOT[run_dir] = first_missing(run_dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


METRICS = ("final_val_loss", "flops_to_target")  # objective.metric: objective_value


def objective_value(cfg, run_dirs: list[Path]) -> float:
    """The number a sweeper minimises, averaged over the trial's seeds.

    final_val_loss: the last validation loss. flops_to_target: FLOPs until the validation loss
    first reaches objective.target (interpolated between evaluations, as msgrun-report does); a
    run that never reaches it scores objective.penalty x its total FLOPs, so never reaching the
    target is always worse than reaching it late."""
    from msgrun.report import load_runs, to_target

    values = []
    for run in load_runs(run_dirs):
        if run.summary is None or run.summary.get("status") != "completed":
            return math.inf
        if cfg.objective.metric == "final_val_loss":
            values.append(run.summary["final_val_loss"])
            continue
        hit = to_target(run, "val_loss", cfg.objective.target)
        values.append(hit[0] if hit is not None else cfg.objective.penalty * run.summary["flops"])
    return sum(values) / len(values) if values else math.inf


def job_status(run_dir: Path) -> str:
    """completed when every training run of the job completed: the job's own summary, or one per
    objective seed (seed<N>/)."""
    summaries = [run_dir / "summary.json"] if (run_dir / "summary.json").exists() else sorted(
        run_dir.glob("seed*/summary.json"))
    statuses = {json.loads(p.read_text()).get("status") for p in summaries}
    return "completed" if statuses == {"completed"} else "failed"


# job directory -> why it was refused without writing anything there (another process held its
# lock: msgrun.cli.run_job). Only this process's jobs: the basic launcher runs them here.
REFUSED: dict[str, str] = {}


class SweepSummary(Callback):
    """Reads the job directories at the end of a multirun. (Launchers such as joblib or submitit
    run jobs, and their on_job_end callbacks, in other processes: the files are what is shared.)"""

    def on_multirun_end(self, config, **kwargs) -> None:
        import yaml

        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = []
        refused = {Path(d).name: why for d, why in REFUSED.items() if Path(d).parent == sweep_dir}
        for d in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir() or p.name in refused),
                        key=lambda p: p.name.zfill(8)):
            if d.name in refused:  # its files, if any, are the other process's
                jobs.append({"job": d.name, "overrides": [], "status": "refused", "dir": str(d), "log": None,
                             "error": refused[d.name]})
                continue
            overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []
            jobs.append({"job": d.name, "overrides": overrides, "status": job_status(d), "dir": str(d),
                         "log": str(d / "error.log") if (d / "error.log").exists() else None})
        if not jobs:
            return
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(jobs, indent=2))
        failed = [j for j in jobs if j["status"] != "completed"]
        print(f"\nsweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs completed")
        for j in failed:
            print(f"  FAILED job {j['job']} ({' '.join(j['overrides'])}): "
                  + (f"refused: {j['error'].split('. ')[0]}" if "error" in j else f"see {j['log'] or j['dir']}"))
        print(f"compare them: msgrun-report {sweep_dir}")
        if failed:
            sys.stdout.flush()
            raise SystemExit(1)
