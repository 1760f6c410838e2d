"""One wandb run per run directory, across kills, preemption and resumes (offline mode)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, compose_cfg

RUN = ["logger=wandb", "logger.wandb.mode=offline", "train.max_steps=30", "train.log_every=1", "train.eval_every=10",
       "train.checkpoint_every=5", "train.threads=1"]


def offline_history(path: Path) -> tuple[set, list]:
    """Run ids and history steps in an offline run file (run-<id>.wandb): a LevelDB-style log of
    protobuf records (a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header:
    checksum, little-endian length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    ids, steps = set(), []
    while pos + 7 <= len(data):
        left = block - pos % block
        kind = data[pos + 6] if left >= 7 else 0
        if kind == 0:  # the rest of a block is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                steps.append(record.history.step.num)
            elif record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
    return ids, steps


def start(run_dir, cache_dir):
    args = [a for a in FAST if not a.startswith("logger=")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(MSGRUN_CACHE=cache_dir, WANDB_SILENT="true")
    return subprocess.Popen([sys.executable, "-m", "msgrun", *args, *RUN, f"hydra.run.dir={run_dir}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_at(proc, run_dir, step, sig):
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    proc.communicate(timeout=240)


def test_one_wandb_run_across_a_kill_a_preemption_and_resumes(tmp_path, cache_dir):
    """SIGKILL at step 12 (its offline file gets no history: the resume backfills steps 1-10
    from metrics.jsonl), SIGTERM at step 20 (finishes cleanly: the resume does not log again
    what it rewinds over), then to the end: every segment is the same run id, and the history
    holds every step 1..30 exactly once."""
    proc = start(tmp_path, cache_dir)
    signal_at(proc, tmp_path, 12, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    proc = start(tmp_path, cache_dir)
    signal_at(proc, tmp_path, 20, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    proc = start(tmp_path, cache_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    run_id = json.loads((tmp_path / "wandb.json").read_text())["id"]
    segments = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(segments) == 3 and all(s.name.endswith(f"-{run_id}") for s in segments)
    steps = []
    for s in segments:
        ids, seg_steps = offline_history(s / f"run-{run_id}.wandb")
        assert ids <= {run_id}
        steps += seg_steps
    assert steps == list(range(1, 31))
    assert f"wandb sync {tmp_path}/wandb/offline-run-*" in out


@pytest.mark.parametrize("env,override,expected", [
    ({}, [], "offline"),
    ({"WANDB_MODE": "disabled"}, [], "disabled"),
    ({"WANDB_MODE": "disabled"}, ["logger.wandb.mode=offline"], "offline"),  # as in wandb: explicit beats env
])
def test_wandb_mode_follows_the_environment_unless_given(monkeypatch, env, override, expected):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert compose_cfg(["logger=wandb", *override]).logger.wandb.mode == expected
