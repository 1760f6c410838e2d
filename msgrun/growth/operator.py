"""A growth operator: one growth method per dimension (`operator.layers=msg operator.hidden=fpi ...`).

The named operators in conf/operator/ are presets of that mapping, and any mix of methods
composes, because every width method is a unit map and every depth method a layer map
(growth/surgery.py). The methods themselves, with what each grows and refuses, are in the
registry (growth/registry.py); this class composes them and asks them, never their names.

Options shared by several methods:
  depth_init / depth_order / depth_remainder: where new layers come from. A depth growth that is
    not an integer multiple copies the top layers once more (top, the MSG reference: 4 -> 6 is
    0,1,2,3,2,3), the bottom ones (bottom, CompoundGrowth's code: layer i copies i mod L,
    0,1,2,3,0,1), or is refused (refuse, G_stack: whole stacks only).
  variant=aki: bert2BERT's switch, AKI wherever FPI would copy heads or FFN units.
  symmetry_noise: zero-sum noise on copies' consuming weights (growth/copying.py says why).
  seq_len=pool (CompoundGrowth's length operator, Gu et al., google-research/grow_bert): read
    full-length sequences and run the blocks on T/pool mean-pooled tokens plus the predicted ones
    (model.forward); the stage's seq_len is the pooled length. Not exact: the probe logs the jump.
    As the paper's code: mean pooling with stride `pool` after the embedding norm, the masked
    positions' embeddings appended as extra queries that carry the MLM predictions, the first
    layer attending over the full-length input. Ours: no [CLS] token is kept out of the pooling
    (our rows have none), T must be a multiple of the pool, and at full length the model is plain
    BERT (the paper's model keeps the appended queries even then).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from msgrun.errors import ConfigError
from msgrun.growth import gqa, moe
from msgrun.growth.copying import break_symmetry, with_variant
from msgrun.growth.methods import Method, first_occurrences
from msgrun.growth.registry import METHODS, REGISTRY, resolved
from msgrun.growth.schedule import Shape, Stage, check_ramp_steps
from msgrun.growth.surgery import Origin, UnitMap, grow_parameters, unit_maps_for, unit_size
from msgrun.growth.expansion import zero_output_projections
from msgrun.model import ModelArgs, Transformer

# the operator's own choices (the growth methods are the registry's; operator.lr_policy is optim.py's)
CHOICES = {
    "depth_init": ("copy", "random"),
    "depth_order": ("stack", "interleave"),
    "mapping": ("random", "left"),
    "variant": ("fpi", "aki"),
    "optimizer_state": ("carry", "reset"),
    "new_moments": ("zero", "mean"),
    "rescale": ("none", "inverse_keep_prob"),
    "depth_remainder": ("top", "bottom", "refuse"),
    "new_layer_state": ("fresh", "carry"),
    "mask_placement": ("reference", "ours"),
    "ramp_start": ("zero", "increment"),
    "expert_top_k": moe.TOP_K,
}


@dataclass
class Grown:
    model: Transformer
    origins: dict[str, Origin]
    new_units: dict[str, torch.Tensor] = field(default_factory=dict)  # msg dims: entry-level indicators
    new_layers: list[bool] = field(default_factory=list)  # msg depth: layers that enter as identity
    copied_layers: list[bool] = field(default_factory=list)  # any depth growth: layers that are not originals
    zeroed_layers: list[bool] = field(default_factory=list)  # identity entry: output projections zeroed
    operator_flops: int = 0  # compute the operator itself trained (LiGO's fitting), charged to the run


class GrowthOperator:
    def __init__(self, cfg, family: str, pos: str = "learned"):
        self.cfg, self.name, self.family, self.pos = cfg, cfg.name, family, pos
        for key, valid in CHOICES.items():
            if getattr(cfg, key) not in valid:
                raise ConfigError(f"operator.{key} = {getattr(cfg, key)!r}; choose one of {', '.join(valid)}.")
        self.methods = {d: getattr(cfg, d) for d in METHODS}
        for d, m in self.methods.items():
            if m is not None and m not in METHODS[d]:
                raise ConfigError(f"operator.{d} = {m!r} is not a growth method for {d}; choose one of "
                                  f"{', '.join(METHODS[d])} (or null: the operator does not grow {d}).")
        self.methods = with_variant(self.methods, cfg.variant)
        for d, m in self.methods.items():  # aliases resolved for this architecture (seq_len=auto)
            self.methods[d] = None if m is None else resolved(m, family, pos).name
        if self.uses_masks:
            check_ramp_steps(cfg.ramp_steps)
        self.check_options(pos)
        self.fit_data = None  # a fitting method's data: k -> the micro-batches of fitting step k (set by the trainer)

    def method(self, dim: str) -> Method | None:
        name = self.methods[dim]
        return None if name is None else REGISTRY[name]

    @property
    def active(self) -> list[Method]:
        return [REGISTRY[m] for m in self.methods.values() if m is not None]

    @property
    def supported(self) -> list[str]:
        return [d for d, m in self.methods.items() if m is not None]

    @property
    def uses_masks(self) -> bool:
        return any(m.masks for m in self.active)

    @property
    def pools(self) -> bool:
        return any(m.pools for m in self.active)

    @property
    def paths(self) -> bool:
        """RaPTr: the full model from step 0, a random path of layers per step."""
        return any(m.paths for m in self.active)

    @property
    def builder(self) -> Method | None:
        """The method that builds the whole grown model itself (LiGO), if any."""
        return next((m for m in self.active if m.build is not None), None)

    def check_options(self, pos: str) -> None:
        """Rules across methods and options, checked when the operator is built."""
        cfg, builder = self.cfg, self.builder
        if builder is not None:
            other = [f"operator.{d}={m}" for d, m in self.methods.items()
                     if m not in (None, builder.name) and (d != "seq_len" or REGISTRY[m].pools)]
            if other:
                raise ConfigError(
                    f"operator={builder.name} is one learned operator for every grown dimension ({builder.about}), so "
                    f"it does not compose with {', '.join(other)}; set layers, hidden, heads and ffn to "
                    f"{builder.name} (or null), and seq_len to warmup or null.")
        depth = self.method("layers")
        if cfg.freeze_old and not (depth is not None and depth.freezes_old):
            able = [m.name for m in REGISTRY.values() if m.freezes_old]
            raise ConfigError(f"operator.freeze_old=true trains only the blocks a depth expansion added, which "
                              f"operator.layers = {self.methods['layers']!r} does not mark; set operator.layers to "
                              f"one of {', '.join(able)}, or operator.freeze_old=false.")
        if self.pools and (self.family != "bert" or pos != "learned"):
            raise ConfigError(
                f"operator.seq_len=pool needs model.family=bert with model.pos=learned (this model: family="
                f"{self.family}, pos={pos}). Pooling the input would leak future tokens into a causal model, and rotary "
                "positions have no meaning for a mean of several tokens; use operator.seq_len=warmup (shorter training "
                "sequences) instead.")
        heads = self.method("heads")
        if self.pools and heads is not None and heads.masks and cfg.mask_placement == "reference":
            raise ConfigError(
                "operator.seq_len=pool with operator.heads=msg and operator.mask_placement=reference: the reference "
                "placement masks new heads' q, k and v, but length pooling's first layer computes its keys and "
                "values from the unpooled input outside that mask. Use operator.mask_placement=ours (new heads "
                "masked at the output projection) with length pooling.")

    def check(self, start: Shape, stages: list[Stage], final: Shape, experts_per_token: int | None = None) -> None:
        """Every stage grows only dimensions this operator can grow, in sizes its methods accept
        (`experts_per_token`: the final model's top-k, for operator.expert_top_k=grow)."""
        self.adopt_sole_methods(stages)
        gqa.check_learned_operator(self.methods, final)
        if experts_per_token is not None:
            moe.check_top_k(self.cfg, start, stages, final, experts_per_token)
        shape = start
        for stage in stages:
            if {"heads", "kv_heads"} & set(stage.dims) and self.methods["heads"] is not None:
                gqa.check_heads(self.methods["heads"], self.cfg, shape, stage.target, stage.describe())
            for d in stage.dims:
                key = "heads" if d == "kv_heads" else d  # a key/value head is a head: operator.heads grows both
                method = self.method(key)
                old, new = getattr(shape, d), getattr(stage.target, d)
                if method is None:
                    raise ConfigError(
                        f"{stage.describe()} grows {d} ({old} -> {new}), but operator '{self.name}' cannot grow "
                        f"{d}: it grows {', '.join(self.supported) or 'nothing'}. Pick a schedule that grows only "
                        f"those, another operator, or set operator.{key} to one of {', '.join(METHODS[key])}.")
                if method.check is not None:
                    method.check(d, old, new, self.family, stage.describe(), self.cfg)
            if "seq_len" in stage.dims and final.seq_len % stage.target.seq_len:
                raise ConfigError(f"{stage.describe()} trains on sequences of {stage.target.seq_len} tokens, which "
                                  f"does not divide model.seq_len = {final.seq_len}; tokens per step stay constant, "
                                  "so the final length must be a multiple of every stage's length.")
            shape = stage.target
        if start.seq_len != final.seq_len and final.seq_len % start.seq_len:
            raise ConfigError(f"schedule.start.seq_len = {start.seq_len} does not divide model.seq_len = "
                              f"{final.seq_len} (tokens per step stay constant across sequence lengths).")
        if self.paths and not (2 <= start.layers <= final.layers):
            raise ConfigError(f"RaPTr always runs the first and last layers, so its starting path length "
                              f"schedule.start.layers = {start.layers} must be between 2 and model.layers = "
                              f"{final.layers}.")

    def adopt_sole_methods(self, stages: list[Stage]) -> None:
        """A dimension that a stage grows, that the operator leaves null, and for which the registry
        has exactly one method, grows by that method: there is no choice to make (today: experts,
        whose one method `copy` is sparse upcycling and expert duplication). So
        `msgrun model=moe_tiny schedule=upcycle` upcycles without naming an operator, as it would
        with operator=upcycle; where methods compete (layers, hidden, ...) a null dimension is still
        refused in check. Recorded in each growth event's `methods`."""
        grown = {"heads" if d == "kv_heads" else d for stage in stages for d in stage.dims}
        adopted = [d for d in grown if self.methods.get(d) is None and len(METHODS.get(d, ())) == 1]
        for d in adopted:
            self.methods[d] = METHODS[d][0]
        if adopted:
            self.check_options(self.pos)  # the adopted method must compose with the others (LiGO)

    def methods_for(self, dims) -> dict[str, str]:
        """The method that grows each of `dims` (kv_heads grow by the heads method), for the growth log."""
        return {d: self.methods["heads" if d == "kv_heads" else d] for d in dims}

    def model_args(self, shape: Shape, final: ModelArgs) -> ModelArgs:
        """The model that trains at `shape`. Under random paths (RaPTr) the model is always full
        depth: its `layers` are the expected path length."""
        layers = final.layers if self.paths else shape.layers
        k = moe.experts_per_token(self.cfg.expert_top_k, final.experts_per_token, final.experts, shape.experts)
        return replace(final, layers=layers, hidden=shape.hidden, heads=shape.heads, ffn=shape.ffn,
                       kv_heads=shape.kv_heads, experts=shape.experts, experts_per_token=k)

    # ------------------------------------------------------------------ building the grown model
    def layer_plan(self, old_layers: int, new_layers: int) -> tuple[list[int | None], list[bool], list[bool],
                                                                    list[bool]]:
        """Source layer of each new layer (None: fresh init), which layers enter under MSG's
        identity mask, which are not originals (copies or fresh: no optimizer state of their own
        under operator.new_layer_state=fresh), and which have their output projections zeroed.
        Deterministic, so an interrupted ramp can be rebuilt on resume."""
        if new_layers == old_layers:
            same = [False] * old_layers
            return list(range(old_layers)), same, same, same
        sources, masked, zeroed = self.method("layers").layer_sources(old_layers, new_layers, self.cfg)
        return sources, masked, [not k for k in first_occurrences(sources)], zeroed

    def mask_plan(self, old_args: ModelArgs, new_args: ModelArgs) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """MSG's new-unit indicators (entry level: a head is head_dim channels) and new layers."""
        grown = {d: getattr(new_args, d) for d in ("hidden", "heads", "ffn")
                 if self.method(d) is not None and self.method(d).masks}
        if "heads" in grown:
            grown["kv_heads"] = new_args.kv_heads  # key/value heads grow with the heads (growth/gqa.py)
        maps = unit_maps_for(old_args, replace(old_args, **grown), lambda d, o, n: UnitMap.append_new(o, n),
                             copy_queries=False)
        new_units = {d: um.new_units.repeat_interleave(unit_size(d, new_args)).float() for d, um in maps.items()}
        return new_units, self.layer_plan(old_args.layers, new_args.layers)[1]

    def plan(self, old_args: ModelArgs, target: Shape, final: ModelArgs, gen: torch.Generator) -> "Plan":
        """The grown shape and the maps of an event (the width methods' random mappings draw
        from `gen` here, before any new weight is drawn): shared by the whole-model growth below
        and the sharded one (growth/sharded.py), so both draw the same numbers in the same order."""
        new_args = self.model_args(target, final)
        hidden = self.method("hidden")
        if hidden is not None and hidden.grown_args is not None:  # e.g. LEMON's norm epsilon
            new_args = hidden.grown_args(old_args, new_args)
        if self.builder is not None:
            return Plan(new_args, {}, [], [], [])
        heads = self.method("heads")
        # under grouped-query attention, a group's extra query heads copy its heads, except where the
        # method brings in new units (MSG's masks): then they are new
        unit_maps = unit_maps_for(old_args, new_args,
                                  lambda d, o, n: self.method(d).unit_map(d, o, n, self.cfg, gen),
                                  copy_queries=heads is None or not heads.masks)
        layer_sources, _, copied, zeroed = self.layer_plan(old_args.layers, new_args.layers)
        return Plan(new_args, unit_maps, layer_sources, copied, zeroed)

    def finishing_order(self, plan: "Plan") -> list[str]:
        """The grown width dimensions in the order their methods finish: hidden last, since
        finishing the residual width may rewrite what other dimensions' steps left (LEMON
        averages the residual writers' rows after every consumer split); key/value heads are
        grown with heads (their fused q, k, v rows are one axis: growth/surgery.py)."""
        return [d for d in sorted(plan.unit_maps, key=lambda d: d == "hidden") if d != "kv_heads"]

    def grow(self, model: Transformer, target: Shape, final: ModelArgs, gen: torch.Generator) -> Grown:
        old_args = model.args
        plan = self.plan(old_args, target, final, gen)
        if self.builder is not None:  # one learned operator for every dimension (LiGO)
            grown_model, flops = self.builder.build(model, plan.new_args, gen, self.cfg, self.fit_data)
            return Grown(grown_model, {name: Origin(None) for name, _ in grown_model.named_parameters()},
                         operator_flops=flops)
        grown_model, origins = grow_parameters(model, plan.new_args, plan.unit_maps, plan.layer_sources, gen)
        for d in self.finishing_order(plan):
            method = self.method(d)
            if method.finish is not None:
                method.finish(grown_model, model, d, plan.unit_maps, origins, self.cfg, gen)
            if method.copies and self.cfg.symmetry_noise > 0:
                break_symmetry(grown_model, d, plan.unit_maps[d], self.cfg.symmetry_noise, gen)
        zero_output_projections(grown_model, plan.zeroed)
        new_units, new_layers = self.mask_plan(old_args, plan.new_args)
        return Grown(grown_model, origins, new_units, new_layers, plan.copied, plan.zeroed)


@dataclass
class Plan:
    new_args: ModelArgs
    unit_maps: dict[str, UnitMap]
    layer_sources: list[int | None]
    copied: list[bool]  # layers that are not originals
    zeroed: list[bool]  # layers whose output projections are zeroed (identity entry)
