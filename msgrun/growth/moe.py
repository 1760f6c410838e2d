"""Growing the mixture of experts (model.experts; the MoE module in msgrun/model.py).

`operator.experts=copy` (preset `operator=upcycle`) grows the experts of every layer. It is the
one method for experts, so a schedule growing experts uses it even when the operator leaves
operator.experts null (GrowthOperator.adopt_sole_methods):

* dense -> E experts (sparse upcycling, Komatsuzaki et al., ICLR 2023): every expert is a copy of
  the layer's dense FFN and the router is freshly initialised (N(0, init_std)). Exact whatever
  the router: a token's output is sum_k w_k FFN(x) with the top-k weights renormalised to sum
  to 1, and all experts are the same FFN. The copies then diverge because different tokens
  route to them. Optimizer state: each expert carries the dense FFN's moments; the router
  starts fresh.
* E -> E' experts (expert duplication): new expert j copies expert j mod E, router rows copied.
  Not exact with a fixed top-k: a duplicated expert ties with its source and takes one of the
  token's k slots, so the probe's logit difference in growth.jsonl is the departure. Ties are
  broken by operator.symmetry_noise (relative noise on the copies' router rows; 0: none); with
  exact ties the copy would never be picked before its source (torch.topk's order).

Depth and width growth of a mixture go through the generic maps (growth/surgery.py lays every
expert out as the dense FFN, and the router reads the hidden units as any consumer does).
"""

from __future__ import annotations

import torch

from msgrun.growth.methods import Method
from msgrun.growth.surgery import UnitMap


def expert_map(old: int, new: int) -> UnitMap:
    """Source expert of every new expert: the dense FFN (old = 1) or round-robin over the old experts."""
    return UnitMap.from_sources(torch.arange(new) % old)


@torch.no_grad()
def break_router_ties(model, um: UnitMap, eta: float, gen: torch.Generator) -> None:
    """Relative noise eta on the router rows of duplicated experts (not on the first copy of each)."""
    if eta <= 0 or int(um.index.max()) == 0:
        return  # upcycling: the router is fresh, nothing ties
    seen, copies = set(), torch.zeros(um.index.numel(), dtype=torch.bool)
    for j, s in enumerate(um.index.tolist()):
        copies[j] = s in seen
        seen.add(s)
    for block in model.blocks:
        router = getattr(block.mlp, "router", None)
        if router is None:
            continue
        w = router.weight
        scale = eta * w.float().pow(2).mean().sqrt()
        noise = torch.randn(int(copies.sum()), w.shape[1], generator=gen).to(w.device) * scale
        w[copies.to(w.device)] += noise.to(w.dtype)


METHOD = Method(
    "copy", ("experts",), "dense FFN -> experts, each a copy (sparse upcycling: exact), or experts -> more, copies "
    "with router rows copied and perturbed by operator.symmetry_noise (expert duplication: not exact)",
    unit_map=lambda dim, old, new, cfg, gen: expert_map(old, new),
    finish=lambda grown, old_model, dim, unit_maps, origins, cfg, gen: break_router_ties(
        grown, unit_maps[dim], cfg.symmetry_noise, gen))
