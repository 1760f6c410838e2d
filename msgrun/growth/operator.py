"""Growth operators as per-dimension methods.

An operator is a mapping dimension -> method (`operator.layers=msg operator.hidden=fpi ...`);
the named operators in conf/operator/ are presets of that mapping, and any mix of methods
composes, because every width method is a unit map and every depth method a layer map
(growth/surgery.py). Methods:

  width (hidden, heads, ffn)
    msg   append new units (fresh init), masked in with a ramp; exact at alpha = 0   (MSG)
    fpi   new units copy source units (operator.mapping random | left); consumers of k copies
          read each at 1/k; exact except where norm statistics change (uneven copies on hidden)
          (bert2BERT's function-preserving initialization)
    aki   fpi, but the new units' own weights come from the *next* layer (bert2BERT's advanced
          knowledge initialization; breaks symmetry, not exact). heads and ffn only.
    tile  integer multiples, every unit copied k times, consumers divided by k; exact, also under
          norms (HyperCloning; CompoundGrowth's FFN operator)
  depth (layers)
    msg   new layers (copies or random, operator.depth_init) enter as identity under the ramp
    stack new layers are copies, no masks: 0..L-1,0..L-1 (order stack) or 0,0,1,1 (interleave);
          not function preserving (G_stack, bert2BERT/StackBERT depth)
    raptr the full model exists from step 0; stages raise the expected random-path length
    A depth growth that is not an integer multiple copies the top layers once more
    (operator.depth_remainder=top, the MSG reference: 4 -> 6 is 0,1,2,3,2,3), the bottom ones
    (bottom, CompoundGrowth's code: layer i copies i mod L, 0,1,2,3,0,1), or is refused
    (refuse, G_stack: whole stacks only).
  seq_len
    warmup train on shorter sequences; nothing structural changes (GPT: no leak of the future)
    auto   pool for BERT (the paper's operator), warmup for GPT (pooling would leak the future)
    pool   (bert) read full-length sequences and run the blocks on T/pool mean-pooled tokens
          plus the predicted ones (CompoundGrowth's length operator; model.forward); the
          stage's seq_len is the pooled length. Not exact: the probe logs the jump.
          As the paper's code (Gu et al., google-research/grow_bert): mean pooling with stride
          `pool` after the embedding norm, the masked positions' embeddings appended as extra
          queries that carry the MLM predictions, the first layer attending over the full-length
          input. Ours: no [CLS] token is kept out of the pooling (our rows have none), T must be
          a multiple of the pool, and at full length the model is plain BERT (the paper's model
          keeps the appended queries even then).

Copies never diverge on their own (identical gradients forever, with dropout 0), so copying
methods add zero-sum noise to the copies' consuming weights (operator.symmetry_noise): the
sum over a copy group is unchanged, so the function is still exact, but copies now receive
different gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from msgrun.errors import ConfigError
from msgrun.growth import expansion, gqa, lemon, ligo, moe
from msgrun.growth.schedule import Shape, Stage, check_ramp_steps
from msgrun.growth.surgery import (Origin, UnitMap, chunk_ranges, grow_parameters, parameter_axes, transplant,
                                   unit_maps_for, unit_size)
from msgrun.model import ModelArgs, Transformer

METHODS = {
    "layers": ("msg", "stack", "raptr"),
    "hidden": ("msg", "fpi", "tile"),
    "heads": ("msg", "fpi", "aki", "tile"),
    "ffn": ("msg", "fpi", "aki", "tile"),
    "seq_len": ("warmup", "pool", "auto"),
    "experts": ("copy",),  # growth/moe.py
}
# methods of issue 14 (LLaMA-Pro, SOLAR, MIDAS, LEMON, LiGO): growth/expansion.py, lemon.py, ligo.py
METHODS["layers"] += expansion.DEPTH_METHODS + ("ligo",)
for _d in ("hidden", "heads", "ffn"):
    METHODS[_d] += ("lemon", "ligo")
COPYING = ("fpi", "aki", "tile")
CHOICES = {
    "depth_init": ("copy", "random"),
    "depth_order": ("stack", "interleave"),
    "mapping": ("random", "left"),
    "optimizer_state": ("carry", "reset"),
    "new_moments": ("zero", "mean"),
    "lr_policy": ("continue", "rewind", "restart", "lemon"),
    "rescale": ("none", "inverse_keep_prob"),
    "depth_remainder": ("top", "bottom", "refuse"),
    "new_layer_state": ("fresh", "carry"),
    "mask_placement": ("reference", "ours"),
    "ramp_start": ("zero", "increment"),
}


@dataclass
class Grown:
    model: Transformer
    origins: dict[str, Origin]
    new_units: dict[str, torch.Tensor] = field(default_factory=dict)  # msg dims: entry-level indicators
    new_layers: list[bool] = field(default_factory=list)  # msg depth: layers that enter as identity
    copied_layers: list[bool] = field(default_factory=list)  # any depth growth: layers that are not originals
    operator_flops: int = 0  # compute the operator itself trained (LiGO's fitting), charged to the run


def layer_map(old: int, new: int, order: str, remainder: str = "top") -> list[int]:
    """Source layer of each layer of the deeper model. Every old layer appears new // old times;
    the new % old layers left over copy the top old layers (remainder top: the MSG reference,
    4 -> 6 gives 0,1,2,3,2,3) or the bottom ones (bottom: CompoundGrowth's i mod L, 0,1,2,3,0,1)."""
    rounds, extra = divmod(new, old)
    tail = list(range(old - extra, old)) if remainder == "top" else list(range(extra))
    if order == "stack":  # the trained stack repeated in order, then the remainder: 0..L-1, 0..L-1, ...
        return list(range(old)) * rounds + tail
    # interleave: each layer followed by its copies, 0, 0, 1, 1, ... (the reference's
    # random-interpolate inserts a copy after its source the same way)
    return [i for i in range(old) for _ in range(rounds + (i in tail))]


def first_occurrences(sources: list[int]) -> list[bool]:
    """True where a layer is the original of its source (kept in place), False for copies."""
    seen, out = set(), []
    for s in sources:
        out.append(s not in seen)
        seen.add(s)
    return out


class GrowthOperator:
    def __init__(self, cfg, family: str, pos: str = "learned"):
        self.cfg, self.name, self.family = cfg, cfg.name, family
        self.methods = {d: getattr(cfg, d) for d in METHODS}
        for d, m in self.methods.items():
            if m is not None and m not in METHODS[d]:
                raise ConfigError(f"operator.{d} = {m!r} is not a growth method for {d}; choose one of "
                                  f"{', '.join(METHODS[d])} (or null: the operator does not grow {d}).")
        for key, valid in CHOICES.items():
            if getattr(cfg, key) not in valid:
                raise ConfigError(f"operator.{key} = {getattr(cfg, key)!r}; choose one of {', '.join(valid)}.")
        if self.uses_masks:
            check_ramp_steps(cfg.ramp_steps)
        if cfg.variant not in ("fpi", "aki"):
            raise ConfigError(f"operator.variant = {cfg.variant!r}; choose fpi or aki.")
        if cfg.variant == "aki":  # bert2BERT's switch: AKI wherever FPI would copy heads or FFN units
            self.methods.update({d: "aki" for d in ("heads", "ffn") if self.methods[d] == "fpi"})
        if self.methods["seq_len"] == "auto":
            self.methods["seq_len"] = "pool" if family == "bert" and pos == "learned" else "warmup"
        if self.methods["seq_len"] == "pool" and self.methods["heads"] == "msg" and cfg.mask_placement == "reference":
            raise ConfigError(
                "operator.seq_len=pool with operator.heads=msg and operator.mask_placement=reference: the reference "
                "placement masks new heads' q, k and v, but length pooling's first layer computes its keys and "
                "values from the unpooled input outside that mask. Use operator.mask_placement=ours (new heads "
                "masked at the output projection) with length pooling.")
        expansion.check_options(cfg, self.methods)
        ligo.check_options(cfg, self.methods)
        self.fit_data = None  # LiGO: k -> the micro-batches of fitting step k (set by the trainer)
        if self.methods["seq_len"] == "pool" and (family != "bert" or pos != "learned"):
            raise ConfigError(
                f"operator.seq_len=pool needs model.family=bert with model.pos=learned (this model: family={family}, "
                f"pos={pos}). Pooling the input would leak future tokens into a causal model, and rotary positions "
                "have no meaning for a mean of several tokens; use operator.seq_len=warmup (shorter training "
                "sequences) instead.")

    @property
    def supported(self) -> list[str]:
        return [d for d, m in self.methods.items() if m is not None]

    @property
    def uses_masks(self) -> bool:
        return "msg" in self.methods.values()

    @property
    def pools(self) -> bool:
        return self.methods["seq_len"] == "pool"

    @property
    def raptr(self) -> bool:
        return self.methods["layers"] == "raptr"

    def check(self, start: Shape, stages: list[Stage], final: Shape) -> None:
        """Every stage grows only dimensions this operator can grow, in sizes its methods accept."""
        gqa.check_learned_operator(self.methods, final)
        shape = start
        for stage in stages:
            if {"heads", "kv_heads"} & set(stage.dims) and self.methods["heads"] is not None:
                gqa.check_heads(self.methods["heads"], self.cfg, shape, stage.target, stage.describe())
            for d in stage.dims:
                key = "heads" if d == "kv_heads" else d  # a key/value head is a head: operator.heads grows both
                method = self.methods[key]
                old, new = getattr(shape, d), getattr(stage.target, d)
                if method is None:
                    raise ConfigError(
                        f"{stage.describe()} grows {d} ({old} -> {new}), but operator '{self.name}' cannot grow "
                        f"{d}: it grows {', '.join(self.supported) or 'nothing'}. Pick a schedule that grows only "
                        f"those, another operator, or set operator.{key} to one of {', '.join(METHODS[key])}.")
                if method == "tile" and new % old:
                    raise ConfigError(f"{stage.describe()} grows {d} {old} -> {new}, but operator.{d}=tile copies "
                                      f"every unit an integer number of times: {new} is not a multiple of {old}.")
                if d == "layers" and method in ("stack", "msg") and new % old and self.cfg.depth_remainder == "refuse":
                    raise ConfigError(
                        f"{stage.describe()} grows layers {old} -> {new}, which is not a whole number of stacks "
                        f"({new / old:.3g} x), and operator.depth_remainder=refuse (operator '{self.name}' stacks the "
                        "whole trained model g times). Choose sizes with an integer ratio (schedule.depth_factor sets "
                        "the start depth to model.layers / g), or operator.depth_remainder=top | bottom to copy "
                        "part of the stack.")
                if d == "layers" and method in expansion.DEPTH_METHODS:
                    expansion.check_depth(method, old, new, self.family, stage.describe())
                if method == "lemon" and d != "layers":
                    lemon.check_width(d, old, new, self.family, stage.describe())
                if method == "aki" and d == "hidden":
                    raise ConfigError("operator.hidden=aki: AKI mixes in the next layer's units, which has no "
                                      "meaning for the residual width shared by all layers; use fpi for hidden.")
            if "seq_len" in stage.dims and final.seq_len % stage.target.seq_len:
                raise ConfigError(f"{stage.describe()} trains on sequences of {stage.target.seq_len} tokens, which "
                                  f"does not divide model.seq_len = {final.seq_len}; tokens per step stay constant, "
                                  "so the final length must be a multiple of every stage's length.")
            shape = stage.target
        if start.seq_len != final.seq_len and final.seq_len % start.seq_len:
            raise ConfigError(f"schedule.start.seq_len = {start.seq_len} does not divide model.seq_len = "
                              f"{final.seq_len} (tokens per step stay constant across sequence lengths).")
        if self.raptr and not (2 <= start.layers <= final.layers):
            raise ConfigError(f"RaPTr always runs the first and last layers, so its starting path length "
                              f"schedule.start.layers = {start.layers} must be between 2 and model.layers = "
                              f"{final.layers}.")

    def model_args(self, shape: Shape, final: ModelArgs) -> ModelArgs:
        """The model that trains at `shape`. RaPTr's model is always full depth: its `layers` are
        the expected path length."""
        layers = final.layers if self.raptr else shape.layers
        return replace(final, layers=layers, hidden=shape.hidden, heads=shape.heads, ffn=shape.ffn,
                       kv_heads=shape.kv_heads, experts=shape.experts)

    # ------------------------------------------------------------------ building the grown model
    def unit_map(self, dim: str, old: int, new: int, gen: torch.Generator) -> UnitMap:
        method = self.methods[dim]
        if dim == "experts":
            return moe.expert_map(old, new)
        if method == "msg":
            return UnitMap.append_new(old, new)
        if method == "tile":
            return UnitMap.from_sources(torch.arange(new) % old)
        if method == "lemon":
            return lemon.unit_map(dim, old, new, self.cfg.symmetry_noise, gen)
        # fpi / aki: originals stay in place; each new unit copies a source unit
        extra = new - old
        if self.cfg.mapping == "left":
            picks = torch.arange(extra) % old
        else:
            picks = torch.randint(old, (extra,), generator=gen)
        return UnitMap.from_sources(torch.cat([torch.arange(old), picks]))

    def layer_plan(self, old_layers: int, new_layers: int) -> tuple[list[int | None], list[bool], list[bool]]:
        """Source layer of each new layer (None: fresh init), which layers enter under MSG's
        identity mask, and which are not originals (copies or fresh: no optimizer state of their
        own under operator.new_layer_state=fresh). Deterministic, so an interrupted ramp can be
        rebuilt on resume."""
        if new_layers == old_layers:
            return list(range(old_layers)), [False] * old_layers, [False] * old_layers
        if self.methods["layers"] in expansion.DEPTH_METHODS:  # copies without masks (growth/expansion.py)
            sources = expansion.layer_sources(self.methods["layers"], old_layers, new_layers)[0]
            return sources, [False] * new_layers, [not k for k in first_occurrences(sources)]
        sources = layer_map(old_layers, new_layers, self.cfg.depth_order, self.cfg.depth_remainder)
        kept = first_occurrences(sources)
        msg = self.methods["layers"] == "msg"
        if msg and self.cfg.depth_init == "random":
            sources = [s if k else None for s, k in zip(sources, kept)]
        return sources, [msg and not k for k in kept], [not k for k in kept]

    def mask_plan(self, old_args: ModelArgs, new_args: ModelArgs) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """MSG's new-unit indicators (entry level: a head is head_dim channels) and new layers."""
        grown = {d: getattr(new_args, d) for d in ("hidden", "heads", "ffn") if self.methods[d] == "msg"}
        if "heads" in grown:
            grown["kv_heads"] = new_args.kv_heads  # key/value heads grow with the heads (growth/gqa.py)
        maps = unit_maps_for(old_args, replace(old_args, **grown), lambda d, o, n: UnitMap.append_new(o, n),
                             copy_queries=False)
        new_units = {d: um.new_units.repeat_interleave(unit_size(d, new_args)).float() for d, um in maps.items()}
        return new_units, self.layer_plan(old_args.layers, new_args.layers)[1]

    def grow(self, model: Transformer, target: Shape, final: ModelArgs, gen: torch.Generator) -> Grown:
        old_args = model.args
        new_args = self.model_args(target, final)
        if self.methods["hidden"] == "lemon":
            new_args = lemon.grown_args(old_args, new_args)
        if "ligo" in self.methods.values():  # one learned operator for every dimension (growth/ligo.py)
            grown_model, flops = ligo.fit(model, new_args, gen, self.cfg.ligo_steps, self.cfg.ligo_lr, self.fit_data)
            return Grown(grown_model, {name: Origin(None) for name, _ in grown_model.named_parameters()},
                         operator_flops=flops)
        shares = ((lambda index: lemon.shares(index, old_args.heads, self.cfg.symmetry_noise, gen))
                  if self.methods["heads"] == "lemon" else None)  # query heads copied under grouped-query attention
        unit_maps = unit_maps_for(old_args, new_args, lambda d, o, n: self.unit_map(d, o, n, gen), shares,
                                  copy_queries=self.methods["heads"] != "msg")
        layer_sources, _, copied = self.layer_plan(old_args.layers, new_args.layers)
        grown_model, origins = grow_parameters(model, new_args, unit_maps, layer_sources, gen)
        for d, um in unit_maps.items():
            if d == "kv_heads":
                continue  # taken care of with heads (AKI) or read by no matmul (symmetry noise)
            if self.methods[d] == "aki":
                take_from_next_layer(grown_model, model, d, origins)
            if self.methods[d] in COPYING and self.cfg.symmetry_noise > 0:
                break_symmetry(grown_model, d, um, self.cfg.symmetry_noise, gen)
        if "experts" in unit_maps:
            moe.break_router_ties(grown_model, unit_maps["experts"], self.cfg.symmetry_noise, gen)
        if "hidden" in unit_maps and self.methods["hidden"] == "lemon":
            lemon.finish_hidden(grown_model, old_args.hidden)
        if self.methods["layers"] in expansion.IDENTITY_ENTRY and new_args.layers != old_args.layers:
            expansion.zero_output_projections(
                grown_model, expansion.layer_sources(self.methods["layers"], old_args.layers, new_args.layers)[1])
        new_units, new_layers = self.mask_plan(old_args, new_args)
        return Grown(grown_model, origins, new_units, new_layers, copied)


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
        axes = parameter_axes(name, model.args)
        if p.dim() != 2 or not (axes[1].dim == dim and axes[1].fan_in):
            continue
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
    old_L, old_units, new_units = old_model.args.layers, getattr(old_model.args, dim), getattr(model.args, dim)
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
