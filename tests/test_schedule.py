"""Schedules: sizes and fractions, trigger timing, and every validation rule's message."""

import pytest

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
