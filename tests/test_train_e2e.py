"""End to end through Hydra's compose API: the run directory contract of docs/architecture.md section 3."""

import json
import math

import pytest

from msgrun.train import Trainer

from conftest import read_jsonl

REQUIRED = {"step", "tokens", "flops", "wall_time", "loss", "lr", "layers", "hidden", "heads", "ffn", "seq_len", "params"}


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny", "llama_tiny"])
def test_tiny_run_writes_the_contract(make_cfg, tmp_path, model):
    cfg = make_cfg(f"model={model}", "train.max_steps=30", "train.lr=3e-3")
    summary = Trainer(cfg, tmp_path, {"model": model}).run()
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    for m in metrics:
        assert REQUIRED <= m.keys()
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [10, 20, 30] and all(m["val_bpb"] > 0 for m in evals)
    flops = [m["flops"] for m in metrics]
    assert all(b > a for a, b in zip(flops, flops[1:]))
    assert [m["tokens"] for m in metrics] == [5 * 8 * 128 * (i + 1) for i in range(6)]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5  # it learns
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["flops"] == flops[-1] and on_disk["steps"] == 30
    for key in ("data_fingerprint", "tokenizer_fingerprint", "git_commit", "git_dirty", "versions", "device"):
        assert key in on_disk
    assert math.isclose(on_disk["final_val_bpb"], evals[-1]["val_bpb"])
    assert summary["final_val_loss"] == evals[-1]["val_loss"]


def test_token_budget_stops_the_run(make_cfg, tmp_path):
    cfg = make_cfg("train.max_steps=1000", "train.max_tokens=20480")
    Trainer(cfg, tmp_path).run()
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["tokens"] == 20480 and last["step"] == 20


def test_flops_count_follows_the_executed_shape(make_cfg, tmp_path):
    """FLOPs per step at the start shape, then at the grown shape, exactly as flops.py says."""
    from msgrun.flops import train_flops
    from msgrun.model import ModelArgs

    cfg = make_cfg("schedule=layers_only", "operator=msg", "operator.ramp_steps=2", "train.max_steps=10",
                   "train.log_every=1", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=4")
    trainer = Trainer(cfg, tmp_path)
    trainer.run()
    m = read_jsonl(tmp_path / "metrics.jsonl")
    per_step = [b["flops"] - a["flops"] for a, b in zip([{"flops": 0}] + m, m)]
    small = ModelArgs(**{**vars(trainer.model.args), "layers": 2})
    assert per_step[0] == train_flops(small, 8, 128)
    assert per_step[-1] == train_flops(trainer.model.args, 8, 128)


def test_default_wandb_logger_runs_offline_without_an_api_key(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no ~/.netrc, no settings
    cfg = make_cfg("logger=wandb", "train.max_steps=10", "schedule=layers_only", "operator=msg",
                   "operator.ramp_steps=2", "schedule.stages.0.at_fraction=0.5")
    assert cfg.logger.wandb.mode == "offline"
    Trainer(cfg, tmp_path, {"model": "gpt_tiny", "schedule": "layers_only", "operator": "msg"}).run()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # `wandb sync` uploads this later
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_gradient_accumulation_equals_the_full_batch(make_cfg, tmp_path):
    """Micro-batches sum to the same gradient: the same losses step by step."""
    runs = []
    for accum in (1, 4):
        d = tmp_path / f"accum{accum}"
        Trainer(make_cfg("train.max_steps=6", "train.log_every=1", f"train.grad_accum={accum}"), d).run()
        runs.append([m["loss"] for m in read_jsonl(d / "metrics.jsonl")])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5, abs=1e-5)


def test_repeating_data_is_counted_and_warned(make_cfg, tmp_path, capsys):
    cfg = make_cfg("data.max_docs=6", "data.val_fraction=0.34", "train.max_steps=40", "train.eval_tokens=512")
    trainer = Trainer(cfg, tmp_path)
    trainer.run()
    epochs = [m["epoch"] for m in read_jsonl(tmp_path / "metrics.jsonl")]
    assert epochs == sorted(epochs) and epochs[-1] >= 1
    assert "training data repeats" in capsys.readouterr().out
    assert json.loads((tmp_path / "summary.json").read_text())["data"]["epochs"] > 1


def test_nonfinite_loss_stops_with_the_step_and_last_checkpoint(make_cfg, tmp_path):
    from msgrun.train import NonFiniteLoss

    cfg = make_cfg("train.max_steps=60", "train.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0",
                   "train.checkpoint_every=5")
    with pytest.raises(NonFiniteLoss, match=r"between steps \d+ and \d+.*(checkpoint|No checkpoint)"):
        Trainer(cfg, tmp_path).run()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_skip_nonfinite_counts_skipped_steps(make_cfg, tmp_path):
    cfg = make_cfg("train.max_steps=30", "train.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0",
                   "train.skip_nonfinite=true")
    Trainer(cfg, tmp_path).run()
    skipped = sum(m.get("skipped_steps", 0) for m in read_jsonl(tmp_path / "metrics.jsonl"))
    assert skipped > 0
