"""protocol=matched: every growth arm of a multirun also trains its compute-matched baseline.

    msgrun -m sweep=schedule_ablation protocol=matched train.seed=0,1,2

For each job that grows, the arm's planned training FLOPs are computed from its config before
it trains (growth.schedule.planned_flops: the engine's simulated trigger steps and each shape's
FLOPs per step), and after the arm a from-scratch run with `train.max_flops` set to that figure
and everything else the arm's own (model, data, batch, steps, warmup, optimizer, seed) trains in
the arm's `matched_baseline/` directory. The report finds it there and pairs it with the arm as
its matched baseline (msgrun/report/matching.py says what "matched" requires).

With `protocol.frontier=[0.25,0.5]` each arm also trains from-scratch runs at those multiples of
its planned FLOPs (in `matched_baseline_x0.25/`, ...): with the matched baseline they are the
points of the from-scratch frontier the report reads the arm's effective-compute multiplier
against, so one command answers "how much compute did growth save" (docs/protocol.md):

    msgrun -m experiment=msg protocol=matched 'protocol.frontier=[0.25,0.5]' train.seed=0,1,2

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


def check(cfg) -> None:
    """protocol.frontier: positive multiples other than 1 (the matched baseline itself), under protocol=matched."""
    from msgrun.errors import ConfigError

    multiples = list(cfg.protocol.frontier)
    if multiples and cfg.protocol.name != "matched":
        raise ConfigError(f"protocol.frontier = {multiples} is read by protocol=matched only (here protocol="
                          f"{cfg.protocol.name}): add protocol=matched, or drop protocol.frontier.")
    bad = [m for m in multiples if m <= 0 or m == 1]  # the schema already made each entry a float
    if bad or len(set(multiples)) != len(multiples):
        raise ConfigError(f"protocol.frontier = {multiples}: each entry is a distinct positive multiple of the arm's "
                          "planned FLOPs other than 1 (1 is the matched baseline, always trained), e.g. "
                          "protocol.frontier=[0.25,0.5].")


def wants_baseline(cfg) -> bool:
    return cfg.protocol.name == "matched" and bool(cfg.schedule.stages)


def budgets(cfg, planned: float) -> list[tuple[str, float]]:
    """(directory name, FLOPs) of every from-scratch run the arm trains after itself: its matched
    baseline, then the frontier's multiples."""
    return [(BASELINE_DIR, planned)] + [(f"{BASELINE_DIR}_x{m:g}", m * planned) for m in cfg.protocol.frontier]


def baseline_job(cfg, run_dir: Path, choices: dict, overrides: list[str], flops: float, name: str = BASELINE_DIR):
    """(config, run directory, choices, overrides) of a from-scratch run of the arm: the arm's
    config with the growth choices set to none and `train.max_flops` = `flops`."""
    base = cfg.copy()
    OmegaConf.set_struct(base, False)
    base.schedule = OmegaConf.structured(ScheduleConfig(name="none"))
    base.operator = OmegaConf.structured(OperatorConfig(name="none"))
    base.train.max_flops = float(flops)
    base.protocol.name = "none"  # the baseline trains no baseline of its own
    base.protocol.frontier = []
    OmegaConf.set_struct(base, True)
    base_choices = {**choices, "schedule": "none", "operator": "none"}  # protocol kept: it is how the run came
    if base_choices.get("experiment"):
        base_choices["experiment"] = "baseline"
    # the arm's steps and seed stay (the config keeps them too); its FLOPs become the budget
    same = tuple(k for k in (*BUDGET_KEYS, *SEED_KEYS) if k != "train.max_flops")
    base_overrides = [*baseline_overrides(overrides, keep=same), "schedule=none", "operator=none",
                      f"train.max_flops={float(flops)!r}"]
    return base, Path(run_dir) / name, base_choices, base_overrides


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


def train_matched_baseline(arm_cfg, arm_dir: Path, choices: dict, overrides: list[str], planned: float) -> None:
    """Train the arm's matched baseline after the arm, with `planned` (the arm's planned training
    FLOPs, Trainer.planned_flops) as its budget, then its frontier runs (protocol.frontier). A
    finished run is not trained again."""
    import sys

    from msgrun.rundir import check_run_dir, config_json
    from msgrun.train import Trainer

    for name, flops in budgets(arm_cfg, planned):
        cfg, run_dir, base_choices, base_overrides = baseline_job(arm_cfg, arm_dir, choices, overrides, flops, name)
        if check_run_dir(run_dir, config_json(cfg)) == "finished":
            print(f"msgrun: {run_dir} holds this arm's finished from-scratch run; not trained again", file=sys.stderr)
            continue
        write_record(run_dir, cfg, base_choices, base_overrides)
        Trainer(cfg, run_dir, base_choices, base_overrides).run()
