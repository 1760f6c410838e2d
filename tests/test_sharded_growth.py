"""Sharded growth (growth/sharded.py): 2 gloo processes grow an FSDP2 model one parameter at a
time and get the single-process growth: the same parameters and AdamW state, and logits within
1e-5 before and after training steps through the ramp (tests/sharded_growth_worker.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["model.layers=2", "model.hidden=64", "model.heads=2", "model.ffn=128"]
CASES = {  # one event per case: its dimension(s) and operator
    "msg-layers": ["schedule=layers_only", "operator=msg"],
    "msg-hidden": ["schedule=hidden_only", "operator=msg"],
    "msg-heads": ["schedule=heads_only", "operator=msg"],
    "msg-ffn": ["schedule=ffn_only", "operator=msg"],
    # copies with symmetry noise drawn after every transplant; new layers without AdamW state
    "bert2bert-width": ["schedule=width_only", "operator=bert2bert"],
    # identity entry: zeroed output projections on interleaved copies
    "llama_pro-layers": ["schedule=block_expansion", "operator=llama_pro", "model.layers=4"],
}


def grow_in_two_processes(overrides):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    tests = Path(__file__).parent
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(tests / "sharded_growth_worker.py"),
                        str(tests), json.dumps(overrides)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_growth_equals_single_process_growth(case):
    r = grow_in_two_processes([*SMALL, *CASES[case]])
    assert "unsupported" not in r, r
    assert r["masked"] and r["optim_names"], r
    assert r["params"] == 0.0 and r["optim"] == 0.0, r  # the same numbers, drawn in the same order
    assert max(r["logits"]) <= 1e-5, r


def test_a_method_that_rewrites_the_whole_model_says_why_it_gathers():
    r = grow_in_two_processes([*SMALL, "schedule=ffn_only", "operator=bert2bert", "operator.variant=aki"])
    assert "operator.ffn=aki rewrites the grown model as a whole" in r["unsupported"]
