"""The training loop: steps, evaluations, growth events, checkpoints.

Counters that make runs comparable (docs/architecture.md section 4):

* `tokens` is the position in the training stream: batches are read by token offset, so runs
  with different batch or sequence-length schedules see the same tokens in the same order.
  Tokens per optimizer step are constant (`train.batch_size` sequences of the *final*
  `model.seq_len`); while a shorter sequence length trains, each step has proportionally more
  rows (sequence-length warmup keeps the optimizer's batch in tokens fixed); under length pooling
  every step reads full-length rows and the model pools them (msgrun/step.py, StepLayout).
* `flops` is cumulative training FLOPs of what executed (msgrun.flops), never evaluation,
  growth probes or operator work.
* `wall_time` is cumulative seconds of training steps and growth events (operator, optimizer
  transfer, and recompiles, which land in the first step after a growth); evaluation, probes,
  checkpoints and logging are excluded, so the figure is comparable between runs that evaluate
  at different rates.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import OmegaConf

from msgrun import branch, checkpoint, data, distributed, provenance
from msgrun.errors import MsgrunError
from msgrun.evaluate import Downstream
from msgrun.flops import train_flops
from msgrun.growth.engine import GrowthEngine, probe
from msgrun.growth.masks import masked_modules
from msgrun.growth.sharded import unsupported as unsharded_reason
from msgrun.model import ModelArgs, Transformer
from msgrun.optim import LRSchedule, annealing_warning, build_adamw, set_lr, warmup_warning
from msgrun.preflight import describe as describe_preflight
from msgrun.preflight import run_preflight
from msgrun.preemption import Interrupted, StopSignals
from msgrun.rundir import config_json
from msgrun.step import forward_backward
from msgrun.tracking import Console, JsonLines, Stopwatch, Wandb, write_json_atomic

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


class NonFiniteLoss(MsgrunError):
    pass


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def final_model_args(model_cfg, vocab_size: int) -> ModelArgs:
    """The model config's architecture fields (model.seq_len sizes the position tables)."""
    names = {f.name for f in fields(ModelArgs)}
    return ModelArgs(vocab_size=vocab_size, max_seq_len=model_cfg.seq_len,
                     **{k: v for k, v in model_cfg.items() if k in names})


class Trainer:
    def __init__(self, cfg, run_dir: Path, choices: dict | None = None, overrides: list | None = None):
        self.cfg = cfg
        self.choices, self.overrides = choices or {}, overrides or []
        tc = cfg.train
        self.dist = distributed.setup(tc.distributed)
        # under torchrun every rank composes its own Hydra run dir (timestamps can differ): follow rank 0's
        self.run_dir = Path(distributed.broadcast(str(run_dir), self.dist))
        self.device = distributed.resolve_device(tc.device) if not self.dist.enabled else self.dist.device
        if tc.threads:
            torch.set_num_threads(tc.threads)
        precision = tc.precision if tc.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else contextlib.nullcontext())
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.is_main = self.dist.rank == 0

        self.console = Console(cfg.logger.console, tc.max_steps, enabled=self.is_main)
        # the schedule and operator are checked before the data is prepared (no compute on a bad
        # config); the engine is rebuilt below with the tokenizer's actual vocabulary
        GrowthEngine(cfg, final_model_args(cfg.model, cfg.data.vocab_size), world_size=self.dist.world_size)
        self.corpus = data.prepare_data(cfg.data, log=self.console.print)
        self.final_args = final_model_args(cfg.model, self.corpus.vocab_size)
        self.engine = GrowthEngine(cfg, self.final_args, world_size=self.dist.world_size)
        self.budget = self.engine.budget
        # downstream evaluation (eval group, msgrun/evaluate.py): checked here, before any compute
        self.downstream = Downstream(cfg, self.corpus, self.final_args, log=self.console.print)
        self.downstream_results = {}

        self.init_gen = torch.Generator().manual_seed(distributed.seed_for(tc.seed, "init"))
        # the global generators draw dropout masks: seeded by train.seed, distinct per rank
        torch.manual_seed(distributed.seed_for(tc.seed, f"dropout/rank{self.dist.rank}"))
        self.model = Transformer(self.engine.initial_args(), generator=self.init_gen).to(self.device)
        self.optimizer = build_adamw(self.model, tc.lr, cfg.optim, self.device.type)
        self.lr_schedule = LRSchedule.create(tc.lr, cfg.optim)
        self.stream = data.TokenStream(self.corpus.train, cfg.data.shuffle_chunk or cfg.model.seq_len,
                                       seed=distributed.seed_for(tc.seed, "data"))
        self.mask_seed = distributed.seed_for(tc.seed, "mlm")
        self.loader = data.BatchLoader(self.host_batch, self.device)  # reads ahead on a GPU (msgrun/data/loader.py)
        self.eval_batches = data.fixed_eval_batches(self.corpus, cfg.model.seq_len, min(tc.batch_size, 16),
                                                    tc.eval_tokens, cfg.model.family, seed=0,
                                                    mlm_probability=cfg.model.mlm_probability)
        self.probe_batch = {k: (v[:4] if torch.is_tensor(v) and v.dim() > 0 else v)
                            for k, v in self.eval_batches[0].items()}
        self.peak_flops = peak_flops(self.device)

        # counters and windows (state_dict below): a resume restores every one of them
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.lr = 0.0
        self.wall = Stopwatch()
        self.window = self.new_window()
        self.last_val = None  # the last log record with an evaluation
        self.last_record = None  # the last log record
        self.warned_repeat = False
        # checkpoint cadence: the step last saved, and when (the clock starts with the run)
        self.saved_step: int | None = None
        self.last_save_time = time.monotonic()
        self.train_model = self.model  # what the step calls (DDP/FSDP-wrapped, compiled)
        self.preflight: dict | None = None
        self.branch: dict | None = None  # train.branch_from: the parent's record
        self.stop: StopSignals | None = None  # set by run()
        self.metrics = self.growth_log = self.wandb = None  # rank 0's files and wandb run, opened by run()
        # torch.compile works on the first call: the first step after each (re)compile is timed
        # as compile time (metrics.jsonl/summary.json compile_seconds), not as training throughput
        self.compile_pending, self.compile_seconds = False, 0.0

    # ------------------------------------------------------------------ setup and teardown
    def run(self) -> dict:
        # from here on a scheduler's signal (or Ctrl-C) stops at a step boundary with a checkpoint
        with StopSignals() as self.stop:
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        # train.branch_from: the parent's checkpoint is found and checked first, so that a refused
        # branch costs no pre-flight and leaves the run directory as it was (msgrun/branch.py)
        parent = branch.find_parent(cfg, self.run_dir, self.budget, self.fingerprints())
        if cfg.train.preflight:  # before the run directory is touched
            self.preflight = run_preflight(self.engine, cfg, self.device, self.dist, self.make_batch, self.autocast)
        self.engine.operator.fit_data = self.fit_batches  # LiGO fits on data (not in the pre-flight)
        state = checkpoint.prepare_run_dir(self.run_dir, config_json(cfg), self.fingerprints(), self.dist,
                                           self.console.print)
        if state is not None:
            self.load_state_dict(state)
        resumed = state is not None
        # train.branch_from: a fresh branch starts from the parent's checkpoint (msgrun/branch.py)
        self.branch, parent_state = branch.prepare(cfg, self.run_dir, self.budget, self.fingerprints(), resumed,
                                                   self.console.print, parent)
        if parent_state is not None:
            self.load_state_dict(parent_state)
        self._wrap()
        if self.is_main:
            self.metrics = JsonLines(self.run_dir / "metrics.jsonl")
            self.growth_log = JsonLines(self.run_dir / "growth.jsonl")
            self.wandb = Wandb(cfg.logger.wandb, self.run_dir, OmegaConf.to_container(cfg, resolve=True),
                               name=self.run_name(), group=self.sweep_group(), tags=self.tags())
            self.wandb.backfill(self.run_dir / "metrics.jsonl", self.run_dir / "growth.jsonl")  # after a SIGKILL
            self.console.print(self.describe(resumed))
            self.console.print(describe_preflight(self.preflight))
            warmup = warmup_warning(cfg.optim.warmup_steps, cfg.train.max_steps)
            if warmup:
                self.console.print(warmup)
        status, error = "failed", None
        try:
            self.loop()
            status = "completed"
        except Interrupted as e:
            status, error = "interrupted", str(e)
            raise
        except BaseException as e:  # noqa: BLE001 - the summary must say how the run ended
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            summary = self.summary(status, error)
            if self.is_main:
                write_json_atomic(self.run_dir / "summary.json", summary)
                self.metrics.close()
                self.growth_log.close()
                wandb_dir = self.wandb.run.dir if self.wandb.run is not None else None
                self.wandb.finish(exit_code=0 if status == "completed" else 1)
            self.console.close()
            self.loader.close()
            if self.is_main and status == "completed":
                self.console.print(self.where(summary, wandb_dir))
                unannealed = annealing_warning(self.lr_schedule, self.step, self.engine.operator.cfg.lr_policy)
                if unannealed:
                    self.console.print(unannealed)
            distributed.teardown(self.dist)
        return summary

    def run_name(self) -> str:
        c = self.choices
        return "-".join(str(c.get(k, "?")) for k in ("model", "schedule", "operator")) + f"-s{self.cfg.train.seed}"

    def sweep_group(self) -> str | None:
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            return f"{hc.sweep.dir}" if hc.mode.name == "MULTIRUN" else None
        except Exception:  # not under Hydra (tests, bench scripts)
            return None

    def tags(self) -> list[str]:
        return [f"{k}={self.choices[k]}" for k in ("model", "schedule", "operator", "data") if k in self.choices]

    def describe(self, resumed: bool) -> str:
        a = self.model.args
        lines = [
            f"run dir: {self.run_dir}" + (" (resumed)" if resumed else ""),
            f"device: {self.device}, world size {self.dist.world_size}, "
            f"params {self.model.num_params():,} (final model {self.engine.final_params:,})",
            f"data: {self.corpus.train.size:,} train / {self.corpus.val.size:,} val tokens, "
            f"vocab {self.corpus.vocab_size}; {self.budget.tokens_per_step:,} tokens/step",
            f"start shape: {self.engine.shape} ({a.family}); final: {self.engine.final_shape}",
        ]
        lines += [f"  stage {s.index}: {s.trigger}={s.value:g} -> {s.target} (grows {', '.join(s.dims)})"
                  for s in self.engine.stages]
        return "\n".join(lines)

    def where(self, summary: dict, wandb_dir: str | None) -> str:
        d = self.run_dir
        lines = [f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3e} FLOPs, "
                 f"{summary['wall_time']:.0f} s of training; final val loss {summary['final_val_loss']:.4f} "
                 f"({summary['final_val_bpb']:.3f} bits/byte)",
                 f"curves: {d / 'metrics.jsonl'} (loss vs flops, tokens, wall_time), growth events: {d / 'growth.jsonl'}",
                 f"summary: {d / 'summary.json'}; figure and table: msgrun-report {d}"]
        if wandb_dir is not None and self.cfg.logger.wandb.mode == "offline":
            # every segment of a resumed run is one offline-run-* directory of the same run id
            lines.append(f"wandb (offline): wandb sync {Path(wandb_dir).parent.parent}/offline-run-*")
        return "\n".join(lines)

    def _wrap(self) -> None:
        """Build what the step calls from the plain model: compiled blocks, then the data-parallel
        form (FSDP2 shards in place and gets an optimizer over its shards, with the full state
        loaded into them). Called at the start and after every growth event."""
        model = self.model
        if self.cfg.train.compile:
            model.compile_units()  # each block and the head (model.py says why those units)
            self.compile_pending = True  # announced and timed by the next train_step
        if self.dist.mode == "fsdp" and not distributed.is_sharded(model):  # restored and grown models are sharded
            self.optimizer = distributed.shard_with_optimizer(model, self.optimizer, self.dist, self.cfg.train.lr,
                                                              self.cfg.optim)
        self.train_model = distributed.wrap(model, self.dist, find_unused=self.engine.operator.paths)

    def _unwrap(self) -> None:
        """FSDP: gather the shards into a plain model and optimizer with the full state on every
        rank, so growth operators and the provenance transfer see whole tensors."""
        if self.dist.mode != "fsdp":
            return
        self.model, self.optimizer = distributed.gather_plain(self.model, self.optimizer, self.cfg.train.lr,
                                                              self.cfg.optim)

    # ------------------------------------------------------------------ the loop
    def loop(self) -> None:
        tc = self.cfg.train
        start = time.monotonic()
        while not self.done(start):
            signum, due = self.boundary_requests()
            if signum is not None:
                raise self.stop.interrupted(signum, self.step, self.save_checkpoint())
            if due:
                self.save_checkpoint()
            stage = self.engine.due_stage(self.step, self.tokens, self.flops, self.progress())
            if stage is not None:
                if self.downstream.due("growth"):
                    self.downstream_eval("growth")  # the model this event grows
                self.grow(stage)
            self.train_step()
            if self.step % tc.log_every == 0 or self.done(start):
                self.log(evaluate=self.step % tc.eval_every == 0 or self.done(start))
            elif self.step % tc.eval_every == 0:
                self.log(evaluate=True)
            if self.downstream.due("step", self.step) and not self.done(start):
                self.downstream_eval("step")
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and not self.done(start):
                self.save_checkpoint()
        self.save_checkpoint()
        if self.downstream.due("end"):  # after the final checkpoint: a failing task never costs the training
            self.downstream_eval("end")

    def boundary_requests(self) -> tuple[int | None, bool]:
        """Between two steps: a stop signal received (its number), and whether the wall-clock
        checkpoint cadence (train.checkpoint_minutes) is due. Under torchrun every rank must
        act alike (a checkpoint is a collective), so the ranks agree at logging steps only: one
        small collective per log window rather than one per step."""
        minutes = self.cfg.train.checkpoint_minutes
        due = bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes
        if not self.dist.enabled:
            return self.stop.signum, due
        if self.step % self.cfg.train.log_every:
            return None, False
        views = distributed.all_gather((self.stop.signum, due), self.dist)
        return next((s for s, _ in views if s is not None), None), views[0][1]

    def progress(self) -> float:
        return self.budget.progress(self.step, self.tokens, self.flops)

    def done(self, start: float) -> bool:
        if self.progress() >= 1.0:
            return True
        limit = self.cfg.train.max_minutes
        return bool(limit) and (time.monotonic() - start) / 60 >= limit

    def train_step(self) -> None:
        tc, dist = self.cfg.train, self.dist
        layout = self.engine.layout(self.engine.shape)
        T, rows = layout.seq_len, layout.rows
        micro_batches = layout.micro_batches(self.tokens, dist.rank, dist.world_size, tc.grad_accum)
        layers, layer_scale = self.engine.path_for_step(self.step)
        lr = self.lr_schedule(self.step, self.progress())
        set_lr(self.optimizer, lr)
        self.engine.before_step(self.step)

        if self.compile_pending:
            self.console.print(f"compiling (train.compile=true) for shape {self.engine.shape}: this step waits for "
                               "torch.compile, seconds to minutes")
        frames = compiled_frames() if tc.compile else 0
        t0 = time.perf_counter()
        with self.wall:
            loss_sum = torch.zeros((), device=self.device)
            for micro, (offset, micro_rows) in enumerate(micro_batches):
                batch = self.make_batch(offset, micro_rows, T, ahead=rows * T)
                with distributed.maybe_no_sync(self.train_model, dist, last=micro == tc.grad_accum - 1):
                    loss_sum += forward_backward(self.train_model, batch, tc.grad_accum, self.autocast, layout.pool,
                                                 layers, layer_scale)
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            loss_mean = distributed.mean_across_ranks(loss_sum / tc.grad_accum, dist)
            skipped = tc.skip_nonfinite and not torch.isfinite(loss_mean)  # a host sync, only when asked for
            if not skipped:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.engine.after_step(self.step)
            if self.device.type == "cuda" and self.step % tc.log_every == tc.log_every - 1:
                torch.cuda.synchronize()  # the window's timing must include the queued work
        step_flops = train_flops(self.model.args, rows, T, len(layers) if layers is not None else None,
                                 layout.predicted, layout.pool, self.engine.trainable_layers)
        self.step += 1
        self.tokens += rows * T
        self.flops += step_flops
        w = self.window
        if skipped:  # its compute was spent (tokens, FLOPs, seconds count), its loss is not averaged
            w["skipped"] += 1
        else:
            w["loss"] += loss_mean.detach()
            w["steps"] += 1
        # a step that waited for torch.compile: the first after (re)wrapping, or one where Dynamo
        # recompiled a unit (a guard changed, e.g. MSG's masks dropped at the end of a ramp)
        recompiled = tc.compile and compiled_frames() > frames
        if self.compile_pending or recompiled:  # compile time, not throughput
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            what = "the first step at" if self.compile_pending else f"step {self.step} recompiled for"
            self.compile_pending = False
            self.compile_seconds += seconds
            w["compile_seconds"] = w.get("compile_seconds", 0.0) + seconds
            self.console.print(f"compiled: {what} shape {self.engine.shape}, {seconds:.1f} s (compile_seconds in "
                               "metrics.jsonl and summary.json; within wall_time, outside tokens/s)")
        else:
            w["tokens"] += rows * T
            w["flops"] += step_flops
            w["seconds"] += time.perf_counter() - t0
        self.lr = lr

    def fit_batches(self, k: int) -> list[dict]:
        """The micro-batches the k-th training step from now will read (LiGO fits its operator on
        them; single process only)."""
        layout = self.engine.layout(self.engine.shape)
        start = self.tokens + k * layout.rows * layout.seq_len
        return [self.make_batch(offset, rows, layout.seq_len)
                for offset, rows in layout.micro_batches(start, accum=self.cfg.train.grad_accum)]

    def make_batch(self, offset: int, rows: int, T: int, ahead: int = 0) -> dict:
        """The batch at `offset` on the device; `ahead`: where the next step's batch starts."""
        return self.loader.get(offset, rows, T, ahead)

    def host_batch(self, offset: int, rows: int, T: int) -> dict:
        inputs, targets = self.stream.batch(offset, rows, T)
        if self.final_args.family == "bert":
            inputs, positions, labels = data.mlm_batch(
                inputs, offset, self.mask_seed, self.corpus.mask_id, self.corpus.vocab_size,
                self.corpus.special_ids, self.cfg.model.mlm_probability)
            batch = {"inputs": inputs, "targets": labels, "positions": positions}
        else:
            batch = {"inputs": inputs, "targets": targets}
        return batch

    # ------------------------------------------------------------------ logging and evaluation
    def new_window(self) -> dict:
        """What accumulates between two log lines (the loss stays on the device: no sync per step)."""
        return {"loss": torch.zeros((), device=self.device), "steps": 0, "tokens": 0, "flops": 0.0,
                "seconds": 0.0, "skipped": 0}

    def log(self, evaluate: bool) -> None:
        w = self.window
        loss = (w["loss"] / w["steps"]).item() if w["steps"] else float("nan")
        shape = self.engine.shape
        record = {
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "wall_time": self.wall.total,
            "loss": loss, "lr": self.lr, **shape.as_dict(), "params": self.model.num_params(),
            "epoch": self.stream.epoch(self.tokens),
        }
        if w["seconds"] > 0:  # throughput of the timed steps (a window of one compile step has none)
            record["tokens_per_s"] = w["tokens"] / w["seconds"]
            if self.peak_flops:
                record["mfu"] = w["flops"] / w["seconds"] / (self.peak_flops * self.dist.world_size)
        record.update(self.engine.log_fields())
        if w["skipped"]:
            record["skipped_steps"] = w["skipped"]
        if "compile_seconds" in w:
            record["compile_seconds"] = w["compile_seconds"]
        if not math.isfinite(loss) and not self.cfg.train.skip_nonfinite:
            raise NonFiniteLoss(
                f"The training loss became {loss} between steps {self.step - w['steps'] + 1} and {self.step}. "
                f"{checkpoint.last_good_message(self.run_dir)} Lower train.lr, raise optim.warmup_steps, or set "
                "train.skip_nonfinite=true to skip such steps (skips are counted in metrics.jsonl).")
        if evaluate:
            record.update(self.evaluate())
            self.last_val = record
        self.window = self.new_window()
        self.last_record = record
        if self.is_main:
            self.metrics.write(record)
            self.wandb.log(record)
            self.console.update(record)
            if record["epoch"] >= 1 and not self.warned_repeat:
                self.warned_repeat = True
                self.console.print(f"warning: the training data repeats (epoch {record['epoch']} at step "
                                   f"{self.step}); use a larger corpus (data=pysite, files, hf, shards) for longer runs.")

    @torch.no_grad()
    def evaluate(self, batches: list[dict] | None = None) -> dict:
        """Loss and bits per byte on the same held-out tokens every time, with the full model
        (all of RaPTr's layers) on full-length input (pooled as in training under length pooling).
        `batches`: other fixed batches in the same form (eval.perplexity); default the validation set."""
        model = self.model
        pool = self.engine.pool
        was_training = model.training
        model.eval()
        nll, count, nbytes = 0.0, 0, 0
        for batch in self.eval_batches if batches is None else batches:
            b = {k: v.to(self.device) for k, v in batch.items() if torch.is_tensor(v)}
            with self.autocast:
                _, loss = model(b["inputs"], b["targets"], b.get("positions"), pool=pool)
            n = b["targets"].numel()
            nll += loss.item() * n
            count += n
            nbytes += int(batch["target_bytes"])
        model.train(was_training)
        # shards read without a tokenizer carry no byte counts: bits per byte is unknown there
        return {"val_loss": nll / count, "val_bpb": nll / (math.log(2) * nbytes) if nbytes else float("nan")}

    def downstream_eval(self, when: str) -> None:
        """Downstream tasks (eval group) on the current model: one metrics.jsonl line of
        eval/<task>/<metric> keys; the latest results also go to summary.json."""
        results = self.downstream.run(self.model, self.evaluate, self.dist, self.device,
                                      masked_modules(self.model), self.engine.pool)
        self.downstream_results.update(results)
        if self.is_main and results:
            record = {"step": self.step, "tokens": self.tokens, "flops": self.flops, "wall_time": self.wall.total,
                      "eval_at": when, **results}
            self.metrics.write(record)
            self.wandb.log(record)
            self.console.print(f"eval at step {self.step} ({when}): " +
                               ", ".join(f"{k} {v:.4g}" for k, v in results.items()))

    # ------------------------------------------------------------------ growth
    def grow(self, stage) -> None:
        """One growth event: operator, optimizer transfer, re-wrap; the probe proves (or measures)
        function preservation on a fixed batch in exact numerics, outside the wall-clock."""
        before = probe(self.model, self.probe_batch, self.device, self.engine.pool)
        with self.wall:
            t0 = time.perf_counter()
            sharded = None
            if self.dist.mode == "fsdp":
                why = unsharded_reason(self.engine.operator, stage)
                if why is None:
                    sharded = self.dist  # one parameter at a time, never gathered (growth/sharded.py)
                else:
                    self.console.print(f"growth event {stage.index}: the whole model and optimizer state are gathered "
                                       f"on every rank for this event, because {why} (docs/scale.md)")
            if sharded is None:
                self._unwrap()
            old_model = self.model
            result = self.engine.grow(old_model, self.optimizer, stage, self.init_gen, self.step, dist=sharded)
            self.model, self.optimizer = result.model, result.optimizer
            self.lr_schedule.on_growth(self.engine.operator.cfg.lr_policy, self.step, self.progress())
            self._wrap()
            seconds = time.perf_counter() - t0
        after = probe(self.model, self.probe_batch, self.device, self.engine.pool)
        diff = (before["logits"] - after["logits"]).abs().max().item()
        record = {
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "wall_time": self.wall.total,
            "stage": stage.index, "operator": self.engine.operator.name, "dims": list(stage.dims),
            "methods": self.engine.operator.methods_for(stage.dims),
            "before": result.before.as_dict(), "after": result.after.as_dict(),
            "params_before": old_model.num_params(), "params_after": self.model.num_params(),
            "probe_loss_before": before["loss"], "probe_loss_after": after["loss"], "max_abs_logit_diff": diff,
            "seconds": seconds, "seconds_operator": result.seconds_operator,
            "seconds_optimizer": result.seconds_optimizer,
            "flops_per_token_before": result.flops_per_token_before,
            "flops_per_token_after": result.flops_per_token_after,
            "operator_flops": result.operator_flops,
        }
        if old_model.args.moe or self.model.args.moe:  # top-k may change with the experts (operator.expert_top_k)
            record["experts_per_token"] = [old_model.args.active_experts, self.model.args.active_experts]
        if self.dist.mode == "fsdp":  # which way the event ran (docs/scale.md, sharded growth)
            record["fsdp_growth"] = "sharded" if sharded is not None else "gathered"
        self.flops += result.operator_flops  # training compute (LiGO's fitting), already inside wall_time
        del old_model
        if self.is_main:
            self.growth_log.write(record)
            self.wandb.log_growth(record)
            self.console.print(growth_table(record))
        self.save_checkpoint()

    def planned_flops(self) -> float:
        """The run's training FLOPs as its growth engine plans them before any step (the simulated
        trigger steps and each shape's FLOPs per step): what a compute-matched baseline gets."""
        return self.engine.planned_flops()

    # ------------------------------------------------------------------ checkpoints
    def fingerprints(self) -> dict:
        return {"data": self.corpus.data_fingerprint, "tokenizer": self.corpus.tokenizer_fingerprint}

    def state_dict(self) -> dict:
        """Everything the next step depends on, as named states (a collective: the per-rank RNG
        states are gathered, and outside FSDP the tensors are whole on every rank). Under FSDP
        `model` and `optimizer` are this rank's shards (DTensors): a sharded checkpoint writes
        them as they are."""
        sharded = self.dist.mode == "fsdp"
        if sharded:
            model_state = self.model.state_dict()
            optim_state = distributed.optimizer_state_by_name(self.model, self.optimizer)
        else:
            model_state, optim_state = distributed.full_state(self.model, self.optimizer)
        return {
            "model_args": dict(vars(self.model.args)),
            "model": model_state,
            "optimizer": optim_state,
            "optimizer_keys": {name: list(entry) for name, entry in optim_state.items()},
            "lr_schedule": self.lr_schedule.state_dict(),
            "counters": {"step": self.step, "tokens": self.tokens, "flops": self.flops,
                         "wall_time": self.wall.total, "lr": self.lr},
            "window": {k: (float(v) if torch.is_tensor(v) else v) for k, v in self.window.items()},
            "last_val": self.last_val, "last_record": self.last_record, "warned_repeat": self.warned_repeat,
            "engine": self.engine.state_dict(),
            **checkpoint.rng_state(self.init_gen, self.dist),
            "config": config_json(self.cfg),
            "fingerprints": self.fingerprints(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint of either format, written at any world size (checkpoint.py): the
        model is built at the checkpoint's shape, sharded first under FSDP (so no rank holds the
        whole of it), and its tensors and the optimizer's are filled in place."""
        model = Transformer(ModelArgs(**state["model_args"])).to(self.device)
        self.engine.load_state_dict(state["engine"])
        self.engine.restore_ramp(model, state["engine"])
        if self.dist.mode == "fsdp":
            distributed.shard(model, self.dist)
        self.model = model
        self.optimizer = build_adamw(model, self.cfg.train.lr, self.cfg.optim, self.device.type)
        optim_targets = distributed.allocate_optimizer_state(model, self.optimizer, checkpoint.optimizer_keys(state))
        checkpoint.restore_tensors(state, {"model": model.state_dict(), "optimizer": optim_targets})
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        c = state["counters"]
        self.step, self.tokens, self.flops, self.lr = c["step"], c["tokens"], c["flops"], c["lr"]
        self.wall.total = c["wall_time"]
        self.window = {**state["window"], "loss": torch.tensor(state["window"]["loss"], device=self.device)}
        self.last_val, self.last_record = state["last_val"], state["last_record"]
        self.warned_repeat = state["warned_repeat"]
        checkpoint.load_rng_state(state, self.init_gen, self.dist, self.cfg.train.seed)

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (once per step: a signal right after a scheduled save
        writes nothing new). FSDP: every rank writes its shards; otherwise every rank gathers and
        rank 0 writes one file."""
        sharded = self.dist.mode == "fsdp"
        path = checkpoint.checkpoint_path(self.run_dir, self.step, sharded)
        if self.saved_step == self.step:
            return path
        state = self.state_dict()
        self.saved_step, self.last_save_time = self.step, time.monotonic()
        keep = self.cfg.train.keep_checkpoints
        if sharded:
            tensors = {"model": state.pop("model"), "optimizer": state.pop("optimizer")}
            checkpoint.save_sharded(self.run_dir, self.step, state, tensors, keep, self.dist)
        elif self.is_main:
            checkpoint.save(self.run_dir, self.step, state, keep)
        return path

    # ------------------------------------------------------------------ summary
    def summary(self, status: str, error: str | None) -> dict:
        last = self.last_record or {}
        val = self.last_val or {}
        return {
            "status": status, "error": error, "steps": self.step, "tokens": self.tokens, "flops": self.flops,
            "wall_time": self.wall.total, "compile_seconds": self.compile_seconds, "params": self.model.num_params(),
            "final_loss": last.get("loss"), "final_val_loss": val.get("val_loss"), "final_val_bpb": val.get("val_bpb"),
            "final_shape": self.engine.shape.as_dict(), "growth_events": self.engine.events_done,
            "preflight": self.preflight, **self.downstream_results,
            "choices": self.choices, "overrides": self.overrides, "seed": self.cfg.train.seed,
            "branch_from": self.branch,
            "data_fingerprint": self.corpus.data_fingerprint, "tokenizer_fingerprint": self.corpus.tokenizer_fingerprint,
            "data": {"train_tokens": int(self.corpus.train.size), "val_tokens": int(self.corpus.val.size),
                     "epochs": self.tokens / max(int(self.corpus.train.size), 1)},
            **provenance.collect(self.device, self.dist.world_size),
        }


def compiled_frames() -> int:
    """Frames Dynamo has compiled in this process (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def growth_table(r: dict):
    from rich.table import Table

    grown = ", ".join(f"{d}={m}" for d, m in r["methods"].items()) if "methods" in r else ", ".join(r["dims"])
    t = Table(title=f"growth event {r['stage']} at step {r['step']} ({r['operator']}: {grown})")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for d in ("layers", "hidden", "heads", "kv_heads", "ffn", "experts", "seq_len"):
        if d in r["before"] or d in r["after"]:  # kv_heads, experts: only where a shape has them (Shape.as_dict)
            default = {"kv_heads": "heads", "experts": None}.get(d)
            before, after = (x.get(d, x[default] if default else 1) for x in (r["before"], r["after"]))
            t.add_row(d, str(before), str(after))
    if "experts_per_token" in r:
        t.add_row("experts per token", *map(str, r["experts_per_token"]))
    t.add_row("params", f"{r['params_before']:,}", f"{r['params_after']:,}")
    t.add_row("train FLOPs/token", f"{r['flops_per_token_before']:,.0f}", f"{r['flops_per_token_after']:,.0f}")
    t.add_row("probe loss", f"{r['probe_loss_before']:.6f}", f"{r['probe_loss_after']:.6f}")
    t.caption = f"max |logit diff| = {r['max_abs_logit_diff']:.2e}, {r['seconds']:.2f} s"
    return t
