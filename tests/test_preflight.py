"""The memory pre-flight: it replays the run's last growth event and a final-shape step before
training, changes nothing about the run, and turns an out-of-memory into a clear error before
the run directory is touched."""

import json

import pytest
import torch

from msgrun.growth.engine import GrowthEngine
from msgrun.model import Transformer
from msgrun.preflight import OutOfMemory
from msgrun.train import Trainer

from conftest import read_jsonl

GROWING = ["schedule=depth_first", "operator=msg", "operator.ramp_steps=1", "train.max_steps=12",
           "train.log_every=2", "model.dropout=0.1"]  # dropout: the pre-flight's RNG draws must not leak


def test_preflight_leaves_the_run_unchanged(make_cfg, tmp_path):
    runs = {}
    for flag in ("true", "false"):
        cfg = make_cfg(*GROWING, f"train.preflight={flag}")
        summary = Trainer(cfg, tmp_path / flag).run()
        runs[flag] = ([m["loss"] for m in read_jsonl(tmp_path / flag / "metrics.jsonl")], summary)
    assert runs["true"][0] == runs["false"][0]
    report = runs["true"][1]["preflight"]
    assert report["final_shape"] == runs["true"][1]["final_shape"]
    assert report["micro_batch_rows"] == 8 and "growth_peak_bytes" in report  # the last event was replayed
    assert runs["false"][1]["preflight"] is None


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("target,attr,phase", [
    (Transformer, "forward", "one training step at the final shape (8 sequences per micro-batch)"),
    (GrowthEngine, "build_grown", "growing it to the final shape (stage 1, hidden, heads, ffn)"),
])
def test_out_of_memory_is_one_paragraph_before_the_run_directory_is_touched(make_cfg, tmp_path, monkeypatch,
                                                                             target, attr, phase):
    run = tmp_path / "run"
    Trainer(make_cfg(*GROWING), run).run()
    (run / "summary.json").unlink()  # an interrupted run: resumable, so a bug here could damage it
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    trainer = Trainer(make_cfg(*GROWING), run)
    monkeypatch.setattr(target, attr, oom)
    with pytest.raises(OutOfMemory) as error:
        trainer.run()
    message = str(error.value)
    assert f"Out of memory in the pre-flight, {phase}" in message
    for key in ("train.batch_size = 8", "train.grad_accum", "train.distributed=fsdp", "Nothing was trained"):
        assert key in message
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    assert "status" not in json.dumps(files.get("summary.json", b"").decode())
