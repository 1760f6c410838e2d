"""Build a larger Transformer from a smaller one, slice by slice, recording provenance.

Every growth operator reduces to two maps:

* a *unit map* per grown width dimension (hidden, heads, kv_heads, ffn): for each unit of the new size,
  the old unit it comes from (-1: a new unit), and a factor for the weights that *consume* that
  unit (fan-in columns), e.g. 1/copies for function-preserving copies;
* a *layer map*: for each new layer, the old layer it copies (None: freshly initialised).

`parameter_axes` says which dimension each axis of each parameter indexes, so one generic
`transplant` builds every new parameter and, with the same `Origin`, every optimizer moment.
Operators then add what is specific to them (MSG's masks, symmetry breaking, AKI's mixing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from msgrun.model import ModelArgs, Transformer

UNIT_DIMS = ("hidden", "heads", "ffn", "kv_heads", "experts")


@dataclass
class UnitMap:
    """index[u]: old unit of new unit u (-1: new unit). fan_in_scale[u]: factor on the weights
    that read unit u (1 for kept or new units; 1/k for each of k copies of one source)."""

    index: torch.Tensor  # int64 (new_size,)
    fan_in_scale: torch.Tensor  # float32 (new_size,)

    @staticmethod
    def identity(n: int) -> "UnitMap":
        return UnitMap(torch.arange(n), torch.ones(n))

    @staticmethod
    def append_new(old: int, new: int) -> "UnitMap":
        return UnitMap(torch.cat([torch.arange(old), torch.full((new - old,), -1)]), torch.ones(new))

    @staticmethod
    def from_sources(sources: torch.Tensor) -> "UnitMap":
        """Units copied from `sources`; consumers of a unit copied k times read each copy at 1/k,
        so the sum over copies equals the original (function preserving)."""
        counts = torch.bincount(sources, minlength=int(sources.max()) + 1).float()
        return UnitMap(sources.long(), 1.0 / counts[sources])

    @property
    def new_units(self) -> torch.Tensor:
        return self.index < 0


@dataclass(frozen=True)
class Axis:
    dim: str | None  # hidden | heads | ffn | None (vocab, positions: never grown)
    fan_in: bool = False  # this axis is the input of a matmul (consumer scaling applies)
    chunks: int = 1  # fused parameters: swiglu's fc has 2 chunks of ffn
    then: tuple = ()  # further (dim, chunks) segments after `dim`'s: qkv is [q: heads | k, v: 2 x kv_heads]

    @property
    def segments(self) -> tuple:
        return ((self.dim, self.chunks),) + self.then


def chunk_ranges(axis: Axis, args: ModelArgs) -> list[tuple[str | None, int, int]]:
    """(dim, first entry, end) of every chunk along `axis` in a model of shape `args`."""
    out, start = [], 0
    for dim, chunks in axis.segments:
        width = getattr(args, "n_kv_heads" if dim == "kv_heads" else dim) * unit_size(dim, args)
        for _ in range(chunks):
            out.append((dim, start, start + width))
            start += width
    return out


def parameter_axes(name: str, args: ModelArgs) -> tuple[Axis, ...]:
    """Which dimension each axis of parameter `name` indexes (one table for the whole model)."""
    leaf = re.sub(r"^blocks\.\d+\.", "", name)
    leaf = re.sub(r"^mlp\.experts\.\d+\.", "mlp.", leaf)  # every expert is laid out as the dense FFN
    fc_chunks = 2 if args.mlp == "swiglu" else 1
    table = {
        "tok_emb.weight": (Axis(None), Axis("hidden")),
        "pos_emb.weight": (Axis(None), Axis("hidden")),
        "attn.qkv.weight": (Axis("heads", then=(("kv_heads", 2),)), Axis("hidden", fan_in=True)),
        "attn.qkv.bias": (Axis("heads", then=(("kv_heads", 2),)),),
        "attn.proj.weight": (Axis("hidden"), Axis("heads", fan_in=True)),
        "attn.proj.bias": (Axis("hidden"),),
        "mlp.fc.weight": (Axis("ffn", chunks=fc_chunks), Axis("hidden", fan_in=True)),
        "mlp.fc.bias": (Axis("ffn", chunks=fc_chunks),),
        "mlp.proj.weight": (Axis("hidden"), Axis("ffn", fan_in=True)),
        "mlp.proj.bias": (Axis("hidden"),),
        "mlp.router.weight": (Axis("experts"), Axis("hidden", fan_in=True)),
        "mlm_head.dense.weight": (Axis("hidden"), Axis("hidden", fan_in=True)),
        "mlm_head.dense.bias": (Axis("hidden"),),
        "lm_head.weight": (Axis(None), Axis("hidden", fan_in=True)),  # only when untied
        "lm_head.bias": (Axis(None),),
    }
    if leaf in table:
        return table[leaf]
    if leaf.endswith(("norm.weight", "norm.bias")):
        # A tied LM head reads the last norm's output through the embedding matrix, whose hidden
        # copies cannot be divided (the embedding also feeds the residual stream): the division
        # that makes copies sum to the original is applied to that norm's gain and bias instead.
        head_norm = "final_norm" if args.family == "gpt" else "mlm_head.norm"
        return (Axis("hidden", fan_in=args.tie_embeddings and leaf.startswith(head_norm)),)
    raise KeyError(f"parameter_axes: no layout for parameter {name!r}")


def unit_size(dim: str, args: ModelArgs) -> int:
    """Entries per unit along an axis: a head (query or key/value) is head_dim channels; hidden/ffn units are 1."""
    return args.head_dim if dim in ("heads", "kv_heads") else 1


def axis_map(axis: Axis, unit_maps: dict[str, UnitMap], old: ModelArgs, new: ModelArgs):
    """Entry-level (index, value factor, moment factor) along one axis, or None where the axis is
    unchanged.

    For a unit copied k times, values and gradients scale in opposite places. Consumers read each
    copy at 1/k so that the copies sum to the original (value factor 1/k on fan-in axes), yet the
    gradient of such a weight is the source's (it multiplies the same input). Each copy's producers
    (its rows, its norm gain, its embedding column) keep their values, yet get 1/k of the source's
    gradient (the k copies share what the source got). AdamW's moments describe gradients, so
    they take the moment factor: 1/k on the producing axes, 1 on fan-in axes."""
    if not any(dim in unit_maps for dim, _ in axis.segments):
        return None
    idx, value, moment, offset = [], [], [], 0
    for dim, chunks in axis.segments:
        size = unit_size(dim, new)
        old_units = units(old, dim)
        um = unit_maps.get(dim) or UnitMap.identity(old_units)
        # expand units to entries (a head's channels move together), then repeat per fused chunk
        within = torch.arange(size)
        entries = torch.where(um.index[:, None] >= 0, um.index[:, None] * size + within, -1).flatten()
        per_copy, ones = um.fan_in_scale.repeat_interleave(size), torch.ones(entries.numel())
        v, m = (per_copy, ones) if axis.fan_in else (ones, per_copy)
        for _ in range(chunks):
            idx.append(torch.where(entries >= 0, entries + offset, -1))
            value.append(v)
            moment.append(m)
            offset += old_units * size
    return torch.cat(idx), torch.cat(value), torch.cat(moment)


def units(args: ModelArgs, dim: str) -> int:
    return args.n_kv_heads if dim == "kv_heads" else getattr(args, dim)


@dataclass
class Origin:
    """Where the entries of one new parameter come from, for its values and its optimizer state.

    source: old parameter name (None: every entry is new). maps: per axis, None (unchanged) or
    (old index per new entry with -1 for new entries, value factor, moment factor per new entry);
    see `axis_map` for why values and optimizer moments scale differently."""

    source: str | None
    maps: list = field(default_factory=list)
    like: str | None = None  # an old parameter whose optimizer statistics suit the new entries


def transplant(old: torch.Tensor | None, origin: Origin, fill: torch.Tensor, value_power: int = 1,
               of: str = "moment") -> torch.Tensor:
    """New tensor shaped like `fill`: entries with a source are gathered from `old` and multiplied
    by their factors, entries without one take `fill`. `of` is what moves: "value" (a parameter:
    value factors) or "moment" (AdamW state: moment factors raised to `value_power`, 1 for the
    first moment and 2 for the second). The default is the optimizer transfer's case."""
    if origin.source is None or old is None:
        return fill.clone()
    out = old
    new_mask = torch.zeros(fill.shape, dtype=torch.bool, device=fill.device)
    for axis, m in enumerate(origin.maps):
        if m is None:
            continue
        idx, value, moment = m
        scale = value if of == "value" else moment ** value_power
        out = out.index_select(axis, idx.to(out.device).clamp(min=0))
        shape = [1] * out.dim()
        shape[axis] = -1
        out = out * scale.to(out.device, out.dtype).view(shape)
        new_mask |= (idx < 0).view(shape).to(new_mask.device)
    return torch.where(new_mask, fill, out.to(fill.dtype))


def layer_source_name(name: str, layer_map: list[int | None], expert_map: UnitMap | None = None,
                      old_experts: int = 1) -> str | None:
    """The old parameter a new parameter copies: blocks.i.* come from blocks.layer_map[i].*; an
    expert's mlp.experts.e.* from expert expert_map[e] of an old mixture, or from the old dense
    mlp.* (sparse upcycling: every expert a copy of the dense FFN)."""
    m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
    if not m:
        return name
    src, leaf = layer_map[int(m.group(1))], m.group(2)
    e = re.match(r"^mlp\.experts\.(\d+)\.(.*)$", leaf)
    if e:
        expert = int(e.group(1)) if expert_map is None else int(expert_map.index[int(e.group(1))])
        if expert < 0:
            return None
        leaf = f"mlp.{e.group(2)}" if old_experts == 1 else f"mlp.experts.{expert}.{e.group(2)}"
    if leaf == "mlp.router.weight" and old_experts == 1:
        return None  # a dense model has no router: the new one keeps its fresh init
    return None if src is None else f"blocks.{src}.{leaf}"


def sibling_name(name: str, layers: int) -> str | None:
    """A parameter of the same role in an existing layer (for optimizer statistics of new layers)."""
    m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
    return f"blocks.{min(int(m.group(1)), layers - 1)}.{m.group(2)}" if m else None


def grow_parameters(old_model: Transformer, new_args: ModelArgs, unit_maps: dict[str, UnitMap],
                    layer_map: list[int | None], generator: torch.Generator) -> tuple[Transformer, dict[str, Origin]]:
    """A new model of shape `new_args` whose parameters are transplanted from `old_model` through
    the unit maps and the layer map; entries without a source keep the fresh model's init."""
    old_args = old_model.args
    new_model = Transformer(new_args, generator=generator)  # its init fills new entries
    device = next(old_model.parameters()).device
    new_model.to(device)
    old_params = dict(old_model.named_parameters())
    origins: dict[str, Origin] = {}
    with torch.no_grad():
        for name, p in new_model.named_parameters():
            source = layer_source_name(name, layer_map, unit_maps.get("experts"), old_args.experts)
            axes = parameter_axes(name, new_args)
            maps = [axis_map(ax, unit_maps, old_args, new_args) for ax in axes]
            origin = Origin(source, maps, like=source or sibling_name(name, old_args.layers))
            p.copy_(transplant(old_params[source] if source else None, origin, p.detach(), of="value"))
            origins[name] = origin
    return new_model, origins


def unit_maps_for(old: ModelArgs, new: ModelArgs, make_map, shares=None, copy_queries: bool = True
                  ) -> dict[str, UnitMap]:
    """Unit maps for every width dimension that changes; `make_map(dim, old_n, new_n)`. Query and
    key/value heads are mapped together (`head_maps`): the heads method's map applies to the
    key/value heads, and query heads follow their groups. `shares(index)`: the consumer factors
    of query heads copied under grouped-query attention (default 1/copies); `copy_queries`: extra
    query heads in a group copy the group's heads (False: they are new units, MSG)."""
    maps = {d: make_map(d, getattr(old, d), getattr(new, d)) for d in ("hidden", "ffn", "experts")
            if getattr(old, d) != getattr(new, d)}
    if (old.heads, old.n_kv_heads) != (new.heads, new.n_kv_heads):
        maps.update(head_maps(old, new, make_map, shares or copy_shares, copy_queries))
    return maps


def copy_shares(index: torch.Tensor) -> torch.Tensor:
    """1/k for each of k copies of a source, 1 for new units (index -1)."""
    counts = torch.bincount(index[index >= 0], minlength=1).float()
    return torch.where(index >= 0, 1.0 / counts[index.clamp(min=0)], torch.ones(index.numel()))


def query_slots(kv_index: torch.Tensor, old_heads: int, old_kv: int, new_heads: int, copy: bool = True) -> torch.Tensor:
    """Source query head of every new query head (-1: none) under grouped-query attention.

    New query head u belongs to new key/value head u // g' (g' = A'/K'), which comes from old
    key/value head s = kv_index[u // g'] (or is new). The g = A/K old query heads of group s stay
    in the first g slots of the groups that copy s, in order (their attention is unchanged: same
    key/value head); the remaining slots copy s's query heads round-robin (`copy`) or hold new
    query heads (-1). A query head copied in
    a group that reads the same key/value head computes the same output, so the consumer shares
    make the copies sum to the original. Slots of new key/value heads get new query heads.
    growth/gqa.py refuses, before training, a growth with too few slots for a group's old heads."""
    g, g_new = old_heads // old_kv, new_heads // kv_index.numel()
    index = torch.full((new_heads,), -1, dtype=torch.long)
    for s in range(old_kv):
        slots = torch.cat([torch.arange(j * g_new, (j + 1) * g_new) for j in torch.nonzero(kv_index == s).flatten()])
        assert slots.numel() >= g, "too few query slots for the old group (growth/gqa.py refuses this first)"
        sources = s * g + torch.arange(slots.numel()) % g
        index[slots] = sources if copy else torch.where(torch.arange(slots.numel()) < g, sources, -1)
    return index


def head_maps(old: ModelArgs, new: ModelArgs, make_map, shares, copy_queries: bool = True) -> dict[str, UnitMap]:
    K, K2 = old.n_kv_heads, new.n_kv_heads
    kv = make_map("heads", K, K2) if K2 != K else UnitMap.identity(K)
    if old.heads == K and new.heads == K2:
        return {"heads": kv, "kv_heads": kv}  # multi-head attention: a query head and its key/value head are one unit
    index = query_slots(kv.index, old.heads, K, new.heads, copy_queries)
    return {"heads": UnitMap(index, shares(index)), "kv_heads": kv}
