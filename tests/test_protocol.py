"""Matched baselines: the report refuses a baseline that differs from its arm outside the growth
choices and the budget, prints a command that makes a matched one (every override of the arms
filled in), and protocol=matched trains arms and their matched baselines in one multirun."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import FAST
from msgrun import protocol
from msgrun.config import check_config
from msgrun.errors import ConfigError
from msgrun.report import analyse, load_runs
from msgrun.report.matching import baseline_overrides, differences, matched_commands
from test_report import BASELINE, GROWN, base_run, by_label, write_run

CONFIG = {"model": {"layers": 2, "hidden": 64, "lr": 1e-3, "seq_len": 64, "family": "gpt"},
          "train": {"batch_size": 8, "lr": "${model.lr}", "max_steps": 100, "max_flops": None, "seed": 0,
                    "eval_every": 10, "eval_tokens": 4096},
          "optim": {"warmup_steps": 5}, "data": {"name": "pystdlib", "shuffle_chunk": None},
          "schedule": {"name": "depth_first", "stages": [{"at_fraction": 0.5}]}, "operator": {"name": "msg"}}


def config(**changes):
    """CONFIG with dotted-key changes."""
    cfg = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


SCRATCH = {"schedule.name": "none", "schedule.stages": [], "operator.name": "none"}


def test_differences_ignore_growth_budget_seed_and_logging_but_nothing_else():
    base = config(**SCRATCH, **{"train.max_flops": 8e11, "train.max_steps": 300, "train.seed": 3,
                                "train.eval_every": 50})
    assert differences(CONFIG, base) == []
    # a value written by hand equals the same value reached through an interpolation
    assert differences(CONFIG, config(**{"train.lr": 1e-3})) == []
    assert differences(CONFIG, config(**{"model.hidden": 128, "optim.warmup_steps": 20})) == [
        "model.hidden", "optim.warmup_steps"]
    assert differences(CONFIG, {}) is None  # unknown: cannot be checked
    # a wandb copy of the config carries wandb's own record beside the settings
    assert differences({**CONFIG, "_wandb": {"t": 1}}, {**CONFIG, "_wandb": {"t": 2}}) == []


def test_a_baseline_that_differs_is_never_matched(tmp_path):
    """The issue's case: a baseline trained at the arm's budget but on another model and batch
    was labelled matched and gave a confident, false speedup."""
    for seed in (0, 1):
        write_run(tmp_path / f"arm{seed}", GROWN, seed=seed, config=config(**{"train.seed": seed}))
        base_run(tmp_path / f"wrong{seed}", [(2e11, 2.9), (4e11, 2.3), (8.2e11, 1.85)], seed=seed,
                 overrides=["train.max_flops=8e11"],
                 config=config(**SCRATCH, **{"model.hidden": 128, "train.batch_size": 32, "train.max_flops": 8e11,
                                             "train.seed": seed}))
    comp = analyse(load_runs([tmp_path]))
    arm = by_label(comp.rows)["depth_first/msg"]
    assert arm.baseline is None and arm.speedup_flops is None and not arm.pairs
    note = next(n for n in comp.notes if n.startswith("not matched"))
    assert "model.hidden (64 here, 128 in the baseline)" in note and "train.batch_size (8 here, 32" in note
    assert any("no baseline for 'depth_first/msg'" in n for n in comp.notes)
    # asked for by hand it is compared, and labelled for what it is
    comp = analyse(load_runs([tmp_path]), baseline="none/none")
    arm = by_label(comp.rows)["depth_first/msg"]
    assert arm.baseline_kind == "--baseline, NOT matched: differs in model.hidden, train.batch_size"
    assert any(n.startswith("WARNING") and "model.hidden" in n for n in comp.notes)


def test_a_baseline_equal_outside_growth_and_budget_is_matched(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"arm{seed}", GROWN, seed=seed, config=config(**{"train.seed": seed}))
        base_run(tmp_path / f"full{seed}", BASELINE, seed=seed,
                 config=config(**SCRATCH, **{"train.seed": seed, "train.max_steps": 150}))
        base_run(tmp_path / f"m{seed}", [(2e11, 2.9), (4e11, 2.3), (8.2e11, 1.85)], seed=seed,
                 overrides=["train.max_flops=8e11"],
                 config=config(**SCRATCH, **{"train.max_flops": 8e11, "train.seed": seed, "train.eval_every": 20}))
    comp = analyse(load_runs([tmp_path]))
    arm = by_label(comp.rows)["depth_first/msg"]
    assert arm.baseline_kind == "matched" and len(arm.pairs) == 2
    assert not any(n.startswith("not matched") for n in comp.notes)


def test_the_command_carries_every_override_of_the_arms():
    class G:  # the two fields matched_commands reads of a group
        def __init__(self, flops, runs):
            self.flops, self.runs = flops, runs

    class R:
        def __init__(self, seed, overrides, choices=None):
            self.seed, self.overrides, self.choices = seed, overrides, choices or {}

    arm = ["sweep=operator_comparison", "experiment=msg", "model.hidden=64", "+train.grad_accum=2",
           "schedule.stages.0.at_fraction=0.5", "operator.ramp_steps=2", "train.max_steps=60", "train.seed=0"]
    assert baseline_overrides(arm) == ["sweep=operator_comparison", "model.hidden=64", "+train.grad_accum=2"]
    runs = [R(s, [*arm[:-1], f"train.seed={s}"], {"experiment": "msg"}) for s in (0, 1)]
    (command,) = matched_commands([G(5.5e11, runs)])
    assert command == ("msgrun -m hydra.sweeper.params=null schedule=none operator=none experiment=baseline "
                       "train.max_flops=5.5e+11 train.seed=0,1 sweep=operator_comparison model.hidden=64 "
                       "+train.grad_accum=2")
    assert "<" not in command  # no placeholder
    plain = [R(0, ["model.layers=2", "schedule=layers_only", "train.seed=0"])]
    other = [R(0, ["model.layers=4", "schedule=layers_only", "train.seed=0"])]
    assert matched_commands([G(1e12, plain), G(2e12, other)]) == [
        "msgrun -m sweep=matched_baselines train.max_flops=1e+12 train.seed=0 model.layers=2",
        "msgrun -m sweep=matched_baselines train.max_flops=2e+12 train.seed=0 model.layers=4"]


# --------------------------------------------------------------------------- real multiruns
TINY = [*FAST, "train.max_steps=60", "train.eval_every=20", "train.log_every=20", "train.batch_size=4",
        "train.eval_tokens=2048", "model.layers=2", "model.hidden=32", "model.heads=2", "model.head_dim=16",
        "model.ffn=64", "model.seq_len=64", "operator.ramp_steps=2"]


def msgrun(args, sweep_dir, cache_dir, cwd):
    env = {**os.environ, "MSGRUN_CACHE": cache_dir}
    r = subprocess.run([sys.executable, "-m", "msgrun", *args, f"hydra.sweep.dir={sweep_dir}"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_printed_command_run_as_printed_gives_matched_baselines(tmp_path, cache_dir):
    # arms under a sweep file, a growth override that a from-scratch run cannot take, two seeds
    msgrun(["-m", "sweep=schedule_ablation", "schedule=layers_only",
            "schedule.stages.0.at_fraction=0.5", "train.seed=0,1", *TINY], tmp_path / "arms", cache_dir, tmp_path)
    comp = analyse(load_runs([tmp_path / "arms"]))
    note = next(n for n in comp.notes if n.startswith("no baseline"))
    (command,) = re.findall(r"`(msgrun -m [^`]*)`", note)
    assert "<" not in command and "model.hidden=32" in command and "sweep=schedule_ablation" in command
    args = shlex.split(command)
    assert args[:2] == ["msgrun", "-m"]
    msgrun(args[1:], tmp_path / "matched", cache_dir, tmp_path)

    comp = analyse(load_runs([tmp_path / "arms", tmp_path / "matched"]))
    (arm,) = [r for r in comp.rows if r.label.startswith("layers_only")]
    assert arm.baseline_kind == "matched" and len(arm.pairs) == 2, comp.notes
    assert not any(n.startswith(("not matched", "no matched baseline")) for n in comp.notes)


def test_protocol_matched_trains_arms_and_their_baselines_in_one_multirun(tmp_path, cache_dir):
    msgrun(["-m", "schedule=layers_only", "operator=msg", "protocol=matched", "train.seed=0,1", *TINY],
           tmp_path / "sweep", cache_dir, tmp_path)
    sweep = tmp_path / "sweep"
    arms = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(arms) == 2
    for arm in arms:
        mine = json.loads((arm / "summary.json").read_text())
        base = json.loads((arm / "matched_baseline" / "summary.json").read_text())
        assert mine["growth_events"] == 1 and base["growth_events"] == 0 and base["seed"] == mine["seed"]
        assert abs(base["flops"] / mine["flops"] - 1) <= 0.02, (base["flops"], mine["flops"])
    comp = analyse(load_runs([sweep]))
    (arm,) = [r for r in comp.rows if r.label.startswith("layers_only")]
    assert arm.baseline_kind == "matched" and len(arm.pairs) == 2, comp.notes
    assert arm.baseline.startswith("none/none train.max_flops=")
    assert {(p.run.split("/")[-1], p.baseline_run.split("/")[-2]) for p in arm.pairs} == {("0", "0"), ("1", "1")}

    # a sweep stopped between an arm and its baseline: the same command trains the baseline only
    shutil.rmtree(arms[1] / "matched_baseline")
    before = {a: (a / "summary.json").stat().st_mtime_ns for a in arms}
    msgrun(["-m", "schedule=layers_only", "operator=msg", "protocol=matched", "train.seed=0,1", *TINY],
           tmp_path / "sweep", cache_dir, tmp_path)
    assert {a: (a / "summary.json").stat().st_mtime_ns for a in arms} == before
    assert json.loads((arms[1] / "matched_baseline" / "summary.json").read_text())["status"] == "completed"


def test_only_growth_arms_train_a_matched_baseline(make_cfg):
    assert protocol.wants_baseline(make_cfg("protocol=matched", "schedule=layers_only", "operator=msg"))
    assert not protocol.wants_baseline(make_cfg("protocol=matched"))  # from scratch: it is the baseline
    assert not protocol.wants_baseline(make_cfg("schedule=layers_only", "operator=msg"))


def test_planned_flops_follow_the_engines_simulation(make_cfg):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args

    cfg = make_cfg("schedule=layers_only", "operator=msg", "train.max_steps=40", "schedule.stages.0.at_fraction=0.25")
    engine = GrowthEngine(cfg, final_model_args(cfg.model, 512))
    (at,) = engine.trigger_steps
    small, full = engine.flops_per_step(engine.start), engine.flops_per_step(engine.final_shape)
    assert at == 10 and small < full
    assert engine.planned_flops() == pytest.approx(at * small + (40 - at) * full, rel=1e-12)
    # under a FLOPs budget the run ends at the first step that reaches it
    budget = 10 * small + 5.5 * full
    cfg = make_cfg("schedule=layers_only", "operator=msg", "train.max_steps=40", "schedule.stages.0.at_step=10",
                   "schedule.stages.0.at_fraction=null",
                   f"train.max_flops={budget}")
    engine = GrowthEngine(cfg, final_model_args(cfg.model, 512))
    assert engine.planned_flops() == pytest.approx(10 * small + 6 * full, rel=1e-12)


def test_an_unknown_protocol_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="protocol.name = 'matchd' is not a valid choice; choose one of none, matched"):
        check_config(make_cfg("protocol.name=matchd"))


@pytest.mark.parametrize("frontier, why", [("[0.5,1]", "other than 1"), ("[0,0.5]", "positive"),
                                           ("[0.5,0.5]", "distinct")])
def test_a_frontier_multiple_that_is_not_a_new_budget_is_refused(make_cfg, frontier, why):
    cfg = make_cfg("protocol=matched", f"protocol.frontier={frontier}", "schedule=layers_only", "operator=msg")
    with pytest.raises(ConfigError, match=r"protocol.frontier = .*" + why):
        check_config(cfg)


def test_frontier_multiples_without_protocol_matched_are_refused(make_cfg):
    with pytest.raises(ConfigError, match="read by protocol=matched only"):
        check_config(make_cfg("protocol.frontier=[0.5]"))


def test_each_frontier_multiple_is_its_own_from_scratch_budget(make_cfg):
    cfg = make_cfg("protocol=matched", "protocol.frontier=[0.25,0.5]", "schedule=layers_only", "operator=msg")
    assert protocol.budgets(cfg, 8e12) == [("matched_baseline", 8e12), ("matched_baseline_x0.25", 2e12),
                                           ("matched_baseline_x0.5", 4e12)]
    base, run_dir, _, overrides = protocol.baseline_job(cfg, "arm", {}, [], 2e12, "matched_baseline_x0.25")
    assert base.train.max_flops == 2e12 and str(run_dir) == "arm/matched_baseline_x0.25"
    assert base.protocol.frontier == [] and base.protocol.name == "none"  # a baseline trains nothing more


def test_one_multirun_gives_arms_their_matched_baselines_and_a_frontier(tmp_path, cache_dir):
    """protocol.frontier: the arm's from-scratch runs at 1/4, 1/2 and 1x its FLOPs make the frontier,
    and the report reads the arm's effective-compute multiplier against it, paired by seed."""
    msgrun(["-m", "schedule=layers_only", "operator=msg", "protocol=matched", "protocol.frontier=[0.25,0.5]",
            "train.seed=0,1", *TINY], tmp_path / "sweep", cache_dir, tmp_path)
    arms = sorted(p for p in (tmp_path / "sweep").iterdir() if p.name.isdigit())
    for arm in arms:
        planned = json.loads((arm / "matched_baseline" / "summary.json").read_text())["flops"]
        for multiple in (0.25, 0.5):
            run = json.loads((arm / f"matched_baseline_x{multiple}" / "summary.json").read_text())
            assert run["growth_events"] == 0 and abs(run["flops"] / (multiple * planned) - 1) <= 0.05
    comp = analyse(load_runs([tmp_path / "sweep"]))
    assert comp.frontier is not None and len(comp.frontier.frontier.flops) == 6, comp.notes
    (arm,) = comp.frontier.arms
    assert arm.n == 2 and arm.paired and arm.multiplier is not None, comp.notes
