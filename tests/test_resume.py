"""Kill a real run with SIGKILL at chosen points, resume it, and get the same metrics to the last digit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msgrun import checkpoint

from conftest import FAST, read_jsonl

# fields that are functions of the computation (timing fields like wall_time, tokens_per_s are not)
EXACT = ("step", "tokens", "flops", "loss", "lr", "val_loss", "val_bpb", "layers", "hidden", "heads", "ffn",
         "seq_len", "params", "alpha", "path_length", "epoch")

MSG_RUN = ["schedule=depth_first", "operator=msg", "operator.ramp_steps=6", "train.max_steps=30",
           "train.log_every=1", "train.eval_every=5", "train.checkpoint_every=3", "train.keep_checkpoints=3",
           "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=8",
           "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=20"]
RAPTR_RUN = ["schedule=raptr_3stage", "operator=raptr", "train.max_steps=24", "train.log_every=1",
             "train.eval_every=6", "train.checkpoint_every=4", "schedule.stages.0.at_fraction=null",
             "schedule.stages.0.at_step=8", "schedule.stages.1.at_fraction=null", "schedule.stages.1.at_step=16"]


def command(run_dir, overrides):
    return [sys.executable, "-m", "msgrun", *FAST, "train.threads=1", *overrides, f"hydra.run.dir={run_dir}"]


def env(cache_dir):
    return {**os.environ, "MSGRUN_CACHE": cache_dir, "PYTHONUNBUFFERED": "1"}


def run_to_end(run_dir, overrides, cache_dir):
    r = subprocess.run(command(run_dir, overrides), env=env(cache_dir), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def signal_when_logged(run_dir, overrides, cache_dir, step, sig):
    """Start the run and send `sig` as soon as metrics.jsonl shows `step` (it may be a step
    further); returns the exit code and the output."""
    proc = subprocess.Popen(command(run_dir, overrides), env=env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines() if l.strip()):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def kill_when_logged(run_dir, overrides, cache_dir, step):
    rc, _, err = signal_when_logged(run_dir, overrides, cache_dir, step, signal.SIGKILL)
    assert rc == -signal.SIGKILL, f"the run ended before step {step}: {err[-2000:]}"


def exact(records):
    return [{k: r.get(k) for k in EXACT} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    out = {}
    for name, overrides in (("msg", MSG_RUN), ("raptr", RAPTR_RUN)):
        d = tmp_path_factory.mktemp(f"ref_{name}")
        run_to_end(d, overrides, cache_dir)
        out[name] = (read_jsonl(d / "metrics.jsonl"), read_jsonl(d / "growth.jsonl"))
    return out


@pytest.mark.parametrize("name,kill_steps", [
    ("msg", [5, 9, 11]),  # before the first growth; right after it (step 8); in the middle of its ramp
    ("raptr", [12]),  # during the second RaPTr stage
])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, cache_dir, reference, name, kill_steps):
    overrides = MSG_RUN if name == "msg" else RAPTR_RUN
    for step in kill_steps:
        kill_when_logged(tmp_path, overrides, cache_dir, step)
        assert checkpoint.newest_valid(tmp_path, warn=lambda *_: None) is not None
    r = run_to_end(tmp_path, overrides, cache_dir)
    assert "resuming from" in r.stdout
    ref_metrics, ref_growth = reference[name]
    assert exact(read_jsonl(tmp_path / "metrics.jsonl")) == exact(ref_metrics)
    growth = read_jsonl(tmp_path / "growth.jsonl")
    keys = ("step", "tokens", "flops", "before", "after", "probe_loss_before", "probe_loss_after", "max_abs_logit_diff")
    assert [{k: g[k] for k in keys} for g in growth] == [{k: g[k] for k in keys} for g in ref_growth]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def truncate(path):  # a crash in the middle of a write: the sidecar no longer matches
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def replace_keeping_the_sidecar(path):  # matches its sidecar, yet is no torch file
    path.write_bytes(b"not a torch file, but its checksum matches")
    path.with_name(path.name + ".sha256").write_text(checkpoint.sha256(path))


@pytest.mark.parametrize("damage,warning", [(truncate, "corrupt"), (replace_keeping_the_sidecar, "does not load")])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, cache_dir, reference, damage, warning):
    kill_when_logged(tmp_path, MSG_RUN, cache_dir, 13)
    ckpts = [p for p in checkpoint.list_checkpoints(tmp_path) if checkpoint.is_valid(p)]
    assert len(ckpts) >= 2
    damage(ckpts[-1])
    r = run_to_end(tmp_path, MSG_RUN, cache_dir)
    assert warning in r.stdout and f"resuming from {ckpts[-2]}" in r.stdout
    assert exact(read_jsonl(tmp_path / "metrics.jsonl")) == exact(reference["msg"][0])


def test_checkpoints_load_without_executing_code(tmp_path, cache_dir):
    kill_when_logged(tmp_path, MSG_RUN, cache_dir, 4)
    path = checkpoint.newest_valid(tmp_path)
    state = torch.load(path, weights_only=True)  # raises if the file needs pickled code
    assert {"model", "optimizer", "rng", "engine", "counters"} <= state.keys()


def stop_when_logged(run_dir, overrides, cache_dir, step, sig):
    """The run must stop by itself on `sig`, with a checkpoint, and exit 128 + sig."""
    rc, out, err = signal_when_logged(run_dir, overrides, cache_dir, step, sig)
    assert rc == 128 + sig, (rc, err[-3000:])
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err, err[-3000:]
    return out, err


# no checkpoints by step count: every checkpoint after growth comes from the signal
SIGNALLED_MSG_RUN = [o for o in MSG_RUN if not o.startswith(("train.checkpoint_every", "train.keep_checkpoints"))]


def test_signals_stop_with_a_checkpoint_and_the_rerun_equals_an_uninterrupted_run(tmp_path, cache_dir, reference):
    """SIGTERM inside the first MSG ramp (steps 8-14), SIGUSR1 inside the second (20-26): each
    run finishes its step, writes a checkpoint at the last logged step (no work lost), says
    "interrupted" in summary.json, and the final rerun's metrics equal an uninterrupted run's."""
    for step, sig in ((11, signal.SIGTERM), (22, signal.SIGUSR1)):
        stop_when_logged(tmp_path, SIGNALLED_MSG_RUN, cache_dir, step, sig)
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["status"] == "interrupted" and signal.Signals(sig).name in summary["error"]
        last_logged = read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"]
        newest = checkpoint.newest_valid(tmp_path, warn=lambda *_: None)
        assert newest is not None and newest.name == f"step_{last_logged:09d}.pt"
        assert last_logged >= step
    r = run_to_end(tmp_path, SIGNALLED_MSG_RUN, cache_dir)
    assert "resuming from" in r.stdout
    assert exact(read_jsonl(tmp_path / "metrics.jsonl")) == exact(reference["msg"][0])
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_a_failed_checkpoint_write_is_one_paragraph_and_keeps_the_previous_ones(tmp_path, cache_dir):
    """A file-size limit (as `ulimit -f` sets) below the grown model's checkpoint: the write after
    the second growth event fails. One paragraph, exit 2, no temporary file, the earlier
    checkpoints kept and loadable."""
    import resource

    limit = 6 * 2**20  # above the checkpoints of the first two shapes, below the final shape's

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(command(tmp_path, MSG_RUN), env=env(cache_dir), capture_output=True, text=True, timeout=300,
                       preexec_fn=set_limit)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Could not write checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert "previous checkpoints are kept" in r.stderr
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    kept = [p for p in checkpoint.list_checkpoints(tmp_path) if checkpoint.is_valid(p)]
    assert len(kept) >= 2 and all(p.stat().st_size < limit for p in kept)
    assert checkpoint.newest_loadable(tmp_path, warn=lambda *_: None)[0] == kept[-1]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.head_dim=16", "model.ffn=64", "model.seq_len=32",
        "train.batch_size=4", "train.eval_tokens=256", "train.preflight=false", "train.log_every=2",
        "train.eval_every=2", "optim.warmup_steps=2"]


def test_a_checkpoint_that_does_not_load_counts_for_nothing(tmp_path, make_cfg):
    """Issue 28, case 4: retention counted a checkpoint that matched its checksum but did not load
    as one of the newest and deleted a good one; msgrun-export then failed on the bad file instead
    of falling back to the newest checkpoint that loads."""
    from msgrun.export import load_checkpoint
    from msgrun.train import Trainer

    cfg = make_cfg(*TINY, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    trainer = Trainer(cfg, tmp_path)
    trainer.run()
    two, four = checkpoint.list_checkpoints(tmp_path)
    replace_keeping_the_sidecar(four)
    trainer.step = 6
    six = trainer.save_checkpoint()
    assert checkpoint.list_checkpoints(tmp_path) == [two, four, six]  # the bad one is no good one: step 2 stays

    replace_keeping_the_sidecar(six)
    warnings = []
    assert checkpoint.newest_loadable(tmp_path, warn=warnings.append)[0] == two
    assert len(warnings) == 2 and all("does not load" in w for w in warnings)
    ckpt, state = load_checkpoint(tmp_path, None)
    assert ckpt == two and state["counters"]["step"] == 2
