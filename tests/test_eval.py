"""Downstream evaluation (eval group): perplexity by msgrun, the bundled lm-eval task offline."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msgrun import checkpoint, data
from msgrun.errors import ConfigError
from msgrun.export import checkpoint_model
from msgrun.train import Trainer

from conftest import read_jsonl

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
pytest.importorskip("lm_eval")

TASK = Path(__file__).parents[1] / "msgrun" / "eval_tasks" / "msgrun_pycode" / "msgrun_pycode.jsonl"
SMALL = ["model.layers=2", "model.hidden=64", "model.heads=2", "model.head_dim=32", "model.ffn=160", "model.seq_len=32",
         "model.dropout=0.1", "train.max_steps=10", "train.eval_every=10", "schedule=layers_only", "operator=msg",
         "operator.ramp_steps=2", "operator.ramp_start=increment",  # the ramp is over before step 5's lm-eval
         "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=3"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    (d / "real.py").write_text(Path(json.__file__).with_name("decoder.py").read_text())
    rng = random.Random(0)
    (d / "noise.txt").write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz{}[]();:=+-*/ \n") for _ in range(6000)))
    return d


def ppl_overrides(texts):
    return [f"+eval.perplexity.real={{name: files, paths: ['{texts / 'real.py'}']}}",
            f"+eval.perplexity.noise={{name: files, paths: ['{texts / 'noise.txt'}']}}"]


def lm_eval_accuracy(model, tok_path: str, max_len: int) -> tuple[float, float]:
    """The example task's acc and acc_norm recomputed from msgrun's own logits, with lm-eval's
    rules: trailing spaces of the context move to the continuation; the continuation's tokens are
    those of context + continuation after the context's; the choice with the largest
    log-likelihood wins (acc_norm: divided by the choice's length in characters)."""
    tok, _ = data.load_tokenizer(tok_path)
    tok.encode_special_tokens = False
    correct, correct_norm = [], []
    for line in TASK.read_text().splitlines():
        doc = json.loads(line)
        scores = []
        for choice in doc["choices"]:
            context, cont = doc["context"], choice
            n = len(context) - len(context.rstrip())
            if n:
                context, cont = context[:-n], context[-n:] + cont
            whole, ctx = tok.encode(context + cont).ids, tok.encode(context).ids
            cont_ids = whole[len(ctx):]
            ids = torch.tensor([(ctx + cont_ids)[-(max_len + 1):][:-1]])  # lm-eval truncates on the left
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0, -len(cont_ids):].double(), -1)
            scores.append(sum(logp[i, t].item() for i, t in enumerate(cont_ids)))
        normed = [sc / len(ch) for sc, ch in zip(scores, doc["choices"])]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
        correct_norm.append(max(range(len(normed)), key=normed.__getitem__) == doc["label"])
    return sum(correct) / len(correct), sum(correct_norm) / len(correct_norm)


def test_example_task_runs_offline_and_lands_in_summary(make_cfg, tmp_path, texts):
    cfg = make_cfg(*SMALL, "eval=example", "eval.every=5", "eval.at_growth=true", *ppl_overrides(texts))
    summary = Trainer(cfg, tmp_path).run()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    lines = [m for m in read_jsonl(tmp_path / "metrics.jsonl") if "eval_at" in m]
    # before the growth event (step 3), every 5 steps (5; not 10: that is the end), and at the end
    assert [(m["eval_at"], m["step"]) for m in lines] == [("growth", 3), ("step", 5), ("end", 10)]
    for m in lines:
        assert 0.0 <= m["eval/msgrun_pycode/acc"] <= 1.0 and "eval/msgrun_pycode/acc_norm" in m
        assert m["eval/real/ppl"] == pytest.approx(torch.tensor(m["eval/real/loss"]).exp().item())
    end = lines[-1]
    assert {k: v for k, v in on_disk.items() if k.startswith("eval/")} == \
        {k: v for k, v in end.items() if k.startswith("eval/")} == {k: v for k, v in summary.items() if k.startswith("eval/")}
    # training shows in the held-out perplexity; per byte, Python is far more predictable than noise
    assert lines[0]["eval/real/ppl"] > lines[1]["eval/real/ppl"] > end["eval/real/ppl"]
    assert end["eval/real/bpb"] < end["eval/noise/bpb"] and end["eval/real/tokens"] > 500
    # lm-eval scored the exported model: the same accuracy as msgrun's own logits give
    state = torch.load(checkpoint.newest_valid(tmp_path), map_location="cpu", weights_only=True)
    model = checkpoint_model(state)
    tok_path = data.prepare_data(cfg.data, log=lambda *_: None).tokenizer_path
    acc, acc_norm = lm_eval_accuracy(model, tok_path, 32)
    assert (end["eval/msgrun_pycode/acc"], end["eval/msgrun_pycode/acc_norm"]) == pytest.approx((acc, acc_norm))


def test_evaluation_leaves_training_untouched(make_cfg, tmp_path, texts):
    """lm-eval seeds python, numpy and torch: with dropout on, a run that evaluates every 5
    steps must still train exactly as one that does not."""
    losses = []
    for name, extra in (("plain", []), ("eval", ["eval=example", "eval.every=5", "eval.at_growth=true",
                                                 *ppl_overrides(texts)])):
        Trainer(make_cfg(*SMALL, "train.log_every=1", *extra), tmp_path / name).run()
        losses.append([m["loss"] for m in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in m])
    assert len(losses[0]) == 10 and losses[0] == losses[1]


def test_bad_eval_config_is_refused_before_training(make_cfg, tmp_path, texts):
    cases = [
        (["eval.lm_eval.tasks=[no_such_task_xyz]"], r"\['no_such_task_xyz'\] are not lm-evaluation-harness tasks.*msgrun_pycode"),
        (["model=bert_tiny", "eval=example"], "needs a causal model"),
        (["+eval.perplexity.gone={name: files, paths: ['/nonexistent/x.txt']}"], r"eval.perplexity.gone.*does not exist"),
        (["eval=example", "eval.lm_eval.include_path=/nonexistent"], "include_path = /nonexistent: no such directory"),
        (["model.hidden=96", "model.heads=3", "model.head_dim=16", "eval=example"], "heads x model.head_dim == model.hidden"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(make_cfg("train.max_steps=2", *overrides), tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_bert_perplexity_is_the_masked_token_loss(make_cfg, tmp_path, texts):
    cfg = make_cfg("model=bert_tiny", "model.layers=2", "model.seq_len=32", "train.max_steps=4",
                   f"+eval.perplexity.real={{name: files, paths: ['{texts / 'real.py'}'], max_tokens: 2000}}")
    summary = Trainer(cfg, tmp_path).run()
    # 2000 tokens in windows of 33, 15% of each window's 32 positions predicted: 60 windows x 5
    assert summary["eval/real/tokens"] == 60 * 5
    assert 0 < summary["eval/real/loss"] < 2 * math.log(512) and summary["eval/real/bpb"] > 0


def test_cli_refuses_lm_eval_on_bert_with_exit_code_2(tmp_path, cache_dir):
    from conftest import FAST

    r = subprocess.run([sys.executable, "-m", "msgrun", "model=bert_tiny", "eval=example", *FAST,
                        f"data.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs a causal model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_evaluate_like_one(tmp_path, cache_dir, texts, mode):
    """Every rank computes the perplexity (FSDP's forward is a collective), rank 0 runs lm-eval on
    the gathered weights, and the results match a single process's."""
    import shutil

    from conftest import FAST

    common = [*FAST, "train.threads=1", "model.layers=2", "model.hidden=64", "model.heads=2", "model.ffn=128",
              "model.seq_len=32", "train.max_steps=6", "eval=example",
              f"+eval.perplexity.real={{name: files, paths: ['{texts / 'real.py'}']}}", f"data.cache_dir={cache_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    summaries = []
    for name, launcher in (("one", [sys.executable, "-m", "msgrun"]),
                           ("two", [torchrun, "--standalone", "--nproc_per_node=2", "-m", "msgrun",
                                    f"train.distributed={mode}"])):
        r = subprocess.run([*launcher, *common, f"hydra.run.dir={tmp_path / name}"], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    keys = {k for k in summaries[0] if k.startswith("eval/")}
    assert {"eval/real/ppl", "eval/msgrun_pycode/acc"} <= keys and keys == {k for k in summaries[1] if k.startswith("eval/")}
    for k in keys:
        assert summaries[1][k] == pytest.approx(summaries[0][k], rel=1e-3), k


def test_a_hub_dataset_without_network_is_refused_from_the_cache_at_once(make_cfg, tmp_path, monkeypatch):
    """eval=wikitext2 without network: the hub client retried for ~30 s before the refusal. With
    the hub unreachable the dataset is looked up in offline mode (the cache only), and the
    refusal says so."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    from msgrun import evaluate

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as a user without HF_HUB_OFFLINE set
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(evaluate, "hub_reachable", lambda timeout=3.0: False)
    seen = []
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))  # wikitext is surely not in it
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache", raising=False)
    with pytest.raises(ConfigError, match=r"eval.perplexity.wikitext2: wikitext .*cannot be reached"):
        Trainer(make_cfg("train.max_steps=2", "eval=wikitext2"), tmp_path / "run")
    assert seen == [True]  # asked in offline mode: no network retries
    assert constants.HF_HUB_OFFLINE is False  # and the switch is put back
    assert not (tmp_path / "run").exists()
