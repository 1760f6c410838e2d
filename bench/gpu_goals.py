"""Every speed figure the GPU goals name, in one run, checked against the goals.

    python bench/gpu_goals.py --out gpu_goals.md                  # one H200, ~4 minutes (part of bench/gpu_check.sh)
    python bench/gpu_goals.py --models gpt_tiny --stage-model gpt_tiny --steps 3 --warmup 1 --event-steps 2   # CPU smoke run

1. Baseline throughput: msgrun's training step against the minimal reference step of the same
   shape, and against its own eager step (bench/throughput.py), for each of --models: tokens/s
   and MFU, with the peak it divides by named. Goals on the first model (gpt_small): msgrun
   >= 1.1x the reference's tokens/s; compiled >= eager.
2. Growth events on --stage-model (bench/growth.py), one per --events schedule (default: one
   depth and one width event): MSG ramp steps against unmasked steps, and each event's seconds
   split into operator, optimizer transfer and recompile. Goals: ramp <= 1.05x unmasked; a depth
   event <= 3 s, a width event <= 15 s, recompile included.
3. Only with --stages: every stage of --schedule on --stage-model as a plain model of that
   stage's shape, msgrun's MFU against the reference's (within 5%). Off by default: it does not
   fit the fifteen-minute GPU lease together with the rest.
--profile FILE: the compiled msgrun step of the first model under torch.profiler, top kernels.

Goals are printed with the measured figure and met / missed; nothing here asserts. --out writes
the same tables as Markdown, with the command line and the device, for docs/gpu.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_trainer, compose_config  # noqa: E402
from growth import bench_event  # noqa: E402
from throughput import measure  # noqa: E402

from msgrun.growth.schedule import resolve_schedule  # noqa: E402
from msgrun.provenance import collect  # noqa: E402
from msgrun.train import peak_flops  # noqa: E402

EVENTS = {"layers_only": ("depth", 3.0), "hidden_only": ("width", 15.0), "all_at_once": ("width", 15.0)}
RAMP_GOAL = 1.05  # ramp step time / unmasked step time


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def stage_overrides(model: str, schedule: str) -> list[tuple[str, list[str]]]:
    """(label, overrides) of a plain model at each shape the schedule trains."""
    cfg = compose_config([f"model={model}", f"schedule={schedule}"])
    start, stages = resolve_schedule(cfg.schedule, cfg.model)
    out = []
    for label, s in [("start", start)] + [(f"stage {st.index}", st.target) for st in stages]:
        out.append((f"{label}: {s}", [f"model={model}", f"model.layers={s.layers}", f"model.hidden={s.hidden}",
                                      f"model.heads={s.heads}", f"model.ffn={s.ffn}", f"model.seq_len={s.seq_len}"]))
    return out


def profile_step(model: str, batch: int | None, compile: bool, path: Path, steps: int = 5) -> None:
    """msgrun's step of `model` under torch.profiler: the top kernels by device time, to a file."""
    from torch.profiler import ProfilerActivity, profile

    trainer = build_trainer([f"model={model}"], batch=batch, compile=compile)
    for _ in range(3):
        trainer.train_step()
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path.write_text(f"{model}, {steps} steps of msgrun's {'compiled' if compile else 'eager'} step\n"
                    + prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70) + "\n")
    print(f"profile written to {path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["gpt_small"])
    p.add_argument("--stage-model", default="gpt_small")
    p.add_argument("--schedule", default="depth_first")
    p.add_argument("--events", nargs="*", default=["layers_only", "hidden_only"])
    p.add_argument("--stages", action="store_true", help="also measure every stage of --schedule (section 3)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 150 on GPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--event-steps", type=int, default=None, help="timed steps per growth phase (default 30 on GPU)")
    p.add_argument("--profile", type=Path, default=None, help="write the first model's compiled step profile here")
    p.add_argument("--eager", action="store_true", help="do not compile (compiling is the default on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables as Markdown here")
    opts = p.parse_args()
    cuda = torch.cuda.is_available()
    compile = cuda and not opts.eager
    steps = opts.steps or (150 if cuda else None)
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)
        if opts.out:  # rewritten at every line: a run stopped at its time limit keeps what it measured
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text("\n".join(lines) + "\n")

    prov = collect(torch.device("cuda" if cuda else "cpu"), 1)
    emit(f"Command: `python {' '.join(sys.argv)}`  ")
    emit(f"Device: {prov.get('device_name') or 'cpu'}, torch {torch.__version__}, "
         f"{'compiled' if compile else 'eager'}, {'bf16' if cuda else 'fp32'}")
    goals = []

    pk = peak_flops(torch.device("cuda")) if cuda else None
    peak_note = (f"MFU divides by {pk / 1e12:.0f} TF/s, the dense bf16 spec peak of this GPU (msgrun.train.PEAK_FLOPS); "
                 f"against the ~790 TF/s an H100/H200 sustains in bf16 matmuls, multiply it by {pk / 790e12:.2f}"
                 if pk else "MFU: no peak known for this device")
    emit("\n## Baseline step against the reference step\n")
    emit(peak_note + ".\n")
    emit("| model | shape | batch x T | msgrun ms | msgrun tok/s | msgrun MFU | eager ms | reference ms | reference tok/s "
         "| reference MFU | msgrun / reference | compiled / eager | graphs, compiles, breaks; recompiles timed |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, model in enumerate(opts.models):
        r = measure([f"model={model}"], opts.batch, compile, steps, opts.warmup, eager=compile)
        ours, ref, eager = r["msgrun"], r.get("reference"), r.get("msgrun_eager")
        vs_ref = ours["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        vs_eager = ours["tokens_per_s"] / eager["tokens_per_s"] if eager else None
        c = r["compile"]
        dynamo = f"{c['graphs']}, {c['compiles']}, {c['graph_breaks']}; {r['compiles_while_timed']}" if c else "eager"
        cells = [model, r["shape"], f"{r['batch']} x {r['seq_len']}", num(ours["ms"], ".2f"),
                 num(ours["tokens_per_s"], ",.0f"), pct(ours["mfu"]), num(eager and eager["ms"], ".2f"),
                 num(ref and ref["ms"], ".2f") if ref else "(attention width != hidden)",
                 num(ref and ref["tokens_per_s"], ",.0f"), pct(ref and ref["mfu"]), num(vs_ref, ".3f"),
                 num(vs_eager, ".3f"), dynamo]
        emit("| " + " | ".join(cells) + " |")
        if i == 0:
            if vs_ref is not None:
                goals.append((f"{model} tokens/s >= 1.1x the reference", f"{vs_ref:.3f}x", vs_ref >= 1.1))
            if vs_eager is not None:
                goals.append((f"{model} compiled step at least as fast as eager", f"{vs_eager:.3f}x", vs_eager >= 1.0))
            if c is not None:
                goals.append((f"{model}: no recompile while timed, no graph break",
                              f"{r['compiles_while_timed']} recompiles, {c['graph_breaks']} breaks",
                              r["compiles_while_timed"] == 0 and c["graph_breaks"] == 0))
            if opts.profile:
                profile_step(model, opts.batch, compile, opts.profile)

    emit(f"\n## Growth events on {opts.stage_model} (MSG)\n")
    emit("| schedule | grows | operator s | optimizer s | recompile s | event s | ramp ms | unmasked ms | ramp / unmasked |")
    emit("|---|---|---|---|---|---|---|---|---|")
    event_steps = opts.event_steps or (30 if cuda else 10)
    for schedule in opts.events:
        e = bench_event(opts.stage_model, schedule, event_steps, compile, [] if opts.batch is None else
                        [f"train.batch_size={opts.batch}"])
        emit(f"| {schedule} | {e['dims']} | {e['operator_s']:.3f} | {e['optimizer_s']:.3f} | {e['recompile_s']:.3f} "
             f"| {e['event_s']:.3f} | {e['ramp_ms']:.2f} | {e['plain_ms']:.2f} | {e['ramp_over_plain']:.3f} |")
        kind, limit = EVENTS.get(schedule, ("width", 15.0))
        goals.append((f"{schedule}: ramp step <= {RAMP_GOAL}x unmasked", f"{e['ramp_over_plain']:.3f}x",
                      e["ramp_over_plain"] <= RAMP_GOAL))
        goals.append((f"{schedule}: {kind} event <= {limit:g} s", f"{e['event_s']:.2f} s", e["event_s"] <= limit))

    if opts.stages:
        emit(f"\n## Each stage of schedule={opts.schedule} on {opts.stage_model}, as a plain model of that shape\n")
        emit("| stage | msgrun ms | msgrun MFU | reference ms | reference MFU | MFU ratio |")
        emit("|---|---|---|---|---|---|")
        for label, overrides in stage_overrides(opts.stage_model, opts.schedule):
            r = measure(overrides, opts.batch, compile, steps, opts.warmup)
            ours, ref = r["msgrun"], r.get("reference")
            if ref is None:
                emit(f"| {label} | {ours['ms']:.2f} | {pct(ours['mfu'])} | (attention width != hidden) | | |")
                continue
            ratio = ref["ms"] / ours["ms"]  # the same FLOPs per step: the MFU ratio is the inverse time ratio
            emit(f"| {label} | {ours['ms']:.2f} | {pct(ours['mfu'])} | {ref['ms']:.2f} | {pct(ref['mfu'])} | {ratio:.3f} |")
            goals.append((f"{label}: MFU within 5% of the reference", f"{ratio:.3f}", ratio >= 0.95))

    emit("\n## Goals\n")
    emit("| goal | measured | |")
    emit("|---|---|---|")
    for goal, measured, met in goals:
        emit(f"| {goal} | {measured} | {'met' if met else 'missed'} |")
    if opts.out:
        print(f"written to {opts.out}")


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
