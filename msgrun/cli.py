"""`msgrun`: compose model x schedule x operator with Hydra, validate, train.

Bad input ends in one paragraph on stderr and exit code 2, before compute is spent, and leaves no
half-written run directory (HYDRA_FULL_ERROR=1 shows the traceback). In a multirun a failing job
never stops the others: it is recorded, and the sweep ends with a list of failed jobs
(msgrun.callbacks.SweepSummary) and a non-zero exit code.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from msgrun.config import check_config, register_configs
from msgrun.errors import MsgrunError

HYDRA_FILES = {".hydra"}


def hydra_only(run_dir: Path) -> bool:
    """True when the directory holds nothing but what Hydra wrote for this job."""
    return run_dir.is_dir() and all(p.name in HYDRA_FILES or p.suffix == ".log" for p in run_dir.iterdir())


def run_job(cfg: DictConfig) -> float | None:
    """Train one job (once per objective seed) and return the sweep objective."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    overrides = list(hc.overrides.task)
    fresh = hydra_only(run_dir)
    try:
        check_config(cfg)
        from msgrun.callbacks import objective_value
        from msgrun.train import Trainer  # torch is imported only once the config is known good

        seeds = list(cfg.objective.seeds)
        if not seeds:
            Trainer(cfg, run_dir, choices, overrides).run()
            return objective_value(cfg, [run_dir])
        dirs = []
        for seed in seeds:
            seed_cfg = cfg.copy()
            seed_cfg.train.seed = seed
            dirs.append(run_dir / f"seed{seed}")
            Trainer(seed_cfg, dirs[-1], choices, [*overrides, f"train.seed={seed}"]).run()
        return objective_value(cfg, dirs)
    except MsgrunError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"msgrun: error: {e}", file=sys.stderr)
        if multirun:  # keep the job directory: the sweep summary points at its log
            (run_dir / "error.log").write_text(f"{e}\n")
            return math.inf
        if fresh and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing of value was written
        sys.exit(2)
    except Exception:
        if not multirun:
            raise
        (run_dir / "error.log").write_text(traceback.format_exc())
        print(f"msgrun: job in {run_dir} failed; traceback in {run_dir / 'error.log'}", file=sys.stderr)
        return math.inf


@hydra.main(version_base="1.3", config_path="pkg://msgrun.conf", config_name="config")
def hydra_entry(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def main() -> None:
    register_configs()
    hydra_entry()


if __name__ == "__main__":
    main()
