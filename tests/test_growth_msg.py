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

from conftest import read_jsonl

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


def msg_operator(family, **kw):
    cfg = OperatorConfig(name="msg", layers="msg", hidden="msg", heads="msg", ffn="msg", **kw)
    return GrowthOperator(cfg, family)


def small_model(arch, start, seed=0):
    shape = {**BASE, **start}
    args = ModelArgs(vocab_size=101, max_seq_len=24, head_dim=16, layers=shape["layers"], hidden=shape["hidden"],
                     heads=shape["heads"], ffn=shape["ffn"], **arch)
    model = Transformer(args, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial norm gains and biases: the masked norms must handle them
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def final_args(model, target):
    shape = {**BASE, **target}
    return ModelArgs(**{**vars(model.args), "layers": shape["layers"], "hidden": shape["hidden"],
                        "heads": shape["heads"], "ffn": shape["ffn"]})


def logits(model, idx, positions=None):
    model.eval()
    with exact_numerics(), torch.no_grad():
        return model(idx, None, positions).float()


def grow_msg(model, target, **op_kw):
    op = msg_operator(model.args.family, **op_kw)
    fa = final_args(model, target)
    shape = Shape(fa.layers, fa.hidden, fa.heads, fa.ffn, 24)
    grown = op.grow(model, shape, fa, torch.Generator().manual_seed(7))
    alpha = torch.zeros(())
    install_masks(grown.model, alpha, grown.new_units, grown.new_layers)
    return grown, alpha


@pytest.mark.parametrize("arch", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("growth", GROWTHS.values(), ids=GROWTHS.keys())
def test_msg_is_function_preserving(arch, growth):
    start, target = growth
    model = small_model(arch, start)
    idx = torch.randint(3, 101, (3, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 5, 23]] * 3) if arch["family"] == "bert" else None
    before = logits(model, idx, positions)
    grown, alpha = grow_msg(model, target)
    after = logits(grown.model, idx, positions)
    assert (before - after).abs().max().item() <= 1e-5
    # and the growth is real: at alpha = 1 the new units change the function
    alpha.fill_(1.0)
    assert (before - logits(grown.model, idx, positions)).abs().max().item() > 1e-3


@pytest.mark.parametrize("depth_init,order", [("random", "stack"), ("copy", "interleave")])
def test_msg_depth_variants_are_function_preserving(depth_init, order):
    model = small_model(FAMILIES["gpt_layernorm"], {"layers": 2})
    idx = torch.randint(3, 101, (2, 24))
    before = logits(model, idx)
    grown, _ = grow_msg(model, {"layers": 5}, depth_init=depth_init, depth_order=order)
    assert (before - logits(grown.model, idx)).abs().max().item() <= 1e-5


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
