"""bench/data.py runs end to end on a tiny corpus (its figures are read from its output, never asserted)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "data.py"


def test_data_bench_runs_and_cleans_up(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--tokens", "2000000", "--steps", "1", "--prepare-docs", "20",
                        "--dir", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for figure in ("peak RSS", "read batch", "train step", "tokens/s"):
        assert figure in r.stdout
    assert list(tmp_path.iterdir()) == []  # the corpus is deleted
