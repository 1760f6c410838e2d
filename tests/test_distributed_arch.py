"""torchrun on CPU (gloo): grouped-query heads, kv_heads and sparse upcycling grow under FSDP2 and
DDP as in one process (same global batch; only the order of float reductions differs)."""

import os
import shutil
import sys

import pytest

from conftest import FAST, read_jsonl
from test_distributed import TOLERANCE, run

# moe_tiny (kv_heads 2) starts dense with 2 query heads / 1 key-value head and grows heads, kv_heads
# (tile) and experts (sparse upcycling) in one exact event
RUN = [*FAST, "train.threads=1", "model=moe_tiny", "model.layers=2", "schedule=upcycle", "operator=hyperclone", "operator.experts=copy",
       "schedule.start.heads=2", "schedule.stages.0.grow.heads=1.0", "schedule.stages.0.at_fraction=null",
       "schedule.stages.0.at_step=3", "train.max_steps=6", "train.log_every=1", "train.eval_every=6"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "msgrun", *RUN, f"hydra.run.dir={d}/one"], cache_dir, d)
    return read_jsonl(d / "one" / "metrics.jsonl")


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_grouped_heads_and_upcycling_grow_across_two_processes(tmp_path, cache_dir, single, mode):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    r = run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "msgrun", *RUN, f"train.distributed={mode}",
             f"hydra.run.dir={tmp_path}/two"], cache_dir, tmp_path)
    one, two = single, read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        assert (a["flops"], a["heads"], a.get("kv_heads"), a.get("experts")) == \
            (b["flops"], b["heads"], b.get("kv_heads"), b.get("experts"))
        assert abs(a["loss"] - b["loss"]) <= TOLERANCE * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
    (event,) = read_jsonl(tmp_path / "two" / "growth.jsonl")
    assert set(event["dims"]) == {"heads", "kv_heads", "experts"} and event["max_abs_logit_diff"] <= 1e-5
    if mode == "fsdp":  # upcycling's router tie-breaking reads the whole model: gathered, and said so
        assert event["fsdp_growth"] == "gathered"
        assert "gathered on every rank for this event, because operator.experts=" in r.stdout
    assert one[-1]["experts"] == 4 and one[-1]["kv_heads"] == 2 and one[0]["heads"] == 2
