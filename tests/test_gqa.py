"""Grouped-query attention: the attention itself (against repeat-kv and transformers' LLaMA), its
FLOPs, export, and heads / kv_heads growth by every head-growing method, exact or refused."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from msgrun.config import OperatorConfig
from msgrun.errors import ConfigError
from msgrun.flops import train_flops
from msgrun.growth.engine import exact_numerics
from msgrun.growth.masks import install_masks
from msgrun.growth.operator import GrowthOperator
from msgrun.growth.schedule import Shape, Stage
from msgrun.model import ModelArgs, Transformer, apply_rope
from msgrun.train import Trainer

from conftest import perturbed, read_jsonl

EXACT = 1e-5
SEQ, VOCAB = 20, 101
LLAMA = dict(family="gpt", norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)
GPT2 = dict(family="gpt")
# odd sizes: hidden 45, head_dim 10 (even for RoPE), 3 layers, FFN 70
BASE = dict(layers=3, hidden=45, head_dim=10, ffn=70)


def make_model(arch, heads, kv_heads, seed=0, **kw):
    args = ModelArgs(vocab_size=VOCAB, max_seq_len=SEQ, heads=heads, kv_heads=kv_heads, **{**BASE, **kw}, **arch)
    return perturbed(Transformer(args, generator=torch.Generator().manual_seed(seed)), seed + 1, 0.1)


def logits(model, idx):
    model.eval()
    with exact_numerics(), torch.no_grad():
        return model(idx).float()


def batch():
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------------- the attention
@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["rope", "learned"])
def test_grouped_attention_equals_repeat_kv_reference(arch):
    """Query head h reads key/value head h // (A/K): the same as repeating each k and v head A/K
    times (transformers' repeat_kv), computed here by hand with an explicit causal softmax."""
    model = make_model(arch, heads=6, kv_heads=2)
    attn, args = model.blocks[0].attn, model.args
    x = torch.randn(2, SEQ, args.hidden, generator=torch.Generator().manual_seed(3))
    rope = (model.rope_cos, model.rope_sin) if args.pos == "rope" else None
    with exact_numerics(), torch.no_grad():
        ours = attn(x, rope)
        W, Wkv, d = args.attn_width, args.kv_width, args.head_dim
        qkv = x @ attn.qkv.weight.t() + (attn.qkv.bias if attn.qkv.bias is not None else 0)
        q = qkv[..., :W].unflatten(-1, (6, d)).transpose(1, 2)
        k = qkv[..., W:W + Wkv].unflatten(-1, (2, d)).transpose(1, 2)
        v = qkv[..., W + Wkv:].unflatten(-1, (2, d)).transpose(1, 2)
        if rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
        ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, SEQ, W) @ attn.proj.weight.t()
        if attn.proj.bias is not None:
            ref = ref + attn.proj.bias
    assert (ours - ref).abs().max().item() < EXACT
    assert attn.qkv.weight.shape == (W + 2 * Wkv, args.hidden)


def hf_model(model):
    pytest.importorskip("transformers")
    from msgrun.export import to_hf

    return to_hf(model.args, model.state_dict(), {"eot": 0, "pad": 0, "mask": 1})


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
def test_grouped_attention_equals_transformers_llama(kv_heads):
    """The exported LlamaForCausalLM (num_key_value_heads = kv_heads) computes msgrun's logits."""
    model = make_model(LLAMA, heads=6, kv_heads=kv_heads, hidden=48)  # LlamaConfig wants hidden % heads == 0
    hf = hf_model(model)
    assert hf.config.num_key_value_heads == kv_heads
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 10, 48)
    idx = batch()
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
    assert (logits(model, idx) - theirs).abs().max().item() < 1e-4


def test_export_of_grouped_attention_is_refused_where_no_class_expresses_it():
    from msgrun.export import ExportError, hf_architecture

    args = ModelArgs(vocab_size=VOCAB, hidden=48, heads=6, head_dim=8, kv_heads=2)  # GPT-2 layout
    with pytest.raises(ExportError, match="kv_heads=2"):
        hf_architecture(args)


def test_flops_of_grouped_attention_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    args = ModelArgs(vocab_size=500, layers=2, hidden=96, heads=6, head_dim=16, kv_heads=2, ffn=200,
                     max_seq_len=32, **LLAMA)
    model = Transformer(args)
    idx = torch.randint(0, 500, (2, 32))
    # the math kernel: FlopCounterMode sees no FLOPs in the CPU's fused SDPA kernel (grouped or not)
    with exact_numerics(), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    counted = counter.get_total_flops()
    assert abs(train_flops(args, 2, 32) - counted) / counted < 0.02
    # and it is the grouped structure that is counted: multi-head attention costs visibly more
    assert train_flops(ModelArgs(**{**vars(args), "kv_heads": None}), 2, 32) > 1.05 * counted


# ---------------------------------------------------------------------------- growth
def grow(model, before, after, method, **cfg):
    """Grow `model` from shape `before` = (A, K) to `after` = (A', K') by operator.heads=`method`,
    through the operator's own check (refusals) and its growth; MSG's masks at alpha = 0."""
    (A, K), (A2, K2) = before, after
    op = GrowthOperator(OperatorConfig(name="test", heads=method, **cfg), "gpt", model.args.pos)
    shape = lambda a, k: Shape(model.args.layers, model.args.hidden, a, model.args.ffn, SEQ, k)  # noqa: E731
    start, target = shape(A, K), shape(A2, K2)
    dims = tuple(d for d in ("heads", "kv_heads") if getattr(start, d) != getattr(target, d))
    op.check(start, [Stage(0, "at_step", 1, target, dims)], target)
    final = ModelArgs(**{**vars(model.args), "heads": A2, "kv_heads": K2})
    grown = op.grow(model, target, final, torch.Generator().manual_seed(7))
    grown.alpha = torch.zeros(())
    if grown.new_units:
        install_masks(grown.model, grown.alpha, grown.new_units, grown.new_layers, op.cfg.mask_placement)
    return grown


# (A, K) -> (A', K'): groups kept (kv grows with heads), kv fixed (groups grow), groups split (kv grows alone)
KEEP, WIDEN, SPLIT = ((6, 2), (9, 3)), ((6, 2), (12, 2)), ((6, 2), (6, 6))
EXACT_CASES = [
    ("msg", dict(mask_placement="ours"), KEEP), ("msg", dict(mask_placement="ours"), WIDEN),
    ("msg", dict(mask_placement="reference"), KEEP),
    ("fpi", dict(mapping="random"), KEEP), ("fpi", dict(mapping="random"), WIDEN),
    ("fpi", dict(mapping="left"), SPLIT), ("fpi", dict(mapping="left"), ((4, 2), (6, 6))),
    ("tile", {}, ((6, 2), (12, 4))), ("tile", {}, WIDEN), ("tile", {}, SPLIT),
    ("lemon", {}, KEEP), ("lemon", {}, WIDEN), ("lemon", {}, SPLIT),
]


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method,cfg,shapes", EXACT_CASES,
                         ids=[f"{m}-{'-'.join(map(str, c.values()))}-{s}" for m, c, s in EXACT_CASES])
def test_head_growth_under_grouped_attention_is_exact(arch, method, cfg, shapes):
    before, after = shapes
    model = make_model(arch, *before)
    grown = grow(model, before, after, method, **cfg)
    assert (grown.model.args.heads, grown.model.args.n_kv_heads) == after
    idx = batch()
    assert (logits(model, idx) - logits(grown.model, idx)).abs().max().item() < EXACT
    if method == "msg":  # and the growth is real: at alpha = 1 the new heads change the function
        grown.alpha.fill_(1.0)
        assert (logits(model, idx) - logits(grown.model, idx)).abs().max().item() > 1e-4


def test_old_query_heads_keep_their_key_value_head():
    """Widening groups 6/2 -> 12/2 places the new query heads inside each group, so an old query
    head still reads its own key/value head (appending them would move old heads to other groups)."""
    grown = grow(make_model(LLAMA, 6, 2), (6, 2), (12, 2), "fpi", mapping="left")
    from msgrun.growth.surgery import query_slots

    index = query_slots(torch.arange(2), 6, 2, 12)
    assert index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert grown.model.args.n_kv_heads == 2


REFUSED = [
    ("aki", {}, KEEP, "defined for one key/value head per query head"),
    ("msg", dict(mask_placement="reference"), WIDEN, "mask_placement=ours"),
    ("msg", dict(mask_placement="ours"), SPLIT, "groups shrink from 3 to 1"),
    ("fpi", dict(mapping="random"), SPLIT, "operator.mapping=left"),
    ("lemon", {}, ((6, 2), (6, 3)), "groups shrink from 3 to 2"),
]


@pytest.mark.parametrize("method,cfg,shapes,reason", REFUSED, ids=[r[0] + "-" + r[3][:12] for r in REFUSED])
def test_head_growth_that_cannot_be_exact_is_refused_with_the_reason(method, cfg, shapes, reason):
    before, after = shapes
    with pytest.raises(ConfigError, match=reason):
        grow(make_model(LLAMA, *before), before, after, method, **cfg)


def test_ligo_is_refused_under_grouped_attention():
    with pytest.raises(ConfigError, match="operator=ligo learns one expansion"):
        grow(make_model(LLAMA, 6, 2), (6, 2), (9, 3), "ligo", layers="ligo", hidden="ligo", ffn="ligo")
    with pytest.raises(ConfigError, match="operator.heads=ligo"):  # heads growth names the heads method
        grow(make_model(LLAMA, 6, 2), (6, 2), (6, 6), "ligo", layers="ligo", hidden="ligo", ffn="ligo")


def test_multi_head_models_grow_as_before():
    """K = A stays multi-head: kv_heads is not a separate growth dimension in the stage's dims."""
    from msgrun.growth.schedule import resolve_schedule
    from omegaconf import OmegaConf

    model = OmegaConf.create(dict(layers=2, hidden=64, heads=4, ffn=128, seq_len=32, kv_heads=None, experts=1))
    sched = OmegaConf.create(dict(name="h", start=dict(heads=2), stages=[dict(at_step=5, grow=dict(heads=4))]))
    start, stages = resolve_schedule(sched, model)
    assert (start.heads, start.kv_heads) == (2, 2) and stages[0].dims == ("heads",)


@pytest.mark.parametrize("start,grow_,match", [
    (dict(heads=3), dict(heads=8), "cannot keep groups of 4"),  # 8 heads, 2 kv: group 4; 3 heads
    (dict(heads=4, kv_heads=3), dict(heads=8), "kv_heads must divide heads"),
])
def test_schedule_shapes_must_group(start, grow_, match):
    from msgrun.growth.schedule import resolve_schedule
    from omegaconf import OmegaConf

    model = OmegaConf.create(dict(layers=2, hidden=64, heads=8, ffn=128, seq_len=32, kv_heads=2, experts=1))
    sched = OmegaConf.create(dict(name="h", start=start, stages=[dict(at_step=5, grow=grow_)]))
    with pytest.raises(ConfigError, match=match):
        resolve_schedule(sched, model)


def test_config_refuses_kv_heads_that_do_not_divide_heads(make_cfg):
    from msgrun.config import check_config

    with pytest.raises(ConfigError, match="model.kv_heads = 3.*one of 1, 2, 4, 8"):
        check_config(make_cfg("model=llama_gqa_tiny", "model.heads=8", "model.kv_heads=3"))


def test_gqa_model_grows_heads_in_a_run_and_exports(make_cfg, tmp_path):
    """`msgrun model=llama_gqa_tiny schedule=heads_only operator=msg`: one exact growth event, in-process."""
    cfg = make_cfg(*["model=llama_gqa_tiny", "schedule=heads_only", "operator=msg", "model.seq_len=32",
                    "data.vocab_size=500", "train.max_steps=8", "train.eval_every=8", "train.batch_size=4",
                    "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=3", "operator.ramp_steps=2"])
    Trainer(cfg, tmp_path).run()
    (event,) = read_jsonl(tmp_path / "growth.jsonl")
    assert event["before"]["heads"] == 2 and event["before"]["kv_heads"] == 1
    assert event["after"]["heads"] == 4 and event["after"]["kv_heads"] == 2
    assert event["max_abs_logit_diff"] < EXACT
    if os.environ.get("MSGRUN_SKIP_EXPORT"):
        return
    pytest.importorskip("transformers")
    from msgrun.export import checkpoint_model, load_checkpoint, max_logit_diff, to_hf

    _, state = load_checkpoint(tmp_path, None)
    model = checkpoint_model(state)
    hf = to_hf(model.args, model.state_dict(), {"eot": 0, "pad": 0, "mask": 1})
    assert hf.config.num_key_value_heads == 2
    assert max_logit_diff(model, hf, torch.arange(32).unsqueeze(0)) < 1e-4


def test_a_stage_growing_seq_len_with_kv_heads_still_checks_the_length():
    """operator.check tested seq_len with the loop's last dimension; kv_heads now follows seq_len in
    a stage's dims, so that test had to look at the stage's dims instead."""
    op = GrowthOperator(OperatorConfig(name="test", heads="tile", seq_len="warmup"), "gpt", "rope")
    start = Shape(2, 48, 4, 64, 64, 1)
    target = Shape(2, 48, 4, 64, 80, 2)  # 80 does not divide the final 128
    final = Shape(2, 48, 4, 64, 128, 2)
    with pytest.raises(ConfigError, match="does not divide model.seq_len = 128"):
        op.check(start, [Stage(0, "at_step", 1, target, ("seq_len", "kv_heads"))], final)
