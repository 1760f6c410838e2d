"""Growth schedules: when the model grows, and to which shape.

A schedule is a start shape plus stages; each stage has one trigger (`at_step`, `at_tokens`,
`at_flops` or `at_fraction` of the run's budget) and target sizes. Sizes are ints (absolute) or
floats in (0, 1] (fractions of the final model), so one schedule file serves every model size.

Everything here is checked before training starts: an impossible schedule must never cost
compute. Trigger times of different kinds are compared by *simulating* the run (tokens per step
is constant by design, FLOPs per step follows each stage's shape), so ordering, ramp overlap and
"stage after the end of the run" are caught for every trigger kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

from msgrun.errors import ConfigError
from msgrun.model import kv_heads_problem

DIMS = ("layers", "hidden", "heads", "ffn", "seq_len", "kv_heads", "experts")
TRIGGERS = ("at_step", "at_tokens", "at_flops", "at_fraction")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq_len: int
    kv_heads: int | None = None  # None (a checkpoint from before grouped-query attention): = heads
    experts: int = 1  # FFN experts; 1: dense

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)

    def replace(self, **changes) -> "Shape":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        """kv_heads only where it is not heads: a multi-head model's records read as they always did."""
        d = asdict(self)
        if self.kv_heads == self.heads:
            del d["kv_heads"]
        if self.experts == 1:  # likewise experts for a dense model
            del d["experts"]
        return d

    def __str__(self) -> str:
        kv = f" ({self.kv_heads} kv)" if self.kv_heads != self.heads else ""
        experts = f" x {self.experts}E" if self.experts > 1 else ""
        return f"{self.layers}L x {self.hidden}H x {self.heads}A{kv} x {self.ffn}F{experts} x T{self.seq_len}"


@dataclass(frozen=True)
class Stage:
    index: int
    trigger: str  # one of TRIGGERS
    value: float
    target: Shape
    dims: tuple[str, ...]  # the dimensions this stage changes

    def describe(self) -> str:
        return f"schedule.stages[{self.index}] ({self.trigger}={self.value:g})"


def final_shape(model_cfg) -> Shape:
    return Shape(*(int(getattr(model_cfg, d)) for d in DIMS[:5]), kv_heads=model_cfg.kv_heads,
                 experts=int(model_cfg.experts))


def resolve_size(value, final: int, where: str) -> int:
    """int -> absolute size; float in (0, 1] -> that fraction of the final size (rounded, >= 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} = {value!r} is not a size: use an int (absolute size) or a float in (0, 1] "
                          "(a fraction of the final model's size).")
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{where} = {value} is a float, so it is read as a fraction of the final model, "
                              "but fractions must lie in (0, 1]. Write an int for an absolute size.")
        return max(1, round(value * final))
    if value < 1:
        raise ConfigError(f"{where} = {value}: sizes must be at least 1.")
    return int(value)


def _resolve_spec(spec, base: Shape, final: Shape, where: str) -> Shape:
    sizes = {}
    for d in DIMS:
        v = getattr(spec, d, None) if spec is not None else None
        sizes[d] = getattr(base, d) if v is None else resolve_size(v, getattr(final, d), f"{where}.{d}")
    if getattr(spec, "kv_heads", None) is None:
        # unset: each key/value head keeps serving as many query heads as in `base` (multi-head
        # attention stays multi-head; a GQA model grows heads and kv_heads together)
        group = base.heads // base.kv_heads
        if sizes["heads"] % group:
            raise ConfigError(
                f"{where}.heads = {sizes['heads']} query heads cannot keep groups of {group} query heads per key/value "
                f"head ({base.heads} heads, {base.kv_heads} kv_heads before it). Set {where}.kv_heads explicitly "
                f"(a divisor of {sizes['heads']}), or choose heads as a multiple of {group}.")
        sizes["kv_heads"] = sizes["heads"] // group
    problem = kv_heads_problem(sizes["heads"], sizes["kv_heads"])
    if problem:
        raise ConfigError(f"{where}.kv_heads = {sizes['kv_heads']} with {where}.heads = {sizes['heads']}: {problem}.")
    return Shape(**sizes)


def depth_factor_start(schedule_cfg, final: Shape) -> int | None:
    """The start depth that `schedule.depth_factor` (G_stack's growth factor g) implies:
    model.layers / g, refused unless it is a whole number (a partial stack is not G_stack, and
    rounding a fraction would silently change g)."""
    g = getattr(schedule_cfg, "depth_factor", None)
    if g is None:
        return None
    if isinstance(g, bool) or not isinstance(g, int) or g < 2:
        raise ConfigError(f"schedule.depth_factor = {g!r}: the growth factor g must be an integer >= 2 "
                          "(the final depth is g times the start depth).")
    if getattr(schedule_cfg.start, "layers", None) is not None:
        raise ConfigError(f"schedule.depth_factor = {g} sets the start depth (model.layers / g); "
                          f"schedule.start.layers = {schedule_cfg.start.layers} sets it too. Set one of them "
                          "(schedule.start.layers=null or schedule.depth_factor=null).")
    if final.layers % g:
        fits = [k for k in range(2, final.layers + 1) if final.layers % k == 0]
        raise ConfigError(
            f"schedule.depth_factor = {g} needs model.layers divisible by {g}, so that the model starts at "
            f"model.layers / g layers and grows by stacking them exactly {g} times; model.layers = {final.layers} "
            f"would start at {final.layers / g:g} layers. Choose model.layers as a multiple of {g} (e.g. "
            f"{g * max(1, round(final.layers / g))}), or schedule.depth_factor as one of "
            f"{', '.join(map(str, fits)) or 'none: this depth cannot be stacked'}.")
    return final.layers // g


def resolve_schedule(schedule_cfg, model_cfg) -> tuple[Shape, list[Stage]]:
    """Turn the config's start and stages into absolute shapes, checking the rules that do not
    depend on the operator or the budget: one trigger per stage, targets never shrink, every
    stage grows something, and the last stage reaches the final model."""
    final = final_shape(model_cfg)
    start = _resolve_spec(schedule_cfg.start, final, final, "schedule.start")
    start_layers = depth_factor_start(schedule_cfg, final)
    if start_layers is not None:
        start = start.replace(layers=start_layers)
    for d in DIMS:
        if getattr(start, d) > getattr(final, d):
            raise ConfigError(f"schedule.start.{d} = {getattr(start, d)} is larger than the final model's "
                              f"model.{d} = {getattr(final, d)}; a schedule can only grow towards the final model.")
    stages, current = [], start
    for i, st in enumerate(schedule_cfg.stages or []):
        where = f"schedule.stages[{i}]"
        set_triggers = [t for t in TRIGGERS if getattr(st, t, None) is not None]
        if len(set_triggers) != 1:
            raise ConfigError(f"{where} needs exactly one trigger out of {', '.join(TRIGGERS)}; "
                              f"it has {set_triggers or 'none'}.")
        trigger = set_triggers[0]
        value = float(getattr(st, trigger))
        if trigger == "at_fraction" and not 0.0 < value < 1.0:
            raise ConfigError(f"{where}.at_fraction = {value}: a fraction of the run must lie in (0, 1).")
        if trigger != "at_fraction" and value <= 0:
            raise ConfigError(f"{where}.{trigger} = {value:g}: a growth trigger must be positive "
                              "(the start shape already covers step 0).")
        target = _resolve_spec(st.grow, current, final, f"{where}.grow")
        for d in DIMS:
            if getattr(target, d) < getattr(current, d):
                raise ConfigError(f"{where}.grow.{d} = {getattr(target, d)} shrinks the model "
                                  f"(it is {getattr(current, d)} before this stage); growth targets never shrink.")
            if getattr(target, d) > getattr(final, d):
                raise ConfigError(f"{where}.grow.{d} = {getattr(target, d)} exceeds the final model's "
                                  f"model.{d} = {getattr(final, d)}.")
        dims = tuple(d for d in DIMS if getattr(target, d) != getattr(current, d)
                     # multi-head attention stays multi-head: its key/value heads are its heads
                     and not (d == "kv_heads" and current.kv_heads == current.heads and target.kv_heads == target.heads))
        if not dims:
            raise ConfigError(f"{where} grows nothing: every target equals the shape before it ({current}).")
        stages.append(Stage(i, trigger, value, target, dims))
        current = target
    if current != final:
        missing = [f"{d}: {getattr(current, d)} -> {getattr(final, d)}" for d in DIMS
                   if getattr(current, d) != getattr(final, d)]
        raise ConfigError(f"The schedule '{schedule_cfg.name}' ends at {current}, not at the final model {final} "
                          f"(model=...). Add or change a stage so that it reaches {', '.join(missing)}; "
                          "targets may be written as fractions so one schedule fits every model size.")
    return start, stages


@dataclass(frozen=True)
class Budget:
    max_steps: int
    tokens_per_step: int
    max_tokens: float | None = None
    max_flops: float | None = None

    def progress(self, step: int, tokens: float, flops: float) -> float:
        """Fraction of the run done: the run ends when the first of its budgets is spent, so
        progress is the largest of the spent fractions. LR schedules and `at_fraction` use it."""
        p = step / self.max_steps
        if self.max_tokens:
            p = max(p, tokens / self.max_tokens)
        if self.max_flops:
            p = max(p, flops / self.max_flops)
        return min(p, 1.0)


def stage_due(stage: Stage, step: int, tokens: float, flops: float, progress: float) -> bool:
    now = {"at_step": step, "at_tokens": tokens, "at_flops": flops, "at_fraction": progress}[stage.trigger]
    return now >= stage.value


def simulate_trigger_steps(start: Shape, stages: list[Stage], budget: Budget,
                           flops_per_step: Callable[[Shape], float]) -> list[int | None]:
    """The step at which each stage would fire (None: not before the run ends)."""
    steps: list[int | None] = []
    step, tokens, flops, shape = 0, 0.0, 0.0, start
    for stage in stages:
        per_step = flops_per_step(shape)
        while step < budget.max_steps and not stage_due(stage, step, tokens, flops,
                                                        budget.progress(step, tokens, flops)):
            # advance in one jump where the trigger is linear in steps; the loop guards rounding
            remaining = {
                "at_step": stage.value - step,
                "at_tokens": (stage.value - tokens) / budget.tokens_per_step,
                "at_flops": (stage.value - flops) / per_step,
            }.get(stage.trigger, 1)
            n = max(1, min(int(math.ceil(remaining)) - 1, budget.max_steps - step))
            step, tokens, flops = step + n, tokens + n * budget.tokens_per_step, flops + n * per_step
        if step >= budget.max_steps or budget.progress(step, tokens, flops) >= 1.0:
            steps.append(None)
            steps.extend([None] * (len(stages) - len(steps)))
            return steps
        steps.append(step)
        shape = stage.target
    return steps


def run_steps(start: Shape, stages: list[Stage], trigger_steps: list[int | None], budget: Budget,
              flops_per_step: Callable[[Shape], float]) -> int:
    """Optimizer steps the run will train: the first of its budgets to be spent ends it."""
    return sum(n for _, n in _segments(start, stages, trigger_steps, budget, flops_per_step))


def planned_flops(start: Shape, stages: list[Stage], trigger_steps: list[int | None], budget: Budget,
                  flops_per_step: Callable[[Shape], float]) -> float:
    """Training FLOPs the run will spend, from its config alone: each shape's FLOPs per step times
    the steps it trains (what `flops` in metrics.jsonl adds up to, for deterministic structures;
    RaPTr's paths are its expected length, operator work such as LiGO's fitting is not known
    before the event)."""
    return float(sum(n * flops_per_step(shape) for shape, n in _segments(start, stages, trigger_steps, budget,
                                                                        flops_per_step)))


def _segments(start: Shape, stages: list[Stage], trigger_steps: list[int | None], budget: Budget,
              flops_per_step: Callable[[Shape], float]) -> list[tuple[Shape, int]]:
    """(shape, steps trained at it) in order, up to the end of the run (a FLOPs budget ends it at
    the first step that reaches it)."""
    n = budget.max_steps
    if budget.max_tokens:
        n = min(n, math.ceil(budget.max_tokens / budget.tokens_per_step))
    shapes = [start] + [s.target for s in stages]
    bounds = [0] + [s for s in trigger_steps if s is not None and s < n] + [n]
    out, flops = [], 0.0
    for shape, a, b in zip(shapes, bounds, bounds[1:]):
        per_step = flops_per_step(shape)
        if budget.max_flops and flops + (b - a) * per_step >= budget.max_flops:
            out.append((shape, min(b, a + math.ceil((budget.max_flops - flops) / per_step)) - a))
            return out
        flops += (b - a) * per_step
        out.append((shape, b - a))
    return out


def check_ramp_steps(value) -> None:
    """operator.ramp_steps: an int >= 1 (optimizer steps) or a float in (0, 1) (a fraction of the run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0.0 < value < 1.0):
        raise ConfigError(f"operator.ramp_steps = {value!r}: MSG's mask ramp takes an int >= 1 (optimizer steps) "
                          "or a float in (0, 1) (that fraction of the run's steps, at least 1).")


def resolve_ramp_steps(value, total_steps: int) -> int:
    """Steps of MSG's ramp (alpha's R increments from 0 to 1) for a run of `total_steps`."""
    check_ramp_steps(value)
    return value if isinstance(value, int) else max(1, round(value * total_steps))


def check_timing(stages: list[Stage], trigger_steps: list[int | None], ramp_steps: int,
                 ramp_setting=None) -> None:
    """Stages fire in order, each after the previous one's mask ramp has finished, and before
    the run ends. `ramp_steps`: steps that train with an event's masks installed (0: no masks)."""
    previous = None
    for stage, step in zip(stages, trigger_steps):
        if step is None:
            raise ConfigError(f"{stage.describe()} would fire after the run ends (train.max_steps and any "
                              "token/FLOPs budget are spent first), so the model would never reach its final "
                              "shape. Move the trigger earlier or lengthen the run.")
        if previous is not None:
            prev_stage, prev_step = previous
            if step <= prev_step:
                raise ConfigError(f"{stage.describe()} fires at step {step}, not after {prev_stage.describe()} "
                                  f"(step {prev_step}); stages must be ordered in time.")
            if ramp_steps and step < prev_step + ramp_steps:
                setting = ramp_setting if ramp_setting is not None else ramp_steps
                raise ConfigError(f"{stage.describe()} fires at step {step}, inside the mask ramp of "
                                  f"{prev_stage.describe()} (steps {prev_step}..{prev_step + ramp_steps - 1} train "
                                  f"with its masks; operator.ramp_steps={setting}). Space the stages further apart "
                                  "or shorten operator.ramp_steps (an int is steps, a float a fraction of the run).")
        previous = (stage, step)


def gstack_growth_tokens(params: float, budget_tokens: float) -> float:
    """G_stack's growth-timing guideline (Du et al. 2024): tokens d to spend on the small model,
    log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74, with N the final model's parameters and
    C = 6 N D the nominal budget of a D-token run (the paper's own table reproduces only with C
    taken this way)."""
    C = 6.0 * params * budget_tokens
    return 10 ** (0.88 * math.log10(params) + 163.27 / math.log10(C) - 5.74)
