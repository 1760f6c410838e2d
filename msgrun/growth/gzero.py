"""G_zero, the zero-initialisation growth operator that G_stack compares stacking against
(Du et al., NeurIPS 2024, "Stacking Your Transformers"; reference code tongxuluo/prts).

The G_stack paper ranks four operators for depth and for width: G_direct (copying: msgrun's
`stack`, `tile`, `fpi`), G_learn (LiGO: `ligo`), G_zero (this module: method `zero`) and G_random
(random new parameters masked in, prts_lit/scaling/msg.py: msgrun's `msg` with
`operator.depth_init=random`; conf/operator/gstack_random.yaml).

width (`operator.hidden|heads|ffn=zero`; prts_lit/scaling/zero.py `ZeroModel.expand_tensor`):
  old entries stay in place; a new unit's producing weights are zero where they read old units
  (W[new rows, old columns] = 0; biases, norm gains and norm biases of new units 0; the
  embedding's new hidden columns 0), while every weight reading a new unit keeps its fresh
  initialisation (W[:, new columns]). New heads and FFN units then output exactly 0 (zero q, k, v;
  act(0) = 0), so heads and ffn growth are exact; the new hidden entries of the residual stream
  stay 0 too, but every norm now averages over H' entries, so hidden growth is not function
  preserving under LayerNorm or RMSNorm (the probe logs the jump). The new rows get gradients at
  once (they multiply non-zero old inputs). The reference special-cases only the token embedding
  (`wte`); ours treats the learned position embedding the same way (new hidden columns 0).
depth (`operator.layers=zero`; prts G_zero_depthwise.py `expend_depth`, the `lemon` branch):
  new layer i copies old layer i // (L' / L) (interleaved: 0, 0', 1, 1'), and every copy after the
  first has its attention output and FFN down projections zeroed (o_proj, down_proj; ours also
  their biases), so in a pre-norm block it is exactly the identity while its input weights are
  trained ones. The reference indexes i // (L' // L), which runs only for whole multiples, and
  its blocks are pre-norm; ours refuses other sizes and post-norm models.
"""

from __future__ import annotations

import torch

from msgrun.errors import ConfigError
from msgrun.growth.methods import Method
from msgrun.growth.surgery import UnitMap, axis_map, parameter_axes
from msgrun.model import ModelArgs, Transformer


def check_depth(old: int, new: int, family: str, where: str) -> None:
    if new % old:
        raise ConfigError(
            f"{where} grows layers {old} -> {new} with operator.layers=zero. G_zero's depth operator (prts "
            "G_zero_depthwise.py) follows every old layer with the same number of zero-output copies (layer i of "
            "the new model copies i // (L'/L)), so the new depth must be a whole multiple of the old one: "
            f"{2 * old}, {3 * old}, ... from {old}.")
    if family != "gpt":
        raise ConfigError(
            f"{where} grows layers {old} -> {new} with operator.layers=zero, whose copies enter as the identity "
            f"through zeroed output projections; that holds in a pre-norm block only, and model.family={family} "
            "is post-norm. Use operator.layers=lemon (identity LayerNorms, exact) or msg.")


def layer_sources(old: int, new: int) -> tuple[list[int], list[bool]]:
    """Source of each new layer, and which are zero-output copies."""
    g = new // old
    return [i // g for i in range(new)], [i % g != 0 for i in range(new)]


@torch.no_grad()
def zero_new_rows(model: Transformer, old_args: ModelArgs, unit_maps: dict[str, UnitMap], dims: list[str]) -> None:
    """After the generic transplant (new units fresh everywhere): zero what a new unit of `dims`
    produces from old inputs, so it starts at exactly 0 (module doc)."""
    args = model.args
    for name, p in model.named_parameters():
        axes = parameter_axes(name, args)
        maps = [axis_map(ax, unit_maps, old_args, args) for ax in axes]
        new_on = [m is not None and ax.dim in dims and (m[0] < 0).any() for ax, m in zip(axes, maps)]
        if p.dim() == 1:
            if new_on[0]:
                p[(maps[0][0] < 0).to(p.device)] = 0.0
            continue
        rows_ax = [i for i, ax in enumerate(axes) if not ax.fan_in and new_on[i]]
        if not rows_ax:
            continue
        (r,) = rows_ax
        new_rows = (maps[r][0] < 0).to(p.device)
        view = p.movedim(r, 0)
        c = 1 - r  # the other axis: zero only where it reads old units
        old_cols = (maps[c][0] >= 0).to(p.device) if axes[c].fan_in and maps[c] is not None else slice(None)
        view[new_rows.nonzero().flatten()[:, None], torch.arange(view.shape[1], device=p.device)[old_cols]] = 0.0


def check(dim: str, old: int, new: int, family: str, where: str, cfg) -> None:
    if dim == "layers":
        check_depth(old, new, family, where)


def depth_sources(old: int, new: int, cfg):
    sources, zeroed = layer_sources(old, new)
    return sources, [False] * new, zeroed


def finish(grown, old_model, dim, unit_maps, origins, cfg, gen) -> None:
    zero_new_rows(grown, old_model.args, unit_maps, [dim])


METHOD = Method(
    "zero", ("layers", "hidden", "heads", "ffn"), "new units produce exactly 0 from old inputs, new layers are "
    "zero-output copies (G_stack's G_zero, Du et al. 2024)",
    check=check, unit_map=lambda dim, old, new, cfg, gen: UnitMap.append_new(old, new),
    layer_sources=depth_sources, finish=finish)
