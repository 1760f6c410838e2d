"""Memory pre-flight (docs/architecture.md section 5): the run's costliest step, tried before training.

A grown run's memory peaks at its end, hours in: the final shape has the most parameters,
optimizer state and activations, and the last growth event briefly holds the old and the grown
model, both optimizers' state and the operator's temporaries at once. The pre-flight replays
that on throwaway models before the first step: it builds the model at the shape before the last
event, gives its optimizer state, grows it with the run's own operator and optimizer transfer,
installs the event's masks (MSG's first steps after an event are the dearest at the final shape)
and runs one full training step (every micro-batch's forward and backward, the optimizer step)
at the final layout. An out-of-memory then stops the run within its first minute, with the
figures, before the run directory is touched.

Under `train.distributed=fsdp` every rank replays its own part: the model before the event is
sharded, the event runs as the training's does (one parameter at a time on the shards,
growth/sharded.py; or gathered, for a method that cannot be split, as the trainer would), and the
final-shape step runs on the shards with the rank's own micro-batches, so each rank's peak is
its real one (`growth` in the report says which way the event ran).

What it does not replay: the compiled step (Inductor's step uses no more memory than eager) and
DDP's gradient buckets (about one more copy of the gradients). Its RNG draws are isolated: a run
with the pre-flight trains exactly as one without.
"""

from __future__ import annotations

import gc
import time

import torch

from msgrun import distributed
from msgrun.errors import MsgrunError
from msgrun.growth.masks import install_masks
from msgrun.growth.sharded import unsupported
from msgrun.model import Transformer
from msgrun.optim import build_adamw
from msgrun.step import forward_backward


class OutOfMemory(MsgrunError):
    pass


def run_preflight(engine, cfg, device: torch.device, dist, make_batch, autocast) -> dict:
    """Replay the last growth event and one final-shape step; returns what it measured (a
    collective under FSDP: every rank calls it). `make_batch(offset, rows, seq_len)`: the
    training batch at a stream offset, on the device."""
    cuda = device.type == "cuda"
    sharded = dist.mode == "fsdp"
    last = engine.stages[-1] if engine.stages else None
    before = engine.shape_before(last) if last is not None else engine.start
    layout = engine.layout(engine.final_shape)
    micro_batches = layout.micro_batches(0, dist.rank, dist.world_size, cfg.train.grad_accum)
    micro_rows = micro_batches[0][1]
    report = {"final_shape": engine.final_shape.as_dict(), "micro_batch_rows": micro_rows}
    t0 = time.perf_counter()
    model = optimizer = grown = batch = loss = None
    phase = "building the model before the last growth event"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        try:
            gen = torch.Generator().manual_seed(0)
            model = Transformer(engine.operator.model_args(before, engine.final_args), generator=gen).to(device)
            if sharded:
                distributed.shard(model, dist)
            optimizer = build_adamw(model, cfg.train.lr, cfg.optim, device.type)
            fill_optimizer_state(model, optimizer)
            if last is not None:
                phase = f"growing it to the final shape (stage {last.index}, {', '.join(last.dims)})"
                reset_peak(cuda)
                lr = cfg.train.lr
                if sharded and unsupported(engine.operator, last) is None:
                    report["growth"] = "sharded"
                    model, optimizer, grown, _ = engine.build_grown_sharded(model, optimizer, last, gen, dist,
                                                                            torch.zeros((), device=device))
                else:
                    if sharded:  # as the trainer does for such a method: gather, grow, shard again
                        report["growth"] = "gathered"
                        model, optimizer = distributed.gather_plain(model, optimizer, lr, cfg.optim)
                    model, optimizer, grown, _ = engine.build_grown(model, optimizer, last, gen)
                    if grown is not None and (grown.new_units or any(grown.new_layers)):
                        install_masks(model, torch.zeros((), device=device), grown.new_units, grown.new_layers,
                                      engine.operator.cfg.mask_placement)
                    if sharded:
                        optimizer = distributed.shard_with_optimizer(model, optimizer, dist, lr, cfg.optim)
                report["growth_peak_bytes"] = peak(cuda)
            phase = f"one training step at the final shape ({micro_rows} sequences per micro-batch)"
            reset_peak(cuda)
            for offset, rows in micro_batches:  # as the training step runs them (msgrun/step.py)
                batch = make_batch(offset, rows, layout.seq_len)
                loss = forward_backward(model, batch, cfg.train.grad_accum, autocast, layout.pool)
            optimizer.step()
            report["step_peak_bytes"] = peak(cuda)
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise OutOfMemory(oom_message(engine, cfg.train, device, phase, micro_rows, e)) from None
        finally:
            # drop every reference (the operator's result holds the grown model too) before the
            # cache is emptied, or the final model's weights and gradients stay reserved
            model = optimizer = grown = batch = loss = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - t0
    if cuda:
        report["device_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return report


@torch.no_grad()
def fill_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its moments at the first step: take one on zero gradients so the state
    occupies its memory, as it does at a real growth event."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def peak(cuda: bool) -> int | None:
    return torch.cuda.max_memory_allocated() if cuda else None


def describe(report: dict | None) -> str:
    if report is None:
        return "pre-flight: skipped (train.preflight=false)"
    gib = 2**30
    grew = "growth_peak_bytes" in report
    if report["step_peak_bytes"] is None:  # no allocator statistics off CUDA
        what = "the last growth event and a final-shape step" if grew else "a final-shape step"
        return f"pre-flight: {what} ran ({report['seconds']:.1f} s)"
    parts = [f"final-shape step peak {report['step_peak_bytes'] / gib:.2f} GiB"]
    if grew:
        parts.append(f"last growth event peak {report['growth_peak_bytes'] / gib:.2f} GiB")
    return f"pre-flight: {', '.join(parts)} of {report['device_bytes'] / gib:.1f} GiB ({report['seconds']:.1f} s)"


def oom_message(engine, tc, device, phase: str, micro_rows: int, error: BaseException) -> str:
    return (f"Out of memory in the pre-flight, {phase}: the final model "
            f"({engine.final_shape}, {engine.final_params:,} parameters) does not fit on "
            f"{device} at train.batch_size = {tc.batch_size} with train.grad_accum = {tc.grad_accum} "
            f"({micro_rows} sequences per micro-batch). Nothing was trained or written. Raise train.grad_accum "
            f"(same batch, smaller micro-batches), lower train.batch_size or model.seq_len, or use "
            f"train.distributed=fsdp to shard the model. ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
