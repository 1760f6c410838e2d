"""Mixture of experts: top-k routing and the load-balancing loss against a direct computation,
FLOPs of what executes, export to transformers' Mixtral, and dense -> MoE growth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msgrun.errors import ConfigError
from msgrun.flops import train_flops
from msgrun.growth.engine import exact_numerics
from msgrun.model import ModelArgs, Transformer

from conftest import perturbed

VOCAB, SEQ = 101, 20
LLAMA = dict(family="gpt", norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)


def make_model(seed=0, **kw):
    args = ModelArgs(vocab_size=VOCAB, max_seq_len=SEQ, **{**dict(layers=2, hidden=45, heads=3, head_dim=10,
                                                                   ffn=30, experts=5, experts_per_token=2), **kw},
                     **LLAMA)
    return perturbed(Transformer(args, generator=torch.Generator().manual_seed(seed)), seed + 1, 0.1)


def batch(n=3):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_routing_and_aux_loss_equal_a_direct_computation(k):
    """Each token: softmax over experts, its top-k, weights renormalised, the weighted sum of those
    experts' dense FFNs (every expert computed on every token here, then picked); the
    load-balancing loss E * sum_e f_e P_e from the same probabilities."""
    model = make_model(experts_per_token=k)
    moe = model.blocks[0].mlp
    x = torch.randn(2, SEQ, 45, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = moe(x)
        flat = x.reshape(-1, 45)
        probs = F.softmax(flat @ moe.router.weight.t(), dim=-1)
        all_out = torch.stack([expert(flat) for expert in moe.experts], dim=1)  # (N, E, H)
        ref = torch.zeros_like(flat)
        for n in range(flat.size(0)):
            top = sorted(range(5), key=lambda e: -probs[n, e].item())[:k]
            total = sum(probs[n, e] for e in top)
            ref[n] = sum(probs[n, e] / total * all_out[n, e] for e in top)
            # the aux loss's f_e: 1 for each of the token's k experts
        chosen = probs.topk(k, dim=-1).indices
        f = torch.zeros(5)
        for e in range(5):
            f[e] = (chosen == e).any(dim=-1).float().mean()
        aux = 5 * (f * probs.mean(0)).sum()
    assert (ours.reshape(-1, 45) - ref).abs().max().item() < 1e-5
    assert abs(moe.aux_loss.item() - aux.item()) < 1e-6
    if k == 5:  # every expert on every token: f_e = 1, so the loss is E * sum P_e = E
        assert abs(moe.aux_loss.item() - 5.0) < 1e-5


def test_aux_loss_joins_the_training_loss_only():
    model = make_model(router_aux_coef=0.5)
    idx = batch()
    model.train()
    _, train_loss = model(idx, idx)
    aux = torch.stack([b.mlp.aux_loss for b in model.blocks]).mean()
    model.eval()
    with torch.no_grad():
        _, eval_loss = model(idx, idx)
    assert abs(train_loss.item() - (eval_loss.item() + 0.5 * aux.item())) < 1e-5
    # and its gradient reaches the router
    model.train()
    model.zero_grad()
    model(idx, idx)[1].backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_flops_count_the_router_and_the_active_experts(k):
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model(experts_per_token=k, hidden=48, heads=4, head_dim=12, ffn=40)
    idx = torch.randint(0, VOCAB, (2, SEQ))
    with exact_numerics(), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    counted = counter.get_total_flops()
    assert abs(train_flops(model.args, 2, SEQ) - counted) / counted < 0.02
    dense_all = ModelArgs(**{**vars(model.args), "experts_per_token": 5})
    assert train_flops(dense_all, 2, SEQ) > 1.2 * counted  # only the active experts are counted


def test_export_to_mixtral_gives_the_same_logits():
    pytest.importorskip("transformers")
    from msgrun.export import to_hf

    model = make_model(hidden=48, heads=4, kv_heads=2, head_dim=12)
    hf = to_hf(model.args, model.state_dict(), {"eot": 0, "pad": 0, "mask": 1})
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 5
    model.eval()
    idx = batch()
    with torch.no_grad():
        diff = (model(idx) - hf(input_ids=idx).logits).abs().max().item()
    assert diff < 1e-4


def test_export_of_a_mixture_without_a_mixtral_layout_is_refused():
    from msgrun.export import ExportError, hf_architecture

    with pytest.raises(ExportError, match="MixtralForCausalLM only"):
        hf_architecture(ModelArgs(vocab_size=VOCAB, hidden=48, heads=4, head_dim=12, experts=4))


def test_config_refuses_more_active_experts_than_experts(make_cfg):
    from msgrun.config import check_config

    with pytest.raises(ConfigError, match="model.experts_per_token = 5 exceeds model.experts = 4"):
        check_config(make_cfg("model=moe_tiny", "model.experts_per_token=5"))


# ---------------------------------------------------------------------------- growth
def grow(model, target_experts=None, shape=None, **cfg):
    from dataclasses import replace

    from msgrun.config import OperatorConfig
    from msgrun.growth.masks import install_masks
    from msgrun.growth.operator import GrowthOperator
    from msgrun.growth.schedule import Shape

    op = GrowthOperator(OperatorConfig(name="test", **cfg), "gpt", "rope")
    final = replace(model.args, experts=target_experts or model.args.experts, **(shape or {}))
    target = Shape(final.layers, final.hidden, final.heads, final.ffn, SEQ, final.n_kv_heads, final.experts)
    grown = op.grow(model, target, final, torch.Generator().manual_seed(7))
    if grown.new_units or any(grown.new_layers):
        install_masks(grown.model, torch.zeros(()), grown.new_units, grown.new_layers, op.cfg.mask_placement)
    return grown


def logit_diff(a, b):
    idx = batch()
    a.eval(), b.eval()
    with exact_numerics(), torch.no_grad():
        return (a(idx) - b(idx)).abs().max().item()


@pytest.mark.parametrize("experts,k", [(5, 2), (3, 1), (4, 4)])
def test_sparse_upcycling_is_exact(experts, k):
    dense = make_model(experts=1, experts_per_token=k)
    grown = grow(dense, experts, experts="copy")
    moe = grown.model.blocks[1].mlp
    assert len(moe.experts) == experts and moe.router.weight.abs().sum() > 0  # a real (fresh) router
    for e in moe.experts:  # every expert a copy of the dense FFN
        assert torch.equal(e.fc.weight, dense.blocks[1].mlp.fc.weight)
    assert logit_diff(dense, grown.model) < 1e-5


def test_expert_duplication_copies_experts_and_router_rows_and_its_departure_is_measured():
    model = make_model(experts=3, experts_per_token=2)
    grown = grow(model, 6, experts="copy", symmetry_noise=0.0)
    old, new = model.blocks[0].mlp, grown.model.blocks[0].mlp
    for j in range(6):
        assert torch.equal(new.experts[j].proj.weight, old.experts[j % 3].proj.weight)
    assert torch.equal(new.router.weight, old.router.weight.repeat(2, 1))
    # a copy ties with its source and takes one of the token's two slots: not function preserving
    assert logit_diff(model, grown.model) > 1e-4
    noisy = grow(model, 6, experts="copy", symmetry_noise=1e-2).model.blocks[0].mlp.router.weight
    assert torch.equal(noisy[:3], old.router.weight) and not torch.equal(noisy[3:], old.router.weight)


@pytest.mark.parametrize("experts,copies,k", [(3, 2, 1), (3, 3, 2), (5, 2, 2)])
def test_expert_duplication_with_top_k_grown_is_exact(experts, copies, k):
    """E -> mE with operator.expert_top_k=grow: every expert copied m times with its router row, k -> mk,
    zero-sum noise on the copies' output projections. Each copy gets p_e / m of the softmax, the top mk
    are the copies of the old top k, and renormalised the m copies weigh what their source did."""
    model = make_model(experts=experts, experts_per_token=k)
    grown = grow(model, experts * copies, shape=dict(experts_per_token=k * copies), experts="copy",
                 expert_top_k="grow", symmetry_noise=1e-2)
    old, new = model.blocks[0].mlp, grown.model.blocks[0].mlp
    assert new.k == k * copies and torch.equal(new.router.weight, old.router.weight.repeat(copies, 1))
    assert not torch.equal(new.experts[experts].proj.weight, old.experts[0].proj.weight)  # symmetry broken
    assert logit_diff(model, grown.model) < 1e-5
    # the router split is what makes it exact: a copy whose router row departs from its twin's takes
    # another share of the weight, and the zero-sum noise no longer cancels
    with torch.no_grad():
        new.router.weight[experts] += 1e-2 * torch.randn(new.router.weight.shape[1],
                                                         generator=torch.Generator().manual_seed(0))
    assert logit_diff(model, grown.model) > 1e-5


@pytest.mark.parametrize("eta", [0.0, 1e-2])
def test_duplicated_experts_drift_apart_only_with_symmetry_noise(eta):
    """Copies with equal router rows and equal weights get equal gradients forever (dropout 0);
    operator.symmetry_noise on their output projections sets them apart and keeps the growth exact."""
    model = make_model(experts=2, experts_per_token=1)
    grown = grow(model, 4, shape=dict(experts_per_token=2), experts="copy", expert_top_k="grow",
                 symmetry_noise=eta).model
    opt = torch.optim.AdamW(grown.parameters(), lr=1e-2)
    grown.train()
    for _ in range(3):
        opt.zero_grad()
        grown(batch(), batch())[1].backward()
        opt.step()
    moe = grown.blocks[0].mlp
    drift = max((moe.experts[0].fc.weight - moe.experts[2].fc.weight).abs().max().item(),
                (moe.router.weight[0] - moe.router.weight[2]).abs().max().item())
    assert drift > 1e-4 if eta else drift < 1e-7


def test_growing_top_k_needs_whole_counts(make_cfg):
    from msgrun.growth.engine import GrowthEngine
    from msgrun.train import final_model_args

    def engine(*overrides):
        cfg = make_cfg("experiment=expert_duplication", *overrides)
        return GrowthEngine(cfg, final_model_args(cfg.model, cfg.data.vocab_size))

    assert engine().initial_args().experts_per_token == 1  # moe_tiny: 2 experts, top-1, then 4, top-2
    with pytest.raises(ConfigError, match=r"schedule.start has 3 experts.*2 x 3 / 4 of them per token"):
        engine("schedule.start.experts=3")
    with pytest.raises(ConfigError, match=r"grows experts 4 -> 6 with operator.expert_top_k=grow.*not a multiple"):
        engine("model.experts=6", "model.experts_per_token=3", "schedule.start.experts=4")
    engine("schedule.start.experts=3", "operator.expert_top_k=fixed")  # fixed k: any counts


@pytest.mark.parametrize("methods,hidden", [(dict(hidden="tile", ffn="fpi", heads="fpi"), 90),
                                            (dict(hidden="msg", ffn="msg", heads="msg", layers="msg"), 61)],
                         ids=["copying", "msg"])
def test_width_and_depth_growth_of_a_mixture_is_exact(methods, hidden):
    """Every expert grows its FFN units as a dense FFN would; the router reads the grown hidden
    units as any consumer (tile: the copies' columns divided; msg: masked norm outputs)."""
    model = make_model()
    grown = grow(model, shape=dict(hidden=hidden, ffn=37, heads=4, layers=3 if "layers" in methods else 2),
                 **methods, mask_placement="ours")
    assert grown.model.args.experts == 5 and grown.model.blocks[0].mlp.experts[4].proj.weight.shape == (hidden, 37)
    assert logit_diff(model, grown.model) < 1e-5


TINY_RUN = ("model.seq_len=32", "data.vocab_size=500", "train.max_steps=6", "train.eval_every=6",
            "train.batch_size=4", "model.layers=2")


def test_moe_model_upcycles_in_a_run_and_exports(make_cfg, tmp_path):
    """`msgrun model=moe_tiny schedule=upcycle`, small and in-process: no operator named, since
    experts have one growth method (copy), which the default operator=none adopts for them."""
    from msgrun.train import Trainer

    from conftest import read_jsonl

    cfg = make_cfg("model=moe_tiny", "schedule=upcycle", *TINY_RUN)
    Trainer(cfg, tmp_path).run()
    (event,) = read_jsonl(tmp_path / "growth.jsonl")
    assert event["dims"] == ["experts"] and "experts" not in event["before"] and event["after"]["experts"] == 4
    assert event["operator"] == "none" and event["methods"] == {"experts": "copy"}
    assert event["experts_per_token"] == [1, 2] and event["max_abs_logit_diff"] < 1e-5
    pytest.importorskip("transformers")
    from msgrun.export import checkpoint_model, load_checkpoint, max_logit_diff, to_hf

    _, state = load_checkpoint(tmp_path, None)
    model = checkpoint_model(state)
    hf = to_hf(model.args, model.state_dict(), {"eot": 0, "pad": 0, "mask": 1})
    assert max_logit_diff(model, hf, torch.arange(32).unsqueeze(0)) < 1e-4


def test_expert_duplication_runs_exactly(make_cfg, tmp_path):
    """`msgrun experiment=expert_duplication`, small: 2 experts at top-1 become 4 at top-2, exactly."""
    from msgrun.train import Trainer

    from conftest import read_jsonl

    Trainer(make_cfg("experiment=expert_duplication", *TINY_RUN), tmp_path).run()
    (event,) = read_jsonl(tmp_path / "growth.jsonl")
    assert (event["before"]["experts"], event["after"]["experts"], event["experts_per_token"]) == (2, 4, [1, 2])
    assert event["methods"] == {"experts": "copy"} and event["max_abs_logit_diff"] < 1e-5
