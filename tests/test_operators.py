"""What each growth method promises, measured: exactness (or its documented absence), where
new weights come from, symmetry breaking that lets copies diverge, RaPTr's paths and output
rescaling, sequence-length warmup, G_stack's timing guideline, refusals of impossible
operator/schedule pairs, and every named operator through the training loop."""

import math
import re
from dataclasses import replace

import pytest
import torch

from msgrun.config import OperatorConfig, OptimConfig
from msgrun.errors import ConfigError
from msgrun.flops import train_flops
from msgrun.growth.engine import GrowthEngine, exact_numerics
from msgrun.growth.operator import GrowthOperator
from msgrun.growth.optim_transfer import transfer_adamw
from msgrun.growth.raptr import RandomPaths
from msgrun.growth.schedule import Shape, Stage, gstack_growth_tokens
from msgrun.model import ModelArgs, Transformer
from msgrun.optim import build_adamw
from msgrun.train import Trainer, final_model_args

from conftest import perturbed, read_jsonl

FAMILIES = {
    "gpt_layernorm": dict(family="gpt"),
    "gpt_rmsnorm": dict(family="gpt", norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
    "bert": dict(family="bert"),
}
BASE = dict(layers=3, hidden=96, heads=3, ffn=200)  # odd sizes: nothing may rely on powers of two
SEQ, VOCAB = 24, 101
EXACT = 1e-5  # fp32, exact numerics: a function-preserving growth stays below this
CHANGED = 1e-4  # a growth that is not function preserving moves the logits by more than this


def make_model(arch, seed=0, **shape):
    args = ModelArgs(vocab_size=VOCAB, max_seq_len=SEQ, head_dim=16, **{**BASE, **shape}, **arch)
    return perturbed(Transformer(args, generator=torch.Generator().manual_seed(seed)), seed + 1, 0.05)


def operator(family="gpt", **cfg):
    return GrowthOperator(OperatorConfig(name="test", **cfg), family)


def grow(model, op, **target):
    """The operator's growth of `model` to the sizes in `target` (other sizes unchanged)."""
    final = replace(model.args, **target)
    shape = Shape(final.layers, final.hidden, final.heads, final.ffn, SEQ)
    return op.grow(model, shape, final, torch.Generator().manual_seed(7))


def logits(model, idx, positions=None):
    model.eval()
    with exact_numerics(), torch.no_grad():
        return model(idx, None, positions).float()


def logit_diff(before, after):
    """Max |logit difference| of two models on a fixed batch (BERT: at a few MLM positions)."""
    idx = torch.randint(3, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 5, 23]] * 3) if before.args.family == "bert" else None
    return (logits(before, idx, positions) - logits(after, idx, positions)).abs().max().item()


archs = pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())


# ---------------------------------------------------------------------------- fpi (bert2BERT)
@archs
@pytest.mark.parametrize("mapping", ["random", "left"])
@pytest.mark.parametrize("dim,old,new", [("heads", 3, 5), ("ffn", 200, 520)])
def test_fpi_heads_and_ffn_are_exact(arch, mapping, dim, old, new):
    model = make_model(arch, **{dim: old})
    grown = grow(model, operator(arch["family"], **{dim: "fpi"}, mapping=mapping), **{dim: new})
    assert getattr(grown.model.args, dim) == new
    assert logit_diff(model, grown.model) <= EXACT


@archs
def test_fpi_hidden_with_uneven_copies_is_not_exact(arch):
    """96 -> 160: some units have 2 copies, others 1, so every norm's mean and variance over the
    wider residual stream differ from the small model's (documented, not hidden)."""
    model = make_model(arch, hidden=96)
    grown = grow(model, operator(arch["family"], hidden="fpi", symmetry_noise=0.0), hidden=160)
    assert logit_diff(model, grown.model) > CHANGED


# ---------------------------------------------------------------------------- tile (HyperCloning, CompoundGrowth FFN)
@archs
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("old,new", [(96, 192), (64, 192)])
def test_tile_hidden_is_exact_under_norms(arch, tie, old, new):
    """Every unit copied k times keeps every norm's statistics; a tied head's 1/k is carried by
    the last norm's gain and bias (surgery.parameter_axes)."""
    arch = {**arch, "tie_embeddings": tie}
    model = make_model(arch, hidden=old)
    grown = grow(model, operator(arch["family"], hidden="tile"), hidden=new)
    assert logit_diff(model, grown.model) <= EXACT


@archs
@pytest.mark.parametrize("dim,old,new", [("heads", 3, 6), ("ffn", 200, 600)])
def test_tile_heads_and_ffn_are_exact(arch, dim, old, new):
    model = make_model(arch, **{dim: old})
    grown = grow(model, operator(arch["family"], **{dim: "tile"}), **{dim: new})
    assert logit_diff(model, grown.model) <= EXACT


@pytest.mark.parametrize("dim,old,new", [("hidden", 96, 160), ("heads", 3, 5), ("ffn", 200, 520)])
def test_tile_refuses_a_non_multiple(dim, old, new):
    start = Shape(3, 96, 3, 200, SEQ).replace(**{dim: old})
    target = start.replace(**{dim: new})
    op = operator("gpt", **{dim: "tile"})
    with pytest.raises(ConfigError, match=rf"grows {dim} {old} -> {new}.*not a multiple of {old}"):
        op.check(start, [Stage(0, "at_step", 5, target, (dim,))], target)


# ---------------------------------------------------------------------------- aki (bert2BERT)
def unit_rows(units: torch.Tensor, n_units: int, size: int, chunks: int) -> torch.Tensor:
    """Row indices of `units` in a fused producing weight of `chunks` x `n_units` units."""
    return torch.cat([((c * n_units + units)[:, None] * size + torch.arange(size)).flatten() for c in range(chunks)])


@archs
@pytest.mark.parametrize("dim,old,new", [("heads", 3, 5), ("ffn", 200, 520)])
def test_aki_takes_added_units_from_the_next_layer(arch, dim, old, new):
    model = make_model(arch, **{dim: old})
    grown = grow(model, operator(arch["family"], **{dim: "aki"}, mapping="left"), **{dim: new})
    assert logit_diff(model, grown.model) > CHANGED  # AKI is not function preserving

    leaf, size = ("attn.qkv", 16) if dim == "heads" else ("mlp.fc", 1)
    chunks = 3 if dim == "heads" else (2 if arch.get("mlp") == "swiglu" else 1)
    added = torch.arange(old, new)
    sources = (added - old) % old  # mapping=left: the added units copy 0, 1, 2, ... in turn
    kept = torch.arange(old)
    old_params, new_params = dict(model.named_parameters()), dict(grown.model.named_parameters())
    L = model.args.layers
    for layer in range(L):
        donor = min(layer + 1, L - 1)  # the last layer takes from itself
        for kind in ("weight", "bias") if model.args.bias else ("weight",):
            p = new_params[f"blocks.{layer}.{leaf}.{kind}"]
            assert torch.equal(p[unit_rows(added, new, size, chunks)],
                               old_params[f"blocks.{donor}.{leaf}.{kind}"][unit_rows(sources, old, size, chunks)])
            assert torch.equal(p[unit_rows(kept, new, size, chunks)],
                               old_params[f"blocks.{layer}.{leaf}.{kind}"][unit_rows(kept, old, size, chunks)])


# ---------------------------------------------------------------------------- stack (G_stack, bert2BERT depth)
@archs
@pytest.mark.parametrize("order,sources", [("stack", [0, 1, 2, 0, 1, 2]), ("interleave", [0, 0, 1, 1, 2, 2])])
def test_stack_copies_layers_in_order(arch, order, sources):
    model = make_model(arch, layers=3)
    grown = grow(model, operator(arch["family"], layers="stack", depth_order=order), layers=6)
    old = dict(model.named_parameters())
    for name, p in grown.model.named_parameters():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
        # blocks copy their source layer; embeddings, final norm and head are kept as they are
        source = f"blocks.{sources[int(m.group(1))]}.{m.group(2)}" if m else name
        assert torch.equal(p, old[source]), name
    assert logit_diff(model, grown.model) > CHANGED  # stacking is not function preserving


# ---------------------------------------------------------------------------- symmetry breaking
@pytest.mark.parametrize("method", ["fpi", "tile"])
def test_symmetry_noise_keeps_exactness_and_separates_the_copies(method):
    model = make_model(FAMILIES["gpt_layernorm"], ffn=200)
    grown = grow(model, operator("gpt", ffn=method, mapping="left"), ffn=400)  # default noise 1e-3
    assert logit_diff(model, grown.model) <= EXACT
    for old_block, block in zip(model.blocks, grown.model.blocks):
        w, w_old = block.mlp.proj.weight.detach(), old_block.mlp.proj.weight.detach()
        # unit u and u + 200 are the two copies of unit u: their consuming columns now differ,
        # and their sum is still the original column
        assert ((w[:, :200] - w[:, 200:]).abs().amax(dim=0) > 0).all()
        torch.testing.assert_close(w[:, :200] + w[:, 200:], w_old, rtol=0, atol=1e-6)


def copy_spread(model, sources: torch.Tensor) -> float:
    """Mean |difference| between the incoming (mlp.fc) rows of copies of one unit."""
    diffs = []
    for block in model.blocks:
        w = block.mlp.fc.weight.detach()
        for src in torch.unique(sources):
            rows = w[sources == src]
            if len(rows) > 1:
                diffs.append((rows[1:] - rows[0]).abs().mean())
    return torch.stack(diffs).mean().item()


@pytest.mark.parametrize("method", ["fpi", "tile"])
def test_copies_drift_apart_in_training_only_with_symmetry_noise(method):
    """With dropout 0, exact copies get identical gradients forever: without the noise their
    incoming rows never separate, and the added capacity is never used."""
    spreads = {}
    for noise in (1e-3, 0.0):
        model = make_model(FAMILIES["gpt_layernorm"], ffn=200)
        grown = grow(model, operator("gpt", ffn=method, mapping="random", symmetry_noise=noise), ffn=400)
        sources = grown.origins["blocks.0.mlp.fc.weight"].maps[0][0]
        assert grown.model.args.dropout == 0.0 and len(torch.unique(sources)) < 400  # there are copies
        opt = build_adamw(grown.model, 1e-3, OptimConfig(weight_decay=0.0), "cpu")
        g = torch.Generator().manual_seed(3)
        spreads[noise] = []
        for _ in range(8):
            idx = torch.randint(3, VOCAB, (4, SEQ), generator=g)
            _, loss = grown.model(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            spreads[noise].append(copy_spread(grown.model, sources))
    with_noise, without = spreads[1e-3], spreads[0.0]
    assert with_noise[0] > 0 and with_noise[-1] > 3 * with_noise[0]  # they drift apart ...
    assert all(a < b for a, b in zip(with_noise, with_noise[1:]))  # ... further at every step
    assert max(without) < 1e-7  # identical copies stay identical


# ---------------------------------------------------------------------------- optimizer state of copies
def gather(t: torch.Tensor, origin) -> torch.Tensor:
    """The source entries of every new entry, unscaled."""
    for axis, amap in enumerate(origin.maps):
        if amap is not None:
            t = t.index_select(axis, amap[0])
    return t


def gradients(model, idx, positions):
    model.zero_grad(set_to_none=True)
    targets = idx if positions is None else idx.gather(1, positions)
    with exact_numerics():
        _, loss = model(idx, targets, positions)
    loss.backward()


@pytest.mark.parametrize("arch", [FAMILIES["gpt_layernorm"], FAMILIES["bert"]], ids=["gpt", "bert"])
@pytest.mark.parametrize("target", [{"ffn": 400}, {"hidden": 128}, {"heads": 6},
                                    {"hidden": 128, "heads": 6, "ffn": 400}], ids=["ffn", "hidden", "heads", "all"])
def test_optimizer_moments_of_copies_follow_their_gradients(arch, target):
    """A copy's consumers get the source's gradient and its producers half of it (two copies share
    it), the opposite of how their values scale. AdamW's moments must scale like the gradients,
    or a grown weight's updates are off by up to the copy count until its moments forget."""
    model = make_model(arch, hidden=64, heads=3, ffn=200)
    opt = build_adamw(model, 1e-3, OptimConfig(weight_decay=0.0), "cpu")
    g = torch.Generator().manual_seed(4)
    positions = torch.tensor([[0, 5, 23]] * 4) if arch["family"] == "bert" else None
    for _ in range(3):
        gradients(model, torch.randint(3, VOCAB, (4, SEQ), generator=g), positions)
        opt.step()
    grown = grow(model, operator(arch["family"], hidden="tile", heads="tile", ffn="tile", symmetry_noise=0.0),
                 **target)
    new_opt = transfer_adamw(opt, model, grown.model, grown.origins, OperatorConfig(), OptimConfig(), "cpu")
    idx = torch.randint(3, VOCAB, (4, SEQ), generator=g)
    gradients(model, idx, positions)
    gradients(grown.model, idx, positions)
    old_params = dict(model.named_parameters())
    for name, p in grown.model.named_parameters():
        origin, source = grown.origins[name], old_params[grown.origins[name].source]
        g_old, g_new = gather(source.grad, origin), p.grad
        measured = ((g_new * g_old).sum() / (g_old * g_old).sum()).item()
        factor = min((0.5, 1.0), key=lambda f: abs(f - measured))
        assert abs(measured - factor) < 0.01, name
        state, old_state = new_opt.state[p], opt.state[source]
        assert torch.equal(state["exp_avg"], factor * gather(old_state["exp_avg"], origin)), name
        assert torch.equal(state["exp_avg_sq"], factor ** 2 * gather(old_state["exp_avg_sq"], origin)), name


# ---------------------------------------------------------------------------- RaPTr: paths
def test_random_paths_keep_the_ends_and_hit_the_target_length():
    paths = RandomPaths(12, 6, seed=123)
    for length in (6, 8, 10):
        paths.set_length(length)
        lengths = []
        for step in range(2000):
            path = paths.sample(step)
            assert path[0] == 0 and path[-1] == 11
            assert path == sorted(set(path))
            lengths.append(len(path))
        assert abs(sum(lengths) / len(lengths) - length) <= 0.02 * length
    paths.set_length(12)
    assert paths.sample(5) is None  # the full model


def test_random_paths_depend_only_on_seed_and_step():
    a, b = RandomPaths(12, 8, seed=5), RandomPaths(12, 8, seed=5)  # two ranks, or a resumed run
    backwards = {s: b.sample(s) for s in reversed(range(50))}  # no state carried between draws
    assert [a.sample(s) for s in range(50)] == [backwards[s] for s in range(50)]
    assert len({tuple(a.sample(s)) for s in range(20)}) > 10  # a new path at (nearly) every step
    assert [RandomPaths(12, 8, seed=6).sample(s) for s in range(20)] != [a.sample(s) for s in range(20)]


def test_skipped_layers_get_no_gradient():
    model = make_model(FAMILIES["gpt_layernorm"], layers=4)
    idx = torch.randint(3, VOCAB, (2, SEQ))
    _, loss = model(idx, idx, layers=[0, 2, 3])
    loss.backward()
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters()]
        assert all(g is None for g in grads) if i == 1 else all(g is not None for g in grads), i


# ---------------------------------------------------------------------------- RaPTr: output rescaling
def manual_forward(model, idx, path, scales):
    """The model's forward written out, with each block's branch outputs times scales[i]."""
    x = model.tok_emb(idx)
    if model.pos_emb is not None:
        x = x + model.pos_emb(torch.arange(idx.size(1)))
    if model.emb_norm is not None:
        x = model.emb_norm(x)
    rope = (model.rope_cos, model.rope_sin) if model.args.pos == "rope" else None
    for i in path:
        b, s = model.blocks[i], scales.get(i, 1.0)
        if b.post_norm:
            x = b.attn_norm(x + s * b.attn(x, rope))
            x = b.mlp_norm(x + s * b.mlp(x))
        else:
            x = x + s * b.attn(b.attn_norm(x), rope)
            x = x + s * b.mlp(b.mlp_norm(x))
    if model.final_norm is not None:
        x = model.final_norm(x)
    if model.mlm_head is not None:
        x = model.mlm_head(x)
    return model.lm_head(x)


@archs
def test_rescale_with_keep_prob_one_is_the_plain_model(arch):
    model = make_model(arch, layers=3)
    paths = RandomPaths(3, 3, seed=0, rescale="inverse_keep_prob")
    assert paths.sample(0) is None and paths.scale() is None and paths.layer_scale(None) is None
    idx = torch.randint(3, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(model(idx, layers=[0, 1, 2], layer_scale={1: 1.0}), model(idx))


@archs
def test_rescale_scales_kept_middle_branches_by_inverse_keep_prob(arch):
    model = make_model(arch, layers=4)
    paths = RandomPaths(4, 3, seed=0, rescale="inverse_keep_prob")  # keep_prob = (3 - 2) / (4 - 2)
    assert paths.keep_prob == 0.5 and paths.scale() == 2.0
    path = next(p for p in map(paths.sample, range(100)) if len(p) == 3)  # one middle layer kept
    layer_scale = paths.layer_scale(path)
    assert layer_scale == {path[1]: 2.0}  # the first and last layers (keep_prob 1) are not scaled
    assert RandomPaths(4, 3, seed=0).layer_scale(path) is None  # rescale=none
    idx = torch.randint(3, VOCAB, (2, SEQ))
    with torch.no_grad():
        got = model(idx, layers=path, layer_scale=layer_scale)
        torch.testing.assert_close(got, manual_forward(model, idx, path, layer_scale), rtol=0, atol=1e-6)
        unscaled = manual_forward(model, idx, path, {})
    assert (got - unscaled).abs().max() > CHANGED


def test_layer_scale_recompiles_once_per_stage_not_per_step():
    """Blocks compile with dynamic=False (train.py): a Python float scale is specialized, so
    each stage's new factor compiles once (shared by all blocks) and steps never recompile."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    try:
        counter = CompileCounter()
        model = make_model(FAMILIES["gpt_layernorm"], layers=6, hidden=32, heads=2, ffn=64)
        for block in model.blocks:
            block.compile(dynamic=False, backend=counter)
        paths = RandomPaths(6, 3, seed=0, rescale="inverse_keep_prob")
        idx = torch.randint(3, VOCAB, (2, SEQ))
        compiled = []
        for stage, length in enumerate((3, 4, 5)):
            paths.set_length(length)
            for step in range(10 * stage, 10 * stage + 10):
                path = paths.sample(step)
                model(idx, layers=path, layer_scale=paths.layer_scale(path))
            compiled.append(counter.frame_count)
        assert compiled == [2, 3, 4]  # the plain blocks' graph, then one graph per stage's factor
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------- G_stack's timing guideline
def test_gstack_guideline_refuses_at_small_scale(make_cfg):
    cfg = make_cfg("schedule=gstack_guideline", "operator=gstack", "train.max_steps=100")
    args = final_model_args(cfg.model, 512)
    with pytest.raises(ConfigError) as err:
        GrowthEngine(cfg, args)
    budget = 100 * cfg.train.batch_size * cfg.model.seq_len
    d = gstack_growth_tokens(Transformer(args).num_params(), budget)
    assert d >= budget
    assert f"d = {d:.3g} tokens" in str(err.value)
    assert f"d / D = {d / budget:.3g}" in str(err.value)  # how far past the end the formula puts the growth


def test_gstack_guideline_formula_for_7b_at_300b_tokens():
    N, D = 7e9, 300e9
    C = 6 * N * D
    expected = 10 ** (0.88 * math.log10(N) + 163.27 / math.log10(C) - 5.74)
    assert math.isclose(gstack_growth_tokens(N, D), expected, rel_tol=1e-12)
    assert math.isclose(expected, 2.048e10, rel_tol=1e-3)  # by hand: log10 C = 22.100
    assert expected < D


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("op,schedule,message", [
    ("gstack", "width_first", "operator 'gstack' cannot grow hidden: it grows layers"),
    ("none", "layers_only", "operator 'none' cannot grow layers: it grows nothing"),
    ("none", "ffn_only", "operator 'none' cannot grow ffn: it grows nothing"),
])
def test_operator_refuses_dimensions_it_cannot_grow(make_cfg, op, schedule, message):
    cfg = make_cfg(f"operator={op}", f"schedule={schedule}", "train.max_steps=100")
    with pytest.raises(ConfigError, match=re.escape(message)):
        GrowthEngine(cfg, final_model_args(cfg.model, 512))


@pytest.mark.parametrize("family,pos", [("gpt", "learned"), ("bert", "rope")])
def test_length_pooling_is_refused_outside_bert_with_learned_positions(family, pos):
    with pytest.raises(ConfigError, match=r"operator.seq_len=pool needs model.family=bert with model.pos=learned"):
        GrowthOperator(OperatorConfig(name="compound", seq_len="pool"), family, pos)


def test_variant_aki_switches_copied_heads_and_ffn_to_aki():
    op = GrowthOperator(OperatorConfig(name="bert2bert", layers="stack", hidden="fpi", heads="fpi", ffn="fpi",
                                       variant="aki"), "bert")
    assert op.methods == {"layers": "stack", "hidden": "fpi", "heads": "aki", "ffn": "aki", "seq_len": None,
                          "experts": None}


# ---------------------------------------------------------------------------- through the training loop
SMALL = ["model.hidden=32", "model.heads=2", "model.head_dim=16", "model.ffn=64", "model.seq_len=32"]


def run(make_cfg, tmp_path, *overrides):
    cfg = make_cfg(*overrides)
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.run()
    assert summary["status"] == "completed"
    return trainer, read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(tmp_path / "growth.jsonl")


def test_raptr_through_the_training_loop(make_cfg, tmp_path):
    trainer, metrics, events = run(make_cfg, tmp_path, "schedule=raptr_3stage", "operator=raptr",
                                   "train.max_steps=30", "train.log_every=1", *SMALL)
    # path lengths 2 -> 3 -> 4 of 4 layers; the model itself never changes at a stage
    assert [e["after"]["layers"] for e in events] == [3, 4]
    assert all(e["max_abs_logit_diff"] == 0 for e in events)
    assert all(e["params_before"] == e["params_after"] for e in events)
    boundaries = [e["step"] for e in events]

    # each step's FLOPs are those of the path it ran (re-drawn here from the same seed)
    seed, args = trainer.engine.paths.seed, trainer.model.args
    flops = [0.0] + [m["flops"] for m in metrics]
    stage_flops = [[], [], []]
    by_length = {}
    for step in range(30):
        stage = sum(step >= b for b in boundaries)
        path = RandomPaths(4, 2 + stage, seed).sample(step)
        run_layers = 4 if path is None else len(path)
        step_flops = flops[step + 1] - flops[step]
        assert math.isclose(step_flops, train_flops(args, 8, 32, run_layers), rel_tol=1e-9)
        assert metrics[step]["path_length"] == 2 + stage
        stage_flops[stage].append(step_flops)
        by_length.setdefault(run_layers, set()).add(step_flops)
    lengths = sorted(by_length)
    assert len(lengths) >= 3 and all(max(by_length[a]) < min(by_length[b]) for a, b in zip(lengths, lengths[1:]))
    means = [sum(f) / len(f) for f in stage_flops]
    assert means[0] < means[1] < means[2]

    # the final evaluation is the full model's loss
    model = trainer.model.eval()
    with torch.no_grad():
        nll, count, partial = 0.0, 0, 0.0
        for batch in trainer.eval_batches:
            _, loss = model(batch["inputs"], batch["targets"])
            _, skipped = model(batch["inputs"], batch["targets"], layers=[0, 3])
            nll += loss.item() * batch["targets"].numel()
            partial += skipped.item() * batch["targets"].numel()
            count += batch["targets"].numel()
    val = metrics[-1]["val_loss"]
    assert abs(val - partial / count) > 0  # a skipped-layer path gives another loss ...
    assert abs(val - nll / count) <= 1e-6 * abs(val - partial / count)  # ... the logged one is the full model's


def test_sequence_length_warmup_through_the_training_loop(make_cfg, tmp_path):
    """CompoundGrowth on gpt_tiny: depth, FFN and sequence length x2 twice; T = 32 -> 64 -> 128
    with the same tokens in every step (more rows at shorter lengths)."""
    _, metrics, events = run(make_cfg, tmp_path, "schedule=compound", "operator=compound",
                             "train.max_steps=10", "train.log_every=1")
    seq_lens = [m["seq_len"] for m in metrics]
    assert seq_lens == sorted(seq_lens) and sorted(set(seq_lens)) == [32, 64, 128]
    tokens = [0] + [m["tokens"] for m in metrics]
    assert {b - a for a, b in zip(tokens, tokens[1:])} == {8 * 128}
    assert [(e["after"]["layers"], e["after"]["ffn"], e["after"]["seq_len"]) for e in events] == \
        [(2, 256, 64), (4, 512, 128)]
    assert all(set(e["dims"]) == {"layers", "ffn", "seq_len"} for e in events)


def test_length_pooling_through_the_training_loop(make_cfg, tmp_path):
    """CompoundGrowth's own length operator on bert_tiny: every step reads the same full-length
    rows (128 tokens); the blocks run on 32 -> 64 -> 128 pooled tokens, and each step's FLOPs are
    those of what ran. Changing the pooling is not function preserving: the probe logs the jump."""
    trainer, metrics, events = run(make_cfg, tmp_path, "model=bert_tiny", "schedule=compound", "operator=compound",
                                   "operator.seq_len=pool", "train.max_steps=10", "train.log_every=1")
    assert [(m["seq_len"], m["pool"]) for m in metrics] == [(32, 4)] * 2 + [(64, 2)] * 3 + [(128, 1)] * 5
    tokens = [0] + [m["tokens"] for m in metrics]
    assert {b - a for a, b in zip(tokens, tokens[1:])} == {8 * 128}
    flops = [0.0] + [m["flops"] for m in metrics]
    predicted = trainer.engine.layout(trainer.engine.shape).predicted
    for m, (a, b) in zip(metrics, zip(flops, flops[1:])):
        args = replace(trainer.model.args, layers=m["layers"], ffn=m["ffn"])
        assert math.isclose(b - a, train_flops(args, 8, 128, None, predicted, m["pool"]), rel_tol=1e-9)
    per_token = [e["flops_per_token_before"] for e in events] + [events[-1]["flops_per_token_after"]]
    assert per_token == sorted(per_token)
    assert all(CHANGED < e["max_abs_logit_diff"] < math.inf for e in events)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m)


NAMED = {  # operator: (schedule, extra overrides, growth events, function preserving)
    "msg": ("all_at_once", ["operator.ramp_steps=2"], 1, True),
    "bert2bert": ("depth_first", ["model=bert_tiny"], 2, False),
    "gstack": ("gstack_g4", [], 1, False),
    "compound": ("compound", [], 2, False),
    "raptr": ("raptr_3stage", [], 2, True),
    "hyperclone": ("width_only", [], 1, True),
}


@pytest.mark.parametrize("op", NAMED)
def test_each_named_operator_trains_through_a_schedule(make_cfg, tmp_path, op):
    schedule, extra, n_events, exact = NAMED[op]
    trainer, metrics, events = run(make_cfg, tmp_path, f"schedule={schedule}", f"operator={op}", *extra, *SMALL,
                                   "train.max_steps=12", "train.log_every=4", "train.eval_every=12")
    assert len(events) == n_events
    assert trainer.engine.shape == trainer.engine.final_shape
    assert all(math.isfinite(m["loss"]) for m in metrics)
    if exact:
        assert all(e["max_abs_logit_diff"] <= EXACT for e in events)


# ---------------------------------------------------------------------------- presets against their reference code
def test_compound_restarts_the_lr_warmup_at_every_stage(make_cfg, tmp_path):
    """The CompoundGrowth code builds a new optimizer and a new warmup-then-decay schedule for every
    stage (TF-models progressive policies.update_pt_stage, grow_bert get_optimizer)."""
    trainer, metrics, events = run(make_cfg, tmp_path, "experiment=compound", *SMALL, "train.max_steps=20",
                                   "train.log_every=1", "train.eval_every=20", "optim.warmup_steps=5")
    peak = trainer.cfg.train.lr
    lr = {m["step"] - 1: m["lr"] for m in metrics}  # the LR each step trained with
    assert [e["step"] for e in events] == [4, 10]
    for e in events:
        assert [lr[e["step"] + k] / peak for k in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr[3] / peak > 0.5  # before the first event the first warmup had finished


@pytest.mark.parametrize("family,method", [("bert", "pool"), ("gpt", "warmup")])
def test_compound_length_operator_is_pooling_for_bert(family, method):
    op = GrowthOperator(OperatorConfig(name="compound", seq_len="auto"), family)
    assert op.methods["seq_len"] == method


@pytest.mark.parametrize("remainder,sources", [("top", [0, 1, 2, 3, 2, 3]), ("bottom", [0, 1, 2, 3, 0, 1])])
def test_non_multiple_depth_growth_copies_top_or_bottom_layers(remainder, sources):
    """MSG's reference copies the top layers (grow_ops_v2.py), CompoundGrowth's layer i mod L."""
    model = make_model(FAMILIES["gpt_layernorm"], layers=4)
    grown = grow(model, operator("gpt", layers="stack", depth_remainder=remainder), layers=6)
    old = dict(model.named_parameters())
    for name, p in grown.model.named_parameters():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
        if m:
            assert torch.equal(p, old[f"blocks.{sources[int(m.group(1))]}.{m.group(2)}"]), name
    assert grown.copied_layers == [False] * 4 + [True] * 2


def test_presets_set_the_reference_choices(make_cfg):
    msg = make_cfg("operator=msg").operator
    assert (msg.ramp_start, msg.mask_placement, msg.new_layer_state, msg.new_moments, msg.lr_policy,
            msg.depth_remainder) == ("zero", "reference", "fresh", "zero", "rewind", "top")
    gstack = make_cfg("operator=gstack").operator
    assert (gstack.optimizer_state, gstack.lr_policy, gstack.depth_remainder) == ("reset", "restart", "refuse")
    compound = make_cfg("operator=compound").operator
    assert (compound.optimizer_state, compound.lr_policy, compound.depth_remainder, compound.seq_len,
            compound.symmetry_noise) == ("reset", "restart", "bottom", "auto", 0.0)
    assert make_cfg("operator=hyperclone").operator.symmetry_noise == 0.0
