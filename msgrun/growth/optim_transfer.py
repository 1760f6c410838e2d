"""Move AdamW state into the grown model by provenance, not by name.

Each new parameter's `Origin` says where its entries came from; the moments follow the
*gradients* those entries will get: kept slices keep their moments bit for bit, copies inherit
their source's, scaled as their gradient scales (a weight that reads k copies at 1/k each keeps
the source's gradient; a weight that produces one of k copies gets 1/k of it; first moment by the
factor, second by its square: see surgery.axis_map), and new entries start per `operator.new_moments`:

* zero (default): m = v = 0, as in the MSG reference code. With the per-tensor step count kept (so no
  bias correction), a new entry's first update is lr * (1 - b1) * g / sqrt((1 - b2) g^2)
  = lr * (1 - b1) / sqrt(1 - b2): 3.2 x lr for b2 = 0.999, the overshoot the reference has.
* mean: m = 0, v = the mean second moment of the source tensor (or of the same role
  in an existing layer, for a fresh layer). The first update is then about lr * (1 - b1) * g /
  sqrt(v_mean), the size of an established entry's update, and it grows in smoothly.

AdamW's step count is per tensor; a grown tensor keeps its source's count (old entries must
keep their bias correction). A tensor with no source and no sibling starts a fresh state.
`operator.optimizer_state=reset` builds a fresh optimizer instead (G_stack's code).

New layers of a depth growth (copies or fresh, `fresh_layers`) start with no state at all under
`operator.new_layer_state=fresh`, as in the MSG reference (its new blocks join the optimizer as
new parameter groups): AdamW then starts them at step 0 with bias correction. A copied layer's
gradient is not its source's (under MSG's ramp it is scaled by alpha), so the source's momentum
would steer it for ~1/(1 - b1) steps. `carry` gives them their source layer's state instead.
Width copies always move by provenance: there the transfer is exact (see surgery.axis_map).
"""

from __future__ import annotations

import re

import torch

from msgrun.growth.surgery import Origin, transplant
from msgrun.optim import build_adamw


def transfer_adamw(old_opt: torch.optim.Optimizer, old_model: torch.nn.Module, new_model: torch.nn.Module,
                   origins: dict[str, Origin], op_cfg, optim_cfg, device_type: str,
                   fresh_layers: set[int] = frozenset()) -> torch.optim.Optimizer:
    lr = old_opt.param_groups[0]["lr"]
    new_opt = build_adamw(new_model, lr, optim_cfg, device_type)
    if op_cfg.optimizer_state == "reset":
        return new_opt
    old_state = {name: old_opt.state[p] for name, p in old_model.named_parameters() if old_opt.state.get(p)}
    for name, p in new_model.named_parameters():
        if in_layers(name, fresh_layers):
            continue
        origin = origins[name]
        state = moved_state(p, origin, old_state.get(origin.source) if origin.source else None,
                            old_state.get(origin.like) if origin.like else None, op_cfg)
        if state is not None:
            new_opt.state[p] = state
    return new_opt


def in_layers(name: str, layers: set[int]) -> bool:
    layer = re.match(r"^blocks\.(\d+)\.", name)
    return bool(layer) and int(layer.group(1)) in layers


def moved_state(p: torch.Tensor, origin: Origin, src: dict | None, like: dict | None, op_cfg) -> dict | None:
    """The AdamW state of one new parameter shaped like `p`, from its source's state `src` and a
    like-shaped old parameter's state `like` (None: no state)."""
    if src is None and like is None:
        return None
    stats = (src or like)["exp_avg_sq"]
    return {"step": (src or like)["step"].clone(),
            **{key: moved_moment(key, p, origin, src[key] if src else None, stats, op_cfg)
               for key in ("exp_avg", "exp_avg_sq")}}


def moved_moment(key: str, p: torch.Tensor, origin: Origin, src: torch.Tensor | None, stats: torch.Tensor | None,
                 op_cfg) -> torch.Tensor:
    """One moment (`exp_avg` or `exp_avg_sq`) of a new parameter shaped like `p`: the source's
    moment `src` moved by provenance; entries without a source zero or, for the second moment
    under operator.new_moments=mean, the mean of `stats` (the source's second moment, or a
    like-shaped parameter's). The one rule, for the whole-model transfer above and the sharded
    growth (growth/sharded.py), which moves one moment of one gathered parameter at a time."""
    zeros = torch.zeros_like(p)
    if key == "exp_avg":
        return transplant(src, origin, zeros, of="moment") if src is not None else zeros
    fill = zeros if op_cfg.new_moments == "zero" else torch.full_like(p, stats.mean().item())
    return transplant(src, origin, fill, value_power=2, of="moment") if src is not None else fill
