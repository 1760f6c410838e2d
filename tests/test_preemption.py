"""Signals: the handler msgrun installs, and a sweep stopped by SIGTERM that a rerun completes."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msgrun.preemption import StopSignals

from conftest import FAST


def test_a_signal_is_a_request_and_a_launchers_handler_runs_after_the_checkpoint():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # as submitit's
    try:
        with StopSignals() as stop:
            signal.raise_signal(signal.SIGUSR2)
            assert stop.signum == signal.SIGUSR2 and calls == []  # nothing stopped yet: the step finishes
            e = stop.interrupted(stop.signum, 7, "ckpt")
        assert e.exit_code == 128 + signal.SIGUSR2 and "after step 7" in str(e)
        e.chain()  # after the checkpoint: submitit requeues here
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is not stop._handle  # restored on exit
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_second_ctrl_c_stops_at_once():
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_stopped_sweep_rerun_resumes_its_unfinished_job_and_skips_the_finished_one(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "msgrun", "-m", *FAST, "train.max_steps=30", "train.log_every=1", "train.threads=1",
           "train.seed=0,1", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "MSGRUN_CACHE": cache_dir}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = sweep / "1" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "interrupted"
    job0 = {p: p.read_bytes() for p in sorted((sweep / "0").rglob("*")) if p.is_file()}

    printed = err.split("To continue exactly where it stopped, run:\n")[1].splitlines()[0].strip()
    assert printed == shlex.join(["msgrun", *cmd[3:-1], f"hydra.sweep.dir={sweep}"])  # the sweep, not the job
    r = subprocess.run([*cmd[:3], *shlex.split(printed)[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished run; not trained again" in r.stderr and "resuming from" in r.stdout
    assert {p: p.read_bytes() for p in sorted((sweep / "0").rglob("*")) if p.is_file()} == job0
    jobs = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["status"] for j in jobs] == ["completed", "completed"]
    assert [json.loads(line)["step"] for line in (sweep / "1" / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 31))


def test_a_stopped_run_prints_the_exact_command_that_resumes_it(tmp_path, cache_dir):
    """On the default timestamped run directory, rerunning the command as typed would start a new
    run: the message carries the command with hydra.run.dir=<this run>, and that command resumes."""
    args = [*FAST, "train.max_steps=30", "train.log_every=1", "train.threads=1"]
    env = {**os.environ, "MSGRUN_CACHE": cache_dir}
    proc = subprocess.Popen([sys.executable, "-m", "msgrun", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = list(tmp_path.glob("outputs/*/*/metrics.jsonl"))
        if metrics and len(metrics[0].read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    [run_dir] = tmp_path.glob("outputs/*/*")
    printed = err.split("To continue exactly where it stopped, run:\n")[1].splitlines()[0].strip()
    assert printed == shlex.join(["msgrun", *args, f"hydra.run.dir={run_dir}"])

    time.sleep(1.1)  # a rerun as typed would now get another timestamped directory
    r = subprocess.run([sys.executable, "-m", "msgrun", *shlex.split(printed)[1:]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and list(tmp_path.glob("outputs/*/*")) == [run_dir]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
