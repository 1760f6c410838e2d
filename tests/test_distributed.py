"""torchrun on CPU (gloo): 2 data-parallel processes with MSG growth match one process with the
same global batch, for DDP and FSDP2."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import FAST, read_jsonl

RUN = [*FAST, "train.threads=1", "schedule=depth_first", "operator=msg", "operator.ramp_steps=3",
       "train.max_steps=16", "train.log_every=1", "train.eval_every=8", "model.layers=2", "model.hidden=64",
       "model.heads=2", "model.ffn=128", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=4",
       "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=9"]
# Same data and same global batch; only the order of floating-point reductions differs.
TOLERANCE = 2e-4


def run(cmd, cache_dir, cwd):
    env = {**os.environ, "MSGRUN_CACHE": cache_dir, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:  # the whole of each rank's error: pytest's assertion repr cuts it short
        print(r.stdout[-2000:], r.stderr[-8000:], sep="\n", file=sys.stderr)
    assert r.returncode == 0, "torchrun failed; its output is in the captured stderr above"
    return r


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "msgrun", *RUN, f"hydra.run.dir={d}/run"], cache_dir, d)
    return read_jsonl(d / "run" / "metrics.jsonl"), read_jsonl(d / "run" / "growth.jsonl")


@pytest.mark.parametrize("mode,extra", [("ddp", []), ("fsdp", []), ("fsdp", ["train.compile=true"])],
                         ids=["ddp", "fsdp", "fsdp-compiled"])
def test_two_processes_match_one(tmp_path, cache_dir, single, mode, extra):
    """fsdp-compiled: FSDP2 with per-block compile, re-sharded and recompiled at each event."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "msgrun", *RUN, f"train.distributed={mode}", *extra,
         f"hydra.run.dir={tmp_path}/run"], cache_dir, tmp_path)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    ref_metrics, ref_growth = single
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics]
    for a, b in zip(metrics, ref_metrics):
        assert (a["tokens"], a["flops"], a["hidden"], a["layers"]) == (b["tokens"], b["flops"], b["hidden"], b["layers"])
        assert abs(a["loss"] - b["loss"]) <= TOLERANCE * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        if "val_loss" in b:
            assert abs(a["val_loss"] - b["val_loss"]) <= TOLERANCE * abs(b["val_loss"])
    growth = read_jsonl(tmp_path / "run" / "growth.jsonl")
    assert len(growth) == len(ref_growth) == 2
    assert all(g["max_abs_logit_diff"] <= 1e-5 for g in growth)
    if mode == "fsdp":  # both events grew on the shards, and so did the pre-flight's replay
        import json

        assert [g["fsdp_growth"] for g in growth] == ["sharded", "sharded"]
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["preflight"]["growth"] == "sharded"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_at_the_same_world_size(tmp_path, cache_dir, mode):
    """An interrupted 2-process run (its later checkpoints and summary gone) resumes from the
    newest remaining checkpoint, across a growth event, to the same metrics. With dropout: each
    rank's own dropout generator must come back."""
    from msgrun import checkpoint

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "msgrun", *RUN, "model.dropout=0.2",
           f"train.distributed={mode}",
           "train.checkpoint_every=3", "train.keep_checkpoints=10", f"hydra.run.dir={tmp_path}/run"]
    run(cmd, cache_dir, tmp_path)
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    (tmp_path / "run" / "summary.json").unlink()
    for p in checkpoint.list_checkpoints(tmp_path / "run"):
        if checkpoint.checkpoint_step(p) > 6:  # keep step 6: before the second growth event (step 9)
            checkpoint.remove(p)
    r = run(cmd, cache_dir, tmp_path)
    assert "resuming from" in r.stdout and "step_000000006" in r.stdout
    again = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    keys = ("step", "tokens", "flops", "loss", "val_loss", "hidden", "layers", "alpha")
    assert [{k: m.get(k) for k in keys} for m in again] == [{k: m.get(k) for k in keys} for m in first]

    if mode == "ddp":  # another world size resumes too (the FSDP cases: test_sharded_checkpoint.py)
        (tmp_path / "run" / "summary.json").unlink()
        for p in checkpoint.list_checkpoints(tmp_path / "run"):
            if checkpoint.checkpoint_step(p) > 6:
                checkpoint.remove(p)
        one = [c if c != "--nproc_per_node=2" else "--nproc_per_node=1" for c in cmd]
        r = run(one, cache_dir, tmp_path)
        assert "resuming from" in r.stdout and "step_000000006" in r.stdout
        again = read_jsonl(tmp_path / "run" / "metrics.jsonl")
        assert [m["step"] for m in again] == [m["step"] for m in first]
        # the same tokens; dropout reseeds at another world size (checkpoint.load_rng_state), so
        # only the steps before the checkpoint are the same to the digit
        assert [{k: m.get(k) for k in keys} for m in again[:6]] == [{k: m.get(k) for k in keys} for m in first[:6]]
        assert [m["tokens"] for m in again] == [m["tokens"] for m in first]
