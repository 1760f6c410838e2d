"""Growing the mixture of experts (model.experts; the MoE module in msgrun/model.py).

`operator.experts=copy` (the one method for experts, so a schedule growing experts uses it even
when the operator leaves operator.experts null: growth/operator.py) grows the experts of every
layer:

* dense -> E experts (sparse upcycling, Komatsuzaki et al., ICLR 2023): every expert is a copy of
  the layer's dense FFN and the router is freshly initialised (N(0, init_std)). Exact whatever
  the router: a token's output is sum_k w_k FFN(x) with the top-k weights renormalised to sum
  to 1, and all experts are the same FFN. The copies then diverge because different tokens
  route to them. Optimizer state: each expert carries the dense FFN's moments; the router
  starts fresh.
* E -> E' experts (expert duplication): new expert j copies expert j mod E, router rows copied.
  What happens to top-k is `operator.expert_top_k`:

  fixed  k stays model.experts_per_token (expert upcycling's recipe: Amazon's
         amazon-science/expert-upcycling keeps top-K). Not exact: a duplicate ties with its
         source and takes one of the token's k slots, so the probe's logit difference in
         growth.jsonl is the departure. operator.symmetry_noise is relative noise on the
         duplicates' router rows (the reference's copy_noise; 0: none); with exact ties a copy
         is never picked before its source (torch.topk's order).
  grow   k grows with the experts: a shape with E experts runs k = model.experts_per_token x E /
         model.experts of them (an integer at every stage, or refused). E -> mE copies every
         expert m times, so k -> mk. Exact, derived for this model's routing (softmax over all
         experts, top-k, weights renormalised): the m copies of expert e have identical router
         rows, so each gets probability p_e / m (the softmax denominator is m times larger);
         the top mk are exactly the m copies of each of the old top k (ties are within a copy
         group, never across its boundary); renormalised, each copy weighs
         p_e / (m sum_topk p), and the m copies, computing the same FFN, add up to the old
         weight p_e / sum_topk p. (The same holds without renormalisation and for top-k-then-
         softmax routers.) It also needs E' a multiple of E (uneven copy counts would rank a
         twice-copied expert's halves below a once-copied one's whole). The router rows stay
         identical so the copies keep equal weights, and operator.symmetry_noise goes on the
         copies' output projections as zero-sum noise over each copy group: their weighted
         sum is unchanged (exact), and they receive different gradients and drift apart. The
         cost: k, hence the active FFN compute per token, grows m-fold with the experts; the
         load-balancing term (E * sum_e f_e P_e) scales with k as well (uniform load: k).

Depth and width growth of a mixture go through the generic maps (growth/surgery.py lays every
expert out as the dense FFN, and the router reads the hidden units as any consumer does).
"""

from __future__ import annotations

import torch

from msgrun.errors import ConfigError
from msgrun.growth.methods import Method
from msgrun.growth.surgery import UnitMap

TOP_K = ("fixed", "grow")  # operator.expert_top_k


def expert_map(old: int, new: int) -> UnitMap:
    """Source expert of every new expert: the dense FFN (old = 1) or round-robin over the old experts."""
    return UnitMap.from_sources(torch.arange(new) % old)


def experts_per_token(mode: str, final_k: int, final_experts: int, experts: int) -> int:
    """model.experts_per_token of a shape with `experts` experts: the final model's k (fixed), or
    k x experts / model.experts (grow; check_top_k has refused a fraction). A dense shape keeps the
    final k: it has no router, and upcycling it is exact for any k."""
    if mode == "fixed" or experts <= 1:
        return final_k
    return max(1, final_k * experts // final_experts)


def check_top_k(cfg, start, stages, final, final_k: int) -> None:
    """operator.expert_top_k=grow: every mixture shape runs a whole number of experts per token,
    and every duplication copies each expert the same number of times (or it is not exact)."""
    if cfg.expert_top_k != "grow" or final.experts <= 1:
        return
    shapes = [("schedule.start", start)] + [(s.describe(), s.target) for s in stages]
    for where, shape in shapes:
        if shape.experts > 1 and (final_k * shape.experts) % final.experts:
            raise ConfigError(
                f"{where} has {shape.experts} experts, and operator.expert_top_k=grow runs model.experts_per_token x "
                f"experts / model.experts = {final_k} x {shape.experts} / {final.experts} of them per token, which is "
                "not a whole number. Choose expert counts that keep it whole (e.g. halve the experts of a model with "
                "an even experts_per_token), or operator.expert_top_k=fixed (k stays; duplication not exact).")
    before = start
    for stage in stages:
        old, new = before.experts, stage.target.experts
        if "experts" in stage.dims and old > 1 and new % old:
            raise ConfigError(
                f"{stage.describe()} grows experts {old} -> {new} with operator.expert_top_k=grow, which is exact only "
                f"when every expert is copied the same number of times: {new} is not a multiple of {old}. Grow to a "
                "multiple, or use operator.expert_top_k=fixed (not exact; the departure is logged).")
        before = stage.target


@torch.no_grad()
def break_router_ties(model, um: UnitMap, eta: float, gen: torch.Generator) -> None:
    """Relative noise eta on the router rows of duplicated experts (not on the first copy of each)."""
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


@torch.no_grad()
def split_output_noise(model, um: UnitMap, eta: float, gen: torch.Generator) -> None:
    """Zero-sum noise over each copy group on the experts' output projections (relative to their
    RMS): copies with equal gate weights still add up to their source, but learn apart."""
    from msgrun.growth.copying import copy_groups

    groups = copy_groups(um)
    for block in model.blocks:
        experts = block.mlp.experts
        for members in groups:
            weights = [experts[int(j)].proj.weight for j in members]
            scale = eta * weights[0].float().pow(2).mean().sqrt()
            noise = torch.randn(len(weights), *weights[0].shape, generator=gen) * scale
            noise -= noise.mean(dim=0, keepdim=True)
            for w, n in zip(weights, noise):
                w += n.to(w.device, w.dtype)


def finish(grown, old_model, dim, unit_maps, origins, cfg, gen) -> None:
    um = unit_maps[dim]
    if cfg.symmetry_noise <= 0 or old_model.args.experts == 1:
        return  # upcycling: the router is fresh, nothing ties
    if cfg.expert_top_k == "grow":
        split_output_noise(grown, um, cfg.symmetry_noise, gen)
    else:
        break_router_ties(grown, um, cfg.symmetry_noise, gen)


METHOD = Method(
    "copy", ("experts",), "dense FFN -> experts, each a copy (sparse upcycling: exact), or experts -> more, copies "
    "with router rows copied (expert duplication: exact with operator.expert_top_k=grow, which raises top-k with the "
    "experts; not exact with fixed top-k)",
    unit_map=lambda dim, old, new, cfg, gen: expert_map(old, new), finish=finish)
