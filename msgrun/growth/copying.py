"""Width by copying: new units copy old ones, and consumers of k copies read each at 1/k.

  fpi   originals stay in place; each new unit copies a source unit (operator.mapping random |
        left); exact except where norm statistics change (uneven copies on hidden)
        (bert2BERT's function-preserving initialization)
  aki   fpi, but the new units' own weights come from the *next* layer (bert2BERT's advanced
        knowledge initialization; breaks symmetry, not exact). heads and ffn only: the residual
        width is shared by all layers, so "the next layer's units" has no meaning for hidden.
  tile  integer multiples, every unit copied k times, consumers divided by k; exact, also under
        norms (HyperCloning; CompoundGrowth's FFN operator)

Copies never diverge on their own (identical gradients forever, with dropout 0), so copying
methods add zero-sum noise to the copies' consuming weights (operator.symmetry_noise): the sum
over a copy group is unchanged, so the function is still exact, but copies now receive different
gradients.
"""

from __future__ import annotations

import torch

from msgrun.errors import ConfigError
from msgrun.growth.methods import Method
from msgrun.growth.surgery import Origin, UnitMap, chunk_ranges, parameter_axes, transplant, unit_size
from msgrun.model import Transformer


def fpi_map(dim: str, old: int, new: int, cfg, gen: torch.Generator) -> UnitMap:
    """Originals stay in place; each new unit copies a source unit."""
    extra = new - old
    picks = torch.arange(extra) % old if cfg.mapping == "left" else torch.randint(old, (extra,), generator=gen)
    return UnitMap.from_sources(torch.cat([torch.arange(old), picks]))


def tile_map(dim: str, old: int, new: int, cfg, gen: torch.Generator) -> UnitMap:
    return UnitMap.from_sources(torch.arange(new) % old)


def check_multiple(dim, old, new, family, where, cfg) -> None:
    if new % old:
        raise ConfigError(f"{where} grows {dim} {old} -> {new}, but operator.{dim}=tile copies every unit an integer "
                          f"number of times: {new} is not a multiple of {old}.")


def copy_groups(um: UnitMap) -> list[torch.Tensor]:
    """Positions of the units that share a source, for sources copied more than once."""
    groups = []
    for src in torch.unique(um.index[um.index >= 0]):
        members = torch.nonzero(um.index == src).flatten()
        if members.numel() > 1:
            groups.append(members)
    return groups


@torch.no_grad()
def break_symmetry(model: Transformer, dim: str, um: UnitMap, eta: float, gen: torch.Generator) -> None:
    """Zero-sum noise across each copy group on every weight that consumes `dim`: copies then get
    different gradients, while their sum (what the next layer computes) is exactly unchanged."""
    groups = copy_groups(um)
    if not groups:
        return
    size = unit_size(dim, model.args)
    for name, p in model.named_parameters():
        if consumes(name, p, dim, model.args):
            add_symmetry_noise(p, groups, size, eta, gen)


def consumes(name: str, p: torch.Tensor, dim: str, args) -> bool:
    """Whether the matrix `name` reads `dim` (its fan-in axis): where copies' noise goes."""
    axes = parameter_axes(name, args)
    return p.dim() == 2 and axes[1].dim == dim and axes[1].fan_in


@torch.no_grad()
def add_symmetry_noise(p: torch.Tensor, groups: list[torch.Tensor], size: int, eta: float,
                       gen: torch.Generator) -> None:
    """One consuming matrix's zero-sum noise (break_symmetry), in place; the sharded growth
    calls it on one gathered parameter at a time, in the same order."""
    scale = eta * p.float().pow(2).mean().sqrt()
    for members in groups:
        cols = (members[:, None] * size + torch.arange(size)).flatten().to(p.device)
        noise = torch.randn(p.shape[0], members.numel(), size, generator=gen).to(p.device) * scale
        noise = (noise - noise.mean(dim=1, keepdim=True)).flatten(1)  # zero sum over the copies
        p[:, cols] += noise.to(p.dtype)


@torch.no_grad()
def take_from_next_layer(model: Transformer, old_model: Transformer, dim: str, origins: dict[str, Origin]) -> None:
    """AKI: the added units' own (producing) weights in layer l are those of their source units
    in layer l+1 of the small model (the last layer uses itself); consumers keep FPI's 1/k.
    This is bert2BERT's formula as we could read it (through a summary of the paper: new output
    units of layer l from layer l+1, the in-dimension of the consuming matrix built from layer
    l's own weights / copy count); no official code exists. An unofficial reimplementation
    (zxhcelestes/bert2BERT) also takes the new consuming columns from layer l+1; we do not.
    The donor goes through the same maps as the parameter it replaces, so other dimensions grown
    in the same event stay consistent."""
    old_params = dict(old_model.named_parameters())
    old_L, old_units = old_model.args.layers, getattr(old_model.args, dim)
    size = unit_size(dim, model.args)
    for name, p in model.named_parameters():
        origin = origins[name]
        axes = parameter_axes(name, model.args)
        if origin.source is None or not name.startswith("blocks.") or axes[0].dim != dim:
            continue
        _, src_layer, leaf = origin.source.split(".", 2)
        donor = transplant(old_params[f"blocks.{min(int(src_layer) + 1, old_L - 1)}.{leaf}"], origin, p.detach(),
                           of="value")
        for _, lo, hi in chunk_ranges(axes[0], model.args):  # the added units of each fused chunk (q, k, v / gate, up)
            added = slice(lo + old_units * size, hi)  # AKI is multi-head only (growth/gqa.py): every chunk has A units
            p[added] = donor[added]


def with_variant(methods: dict[str, str | None], variant: str) -> dict[str, str | None]:
    """operator.variant=aki, bert2BERT's switch: AKI wherever FPI would copy heads or FFN units."""
    if variant != "aki":
        return dict(methods)
    return {d: "aki" if m == "fpi" and d in ("heads", "ffn") else m for d, m in methods.items()}


def aki_finish(grown, old_model, dim, unit_maps, origins, cfg, gen) -> None:
    take_from_next_layer(grown, old_model, dim, origins)


METHODS = (
    Method("fpi", ("hidden", "heads", "ffn"), "new units copy source units, consumers divided by the copy count "
           "(bert2BERT's FPI)", copies=True, unit_map=fpi_map),
    Method("aki", ("heads", "ffn"), "FPI with the new units' weights from the next layer (bert2BERT's AKI; not "
           "exact)", copies=True, unit_map=fpi_map, finish=aki_finish),
    Method("tile", ("hidden", "heads", "ffn"), "every unit copied k times, consumers divided by k; exact "
           "(HyperCloning, CompoundGrowth's FFN)", copies=True, unit_map=tile_map, check=check_multiple),
)
