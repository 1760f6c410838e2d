"""What a growth method is, and the methods at msgrun's core: MSG, stacking, RaPTr, and the
sequence-length methods. The registry of every method is growth/registry.py.

A method grows one or more dimensions (`operator.layers=stack operator.hidden=msg ...`) and says,
as data, everything the rest of msgrun needs to know about it: which dimensions it grows, what it
refuses (`check`), how it maps units (`unit_map`, width) or layers (`layer_sources`, depth), what
it does after the generic copy (`finish`), and which engine hooks it needs (masks and a ramp,
per-step paths, length pooling, frozen layers, fitting batches). The growth operator, the engine
and the trainer ask these fields; nothing outside a method's own module compares its name.

Width methods are unit maps and depth methods layer maps (growth/surgery.py), so any mix of them
composes; a method that builds the whole grown model itself (LiGO) composes with nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from msgrun.errors import ConfigError
from msgrun.growth.surgery import UnitMap

# Hooks, by signature:
#   check(dim, old, new, family, where, cfg)  raise ConfigError where the method cannot grow old -> new
#   unit_map(dim, old, new, cfg, gen) -> UnitMap   the source (and scale) of each unit of the wider model
#   layer_sources(old, new, cfg) -> (sources, masked, zeroed)
#       sources: the old layer each new layer copies (None: fresh init); masked: layers that enter
#       under MSG's identity mask; zeroed: layers whose output projections are zeroed (identity entry)
#   finish(grown, old_model, dim, unit_maps, origins, cfg, gen)   after the generic transplant of every
#       grown dimension (unit_maps: all of this event's, by dimension); hidden is finished last
#   grown_args(old_args, new_args) -> new_args   a hidden method that changes more than the sizes (LEMON's eps)
#   build(old_model, new_args, gen, cfg, fit_data) -> (model, operator_flops)   the whole grown model
#   resolve(family, pos) -> name                  an alias resolved per architecture (seq_len=auto)


@dataclass(frozen=True)
class Method:
    name: str
    dims: tuple[str, ...]  # the dimensions it can grow
    about: str  # what it does and whose method it is (one line, for errors and docs)
    masks: bool = False  # new units and layers enter under MSG's alpha ramp (engine: install_ramp)
    copies: bool = False  # new width units copy old ones: zero-sum symmetry noise applies (operator.symmetry_noise)
    paths: bool = False  # RaPTr: the full model from step 0, a random path of layers per step
    pools: bool = False  # seq_len: the model reads full-length input and pools it
    freezes_old: bool = False  # operator.freeze_old may train only the blocks this depth method added
    single_process: bool = False  # fits on one process's batches (refused under DDP/FSDP)
    check: Callable | None = None
    unit_map: Callable | None = None
    layer_sources: Callable | None = None
    finish: Callable | None = None
    grown_args: Callable | None = None
    build: Callable | None = None
    resolve: Callable | None = None


# ---------------------------------------------------------------------------------------- depth
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


def first_occurrences(sources: list[int | None]) -> list[bool]:
    """True where a layer is the original of its source (kept in place), False for copies and
    fresh layers."""
    seen, out = set(), []
    for s in sources:
        out.append(s is not None and s not in seen)
        seen.add(s)
    return out


def check_whole_stacks(dim, old, new, family, where, cfg) -> None:
    if dim == "layers" and new % old and cfg.depth_remainder == "refuse":
        raise ConfigError(
            f"{where} grows layers {old} -> {new}, which is not a whole number of stacks ({new / old:.3g} x), and "
            f"operator.depth_remainder=refuse (operator '{cfg.name}' stacks the whole trained model g times). "
            "Choose sizes with an integer ratio (schedule.depth_factor sets the start depth to model.layers / g), "
            "or operator.depth_remainder=top | bottom to copy part of the stack.")


def stack_sources(old: int, new: int, cfg):
    sources = layer_map(old, new, cfg.depth_order, cfg.depth_remainder)
    return sources, [False] * new, [False] * new


def msg_sources(old: int, new: int, cfg):
    """Copies (operator.depth_init=copy) or fresh layers (random) that enter as the identity
    under the mask."""
    sources = layer_map(old, new, cfg.depth_order, cfg.depth_remainder)
    kept = first_occurrences(sources)
    if cfg.depth_init == "random":
        sources = [s if k else None for s, k in zip(sources, kept)]
    return sources, [not k for k in kept], [False] * new


# ------------------------------------------------------------------------------------- seq_len
def resolve_length(family: str, pos: str) -> str:
    """CompoundGrowth's length operator as the architecture allows it: pooling for BERT with
    learned positions (the paper's operator), sequence-length warmup otherwise (pooling would leak
    the future into a causal model; a mean of rotary positions has no meaning)."""
    return "pool" if family == "bert" and pos == "learned" else "warmup"


CORE = (
    Method("msg", ("layers", "hidden", "heads", "ffn"), "new units and layers appended and masked in by an "
           "alpha ramp; exact at alpha = 0 (MSG, Yao et al. 2024)", masks=True,
           check=check_whole_stacks, unit_map=lambda dim, old, new, cfg, gen: UnitMap.append_new(old, new),
           layer_sources=msg_sources),
    Method("stack", ("layers",), "new layers are copies of the trained stack, in order or interleaved "
           "(G_stack, StackBERT)", check=check_whole_stacks, layer_sources=stack_sources),
    Method("raptr", ("layers",), "the full model from step 0; stages raise the expected length of the random "
           "path of layers trained per step (RaPTr, Panigrahi et al. 2024)", paths=True),
    Method("warmup", ("seq_len",), "shorter training sequences, more of them per step; nothing structural "
           "changes"),
    Method("pool", ("seq_len",), "full-length input mean-pooled inside the model (CompoundGrowth's length "
           "operator; BERT only)", pools=True),
    Method("auto", ("seq_len",), "pool for BERT with learned positions, warmup otherwise",
           resolve=resolve_length),
)
