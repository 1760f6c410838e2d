"""train.compile=true: the wait for torch.compile is announced and accounted as compile time, at
the start and after a growth event, never as silent step time. torch.compile's own cost is
simulated here (a CPU compile takes minutes on 2 cores); tests/test_gpu.py compiles for real."""

import time

from torch._dynamo.utils import counters

from msgrun.model import Transformer
from msgrun.train import Trainer

from conftest import read_jsonl

COMPILE_S = 0.6


def test_compile_time_is_announced_and_kept_out_of_step_time(make_cfg, tmp_path, capsys, monkeypatch):
    forward = Transformer.forward

    def compile_units(self):  # as torch.compile: nothing now, the cost on the first training call
        self.pending_compile = True

    compiled_calls = []

    def slow_first_forward(self, *args, **kwargs):
        if self.training and getattr(self, "pending_compile", False):
            self.pending_compile = False
            compiled_calls.append(1)
            time.sleep(COMPILE_S)
        elif self.training and len(compiled_calls) == 2:  # the first training call after growth's compile:
            compiled_calls.append(1)  # then, as if Dynamo recompiled a unit (MSG's masks dropped)
            counters["frames"]["ok"] += 1
            time.sleep(COMPILE_S)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "compile_units", compile_units)
    monkeypatch.setattr(Transformer, "forward", slow_first_forward)
    cfg = make_cfg("train.compile=true", "train.max_steps=8", "train.log_every=1", "train.eval_every=8",
                   "model.layers=2", "schedule=layers_only", "operator=msg", "operator.ramp_steps=2",
                   "optim.warmup_steps=2")
    summary = Trainer(cfg, tmp_path / "run").run()
    out = capsys.readouterr().out
    assert out.count("compiling (train.compile=true)") == 2 and out.count("compiled: the first step") == 2
    assert out.count("recompiled for shape") == 1

    lines = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    [grown] = read_jsonl(tmp_path / "run" / "growth.jsonl")
    compiled = {m["step"]: m["compile_seconds"] for m in lines if "compile_seconds" in m}
    # the first step, the first after growth, and the step after it, which recompiled
    assert set(compiled) == {1, grown["step"] + 1, grown["step"] + 2}
    assert all(s >= COMPILE_S for s in compiled.values())
    assert summary["compile_seconds"] >= 3 * COMPILE_S
    # the compile wait is wall-clock (the user waited for it) but never step time: a compile
    # step's window has no timed tokens, the other windows' throughput is the steps' own
    assert all("tokens_per_s" not in m for m in lines if m["step"] in compiled)  # log_every=1: nothing timed
    assert all(m["tokens_per_s"] > 0 for m in lines if m["step"] not in compiled)
    assert summary["wall_time"] >= 2 * COMPILE_S
