"""MSG growth: strict function preservation in every dimension, the ramp, optimizer transfer."""

import math

import pytest
import torch

from msgrun.config import OperatorConfig, OptimConfig
from msgrun.growth.engine import exact_numerics
from msgrun.growth.masks import install_masks, masked_modules, remove_masks
from msgrun.growth.operator import GrowthOperator
from msgrun.growth.optim_transfer import transfer_adamw
from msgrun.growth.schedule import Shape
from msgrun.model import ModelArgs, Transformer
from msgrun.optim import build_adamw

from conftest import perturbed, read_jsonl

FAMILIES = {
    "gpt_layernorm": dict(family="gpt"),
    "gpt_rmsnorm": dict(family="gpt", norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False),
    "bert": dict(family="bert"),
}
# odd sizes on purpose: nothing may rely on powers of two or integer ratios
GROWTHS = {
    "hidden": ({"hidden": 96}, {"hidden": 160}),
    "heads": ({"heads": 3}, {"heads": 5}),
    "ffn": ({"ffn": 200}, {"ffn": 520}),
    "layers": ({"layers": 2}, {"layers": 5}),
    "hidden+ffn": ({"hidden": 96, "ffn": 200}, {"hidden": 160, "ffn": 520}),
    "layers+heads": ({"layers": 2, "heads": 3}, {"layers": 5, "heads": 5}),
    "all": ({"layers": 2, "hidden": 96, "heads": 3, "ffn": 200}, {"layers": 5, "hidden": 160, "heads": 5, "ffn": 520}),
}
BASE = dict(layers=5, hidden=160, heads=5, ffn=520, seq_len=24)


PLACEMENTS = ("reference", "ours")


def msg_operator(family, **kw):
    cfg = OperatorConfig(name="msg", layers="msg", hidden="msg", heads="msg", ffn="msg", **kw)
    return GrowthOperator(cfg, family)


def small_model(arch, start, seed=0):
    shape = {**BASE, **start}
    args = ModelArgs(vocab_size=101, max_seq_len=24, head_dim=16, layers=shape["layers"], hidden=shape["hidden"],
                     heads=shape["heads"], ffn=shape["ffn"], **arch)
    return perturbed(Transformer(args, generator=torch.Generator().manual_seed(seed)), seed + 1, 0.05)


def final_args(model, target):
    shape = {**BASE, **target}
    return ModelArgs(**{**vars(model.args), "layers": shape["layers"], "hidden": shape["hidden"],
                        "heads": shape["heads"], "ffn": shape["ffn"]})


def logits(model, idx, positions=None):
    model.eval()
    with exact_numerics(), torch.no_grad():
        return model(idx, None, positions).float()


def grow_msg(model, target, placement="reference", **op_kw):
    op = msg_operator(model.args.family, mask_placement=placement, **op_kw)
    fa = final_args(model, target)
    shape = Shape(fa.layers, fa.hidden, fa.heads, fa.ffn, 24)
    grown = op.grow(model, shape, fa, torch.Generator().manual_seed(7))
    alpha = torch.zeros(())
    install_masks(grown.model, alpha, grown.new_units, grown.new_layers, placement)
    return grown, alpha


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("growth", GROWTHS.values(), ids=GROWTHS.keys())
def test_msg_is_function_preserving(arch, growth, placement):
    start, target = growth
    model = small_model(arch, start)
    idx = torch.randint(3, 101, (3, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 5, 23]] * 3) if arch["family"] == "bert" else None
    before = logits(model, idx, positions)
    grown, alpha = grow_msg(model, target, placement)
    after = logits(grown.model, idx, positions)
    assert (before - after).abs().max().item() <= 1e-5
    # and the growth is real: at alpha = 1 the new units change the function
    alpha.fill_(1.0)
    with_masks = logits(grown.model, idx, positions)
    assert (before - with_masks).abs().max().item() > 1e-3
    # alpha = 1 is the plain grown model under either placement
    remove_masks(grown.model)
    assert (with_masks - logits(grown.model, idx, positions)).abs().max().item() <= 1e-5


def masked_names(model):
    return {n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in masked_modules(model)}


@pytest.mark.parametrize("dim,reference,ours", [
    ("heads", {"attn.qkv"}, {"attn.proj"}),
    ("ffn", {"mlp.fc"}, {"mlp.proj"}),
    ("hidden", {"attn_norm", "mlp_norm", "emb_norm", "mlm_head.norm"},
     {"attn_norm", "mlp_norm", "emb_norm", "mlm_head.norm", "tok_emb", "pos_emb", "attn.proj", "mlp.proj"}),
])
def test_mask_placement_puts_masks_where_the_reference_does(dim, reference, ours):
    """reference (cofe-ai/MSG bert_ex_v2.py): new heads' q, k, v; the FFN before its activation;
    for hidden only the norms (BERT's raw embeddings enter the embedding norm unmasked)."""
    model = small_model(FAMILIES["bert"], GROWTHS[dim][0])
    for placement, expected in (("reference", reference), ("ours", ours)):
        grown, _ = grow_msg(model, GROWTHS[dim][1], placement)
        assert masked_names(grown.model) == expected, placement


def scaled_rows(model, name, rows, factor, columns=False):
    """A plain copy of `model` whose linear layer `name` has its weight's `rows` (and their bias
    entries) multiplied by `factor`; columns=True: the weight's columns `rows` instead."""
    import copy

    out = copy.deepcopy(model)
    remove_masks(out)
    params = dict(out.named_parameters())
    with torch.no_grad():
        if columns:
            params[f"{name}.weight"][:, rows] *= factor
        else:
            params[f"{name}.weight"][rows] *= factor
            if f"{name}.bias" in params:
                params[f"{name}.bias"][rows] *= factor
    return out


@pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())
def test_mid_ramp_reference_heads_scale_scores_by_alpha_squared(arch):
    """Reference placement at alpha: new heads' q, k and v are scaled by alpha, so their scores
    scale by alpha^2. That is exactly msgrun's placement (new heads' outputs x alpha) applied to
    a model whose new q and k rows are multiplied by alpha; and the two placements differ."""
    a, heads, d = 0.4, 3, 16
    model = small_model(arch, {"heads": heads})
    idx = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    ref, alpha = grow_msg(model, {"heads": 5}, "reference")
    ours, alpha_ours = grow_msg(model, {"heads": 5}, "ours")
    alpha.fill_(a)
    alpha_ours.fill_(a)
    W = 5 * d
    new_qk = torch.cat([torch.arange(heads * d, W), W + torch.arange(heads * d, W)])
    twin = ours.model
    for i in range(len(twin.blocks)):
        twin = scaled_rows(twin, f"blocks.{i}.attn.qkv", new_qk, a)
    install_masks(twin, alpha_ours, ours.new_units, ours.new_layers, "ours")
    assert (logits(ref.model, idx) - logits(twin, idx)).abs().max().item() <= 1e-5
    assert (logits(ref.model, idx) - logits(ours.model, idx)).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())
def test_mid_ramp_ffn_mask_before_or_after_the_activation(arch):
    """Reference: act(alpha * fc(x)) for new units = the plain model with the new fc rows x alpha.
    Ours: alpha * act(fc(x)) = the plain model with the new proj columns x alpha."""
    a, old, new = 0.3, 200, 520
    model = small_model(arch, {"ffn": old})
    idx = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    out = {}
    for placement in PLACEMENTS:
        grown, alpha = grow_msg(model, {"ffn": new}, placement)
        alpha.fill_(a)
        twin = grown.model
        for i in range(len(twin.blocks)):
            if placement == "reference":
                chunks = 2 if arch.get("mlp") == "swiglu" else 1
                rows = torch.cat([c * new + torch.arange(old, new) for c in range(chunks)])
                twin = scaled_rows(twin, f"blocks.{i}.mlp.fc", rows, a)
            else:
                twin = scaled_rows(twin, f"blocks.{i}.mlp.proj", torch.arange(old, new), a, columns=True)
        out[placement] = logits(grown.model, idx)
        assert (out[placement] - logits(twin, idx)).abs().max().item() <= 1e-5, placement
    assert (out["reference"] - out["ours"]).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())
def test_mid_ramp_hidden_placements_differ(arch):
    model = small_model(arch, {"hidden": 96})
    idx = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 5, 23]] * 2) if arch["family"] == "bert" else None
    out = {}
    for placement in PLACEMENTS:
        grown, alpha = grow_msg(model, {"hidden": 160}, placement)
        alpha.fill_(0.5)
        out[placement] = logits(grown.model, idx, positions)
    assert (out["reference"] - out["ours"]).abs().max().item() > 1e-4


@pytest.mark.parametrize("depth_init,order", [("random", "stack"), ("copy", "interleave")])
def test_msg_depth_variants_are_function_preserving(depth_init, order):
    model = small_model(FAMILIES["gpt_layernorm"], {"layers": 2})
    idx = torch.randint(3, 101, (2, 24))
    before = logits(model, idx)
    grown, _ = grow_msg(model, {"layers": 5}, depth_init=depth_init, depth_order=order)
    assert (before - logits(grown.model, idx)).abs().max().item() <= 1e-5


def test_depth_growth_copies_the_top_layers_with_fresh_optimizer_state():
    """MSG reference (grow_ops_v2.py): 4 -> 6 appends copies of layers 2 and 3, and the new blocks
    join the optimizer with no state; old layers keep theirs exactly."""
    from msgrun.growth.engine import GrowthEngine
    from msgrun.growth.schedule import Stage
    from msgrun.train import final_model_args

    from conftest import compose_cfg

    for state in ("fresh", "carry"):
        cfg = compose_cfg(["operator=msg", "schedule=layers_only", "model.layers=6", "schedule.start.layers=4",
                           "train.max_steps=100", f"operator.new_layer_state={state}"])
        engine = GrowthEngine(cfg, final_model_args(cfg.model, 101))
        model = Transformer(engine.initial_args(), generator=torch.Generator().manual_seed(0))
        opt = trained_optimizer(model, steps=2)
        grown_model, new_opt, grown, _ = engine.build_grown(model, opt, engine.stages[0], torch.Generator())
        assert grown.copied_layers == [False] * 4 + [True] * 2 and grown.new_layers == [False] * 4 + [True] * 2
        old = dict(model.named_parameters())
        for name, p in grown_model.named_parameters():
            if not name.startswith("blocks."):
                continue
            i, leaf = int(name.split(".")[1]), name.split(".", 2)[2]
            source = old[f"blocks.{[0, 1, 2, 3, 2, 3][i]}.{leaf}"]
            assert torch.equal(p, source), name
            if i >= 4 and state == "fresh":
                assert p not in new_opt.state, name  # AdamW starts it at step 0
            else:
                assert torch.equal(new_opt.state[p]["exp_avg"], opt.state[source]["exp_avg"]), name


def test_masks_are_removed_without_a_trace():
    model = small_model(FAMILIES["gpt_layernorm"], GROWTHS["all"][0])
    grown, alpha = grow_msg(model, GROWTHS["all"][1])
    assert masked_modules(grown.model)
    names_before = [n for n, _ in grown.model.named_parameters()]
    alpha.fill_(1.0)
    idx = torch.randint(3, 101, (2, 24))
    with_masks = logits(grown.model, idx)
    n = remove_masks(grown.model)
    assert n > 0 and masked_modules(grown.model) == []
    assert not any(hasattr(m, "alpha") for m in grown.model.modules())
    assert [n for n, _ in grown.model.named_parameters()] == names_before
    # alpha = 1 is exactly the plain model
    assert torch.allclose(with_masks, logits(grown.model, idx), atol=1e-6)


def trained_optimizer(model, steps=3, betas=(0.9, 0.999)):
    opt = build_adamw(model, 1e-3, OptimConfig(betas=list(betas), weight_decay=0.0), "cpu")
    idx = torch.randint(3, 101, (4, 24))
    for _ in range(steps):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_old_optimizer_state_is_carried_exactly():
    model = small_model(FAMILIES["gpt_layernorm"], GROWTHS["all"][0])
    opt = trained_optimizer(model)
    grown, _ = grow_msg(model, GROWTHS["all"][1])
    new_opt = transfer_adamw(opt, model, grown.model, grown.origins, OperatorConfig(), OptimConfig(), "cpu")
    new_params = dict(grown.model.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        old, new = opt.state[p], new_opt.state[new_params[name]]
        # the entries that hold old values (fused qkv / swiglu chunks move, so ask the origin),
        # in the same order as the old tensor
        m, v = new["exp_avg"], new["exp_avg_sq"]
        for axis, amap in enumerate(grown.origins[name].maps):
            if amap is not None:
                keep = torch.nonzero(amap[0] >= 0).flatten()
                assert torch.equal(amap[0][keep], torch.arange(p.shape[axis]))
                m, v = m.index_select(axis, keep), v.index_select(axis, keep)
        assert torch.equal(m, old["exp_avg"]), name
        assert torch.equal(v, old["exp_avg_sq"]), name
        assert torch.equal(new["step"], old["step"])
        checked += 1
    assert checked == len(list(model.parameters()))


@pytest.mark.parametrize("policy", ["zero", "mean"])
def test_first_update_of_new_entries(policy):
    """With zero moments and the kept step count (the MSG reference), a new entry's first Adam
    update is lr * (1 - b1) / sqrt(1 - b2) = 3.16 lr for b2 = 0.999; under the `mean` policy the
    typical first update is below lr/2."""
    model = small_model(FAMILIES["gpt_layernorm"], {"ffn": 200})
    opt = trained_optimizer(model, steps=3)
    for state in opt.state.values():  # a long-trained model: bias corrections have faded
        state["step"].fill_(10_000)
    grown, alpha = grow_msg(model, {"ffn": 520})
    cfg = OperatorConfig(new_moments=policy)
    new_opt = transfer_adamw(opt, model, grown.model, grown.origins, cfg,
                           OptimConfig(betas=[0.9, 0.999], weight_decay=0.0), "cpu")
    w = grown.model.blocks[0].mlp.fc.weight
    before = w.detach().clone()
    alpha.fill_(1.0)  # new units receive their full gradient
    idx = torch.randint(3, 101, (4, 24))
    _, loss = grown.model(idx, idx)
    loss.backward()
    new_opt.step()
    lr = new_opt.param_groups[0]["lr"]
    ratio = ((w.detach() - before)[200:].abs() / lr).flatten()
    ratio = ratio[ratio > 0]
    if policy == "zero":
        assert math.isclose(ratio.median().item(), 0.1 / math.sqrt(0.001), rel_tol=0.02)
    else:  # an established entry's update size: well below lr for most entries
        assert ratio.median().item() < 0.5


def test_growth_through_the_training_loop(make_cfg, tmp_path):
    """`msgrun schedule=depth_first operator=msg`-style run: events fire on schedule, each proves
    function preservation in growth.jsonl, alpha ramps to exactly 1, and the masks are gone."""
    from msgrun.train import Trainer

    cfg = make_cfg("schedule=all_at_once", "operator=msg", "operator.ramp_steps=4", "train.max_steps=20",
                   "train.log_every=1", "model.layers=3", "model.hidden=96", "model.heads=3", "model.ffn=200",
                   "schedule.start.layers=2", "schedule.start.hidden=64", "schedule.start.heads=2",
                   "schedule.start.ffn=100", "schedule.stages.0.at_fraction=null", "schedule.stages.0.at_step=6")
    trainer = Trainer(cfg, tmp_path, {"schedule": "all_at_once", "operator": "msg"})
    trainer.run()
    events = read_jsonl(tmp_path / "growth.jsonl")
    assert len(events) == 1 and events[0]["step"] == 6
    e = events[0]
    assert e["before"]["hidden"] == 64 and e["after"] == {"layers": 3, "hidden": 96, "heads": 3, "ffn": 200, "seq_len": 128}
    assert e["max_abs_logit_diff"] <= 1e-5
    assert abs(e["probe_loss_before"] - e["probe_loss_after"]) <= 1e-5
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    alphas = [m.get("alpha") for m in metrics]
    # logged after steps 7..11: the event's step trains at alpha 0 (as the reference); the masks
    # go after the step at alpha = 1
    assert alphas[6:11] == [0.0, 0.25, 0.5, 0.75, None]
    assert masked_modules(trainer.model) == []
    assert [m["hidden"] for m in metrics][:7] == [64] * 6 + [96]


def test_readme_card_command_runs_at_80_steps(make_cfg, tmp_path):
    """`msgrun schedule=depth_first operator=msg train.max_steps=80`: the preset's ramp is a
    fraction of the run (0.05: 4 steps here), so a short budget no longer lands a stage inside a
    ramp; both events are exact."""
    from msgrun.train import Trainer

    cfg = make_cfg("schedule=depth_first", "operator=msg", "train.max_steps=80", "train.eval_every=80",
                   "model.hidden=32", "model.heads=2", "model.head_dim=16", "model.ffn=64", "model.seq_len=32")
    trainer = Trainer(cfg, tmp_path, {"schedule": "depth_first", "operator": "msg"})
    assert trainer.engine.ramp_steps == 4 and trainer.engine.trigger_steps == [16, 32]
    assert trainer.run()["status"] == "completed"
    events = read_jsonl(tmp_path / "growth.jsonl")
    assert [e["step"] for e in events] == [16, 32]
    assert all(e["max_abs_logit_diff"] <= 1e-5 for e in events)
    assert masked_modules(trainer.model) == []


def test_a_new_block_sharded_by_fsdp_loses_its_blend_at_the_end_of_the_ramp(tmp_path):
    """FSDP2 gives a sharded block a class of its own (FSDPBlendedBlock for a new post-norm block
    masked before sharding): remove_masks must still find it, keep it sharded and make it a plain
    block, with the same output at alpha = 1. (Before: the block stayed blended for the rest of the run.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from msgrun.growth.masks import BlendedBlock
    from msgrun.model import Block

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = small_model({"family": "bert"}, {"layers": 2})
        alpha = torch.ones(())
        install_masks(model, alpha, {}, [False, True])
        assert isinstance(model.blocks[1], BlendedBlock)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        x = torch.randint(0, 101, (2, 12))
        before = model(x).clone()
        assert masked_modules(model) == ["blocks.1"]
        assert remove_masks(model) == 1 and masked_modules(model) == []
        block = model.blocks[1]
        assert isinstance(block, FSDPModule) and isinstance(block, Block) and not isinstance(block, BlendedBlock)
        assert not hasattr(block, "alpha")
        after = model(x)
        assert torch.equal(before, after)
    finally:
        dist.destroy_process_group()
