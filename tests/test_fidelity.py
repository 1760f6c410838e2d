"""Issue 23: each preset does what its reference code does. Expected values are derived by hand from
the references' rules (docs/fidelity.md cites repository, file and line for each), not from their code:

  LLaMA-Pro  split = int(L / P); a zeroed copy after every block i with (i + 1) % split == 0; runs only
             where that yields exactly L' layers
  LEMON      the first 2L - L' layers single, each of the top L' - L followed by a zero-output copy;
             consumers of a copied unit split into [A - C, C], C = 0.1 x a fresh init; post-LN depth
             through identity LayerNorms
  LiGO       per-large-layer q, k, v, FFN width factors, [I; B_new] with only B_new learned, no factor
             for a dimension that does not grow, B_new rows U(0, 1) normalised, depth stackbert_noisy,
             fitting AdamW (wd 0.1, clip 1.0, linear warmup 10000 steps from 0 to 2e-4)
  G_zero     depth: layer i copies i // (L'/L), copies' output projections zero; width: new rows zero on
             old inputs, new columns fresh
"""

import pytest
import torch

from msgrun.config import OperatorConfig
from msgrun.errors import ConfigError
from msgrun.growth import expansion, gzero, ligo

from test_operators import CHANGED, EXACT, FAMILIES, grow, logit_diff, make_model, operator

PRE_NORM = {k: v for k, v in FAMILIES.items() if k != "bert"}
pre_norm = pytest.mark.parametrize("arch", PRE_NORM.values(), ids=PRE_NORM.keys())
archs = pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())


def engine(make_cfg, *overrides):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args
    cfg = make_cfg(*overrides)
    return GrowthEngine(cfg, final_model_args(cfg.model, 256))


# ---------------------------------------------------------------------------- LLaMA-Pro
def test_llama_pro_32_to_38_copies_after_blocks_4_9_14_19_24_29():
    # P = 6, split = int(32 / 6) = 5: a copy after every block i with (i + 1) % 5 == 0, i < 30
    sources, zeroed = expansion.layer_sources("llama_pro", 32, 38)
    copies_after = [sources[k] for k, z in enumerate(zeroed) if z]
    assert copies_after == [4, 9, 14, 19, 24, 29]
    assert len(sources) == 38 and sources[-2:] == [30, 31]  # blocks 30, 31 have no copy
    assert all(sources[k - 1] == sources[k] for k, z in enumerate(zeroed) if z)


@pytest.mark.parametrize("old,new,runs", [
    (32, 38, True), (32, 40, True), (5, 7, True), (3, 4, True), (3, 6, True),
    (3, 5, False),  # split int(3/2) = 1 adds 3 blocks, not 2: the reference's assert fails
    (32, 39, False),  # split int(32/7) = 4 adds 8
    (18, 24, True), (19, 24, False),  # schedule=block_expansion starts at 3/4: 18 -> 24
])
def test_llama_pro_runs_exactly_where_the_reference_runs(old, new, runs):
    assert expansion.llama_pro_runs(old, new) == runs


def test_llama_pro_reference_runs_for_290_pairs_up_to_40_layers():
    # the independent review ran the reference over 1 <= P <= L <= 40: it runs for 290 (L, L') pairs
    assert sum(expansion.llama_pro_runs(L, L + P) for L in range(1, 41) for P in range(1, L + 1)) == 290


def test_llama_pro_refuses_a_growth_the_reference_cannot_run(make_cfg):
    with pytest.raises(ConfigError, match=r"grows layers 3 -> 5 with operator.layers=llama_pro.*reaches from 3: 4, 6"):
        engine(make_cfg, "schedule=layers_only", "operator.layers=llama_pro", "model.layers=5",
               "schedule.start.layers=3")


# ---------------------------------------------------------------------------- LEMON
@pytest.mark.parametrize("old,new,sources,zeroed", [
    (3, 5, [0, 1, 1, 2, 2], [False, False, True, False, True]),  # 2L - L' = 1 single layer, then 1, 1', 2, 2'
    (4, 5, [0, 1, 2, 3, 3], [False] * 4 + [True]),  # only the top layer gets a copy
    (2, 4, [0, 0, 1, 1], [False, True, False, True]),  # L' = 2L: every layer
])
def test_lemon_depth_copies_the_top_layers(old, new, sources, zeroed):
    assert expansion.layer_sources("lemon", old, new) == (sources, zeroed)


def test_lemon_depth_beyond_twice_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="at most 4 layers from 2"):
        engine(make_cfg, "schedule=layers_only", "operator.layers=lemon", "model.layers=5", "schedule.start.layers=2")


@pytest.mark.parametrize("new", [4, 5, 6])
def test_lemon_post_norm_depth_is_exact(new):
    model = make_model(FAMILIES["bert"])
    grown = grow(model, operator(family="bert", layers="lemon"), layers=new)
    assert logit_diff(model, grown.model) <= EXACT
    _, zeroed = expansion.layer_sources("lemon", 3, new)
    for i, z in enumerate(zeroed):  # the pair: original's FFN norm and copy's attention norm are identity
        if z:
            for norm in (grown.model.blocks[i - 1].mlp_norm, grown.model.blocks[i].attn_norm):
                assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()


def test_lemon_post_norm_depth_and_hidden_at_once_is_exact():
    model = make_model(FAMILIES["bert"], hidden=64)
    grown = grow(model, operator(family="bert", layers="lemon", hidden="lemon", heads="lemon", ffn="lemon",
                                 symmetry_noise=0.1), layers=5, hidden=128, heads=5, ffn=333)
    assert logit_diff(model, grown.model) <= EXACT


@archs
def test_lemon_splits_consumers_into_a_minus_c_and_c(arch):
    """heads 3 -> 6: each head one copy. The copy's attn.proj columns are C = 0.1 x a fresh draw of
    attn.proj (std 0.1 x init_std / sqrt(2L)); the original's are A - C; the sum is A."""
    from msgrun.model import init_std
    model = make_model(arch)
    grown = grow(model, operator(family=arch["family"], heads="lemon", symmetry_noise=0.1), heads=6)
    assert logit_diff(model, grown.model) <= EXACT
    for i in range(3):
        a = model.blocks[i].attn.proj.weight.detach()
        new = grown.model.blocks[i].attn.proj.weight.detach()
        orig, copy = new[:, :48], new[:, 48:]
        torch.testing.assert_close(orig + copy, a, atol=1e-6, rtol=1e-5)
        c_std = 0.1 * init_std("blocks.0.attn.proj.weight", grown.model.args)
        assert 0.8 * c_std < copy.std().item() < 1.2 * c_std  # a scalar share would be ~ std(A) / 2
        assert abs(copy.mean().item()) < 0.2 * c_std


def test_lemon_units_without_a_copy_keep_their_consumers():
    """ffn 200 -> 333: units 0..132 get one copy each (C), units 133..199 none: their mlp.proj
    columns stay exactly A (the reference's projection with one copy is the identity)."""
    from msgrun.model import init_std
    model = make_model(FAMILIES["gpt_layernorm"])
    grown = grow(model, operator(ffn="lemon", symmetry_noise=0.1), ffn=333)
    a = model.blocks[0].mlp.proj.weight.detach()
    new = grown.model.blocks[0].mlp.proj.weight.detach()
    assert torch.equal(new[:, 133:200], a[:, 133:200])
    torch.testing.assert_close(new[:, :133] + new[:, 200:], a[:, :133], atol=1e-6, rtol=1e-5)
    c_std = 0.1 * init_std("blocks.0.mlp.proj.weight", grown.model.args)
    assert 0.8 * c_std < new[:, 200:].std().item() < 1.2 * c_std  # the copies' columns are C
    assert logit_diff(model, grown.model) <= EXACT


def test_lemon_preset_is_the_references_recipe(make_cfg):
    cfg = make_cfg("experiment=lemon")
    op = cfg.operator
    assert (op.symmetry_noise, op.optimizer_state, op.lr_policy) == (0.1, "reset", "restart")


# ---------------------------------------------------------------------------- LiGO
def ligo_operator(arch, noise=0.03, **target):
    from dataclasses import replace
    model = make_model(arch, hidden=64)
    new = replace(model.args, **target)
    return model, ligo.LigoOperator(model, new, torch.Generator().manual_seed(0), noise)


def test_ligo_width_factors_are_per_layer_and_only_for_dimensions_that_grow():
    _, op = ligo_operator(FAMILIES["gpt_layernorm"], layers=5, heads=4, ffn=257)
    per_layer = {f"{c}_{i}" for c in ("q", "k", "v", "ffn") for i in range(5)}
    assert set(op.width) == per_layer  # hidden does not grow: no hidden factor
    assert len({id(p) for p in op.width.values()}) == 20  # 20 separate parameters
    assert op.width["q_0"].shape == (16, 48) and op.width["ffn_4"].shape == (57, 200)  # new rows only
    _, op = ligo_operator(FAMILIES["gpt_layernorm"], heads=4)
    assert set(op.width) == {f"{c}_{i}" for c in "qkv" for i in range(3)}


def test_ligo_bert_mlm_head_has_its_own_width_factor():
    model, op = ligo_operator(FAMILIES["bert"], hidden=96)
    assert set(op.width) == {"hidden", "cls"}
    assert op.factors("mlm_head.dense.weight", "hidden", 1, fan_in=True) == ["hidden"]  # reads the stream
    assert op.factors("mlm_head.dense.weight", "hidden", 1, fan_in=False) == ["cls"]
    params = op.materialize(ligo.Tally(backward=False))
    gamma = model.mlm_head.norm.weight.detach()
    torch.testing.assert_close(params["mlm_head.norm.weight"][64:], op.width["cls"].detach() @ gamma)


def test_ligo_identity_block_is_fixed_and_new_units_are_convex_mixtures():
    model, op = ligo_operator(FAMILIES["gpt_layernorm"], noise=0.0, layers=5, hidden=96, heads=4, ffn=257)
    for b in op.width.values():  # rows U(0, 1) normalised: non-negative, summing to 1
        assert (b >= 0).all()
        torch.testing.assert_close(b.sum(-1), torch.ones(b.shape[0]))
    params = op.materialize(ligo.Tally(backward=False))
    for i in range(5):  # noise 0: exact stacking; the old block of every parameter is the old layer i mod 3
        old = model.blocks[i % 3].mlp.fc.weight.detach()
        torch.testing.assert_close(params[f"blocks.{i}.mlp.fc.weight"][:200, :64], old, atol=1e-6, rtol=0)
    emb, old_emb = params["tok_emb.weight"].detach(), model.tok_emb.weight.detach()
    assert torch.equal(emb[:, :64], old_emb)
    # each new embedding column is a convex mixture of the old columns
    assert (emb[:, 64:] <= old_emb.max(1, keepdim=True).values + 1e-6).all()
    assert (emb[:, 64:] >= old_emb.min(1, keepdim=True).values - 1e-6).all()
    assert not any("eye" in k for k in dict(op.named_parameters()))  # nothing but the new rows is learned


def test_ligo_depth_init_is_a_noisy_one_hot():
    _, op = ligo_operator(FAMILIES["gpt_layernorm"], layers=5)
    d = op.depth["mlp/fc/weight/0"].detach()
    assert d.shape == (5, 3)
    torch.testing.assert_close(d.sum(-1), torch.ones(5))
    assert torch.equal(d.argmax(-1), torch.tensor([0, 1, 2, 0, 1]))
    # (u + e_l) / (1 + sum u) with u ~ U(0, 0.03): the one at least 1 / 1.06, every other entry in (0, 0.03)
    assert (d.max(-1).values >= 1 / 1.06).all()
    off = d[d < 0.5]
    assert (off > 0).all() and (off < 0.03).all()
    assert "attn/qkv/weight/2" in op.depth  # q, k and v mix their own layers


def test_ligo_fitting_schedule_is_the_references_linear_warmup():
    # get_linear_schedule_with_warmup: k / warmup during the warmup, from 0 at the first step
    assert ligo.lr_factor(0, 100, 10000) == 0.0
    assert ligo.lr_factor(99, 100, 10000) == pytest.approx(99 / 10000)  # the preset ends at 1.98e-6
    assert ligo.lr_factor(0, 100, 0) == 1.0 and ligo.lr_factor(50, 100, 0) == 0.5
    assert ligo.lr_factor(20, 100, 10) == pytest.approx(80 / 90)


def test_ligo_preset_is_the_references_fitting(make_cfg):
    op = make_cfg("experiment=ligo").operator
    assert (op.ligo_steps, op.ligo_lr, op.ligo_warmup, op.ligo_weight_decay, op.ligo_clip, op.ligo_noise) == \
        (100, 2e-4, 10000, 0.1, 1.0, 0.03)


def test_ligo_fitting_optimizer_is_adamw_with_decay_clipping_and_warmup(monkeypatch):
    from dataclasses import replace
    from test_new_operators import ligo_data
    built, clipped, lrs = [], [], []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kw):
            built.append(kw)
            super().__init__(params, **kw)

        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: clipped.append(m) or real_clip(p, m))
    model = make_model(FAMILIES["gpt_layernorm"], hidden=64)
    preset = OperatorConfig(ligo_steps=3, ligo_lr=2e-4, ligo_warmup=10000, ligo_weight_decay=0.1, ligo_clip=1.0)
    ligo.fit(model, replace(model.args, ffn=257), torch.Generator().manual_seed(0), preset, ligo_data("gpt"))
    assert built == [dict(lr=2e-4, weight_decay=0.1, eps=1e-6)]
    assert clipped == [1.0] * 3
    assert lrs == pytest.approx([0.0, 2e-8, 4e-8])  # 2e-4 x k / 10000


# ---------------------------------------------------------------------------- G_zero, G_random
def test_gzero_depth_map_interleaves_zero_output_copies():
    assert gzero.layer_sources(2, 6) == ([0, 0, 0, 1, 1, 1], [False, True, True, False, True, True])
    assert gzero.layer_sources(3, 6) == ([0, 0, 1, 1, 2, 2], [False, True] * 3)


@pre_norm
def test_gzero_depth_is_exact(arch):
    model = make_model(arch)
    grown = grow(model, operator(layers="zero"), layers=6)
    assert logit_diff(model, grown.model) <= EXACT
    assert not grown.model.blocks[1].mlp.proj.weight.any() and grown.model.blocks[1].attn.qkv.weight.any()


@pytest.mark.parametrize("overrides,message", [
    (["model.layers=5", "schedule.start.layers=3"], "whole multiple"),
    (["model=bert_tiny"], "post-norm"),
])
def test_gzero_depth_refusals(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        engine(make_cfg, "schedule=layers_only", "operator.layers=zero", *overrides)


@archs
@pytest.mark.parametrize("dim,old,new", [("heads", 3, 5), ("ffn", 200, 333)])
def test_gzero_heads_and_ffn_are_exact_with_zero_rows_and_fresh_columns(arch, dim, old, new):
    model = make_model(arch, **{dim: old})
    grown = grow(model, operator(family=arch["family"], **{dim: "zero"}), **{dim: new})
    assert logit_diff(model, grown.model) <= EXACT
    block = grown.model.blocks[0]
    if dim == "ffn":
        fc, proj = block.mlp.fc.weight, block.mlp.proj.weight
        rows = torch.cat([torch.arange(old, new) + c * new for c in range(fc.shape[0] // new)])
        assert not fc[rows].any()  # new units read the old hidden units through zeros
        assert proj[:, old:].abs().min() > 0  # their consumers keep the fresh init
    else:
        qkv, proj = block.attn.qkv.weight, block.attn.proj.weight
        W = new * 16
        rows = torch.cat([torch.arange(old * 16, W) + c * W for c in range(3)])
        assert not qkv[rows].any() and proj[:, old * 16:].abs().min() > 0


@pre_norm
def test_gzero_hidden_zeroes_the_new_stream_but_changes_the_norms(arch):
    model = make_model(arch, hidden=64)
    grown = grow(model, operator(hidden="zero"), hidden=96)
    assert not grown.model.tok_emb.weight[:, 64:].any() and not grown.model.blocks[0].attn_norm.weight[64:].any()
    assert logit_diff(model, grown.model) > CHANGED  # every norm now averages over 96 entries


def test_gstack_presets_select_the_other_operators(make_cfg):
    z = make_cfg("experiment=gstack_zero").operator
    assert (z.layers, z.hidden, z.heads, z.ffn, z.optimizer_state, z.lr_policy) == \
        ("zero", "zero", "zero", "zero", "reset", "restart")
    r = make_cfg("experiment=gstack_random").operator
    assert (r.layers, r.hidden, r.depth_init, r.depth_order, r.optimizer_state, r.lr_policy) == \
        ("msg", "msg", "random", "stack", "reset", "restart")
    e = engine(make_cfg, "experiment=gstack_random", "model.layers=8")
    sources, entering, _, _ = e.operator.layer_plan(2, 8)
    assert sources == [0, 1] + [None] * 6 and entering == [False, False] + [True] * 6  # fresh layers on top
    assert len(engine(make_cfg, "experiment=gstack_zero", "model.layers=8").stages) == 1
