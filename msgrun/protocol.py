"""protocol=matched: every growth arm of a multirun also trains its compute-matched baseline.

    msgrun -m sweep=schedule_ablation protocol=matched train.seed=0,1,2

For each job that grows, the arm's planned training FLOPs are computed from its config before
it trains (growth.schedule.planned_flops: the engine's simulated trigger steps and each shape's
FLOPs per step), and after the arm a from-scratch run with `train.max_flops` set to that figure
and everything else the arm's own (model, data, batch, steps, warmup, optimizer, seed) trains in
the arm's `matched_baseline/` directory. The report finds it there and pairs it with the arm as
its matched baseline (msgrun/report/matching.py says what "matched" requires).

From-scratch jobs (`schedule=none`) train no second run: they are the full-budget baseline.
Two arms with the same planned FLOPs each train their own copy of the baseline (a multirun's
jobs do not see each other; the report counts a repeated seed once).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from msgrun.config import OperatorConfig, ScheduleConfig
from msgrun.report.matching import BASELINE_DIR, BUDGET_KEYS, SEED_KEYS, baseline_overrides

PROTOCOLS = ("none", "matched")  # protocol.name (config.CHOICES reads these)


def wants_baseline(cfg) -> bool:
    return cfg.protocol.name == "matched" and bool(cfg.schedule.stages)


def baseline_job(cfg, run_dir: Path, choices: dict, overrides: list[str], flops: float):
    """(config, run directory, choices, overrides) of the arm's matched baseline: the arm's
    config with the growth choices set to none and `train.max_flops` = the arm's FLOPs."""
    base = cfg.copy()
    OmegaConf.set_struct(base, False)
    base.schedule = OmegaConf.structured(ScheduleConfig(name="none"))
    base.operator = OmegaConf.structured(OperatorConfig(name="none"))
    base.train.max_flops = float(flops)
    base.protocol.name = "none"  # the baseline trains no baseline of its own
    OmegaConf.set_struct(base, True)
    base_choices = {**choices, "schedule": "none", "operator": "none"}  # protocol kept: it is how the run came
    if base_choices.get("experiment"):
        base_choices["experiment"] = "baseline"
    # the arm's steps and seed stay (the config keeps them too); its FLOPs become the budget
    same = tuple(k for k in (*BUDGET_KEYS, *SEED_KEYS) if k != "train.max_flops")
    base_overrides = [*baseline_overrides(overrides, keep=same), "schedule=none", "operator=none",
                      f"train.max_flops={float(flops)!r}"]
    return base, Path(run_dir) / BASELINE_DIR, base_choices, base_overrides


def write_record(run_dir: Path, cfg, choices: dict, overrides: list[str]) -> None:
    """The baseline's .hydra/ record (config.yaml, hydra.yaml, overrides.yaml), as Hydra writes
    one for a job: the report reads its configuration, choices and overrides from there."""
    record = Path(run_dir) / ".hydra"
    if record.exists():
        return  # a resume keeps the first record
    record.mkdir(parents=True)
    OmegaConf.save(cfg, record / "config.yaml")
    hydra = {"hydra": {"runtime": {"choices": choices, "output_dir": str(run_dir)},
                       "overrides": {"task": overrides}}}
    OmegaConf.save(OmegaConf.create(hydra), record / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(overrides), record / "overrides.yaml")


def train_matched_baseline(arm_cfg, arm_dir: Path, choices: dict, overrides: list[str], flops: float) -> None:
    """Train the arm's matched baseline after the arm, with `flops` (the arm's planned training
    FLOPs, Trainer.planned_flops) as its budget. A finished baseline is not trained again."""
    import sys

    from msgrun.rundir import check_run_dir, config_json
    from msgrun.train import Trainer

    cfg, run_dir, base_choices, base_overrides = baseline_job(arm_cfg, arm_dir, choices, overrides, flops)
    if check_run_dir(run_dir, config_json(cfg)) == "finished":
        print(f"msgrun: {run_dir} holds this arm's finished matched baseline; not trained again", file=sys.stderr)
        return
    write_record(run_dir, cfg, base_choices, base_overrides)
    Trainer(cfg, run_dir, base_choices, base_overrides).run()
