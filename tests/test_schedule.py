"""Schedules: sizes and fractions, trigger timing, and every validation rule's message."""

import pytest
import torch

from msgrun.errors import ConfigError
from msgrun.growth.engine import GrowthEngine
from msgrun.growth.schedule import Budget, Shape, Stage, resolve_schedule, resolve_size, simulate_trigger_steps
from msgrun.optim import LRSchedule
from msgrun.config import OptimConfig
from msgrun.train import final_model_args

from conftest import compose_cfg


def engine(*overrides):
    cfg = compose_cfg(list(overrides))
    return GrowthEngine(cfg, final_model_args(cfg.model, cfg.data.vocab_size))


def test_sizes_are_absolute_or_fractions():
    assert resolve_size(3, 12, "k") == 3
    assert resolve_size(0.25, 12, "k") == 3
    assert resolve_size(1.0, 12, "k") == 12
    with pytest.raises(ConfigError, match="fraction"):
        resolve_size(1.5, 12, "k")
    with pytest.raises(ConfigError, match="at least 1"):
        resolve_size(0, 12, "k")


def test_named_schedules_resolve_on_the_tiny_model():
    e = engine("schedule=depth_first", "operator=msg")
    assert e.start == Shape(2, 64, 2, 256, 128)
    assert [s.dims for s in e.stages] == [("layers",), ("hidden", "heads", "ffn")]
    assert e.trigger_steps == [160, 320]  # at_fraction 0.2 and 0.4 of 800 steps


def test_msg_bert_base_follows_the_reference_order():
    cfg = compose_cfg(["model=bert_base", "schedule=msg_bert_base", "operator=msg"])
    start, stages = resolve_schedule(cfg.schedule, cfg.model)
    assert start == Shape(3, 512, 8, 768, 512)
    assert [s.target for s in stages] == [Shape(3, 512, 8, 3072, 512), Shape(6, 512, 8, 3072, 512),
                                         Shape(6, 768, 8, 3072, 512), Shape(6, 768, 12, 3072, 512),
                                         Shape(12, 768, 12, 3072, 512)]


@pytest.mark.parametrize("trigger,value,step", [
    ("at_step", 30, 30), ("at_tokens", 30_500, 31), ("at_flops", 305.0, 31), ("at_fraction", 0.25, 25)])
def test_triggers_of_every_kind_are_simulated_in_steps(trigger, value, step):
    start, target = Shape(2, 64, 2, 256, 128), Shape(4, 64, 2, 256, 128)
    stage = Stage(0, trigger, value, target, ("layers",))
    budget = Budget(max_steps=100, tokens_per_step=1000)
    assert simulate_trigger_steps(start, [stage], budget, lambda shape: 10.0) == [step]


@pytest.mark.parametrize("overrides,words", [
    (["schedule.start.layers=6"], "larger than the final"),
    (["schedule=layers_only", "schedule.stages.0.grow.layers=1"], "shrinks"),
    (["schedule=layers_only", "schedule.stages.0.grow.layers=3"], "ends at"),
    (["schedule=layers_only", "schedule.stages.0.at_step=10"], "exactly one trigger"),
    (["schedule=layers_only", "schedule.stages.0.at_fraction=null"], "exactly one trigger"),
    (["schedule=layers_only", "schedule.stages.0.at_fraction=1.5"], "at_fraction"),
    (["schedule=layers_only", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=900"], "after the run ends"),
    (["schedule=depth_first", "schedule.stages.1.at_fraction=0.1"], "ordered"),
    (["schedule=depth_first", "schedule.stages.1.at_fraction=0.25"], "inside the mask ramp"),
    (["schedule=width_first", "operator=gstack"], "cannot grow hidden"),
    (["schedule=layers_only", "operator=none"], "cannot grow layers"),
    (["schedule=hidden_only", "operator=hyperclone", "schedule.start.hidden=48"], "not a multiple"),
    (["schedule=compound", "operator=compound", "schedule.start.seq_len=48"], "seq_len"),
    (["schedule=layers_only", "operator.layers=grow"], "operator.layers"),
    (["schedule=layers_only", "schedule.stages.0.grow.layers=2"], "grows nothing"),
])
def test_bad_schedules_are_refused_with_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words):
        engine("operator=msg", *overrides)


def test_error_names_the_stage():
    with pytest.raises(ConfigError, match=r"schedule\.stages\[1\]"):
        engine("operator=msg", "schedule=depth_first", "schedule.stages.1.at_fraction=0.25")


def test_rewind_jumps_back_to_the_peak_twice_with_the_same_slope():
    s = LRSchedule.create(1.0, OptimConfig(warmup_steps=0, decay="linear", min_lr_ratio=0.0))
    assert s(50, 0.5) == pytest.approx(0.5)
    s.on_growth("rewind", 50, 0.5)
    assert s(50, 0.5) == pytest.approx(1.0)
    assert s(60, 0.6) == pytest.approx(0.9)  # same slope as before the rewind
    s.on_growth("rewind", 70, 0.7)
    s.on_growth("rewind", 80, 0.8)  # a third event does not rewind
    assert s(80, 0.8) == pytest.approx(0.9)
    assert s(100, 1.0) == pytest.approx(0.7)  # training ends above zero LR


def test_restart_warms_up_again_and_decays_over_the_rest():
    s = LRSchedule.create(1.0, OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1))
    s.on_growth("restart", 50, 0.5)
    assert s(50, 0.5) == pytest.approx(0.1)
    assert s(59, 0.59) == pytest.approx(1.0)
    assert s(100, 1.0) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- G_stack's growth factor
def test_depth_factor_starts_at_a_whole_fraction_of_the_depth():
    e = engine("operator=gstack", "schedule=gstack_g4", "model.layers=8")
    assert e.start.layers == 2 and e.stages[0].target.layers == 8


@pytest.mark.parametrize("layers", [6, 10, 14, 18])
def test_depth_factor_refuses_a_partial_stack(layers):
    """Rounding model.layers / 4 would give g = 3, 5, 3.5, 4.5: refused, naming the key."""
    with pytest.raises(ConfigError, match=r"schedule.depth_factor = 4 needs model.layers divisible by 4"):
        engine("operator=gstack", "schedule=gstack_g4", f"model.layers={layers}")


def test_depth_factor_and_start_layers_are_exclusive():
    with pytest.raises(ConfigError, match="schedule.start.layers"):
        engine("operator=gstack", "schedule=gstack_g4", "model.layers=8", "schedule.start.layers=2")


def test_gstack_refuses_a_non_multiple_depth_growth_from_any_schedule():
    with pytest.raises(ConfigError, match="operator.depth_remainder=refuse"):
        engine("operator=gstack", "schedule=layers_only", "model.layers=6", "schedule.start.layers=4")
    assert engine("operator=gstack", "schedule=layers_only", "model.layers=6", "schedule.start.layers=3").stages


def test_gstack_with_a_non_integer_start_depth_exits_with_code_2(tmp_path, cache_dir):
    import subprocess
    import sys

    from conftest import FAST

    r = subprocess.run([sys.executable, "-m", "msgrun", *FAST, "model.layers=6", "operator=gstack",
                        "schedule=gstack_g4", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path,
                       env={**__import__("os").environ, "MSGRUN_CACHE": cache_dir}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "schedule.depth_factor" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- MSG's ramp length
def test_ramp_steps_is_steps_or_a_fraction_of_the_run():
    e = engine("operator=msg", "schedule=depth_first", "train.max_steps=200", "operator.ramp_steps=7")
    assert e.ramp_steps == 7
    assert engine("operator=msg", "schedule=depth_first", "train.max_steps=200",
                  "operator.ramp_steps=0.05").ramp_steps == 10
    # a token budget that ends the run first: the fraction is of the steps actually trained
    e = engine("operator=msg", "schedule=depth_first", "train.max_steps=1000", "train.batch_size=8",
               "model.seq_len=128", f"train.max_tokens={200 * 8 * 128}", "operator.ramp_steps=0.05")
    assert e.run_steps == 200 and e.ramp_steps == 10
    for bad in ("0", "1.5", "0.0", "true"):
        with pytest.raises(ConfigError, match="operator.ramp_steps"):
            engine("operator=msg", "schedule=depth_first", f"operator.ramp_steps={bad}")


def test_run_steps_under_a_flops_budget_follows_each_stage_cost():
    from msgrun.growth.schedule import run_steps

    start, target = Shape(2, 64, 2, 256, 128), Shape(4, 64, 2, 256, 128)
    stage = Stage(0, "at_step", 10, target, ("layers",))
    cost = lambda shape: 1.0 if shape == start else 2.0  # noqa: E731
    # 10 steps at 1, then 2 per step: 30 FLOPs are spent after step 20
    assert run_steps(start, [stage], [10], Budget(100, 1000, max_flops=30.0), cost) == 20
    assert run_steps(start, [stage], [10], Budget(15, 1000, max_flops=30.0), cost) == 15


SHIPPED = ["depth_first", "width_first", "layers_only", "hidden_only", "heads_only", "ffn_only", "width_only",
           "all_at_once", "msg_bert_base", "compound"]


@pytest.mark.parametrize("schedule", SHIPPED)
@pytest.mark.parametrize("steps", [50, 80, 1000])
def test_msg_preset_ramp_fits_every_shipped_schedule_at_any_budget(schedule, steps):
    """The default ramp (a fraction of the run) never overlaps the next stage, from 50 steps up."""
    model = ["model=bert_base"] if schedule == "msg_bert_base" else []
    grow_len = ["operator.seq_len=warmup"] if schedule == "compound" else []
    e = engine(*model, f"schedule={schedule}", "operator=msg", *grow_len, f"train.max_steps={steps}")
    assert e.ramp_steps >= 1


def test_ramp_starts_at_zero_or_one_increment():
    """zero (the reference): alpha = 0 at the event's step, k/R k steps later, masks gone after
    the step at alpha = 1; increment: 1/R at the event's step."""
    from msgrun.growth.engine import Ramp

    for first, expected in ((0, [0.0, 0.25, 0.5, 0.75, 1.0]), (1, [0.25, 0.5, 0.75, 1.0, 1.0])):
        ramp = Ramp(0, 10, 4, torch.zeros(()), None, first)
        assert [ramp.value(s) for s in range(10, 15)] == expected
