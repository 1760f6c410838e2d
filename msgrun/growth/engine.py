"""The growth engine: which stage is due, the growth event itself, and per-step hooks.

A growth event: the operator builds the larger model from the smaller one (growth/operator.py),
the optimizer state moves by provenance (growth/optim_transfer.py), MSG's masks go in with
alpha = 0, and the trainer re-wraps (compiles) the new model and logs the event with a probe.
Per step: MSG's alpha ramps in R = operator.ramp_steps increments. operator.ramp_start=zero (the
MSG reference, run_grow_bert.py): the step of the event trains at alpha = 0, the k-th step after
it at k/R, and the masks are removed after the step at alpha = 1 (R + 1 masked steps);
increment: 1/R at the event's step, 1 at the R-th (R masked steps). RaPTr samples a path.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from msgrun.data import mlm_count
from msgrun.distributed import seed_for
from msgrun.errors import ConfigError
from msgrun.flops import train_flops
from msgrun.growth.masks import install_masks, remove_masks
from msgrun.growth.operator import GrowthOperator, Grown
from msgrun.growth.optim_transfer import transfer_adamw
from msgrun.growth.raptr import RandomPaths
from msgrun.growth.schedule import (Budget, Shape, Stage, check_timing, final_shape, gstack_growth_tokens,
                                    planned_flops, resolve_ramp_steps, resolve_schedule, run_steps,
                                    simulate_trigger_steps, stage_due)
from msgrun.model import ModelArgs, Transformer, count_params
from msgrun.step import StepLayout


@dataclass
class GrowthResult:
    model: Transformer
    optimizer: torch.optim.Optimizer
    before: Shape
    after: Shape
    seconds_operator: float
    seconds_optimizer: float
    flops_per_token_before: float
    flops_per_token_after: float
    operator_flops: int = 0  # LiGO's fitting: training compute spent inside the event


@dataclass
class Ramp:
    stage: int  # index of the event that installed the masks
    start_step: int
    steps: int  # R: increments from 0 to 1
    alpha: torch.Tensor  # shared by every mask of the event
    model: Transformer
    first: int = 0  # increments already made at the event's step: 0 (ramp_start=zero) or 1 (increment)

    def value(self, step: int) -> float:
        return min(1.0, (step - self.start_step + self.first) / self.steps)


def masked_steps(ramp_steps: int, ramp_start: str) -> int:
    """Training steps an event's masks stay installed: through the step at alpha = 1 included."""
    return ramp_steps + (ramp_start == "zero")


class GrowthEngine:
    def __init__(self, cfg, final_args: ModelArgs, world_size: int = 1):
        self.cfg, self.final_args = cfg, final_args
        self.trainable_layers: list[int] | None = None  # LLaMA-Pro's freeze_old: the blocks that train
        tc = cfg.train
        self.final_shape = final_shape(cfg.model)
        self.operator = GrowthOperator(cfg.operator, cfg.model.family, cfg.model.pos)
        self.budget = Budget(tc.max_steps, tc.batch_size * cfg.model.seq_len, tc.max_tokens, tc.max_flops)
        start, stages = resolve_schedule(cfg.schedule, cfg.model)
        if cfg.schedule.guideline == "gstack":
            stages = self.apply_gstack_guideline(start, stages)
        self.operator.check(start, stages, self.final_shape, final_args.experts_per_token)
        single = [m.name for m in self.operator.active if m.single_process]
        if single and (world_size > 1 or tc.distributed != "none"):
            raise ConfigError(f"operator.*={single[0]} fits its growth operator on one process's batches; under "
                              f"train.distributed={tc.distributed} every rank would fit its own. Train it on one "
                              "process (train.distributed=none).")
        for shape in [start] + [stage.target for stage in stages]:
            check_rows(tc, self.layout(shape), world_size)
        self.trigger_steps = simulate_trigger_steps(start, stages, self.budget, self.flops_per_step)
        self.run_steps = run_steps(start, stages, self.trigger_steps, self.budget, self.flops_per_step)
        self.ramp_steps = resolve_ramp_steps(cfg.operator.ramp_steps, self.run_steps) if self.operator.uses_masks else 0
        masked = masked_steps(self.ramp_steps, cfg.operator.ramp_start) if self.ramp_steps else 0
        check_timing(stages, self.trigger_steps, masked, cfg.operator.ramp_steps)
        self.start, self.stages, self.shape = start, stages, start
        self.next_stage = 0
        self.ramp: Ramp | None = None
        self.paths = RandomPaths(final_args.layers, start.layers, seed_for(tc.seed, "raptr"),
                                 cfg.operator.rescale) if self.operator.paths else None
        self.final_params = count_params(final_args)

    # ------------------------------------------------------------------ planning
    def layout(self, shape: Shape) -> StepLayout:
        """Tokens per step are constant: sequence-length warmup reads more, shorter rows; length
        pooling reads full-length rows and pools them inside the model."""
        pool = self.final_shape.seq_len // shape.seq_len if self.operator.pools else 1
        T = shape.seq_len * pool
        predicted = mlm_count(T, self.cfg.model.mlm_probability) if self.final_args.family == "bert" else None
        return StepLayout(self.budget.tokens_per_step // T, T, pool, predicted)

    @property
    def pool(self) -> int:
        """The length pooling of the shape that trains now (1: none)."""
        return self.layout(self.shape).pool

    def flops_per_step(self, shape: Shape) -> float:
        args = self.operator.model_args(shape, self.final_args)
        layers_run = shape.layers if self.operator.paths else None  # RaPTr: expected path length
        lay = self.layout(shape)
        return train_flops(args, lay.rows, lay.seq_len, layers_run, lay.predicted, lay.pool,
                           self.trainable_layers if self.trainable_layers and shape == self.shape else None)

    def planned_flops(self) -> float:
        """The run's training FLOPs as planned before any step: the simulated trigger steps and
        each shape's FLOPs per step (growth.schedule.planned_flops)."""
        return planned_flops(self.start, self.stages, self.trigger_steps, self.budget, self.flops_per_step)

    def apply_gstack_guideline(self, start: Shape, stages: list[Stage]) -> list[Stage]:
        """Replace the single depth stage's trigger by G_stack's formula, or refuse."""
        if len(stages) != 1 or stages[0].dims != ("layers",):
            raise ConfigError("schedule.guideline=gstack computes the time of one depth-growth stage; the schedule "
                              f"'{self.cfg.schedule.name}' has {len(stages)} stage(s) growing "
                              f"{[s.dims for s in stages]}.")
        params = count_params(self.final_args)
        budget_tokens = self.budget.max_tokens or self.budget.max_steps * self.budget.tokens_per_step
        d = gstack_growth_tokens(params, budget_tokens)
        if d >= budget_tokens:
            raise ConfigError(
                f"G_stack's growth-timing guideline gives d = {d:.3g} tokens for the small model (N = {params:,} "
                f"parameters, D = {budget_tokens:.3g} tokens, C = 6ND = {6 * params * budget_tokens:.3g}), which is "
                f"not before the end of the run: d / D = {d / budget_tokens:.3g}. The formula was fitted on models of 410M-7B parameters and budgets of "
                "tens of billions of tokens; at this scale it does not give a usable time. Use schedule=gstack_g4 "
                "with an explicit trigger, or a larger model and budget.")
        s = stages[0]
        return [Stage(s.index, "at_tokens", float(round(d)), s.target, s.dims)]

    def initial_args(self) -> ModelArgs:
        return self.operator.model_args(self.shape, self.final_args)

    # ------------------------------------------------------------------ during training
    def due_stage(self, step: int, tokens: float, flops: float, progress: float) -> Stage | None:
        if self.next_stage < len(self.stages):
            stage = self.stages[self.next_stage]
            if stage_due(stage, step, tokens, flops, progress):
                return stage
        return None

    @property
    def events_done(self) -> int:
        return self.next_stage

    def grow(self, model: Transformer, optimizer, stage: Stage, gen: torch.Generator, step: int,
             dist=None) -> GrowthResult:
        """dist: an FSDP2 model grown one parameter at a time, never gathered (growth/sharded.py;
        the caller has checked `sharded.unsupported`); None: a plain model grown as a whole."""
        before, after = self.shape, stage.target
        fpt_before = self.flops_per_step(before) / self.budget.tokens_per_step
        if dist is not None:
            alpha = torch.zeros((), device=dist.device)
            grown_model, new_opt, grown, seconds = self.build_grown_sharded(model, optimizer, stage, gen, dist, alpha)
            if grown is not None and (grown.new_units or any(grown.new_layers)):  # installed before sharding
                self.ramp = Ramp(stage.index, step, self.ramp_steps, alpha, grown_model,
                                 int(self.operator.cfg.ramp_start == "increment"))
        else:
            grown_model, new_opt, grown, seconds = self.build_grown(model, optimizer, stage, gen)
        if self.paths is not None:
            self.paths.set_length(after.layers)
        if self.operator.cfg.freeze_old and grown is not None and after.layers != before.layers:
            self.trainable_layers = [i for i, zeroed in enumerate(grown.zeroed_layers) if zeroed]
        self.apply_freeze(grown_model)
        if dist is None and grown is not None and (grown.new_units or any(grown.new_layers)):
            self.install_ramp(grown_model, grown.new_units, grown.new_layers, stage.index, step)
        self.shape = after
        self.next_stage += 1
        return GrowthResult(grown_model, new_opt, before, after, *seconds, fpt_before,
                            self.flops_per_step(after) / self.budget.tokens_per_step,
                            grown.operator_flops if grown is not None else 0)

    def build_grown(self, model: Transformer, optimizer, stage: Stage, gen: torch.Generator):
        """The operator's grown model and the optimizer with the moved state (nothing in the
        engine changes: the memory pre-flight runs this on throwaway copies too). Returns the
        model, the optimizer, the operator's `Grown` (None where the model is unchanged) and the
        seconds of the operator and of the optimizer transfer."""
        t0 = time.perf_counter()
        if self.operator.paths and stage.dims == ("layers",):
            return model, optimizer, None, (0.0, 0.0)  # RaPTr: same model, longer paths
        grown = self.operator.grow(model, stage.target, self.final_args, gen)
        t1 = time.perf_counter()
        fresh = set()
        if self.operator.cfg.new_layer_state == "fresh":  # new layers start with no AdamW state
            fresh = {i for i, copied in enumerate(grown.copied_layers) if copied}
        new_opt = transfer_adamw(optimizer, model, grown.model, grown.origins, self.operator.cfg, self.cfg.optim,
                                 model_device(model).type, fresh_layers=fresh)
        return grown.model, new_opt, grown, (t1 - t0, time.perf_counter() - t1)

    def build_grown_sharded(self, model, optimizer, stage: Stage, gen: torch.Generator, dist, alpha: torch.Tensor):
        """build_grown for an FSDP2 model, one parameter at a time (growth/sharded.py); the event's
        masks (sharing `alpha`) go in before the new model is sharded, as they do when a plain
        model is wrapped. Changes nothing in the engine (the pre-flight calls it too)."""
        from msgrun.growth.sharded import grow_sharded

        t0 = time.perf_counter()
        if self.operator.paths and stage.dims == ("layers",):
            return model, optimizer, None, (0.0, 0.0)

        marks = {}

        def install(new_model):
            new_units, new_layers = self.operator.mask_plan(model.args, new_model.args)
            marks.update(new_units=new_units, new_layers=new_layers)
            if new_units or any(new_layers):
                install_masks(new_model, alpha, new_units, new_layers, self.operator.cfg.mask_placement)

        grown_model, new_opt, plan = grow_sharded(self.operator, model, optimizer, stage.target, self.final_args, gen,
                                                  dist, optimizer.param_groups[0]["lr"], self.cfg.optim, install)
        grown = Grown(grown_model, {}, marks["new_units"], marks["new_layers"], plan.copied, plan.zeroed)
        # the operator's work and the moments' move are interleaved per parameter: one figure
        return grown_model, new_opt, grown, (time.perf_counter() - t0, 0.0)

    def apply_freeze(self, model: Transformer) -> None:
        """LLaMA-Pro's recipe (operator.freeze_old): only the newest expansion's blocks train."""
        if self.trainable_layers is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(any(name.startswith(f"blocks.{i}.") for i in self.trainable_layers))

    def shape_before(self, stage: Stage) -> Shape:
        return self.stages[stage.index - 1].target if stage.index > 0 else self.start

    def install_ramp(self, model, new_units, new_layers, stage_index: int, step: int) -> None:
        alpha = torch.zeros((), device=model_device(model))
        install_masks(model, alpha, new_units, new_layers, self.operator.cfg.mask_placement)
        first = int(self.operator.cfg.ramp_start == "increment")
        self.ramp = Ramp(stage_index, step, self.ramp_steps, alpha, model, first)

    def before_step(self, step: int) -> None:
        if self.ramp is not None:
            self.ramp.alpha.fill_(self.ramp.value(step))  # in place: no sync, no recompile

    def after_step(self, step: int) -> None:
        if self.ramp is not None and self.ramp.value(step) >= 1.0:
            remove_masks(self.ramp.model)  # alpha = 1 was the plain model: drop the mask code path
            self.ramp = None

    def path_for_step(self, step: int) -> tuple[list[int] | None, dict[int, float] | None]:
        """RaPTr's layers for this step and their branch scales (None, None: the full model)."""
        if self.paths is None:
            return None, None
        path = self.paths.sample(step)
        return path, self.paths.layer_scale(path)

    def log_fields(self) -> dict:
        out = {}
        if self.ramp is not None:
            out["alpha"] = float(self.ramp.alpha)
        if self.paths is not None:
            out["path_length"] = self.paths.length
        if self.operator.pools:
            out["pool"] = self.pool
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"next_stage": self.next_stage, "shape": self.shape.as_dict(),
                "ramp": None if self.ramp is None else {"stage": self.ramp.stage, "start_step": self.ramp.start_step},
                "path_length": None if self.paths is None else self.paths.length,
                "trainable_layers": self.trainable_layers}

    def load_state_dict(self, state: dict) -> None:
        self.next_stage = state["next_stage"]
        self.shape = Shape(**state["shape"])
        self.trainable_layers = state.get("trainable_layers")
        if self.paths is not None and state["path_length"] is not None:
            self.paths.set_length(state["path_length"])

    def restore_ramp(self, model: Transformer, state: dict) -> None:
        """Re-install the masks of an interrupted ramp into a model rebuilt at the grown shape:
        which units and layers are new follows from the event's shapes (MSG appends new units;
        the layer order is deterministic). Frozen blocks (operator.freeze_old) are frozen again."""
        self.apply_freeze(model)
        ramp = state.get("ramp")
        if ramp is None:
            return
        before = self.shape_before(self.stages[ramp["stage"]])
        new_units, new_layers = self.operator.mask_plan(self.operator.model_args(before, self.final_args), model.args)
        self.install_ramp(model, new_units, new_layers, ramp["stage"], ramp["start_step"])


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_rows(tc, layout: StepLayout, world_size: int) -> None:
    if layout.rows % (world_size * tc.grad_accum):
        raise ConfigError(
            f"A step of {layout.rows} sequences (train.batch_size = {tc.batch_size} at sequence length {layout.seq_len}) does not "
            f"split evenly over {world_size} rank(s) x train.grad_accum = {tc.grad_accum} micro-batches. Choose "
            "train.batch_size divisible by world size x grad_accum.")


@contextlib.contextmanager
def exact_numerics():
    """fp32 matmuls without TF32 and the math attention kernel: the probe then measures the
    operator, not the kernels."""
    cuda_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = cuda_tf32, cudnn_tf32


@torch.no_grad()
def probe(model: Transformer, batch: dict, device: torch.device, pool: int = 1) -> dict:
    """Logits (fp32, on the host) and loss of `model` on a fixed batch, in eval mode."""
    was_training = model.training
    model.eval()
    b = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    targets = b["targets"]
    with exact_numerics():
        logits, loss = model(b["inputs"], targets, b.get("positions"), pool=pool)
    model.train(was_training)
    return {"logits": logits.float().cpu(), "loss": loss.item()}
