"""The benchmark scripts run end to end (on CPU, tiny shapes, a step or two per figure), so the
GPU session that needs them finds them working. Their figures are not checked here: speed goals
are read from the scripts' output on a GPU, never asserted in tests."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench(*args, cwd):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_gpu_goals_report_runs_and_writes_every_table(tmp_path):
    out, profile = tmp_path / "goals.md", tmp_path / "profile.txt"
    bench(str(BENCH / "gpu_goals.py"), "--models", "gpt_tiny", "--stage-model", "gpt_tiny", "--steps", "1",
          "--warmup", "1", "--event-steps", "1", "--events", "layers_only", "--stages", "--out", str(out),
          "--profile", str(profile), cwd=tmp_path)
    text = out.read_text()
    for heading in ("Baseline step against the reference step", "Each stage of schedule=depth_first",
                    "Growth events on gpt_tiny", "Goals"):
        assert f"## {heading}" in text
    goals = text.split("## Goals")[1]
    # eager on the CPU: the baseline against the reference (no compiled-vs-eager goal), ramp and
    # event time for the one event, one per stage of depth_first (start + 2 stages)
    assert goals.count("| met |") + goals.count("| missed |") == 1 + 2 + 3
    assert "aten::mm" in profile.read_text()  # the step's matmuls, by self time


def test_throughput_script_prints_the_comparison(tmp_path):
    stdout = bench(str(BENCH / "throughput.py"), "--model", "gpt_tiny", "--steps", "2", "--rounds", "2",
                   "--warmup", "1", cwd=tmp_path)
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("gpt_tiny: msgrun / reference tokens/s ") and "median of 2 interleaved rounds" in last


def test_sharded_growth_bench_prints_both_ways_per_rank(tmp_path):
    stdout = bench(str(BENCH / "sharded_growth.py"), "--layers", "2", "--hidden", "128", "--vocab", "1024",
                   "--worlds", "2", "--tmp", str(tmp_path), cwd=tmp_path)
    rows = [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"] and "sharded event" in stdout and "gathered event" in stdout
    assert not list(tmp_path.glob("msgrun-bench-ckpt-*"))  # its checkpoints are removed
