"""Resume exactness through the growth events of the issue-14 operators: a run killed with SIGKILL
right after an event (and before one) continues to the same metrics and growth log as an
uninterrupted run. LEMON's grown model carries a changed norm epsilon, and llama_pro/solar/lemon
start a fresh optimizer at the event: both must survive the checkpoint."""

import pytest

from msgrun import checkpoint

from conftest import read_jsonl
from test_resume import exact, kill_when_logged, run_to_end

COMMON = ["train.max_steps=20", "train.log_every=1", "train.eval_every=5", "train.checkpoint_every=3",
          "train.keep_checkpoints=3"]
RUNS = {  # name: (overrides, steps to kill at)
    # depth at step 6, then non-multiple width (hidden 128 -> 160 under LayerNorm: eps changes) at step 12
    "lemon": (["operator=lemon", "schedule=depth_first", "schedule.stages.0.at_fraction=null",
               "schedule.stages.0.at_step=6", "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=12",
               "schedule.start.hidden=128", "model.hidden=160", "schedule.start.layers=3"], [7, 13]),
    "midas": (["experiment=midas", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=4",
               "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=8",
               "schedule.stages.2.at_fraction=null", "schedule.stages.2.at_step=14"], [9]),
    "llama_pro": (["experiment=llama_pro", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=6"], [7]),
    "solar": (["experiment=solar", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=6"], [7]),
    "ligo": (["experiment=ligo", "operator.ligo_steps=3", "schedule.stages.0.at_fraction=null",
              "schedule.stages.0.at_step=6"], [5, 7]),
}


@pytest.mark.parametrize("name", RUNS)
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, cache_dir, name):
    overrides, kill_steps = RUNS[name]
    overrides = COMMON + overrides
    ref = tmp_path / "ref"
    run_to_end(ref, overrides, cache_dir)
    resumed = tmp_path / "resumed"
    for step in kill_steps:
        kill_when_logged(resumed, overrides, cache_dir, step)
        assert checkpoint.newest_valid(resumed, warn=lambda *_: None) is not None
    r = run_to_end(resumed, overrides, cache_dir)
    assert "resuming from" in r.stdout
    assert exact(read_jsonl(resumed / "metrics.jsonl")) == exact(read_jsonl(ref / "metrics.jsonl"))
    keys = ("step", "flops", "before", "after", "probe_loss_before", "probe_loss_after", "max_abs_logit_diff")
    growth, ref_growth = read_jsonl(resumed / "growth.jsonl"), read_jsonl(ref / "growth.jsonl")
    assert len(growth) == len(ref_growth) > 0
    assert [{k: g[k] for k in keys} for g in growth] == [{k: g[k] for k in keys} for g in ref_growth]
