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

VOCAB, SEQ = 101, 20
LLAMA = dict(family="gpt", norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)


def make_model(seed=0, **kw):
    args = ModelArgs(vocab_size=VOCAB, max_seq_len=SEQ, **{**dict(layers=2, hidden=45, heads=3, head_dim=10,
                                                                   ffn=30, experts=5, experts_per_token=2), **kw},
                     **LLAMA)
    model = Transformer(args, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


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
