"""Training throughput of msgrun's step against a minimal nanoGPT-style step of the same shape.

    python bench/throughput.py --model gpt_small --compile              # on a GPU (bf16)
    python bench/throughput.py --model gpt_tiny --steps 40 --compile    # CPU shape
    python bench/throughput.py --model gpt_tiny --steps 40 --compile --threads 1 --clock cpu   # a loaded CPU

Both steps run the same shape, batch, precision and optimizer (AdamW, fused on CUDA). msgrun's
step is the real `Trainer.train_step` (data read from the token stream by offset, per-unit
compile, FLOPs accounting); the reference is written out below in ~40 lines, the yardstick an
engineer would write by hand, compiled whole. With --compile, msgrun's eager step is timed too
(compiling must never make it slower). The steps are timed in interleaved rounds (msgrun,
reference, msgrun, ...) in one process, and each figure is the median round: on a shared machine
a burst of load then costs every variant one round instead of all of one variant's steps.
Figures: tokens/s and MFU against the GPU's dense bf16 peak (msgrun.train.PEAK_FLOPS, the spec
sheet's figure) with FLOPs from msgrun.flops; Dynamo's counters for msgrun's compiled step
(graphs, compiles, graph breaks) and whether anything recompiled while timed. The last line
compares, with the goals (msgrun >= 0.95x the reference compiled, compiled >= eager).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_trainer, compile_stats, peak, sync  # noqa: E402

from msgrun.flops import train_flops  # noqa: E402


class RefBlock(nn.Module):
    def __init__(self, H, A, F_):
        super().__init__()
        self.A = A
        self.ln1, self.ln2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.qkv, self.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.fc, self.out = nn.Linear(H, F_), nn.Linear(F_, H)

    def forward(self, x):
        B, T, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.A, H // self.A).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    """nanoGPT's shape: learned positions, pre-LN blocks, tied head."""

    def __init__(self, V, T, L, H, A, F_):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, H), nn.Embedding(T, H)
        self.blocks = nn.ModuleList(RefBlock(H, A, F_) for _ in range(L))
        self.ln_f = nn.LayerNorm(H)
        self.head = nn.Linear(H, V, bias=False)
        self.head.weight = self.wte.weight
        # nanoGPT's init: N(0, 0.02), residual projections / sqrt(2L). (PyTorch's default init
        # makes this CPU step ~9x slower through denormal gradients; it is not what nanoGPT runs.)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                std = 0.02 / math.sqrt(2 * L) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def warm_up(step, n: int, device) -> None:
    for _ in range(n):
        step()
    sync(device)


def time_steps(step, n_warmup: int, n_steps: int, device, clock=time.perf_counter) -> float:
    warm_up(step, n_warmup, device)
    t0 = clock()
    for _ in range(n_steps):
        step()
    sync(device)
    return (clock() - t0) / n_steps


def interleaved(steps: dict, n_steps: int, rounds: int, device, clock=time.perf_counter) -> dict[str, float]:
    """Seconds per step of each callable in `steps` (already warm): `rounds` rounds, each timing
    n_steps / rounds steps of every callable in turn; per callable the median round."""
    per_round = max(n_steps // rounds, 1)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, 0, per_round, device, clock))
    return {name: statistics.median(t) for name, t in times.items()}


def reference_step(args_m, batch: int, seq_len: int, device, compile: bool, bf16: bool):
    """The reference's training step at msgrun's shape: a closure over its model and optimizer."""
    from msgrun.model import padded_vocab

    a = args_m
    model = RefGPT(padded_vocab(a.vocab_size), seq_len, a.layers, a.hidden, a.heads, a.ffn).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile else model
    idx = torch.randint(0, a.vocab_size, (batch, seq_len + 1), device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)

    def step():
        with ctx:
            loss = fwd(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(overrides: list[str], batch: int | None, compile: bool, n_steps: int | None, n_warmup: int | None,
            reference: bool = True, eager: bool = False, rounds: int = 5, clock: str = "wall") -> dict:
    """msgrun's step and (optionally) the reference step at the shape `overrides` compose, timed
    interleaved. `eager` (with `compile`): msgrun's eager step as a third contender."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh compile cache: earlier measurements neither help nor crowd this one
    counters.clear()
    trainer = build_trainer(overrides, batch=batch, compile=compile)
    device, bf16 = trainer.device, trainer.device.type == "cuda"
    if clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu times the host only; on a GPU use the wall clock")
    n_steps = n_steps or (1000 if device.type == "cuda" else 30)
    n_warmup = n_warmup or (20 if device.type == "cuda" else 3)
    a, B, T = trainer.model.args, trainer.cfg.train.batch_size, trainer.final_args.max_seq_len
    flops_per_step, pk = train_flops(a, B, T), peak(device)

    steps = {"msgrun": trainer.train_step}
    warm_up(trainer.train_step, n_warmup, device)
    compiled = compile_stats()  # msgrun's graphs only: nothing else has compiled yet
    if compile and eager:
        eager_trainer = build_trainer(overrides, batch=batch, compile=False)
        steps["msgrun_eager"] = eager_trainer.train_step
    if reference and a.heads * a.head_dim == a.hidden:  # the reference ties attention width to hidden
        steps["reference"] = reference_step(a, B, T, device, compile, bf16)
    for name, step in steps.items():
        if name != "msgrun":
            warm_up(step, n_warmup, device)
    before = compile_stats()["compiles"]
    seconds = interleaved(steps, n_steps, rounds, device, CLOCKS[clock])

    def figures(s):
        return {"ms": 1000 * s, "tokens_per_s": B * T / s, "mfu": flops_per_step / s / pk if pk else None}

    return {"shape": f"{a.layers}L x {a.hidden}H x {a.heads}A x {a.ffn}F", "batch": B, "seq_len": T,
            "params": trainer.model.num_params(), "device": f"{device}{' bf16' if bf16 else ' fp32'}",
            "steps": max(n_steps // rounds, 1) * rounds, "rounds": rounds, "warmup": n_warmup, "clock": clock,
            "threads": torch.get_num_threads(), "compile": compiled if compile else None,
            "compiles_while_timed": compile_stats()["compiles"] - before,
            **{name: figures(s) for name, s in seconds.items()}}


def line(name: str, f: dict) -> str:
    mfu = f", MFU {100 * f['mfu']:.1f}%" if f["mfu"] is not None else ""
    return f"{name:<34} {f['ms']:9.2f} ms/step  {f['tokens_per_s']:12,.0f} tokens/s{mfu}"


def comparison(r: dict, model: str) -> str:
    """The one line a reader compares: msgrun against the reference, and compiled against eager."""
    mode = "compiled" if r["compile"] is not None else "eager"
    parts = []
    if "reference" in r:
        x = r["msgrun"]["tokens_per_s"] / r["reference"]["tokens_per_s"]
        parts.append(f"msgrun / reference tokens/s {x:.3f} ({mode}; goal >= 0.95: {'met' if x >= 0.95 else 'MISSED'})")
    if "msgrun_eager" in r:
        x = r["msgrun"]["tokens_per_s"] / r["msgrun_eager"]["tokens_per_s"]
        parts.append(f"msgrun compiled / eager tokens/s {x:.3f} (goal >= 1: {'met' if x >= 1 else 'MISSED'})")
    if r["compile"] is not None:
        parts.append(f"recompiles while timed: {r['compiles_while_timed']}")
    how = f"{r['clock']} clock, {r['threads']} threads, median of {r['rounds']} interleaved rounds"
    return f"{model}: " + "; ".join(parts) + f" [{how}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt_tiny")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 16 on GPU, 32 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of each contender (default: 1000 on GPU, "
                                                           "30 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the timed steps are split into")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-eager", action="store_true", help="with --compile, skip timing msgrun's eager step")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="cpu: this process's CPU time, steadier than the wall clock on a loaded machine with "
                        "--threads 1 (work done, not time waited for a core)")
    p.add_argument("--overrides", nargs="*", default=[], help="extra msgrun config overrides")
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)  # before anything compiles: Inductor's CPU kernels bake it in

    r = measure([f"model={opts.model}", *opts.overrides], opts.batch, opts.compile, opts.steps, opts.warmup,
                reference=not opts.no_reference, eager=opts.compile and not opts.no_eager, rounds=opts.rounds,
                clock=opts.clock)
    print(f"{opts.model}: {r['shape']}, batch {r['batch']} x {r['seq_len']}, {r['params']:,} params, {r['device']}"
          f"{', compiled' if opts.compile else ''}; {r['steps']} timed steps each in {r['rounds']} interleaved "
          f"rounds after {r['warmup']} warm-up")
    print(line(f"msgrun train_step{' (compiled)' if opts.compile else ''}", r["msgrun"]))
    if "msgrun_eager" in r:
        print(line("msgrun train_step (eager)", r["msgrun_eager"]))
    if "reference" in r:
        print(line(f"reference nanoGPT step{' (compiled)' if opts.compile else ''}", r["reference"]))
    if r["compile"] is not None:
        c = r["compile"]
        print(f"msgrun compiled: {c['graphs']} graphs from {c['compiles']} compiles, {c['graph_breaks']} graph breaks")
    print(comparison(r, opts.model))


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
