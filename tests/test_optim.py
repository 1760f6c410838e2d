"""The LR schedule follows the budget that ends the run, whichever it is."""

import pytest

from msgrun.config import OptimConfig, check_config
from msgrun.errors import ConfigError
from msgrun.optim import LRSchedule, annealing_warning, warmup_warning
from msgrun.train import Trainer

from conftest import read_jsonl


def lrs_over(schedule, steps, progress_per_step):
    return [schedule(step, min(step * progress_per_step, 1.0)) for step in range(steps)]


def test_a_flops_budget_reaches_the_peak_and_ends_annealed():
    # max_steps would be 1000, but a FLOPs budget ends the run after 200 steps: progress runs 5x
    # faster than step / max_steps. The warmup (50 steps) must still reach the peak before the
    # decay starts, and the decay must end at the minimum when the budget is spent.
    s = LRSchedule.create(1.0, OptimConfig(warmup_steps=50, decay="cosine", min_lr_ratio=0.1))
    lrs = lrs_over(s, 201, 1 / 200)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs.index(max(lrs)) in (49, 50)  # the peak at the end of the warmup
    assert all(b <= a + 1e-12 for a, b in zip(lrs[50:], lrs[51:]))  # then only down
    assert lrs[200] == pytest.approx(0.1)


def test_a_step_budget_keeps_its_schedule():
    # the decay starts where the warmup ends: for a step budget, at warmup_steps / max_steps
    s = LRSchedule.create(1.0, OptimConfig(warmup_steps=10, decay="linear", min_lr_ratio=0.0))
    lrs = lrs_over(s, 101, 1 / 100)
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)  # halfway through the decay from 0.1 to 1.0
    assert lrs[100] == pytest.approx(0.0)


def test_wsd_holds_the_peak_then_decays_over_its_fraction():
    s = LRSchedule.create(2.0, OptimConfig(warmup_steps=10, decay="wsd", decay_fraction=0.25, min_lr_ratio=0.0))
    lrs = lrs_over(s, 101, 1 / 100)
    assert lrs[4] == pytest.approx(1.0)  # warming up
    assert lrs[10] == lrs[50] == lrs[75] == pytest.approx(2.0)  # stable
    assert lrs[85] == pytest.approx(2.0 * (1 - 0.4))  # 40% through the decay window 0.75..1
    assert lrs[100] == pytest.approx(0.0)
    s.on_growth("rewind", 40, 0.4)  # nothing to rewind: the LR is at its peak
    assert s(40, 0.4) == pytest.approx(2.0) and s(100, 1.0) == pytest.approx(0.0)


def test_decay_choices_and_fraction_are_checked_once_by_check_config(make_cfg):
    # the choices come from optim.DECAYS itself: before, check_config listed its own three and
    # refused optim.decay=wsd, which LRSchedule implements
    check_config(make_cfg("optim.decay=wsd"))
    with pytest.raises(ConfigError, match=r"optim.decay_fraction = 0.0 is out of range"):
        check_config(make_cfg("optim.decay=wsd", "optim.decay_fraction=0"))
    with pytest.raises(ConfigError, match=r"optim.decay = 'cosinus'.*cosine, linear, constant, wsd"):
        check_config(make_cfg("optim.decay=cosinus"))


def test_wsd_trains_from_the_command_line(make_cfg, tmp_path):
    """`msgrun optim.decay=wsd`: composed through Hydra, checked, trained; the LR holds the peak
    until the last optim.decay_fraction of the budget, then decays linearly to the minimum."""
    cfg = make_cfg("optim.decay=wsd", "optim.decay_fraction=0.25", "optim.min_lr_ratio=0", "optim.warmup_steps=2",
                   "train.max_steps=20", "train.log_every=1", "train.eval_every=20", "train.lr=1e-3",
                   "model.layers=1", "train.preflight=false")
    check_config(cfg)
    Trainer(cfg, tmp_path).run()
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in m]
    assert len(lrs) == 20
    assert lrs[0] == pytest.approx(5e-4)  # warmup
    assert lrs[1:15] == pytest.approx([1e-3] * 14)  # stable through 75% of the budget
    # step k runs at budget progress k/20: linear from the peak at 0.75 towards 0 at 1.0
    assert lrs[15:] == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4])


def test_a_max_flops_run_reaches_its_peak_lr_and_ends_annealed(make_cfg, tmp_path):
    # a 40-step FLOPs budget inside max_steps=400: the old schedule started decaying at step 4,
    # before its 10-step warmup was over, and ended at 90% of the peak
    probe = make_cfg("train.max_steps=1", "train.log_every=1", "model.layers=2")
    Trainer(probe, tmp_path / "probe").run()
    per_step = read_jsonl(tmp_path / "probe" / "metrics.jsonl")[0]["flops"]
    cfg = make_cfg("train.max_steps=400", f"train.max_flops={40 * per_step}", "train.log_every=1",
                   "train.eval_every=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", "train.lr=1e-3",
                   "model.layers=2")
    Trainer(cfg, tmp_path / "run").run()
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert len(lrs) == 40
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)  # annealed: the last step's LR is the minimum


def test_a_warmup_that_takes_most_of_a_short_run_is_warned_about_before_training():
    assert warmup_warning(50, 800) is None  # the default job: 6%
    message = warmup_warning(50, 60)
    assert "optim.warmup_steps=50" in message and "83%" in message and "optim.warmup_steps=4" in message


def test_a_run_that_ends_unannealed_is_warned_about_and_says_why():
    cfg = OptimConfig(warmup_steps=5, decay="linear", min_lr_ratio=0.1)
    annealed = LRSchedule.create(1.0, cfg)
    lrs_over(annealed, 60, 1 / 60)
    assert annealing_warning(annealed, 60, "continue") is None

    rewound = LRSchedule.create(1.0, cfg)  # MSG's reference policy: the decay goes back to the peak twice
    for step in range(60):
        if step in (20, 40):
            rewound.on_growth("rewind", step, step / 60)
        rewound(step, step / 60)
    message = annealing_warning(rewound, 60, "rewind")
    assert "not annealed" in message and "operator.lr_policy=rewind" in message
    assert f"{(1 - 0.9 * 20 / 55):.0%} of its peak" in message  # the decay from step 40 covers 20/55 of its span
    assert rewound.decay_start == pytest.approx(40 / 60)  # reading the end LR did not change the schedule

    unfinished = LRSchedule.create(1.0, OptimConfig(warmup_steps=100, decay="cosine", min_lr_ratio=0.1))
    lrs_over(unfinished, 60, 1 / 60)
    assert "had not finished" in annealing_warning(unfinished, 60, "continue")


def test_a_short_msg_run_prints_the_unannealed_warning(make_cfg, tmp_path, capsys):
    cfg = make_cfg("train.max_steps=12", "train.eval_every=12", "model.layers=2", "schedule=layers_only",
                   "schedule.stages.0.at_fraction=0.75", "operator=msg", "operator.ramp_steps=2", "optim.warmup_steps=2")
    Trainer(cfg, tmp_path / "run").run()
    out = capsys.readouterr().out
    assert "it was not annealed" in out and "operator.lr_policy=rewind" in out
