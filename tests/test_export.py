"""msgrun-export: grown runs of each family load in `transformers` with msgrun's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msgrun import checkpoint
from msgrun.export import ExportError, checkpoint_model, export_run, hf_architecture
from msgrun.model import ModelArgs, Transformer
from msgrun.train import Trainer

from conftest import read_jsonl

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
transformers = pytest.importorskip("transformers")

# odd shapes, grown in every dimension by a real growth event; the ramp ends long before the last step
SHORT = ["model.seq_len=32", "data.vocab_size=500", "train.max_steps=10", "train.eval_every=10",
         "schedule=all_at_once", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=3"]
RUNS = {
    "gpt2": ["model=gpt_tiny", "model.layers=3", "model.hidden=96", "model.heads=3", "model.head_dim=32",
             "model.ffn=200", "operator=msg", "operator.ramp_steps=2"],
    # head_dim free in LLaMA: 3 x 18 = 54 != hidden 90; untied head, biases off, eps 1e-6
    "llama": ["model=llama_tiny", "model.layers=3", "model.hidden=90", "model.heads=3", "model.head_dim=18",
              "model.ffn=136", "operator=msg", "operator.ramp_steps=2"],
    "bert": ["model=bert_tiny", "model.layers=3", "model.hidden=96", "model.heads=3", "model.head_dim=32",
             "model.ffn=200", "operator=bert2bert", "train.lr=3e-3"],
}
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}


@pytest.fixture(scope="module")
def grown_runs(tmp_path_factory, cache_dir):
    from conftest import compose_cfg

    runs = {}
    for name, overrides in RUNS.items():
        run_dir = tmp_path_factory.mktemp(f"run_{name}")
        Trainer(compose_cfg([*SHORT, *overrides], cache_dir), run_dir).run()
        events = read_jsonl(run_dir / "growth.jsonl")
        assert len(events) == 1 and set(events[0]["dims"]) == {"layers", "hidden", "heads", "ffn"}
        runs[name] = run_dir
    return runs


def held_out_ids(run_dir: Path, n: int = 32) -> torch.Tensor:
    """Real token ids: the run's own tokenizer on a standard-library file it may never have seen."""
    from msgrun.export import find_tokenizer
    from msgrun import data

    state = torch.load(checkpoint.newest_valid(run_dir), map_location="cpu", weights_only=True)
    path = find_tokenizer(json.loads(state["config"]), state["fingerprints"], None)
    tok, _ = data.load_tokenizer(path)
    text = Path(json.__file__).read_text()
    return torch.tensor([tok.encode(text).ids[:n]]), path, state


@pytest.mark.parametrize("name", list(RUNS))
def test_export_matches_msgrun_logits(grown_runs, tmp_path, name):
    run_dir = grown_runs[name]
    info = export_run(run_dir, tmp_path / "hf")
    assert info["architecture"] == CLASSES[name] and info["max_abs_logit_diff"] < 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json", "msgrun_export.json"} <= \
        {p.name for p in (tmp_path / "hf").iterdir()}
    auto = transformers.AutoModelForMaskedLM if name == "bert" else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == CLASSES[name]

    ids, tok_path, state = held_out_ids(run_dir)
    ours = checkpoint_model(state)
    assert ours.args.layers == 3 and (ours.args.hidden, ours.args.ffn) == ((90, 136) if name == "llama" else (96, 200))
    with torch.no_grad():
        expected = ours(ids)
        got = hf(input_ids=ids).logits
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logit diff| {diff}"
    assert expected.abs().max() > 1.0  # a trained model, not zeros on both sides

    # the exported tokenizer gives the run's ids, and AutoTokenizer finds it
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = Path(json.__file__).read_text()[:2000]
    from msgrun import data

    run_tok, _ = data.load_tokenizer(tok_path)
    assert tok(text)["input_ids"] == run_tok.encode(text).ids
    assert tok.eos_token == data.EOT and tok.mask_token == data.MASK
    assert tok.convert_tokens_to_ids(data.MASK) == run_tok.token_to_id(data.MASK)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_export_generates(grown_runs, tmp_path, name):
    export_run(grown_runs[name], tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = tok("def main(", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8 or tok.eos_token_id in out[0].tolist()
    assert isinstance(tok.decode(out[0]), str) and tok.decode(out[0]).startswith("def main(")
    # greedy generation is msgrun's argmax, token by token
    ids = prompt["input_ids"]
    state = torch.load(checkpoint.newest_valid(grown_runs[name]), map_location="cpu", weights_only=True)
    ours = checkpoint_model(state)
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, ours(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out[0].tolist() == ids[0, :out.shape[1]].tolist()


def test_mid_ramp_checkpoint_is_refused(grown_runs, tmp_path):
    """The checkpoint written at the growth event carries MSG's masks (alpha = 0)."""
    at_event = checkpoint.checkpoint_dir(grown_runs["gpt2"]) / "step_000000003.pt"
    if not at_event.exists():  # keep_checkpoints pruned it: the refusal is tested on the live model instead
        pytest.skip("the growth-event checkpoint was pruned")
    with pytest.raises(ExportError, match="MSG ramp"):
        export_run(grown_runs["gpt2"], tmp_path / "hf", checkpoint_path=str(at_event))
    assert not (tmp_path / "hf").exists()


def test_shapes_no_hf_class_expresses_are_refused():
    with pytest.raises(ExportError, match=r"heads x model.head_dim == model.hidden"):
        hf_architecture(ModelArgs(vocab_size=64, hidden=80, heads=3, head_dim=18))
    with pytest.raises(ExportError, match="model.norm=rmsnorm, model.mlp=gelu"):
        hf_architecture(ModelArgs(vocab_size=64, norm="rmsnorm", mlp="gelu", pos="rope"))
    with pytest.raises(ExportError, match="BertForMaskedLM needs"):
        hf_architecture(ModelArgs(vocab_size=64, family="bert", pos="rope"))
    with pytest.raises(ExportError, match="LlamaConfig requires model.hidden divisible by model.heads"):
        hf_architecture(ModelArgs(vocab_size=64, hidden=80, heads=3, head_dim=18, norm="rmsnorm", mlp="swiglu",
                                  pos="rope"))
    assert hf_architecture(ModelArgs(vocab_size=64, hidden=90, heads=3, head_dim=18, norm="rmsnorm",
                                     mlp="swiglu", pos="rope")) == "LlamaForCausalLM"


def test_bert_uses_one_gelu_everywhere():
    """HF BERT's hidden_act is one function for the FFN and the MLM transform; msgrun's BERT used
    the tanh GELU in one and the exact GELU in the other."""
    import torch.nn.functional as F

    for gelu, approx in (("exact", "none"), ("tanh", "tanh")):
        m = Transformer(ModelArgs(vocab_size=64, family="bert", hidden=32, heads=2, head_dim=16, ffn=48, gelu=gelu))
        x = torch.randn(2, 5, 32) * 3
        h = m.blocks[0].mlp.fc(x)
        assert torch.equal(m.blocks[0].mlp.proj(F.gelu(h, approximate=approx)), m.blocks[0].mlp(x))
        assert torch.equal(m.mlm_head.norm(F.gelu(m.mlm_head.dense(x), approximate=approx)), m.mlm_head(x))


@pytest.mark.parametrize("layout", ["gpt2", "llama", "bert"])
def test_large_weights_match_and_a_wrong_gelu_would_show(layout):
    """Freshly built models with weights large enough that activations reach the range where the
    two GELUs differ (a barely trained model's do not: there they agree to ~1e-6). The export
    matches within 1e-4; the other GELU in HF's config would miss by 5x that."""
    import dataclasses

    from msgrun.export import to_hf

    shape = dict(vocab_size=100, layers=2, hidden=48, heads=3, head_dim=16, ffn=72, init_std=0.2, max_seq_len=24)
    args = {"gpt2": ModelArgs(**shape),
            "llama": ModelArgs(**{**shape, "head_dim": 10}, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                               tie_embeddings=False, rope_base=500.0, norm_eps=1e-6),
            "bert": ModelArgs(**shape, family="bert", gelu="exact", norm_eps=1e-12)}[layout]
    model = Transformer(args, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    special = {"eot": 0, "mask": 1, "pad": 2}
    with torch.no_grad():
        ours = model(ids)
        assert (to_hf(args, model.state_dict(), special)(input_ids=ids).logits - ours).abs().max() < 1e-4
        if args.mlp == "gelu":
            other = dataclasses.replace(args, gelu="exact" if args.gelu == "tanh" else "tanh")
            assert (to_hf(other, model.state_dict(), special)(input_ids=ids).logits - ours).abs().max() > 5e-4  # 5x the tolerance


def test_cli_refuses_bad_input_with_exit_code_2(grown_runs, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")], "not a directory"),
        ([str(grown_runs["gpt2"]), "--out", str(tmp_path / "taken")], "never overwrites"),
        ([str(grown_runs["gpt2"]), "--out", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "x.pt")], "no such file"),
        ([str(grown_runs["gpt2"]), "--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "taken" / "keep.txt")],
         "not a Hugging Face tokenizer.json"),
    ]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-m", "msgrun.export", *argv], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("seq_len_method,family,pool", [("auto", "bert", 4), ("pool", "bert", 4), ("auto", "gpt", 1),
                                                        ("warmup", "bert", 1), (None, "bert", 1)])
def test_length_pooling_is_read_as_the_growth_operator_reads_it(seq_len_method, family, pool):
    """The shipped compound preset says operator.seq_len=auto, which pools for BERT: export refused
    a mid-pooling checkpoint only for the literal 'pool' (a second, wrong copy of the rule)."""
    from msgrun.export import check_state, pool_of

    state = {"engine": {"shape": {"seq_len": 32}}}
    cfg = {"model": {"family": family, "pos": "learned", "seq_len": 128}, "operator": {"seq_len": seq_len_method}}
    assert pool_of(state, cfg) == pool
    if pool > 1:
        with pytest.raises(ExportError, match="length pooling"):
            check_state([], pool_of(state, cfg))


def test_export_is_readable_like_any_file_and_sets_no_max_length(grown_runs, tmp_path):
    """mkdtemp's 0700 directory and 0600 files made an export unreadable to the user's group;
    generation_config.json's max_length made generate(max_new_tokens=...) warn on every call."""
    old = os.umask(0o022)
    try:
        export_run(grown_runs["gpt2"], tmp_path / "hf")
    finally:
        os.umask(old)
    out = tmp_path / "hf"
    assert out.stat().st_mode & 0o777 == 0o755
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name
    generation = json.loads((out / "generation_config.json").read_text())
    assert "max_length" not in generation and generation["eos_token_id"] is not None


def as_sharded_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a run whose newest checkpoint is rewritten in the sharded (DCP) format, as
    train.distributed=fsdp writes it, and whose single-file checkpoints are gone."""
    import shutil

    from msgrun.distributed import Dist

    shutil.copytree(run_dir, dest)
    newest = checkpoint.newest_valid(dest)
    state = checkpoint.load(newest)
    for p in checkpoint.list_checkpoints(dest):
        checkpoint.remove(p)
    state["optimizer_keys"] = {n: list(e) for n, e in state["optimizer"].items()}
    tensors = {"model": state.pop("model"), "optimizer": state.pop("optimizer")}
    state.pop("log_lines"), state.pop("format")
    return checkpoint.save_sharded(dest, state["counters"]["step"], state, tensors, keep=1, dist=Dist())


@pytest.mark.parametrize("name", list(RUNS))
def test_streamed_export_of_a_sharded_checkpoint_matches_msgrun_logits(grown_runs, tmp_path, name):
    """A sharded checkpoint exports block by block into safetensors shards with an index (a
    small shard limit forces several files), which transformers loads with msgrun's logits."""
    ckpt = as_sharded_run(grown_runs[name], tmp_path / "run")
    info = export_run(tmp_path / "run", tmp_path / "hf", max_shard_bytes=200_000)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert info["shards"] > 2 and info["max_abs_logit_diff"] is None and info["checkpoint"] == str(ckpt.absolute())
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    assert f"model-00001-of-{info['shards']:05d}.safetensors" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    auto = transformers.AutoModelForMaskedLM if name == "bert" else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == CLASSES[name]
    ids, _, _ = held_out_ids(grown_runs[name])
    ours = checkpoint_model(checkpoint.load(ckpt))
    with torch.no_grad():
        expected, got = ours(ids), hf(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-4 and expected.abs().max() > 1.0
