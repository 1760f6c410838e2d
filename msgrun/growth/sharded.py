"""A growth event under FSDP2 that never holds the whole model or optimizer state on one rank.

The growth operators are maps of parameters (growth/surgery.py): each new parameter is built
from one old parameter (its `Origin.source`: the same tensor, or the same name in the layer a
new layer copies) through unit maps, and its AdamW moments from that parameter's moments. So the
event runs one new parameter at a time: every rank gathers the one old parameter (and its
moments) the new one draws from, builds the new parameter and its moments at full size, keeps
its own shard of each and frees the rest. The grown model itself is created on the meta device,
sharded, and only then allocated, so a rank holds its shards of the old and the new state plus
one parameter group: about (old + new state) / world size + the largest parameter and moments.

Exactness: every rank draws the same numbers as the whole-model growth in the same order (the
operator's plan first, then each new parameter's fresh init in parameter order, then each copying
dimension's symmetry noise in parameter order), so the grown model equals the single-process one
bit for bit, and the moments follow the same rule (optim_transfer.moved_moment).

A method that changes the grown model as a whole after the transplant (its `finish` hook: AKI,
LEMON, G_zero, mixture router ties; or LiGO, which builds the model itself) cannot be split
this way: `unsupported` names it, and the trainer then gathers the model as before and logs why.
"""

from __future__ import annotations

import re

import torch

from msgrun import distributed
from msgrun.growth.copying import add_symmetry_noise, consumes, copy_groups
from msgrun.growth.expansion import OUTPUT_PROJECTIONS
from msgrun.growth.masks import MASK_ATTRS
from msgrun.growth.optim_transfer import in_layers, moved_moment
from msgrun.growth.surgery import UNIT_DIMS, Origin, axis_map, layer_source_name, parameter_axes, sibling_name, transplant, \
    unit_size
from msgrun.model import Transformer, init_std, rope_cache
from msgrun.optim import build_adamw


def unsupported(operator, stage) -> str | None:
    """Why this event cannot grow parameter by parameter (None: it can)."""
    if operator.builder is not None:
        return f"operator {operator.builder.name} builds the whole grown model itself"
    for d in stage.dims:
        if d not in UNIT_DIMS:
            continue  # finish hooks run for the grown width dimensions only (GrowthOperator.grow)
        method = operator.method("heads" if d == "kv_heads" else d)
        if method is not None and method.finish is not None:
            return (f"operator.{d}={method.name} rewrites the grown model as a whole after the transplant "
                    f"(its finish step reads several parameters at once)")
    return None


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full`, laid out as the DTensor `like`, in storage of its own (a view
    would keep the whole of `full` alive). Every rank computed the same `full`, so nothing is
    sent (src_data_rank=None)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    view = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return DTensor.from_local(view.to_local().clone(), like.device_mesh, like.placements, run_check=False,
                              shape=view.shape, stride=view.stride())


@torch.no_grad()
def grow_sharded(operator, old_model: Transformer, old_opt, target, final, gen: torch.Generator, dist, lr: float,
                 optim_cfg, install):
    """The grown FSDP2 model and its optimizer, built one parameter at a time (a collective:
    every rank calls it). `install(model)` puts the event's masks into the new model before it
    is sharded. Returns the model, the optimizer and the plan (growth/operator.py)."""
    device = dist.device
    old_args = old_model.args
    distributed.reshard(old_model)  # the probe's forward left the root's gathered parameters registered
    plan = operator.plan(old_args, target, final, gen)
    new_args = plan.new_args
    with torch.device("meta"):
        model = Transformer(new_args)  # shapes only: meta tensors draw no random numbers
    install(model)
    # the masks' tensors are real (alpha is shared by the whole event and updated in place):
    # keep them through the allocation, which replaces every buffer
    kept = [(m, k, v) for m in model.modules() for k, v in m._buffers.items() if k in MASK_ATTRS and v is not None]
    distributed.shard(model, dist)
    model.to_empty(device=device)
    for m, k, v in kept:
        m._buffers[k] = v
    if new_args.pos == "rope":
        model.rope_cos, model.rope_sin = (t.to(device) for t in rope_cache(new_args))
    optimizer = build_adamw(model, lr, optim_cfg, device.type)

    old_params = dict(old_model.named_parameters())
    old_state = distributed.optimizer_state_by_name(old_model, old_opt)
    fresh = set()
    if operator.cfg.new_layer_state == "fresh":
        fresh = {i for i, copied in enumerate(plan.copied) if copied}
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    new_params = list(model.named_parameters())
    for name, p in new_params:
        # the fresh init of this parameter, drawn as Transformer.reset_parameters draws it (on the
        # host, in parameter order): new entries get the numbers the whole-model growth gives them
        full = torch.empty(p.shape)
        if p.dim() == 1:
            full.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        else:
            full.normal_(0.0, init_std(name, new_args), generator=gen)
        full = full.to(device)
        source = layer_source_name(name, plan.layer_sources, plan.unit_maps.get("experts"), old_args.experts)
        maps = [axis_map(ax, plan.unit_maps, old_args, new_args) for ax in parameter_axes(name, new_args)]
        origin = Origin(source, maps, like=source or sibling_name(name, old_args.layers))
        old = distributed.full_tensor(old_params[source]) if source else None  # one parameter gathered
        full = transplant(old, origin, full, of="value")
        p.to_local().copy_(shard_like(full, p).to_local())
        del old, full
        if operator.cfg.optimizer_state == "reset" or in_layers(name, fresh):
            continue
        src = old_state.get(origin.source) if origin.source else None
        like = old_state.get(origin.like) if src is None and origin.like else None
        if src is None and like is None:
            continue
        # one moment of one parameter at a time: gathered, moved, sharded, freed
        step = (src or like)["step"].clone()
        state = {"step": step if on_device else step.cpu()}  # AdamW keeps `step` on the host unless fused
        for key in ("exp_avg", "exp_avg_sq"):
            moment = distributed.full_tensor(src[key]) if src is not None else None
            needs_stats = key == "exp_avg_sq" and operator.cfg.new_moments != "zero"
            stats = moment if src is not None else (distributed.full_tensor(like[key]) if needs_stats else None)
            moved = moved_moment(key, torch.empty(p.shape, device=device), origin, moment, stats, operator.cfg)
            state[key] = shard_like(moved, p)
            del moment, stats, moved
        optimizer.state[p] = state

    # after every transplant, as in GrowthOperator.grow: each copying dimension's noise, then the
    # identity entry's zeroed output projections (which may carry noise before they are zeroed)
    for d in operator.finishing_order(plan):
        if operator.method(d).copies and operator.cfg.symmetry_noise > 0:
            groups, size = copy_groups(plan.unit_maps[d]), unit_size(d, new_args)
            if not groups:
                continue
            for name, p in new_params:
                if consumes(name, p, d, new_args):
                    full = p.full_tensor()
                    add_symmetry_noise(full, groups, size, operator.cfg.symmetry_noise, gen)
                    p.to_local().copy_(shard_like(full, p).to_local())
    # expansion.zero_output_projections, shard by shard: a post-norm (BERT) block entering as the
    # identity also makes the norms around its attention identity LayerNorms
    identity_norms = {f"blocks.{j}.{norm}.{leaf}" for i, z in enumerate(plan.zeroed) if z and new_args.family == "bert"
                      for j, norm in ((i - 1, "mlp_norm"), (i, "attn_norm")) for leaf in ("weight", "bias")}
    for name, p in new_params:
        layer = re.match(r"^blocks\.(\d+)\.(.*)$", name)
        if layer and plan.zeroed[int(layer.group(1))] and \
                re.sub(r"^mlp\.experts\.\d+\.", "mlp.", layer.group(2)) in OUTPUT_PROJECTIONS:
            p.to_local().zero_()
        if name in identity_norms:
            p.to_local().fill_(1.0 if name.endswith("weight") else 0.0)
    return model, optimizer, plan
