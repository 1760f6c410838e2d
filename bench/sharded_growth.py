"""Per-rank memory of a growth event under FSDP2, sharded (growth/sharded.py) against gathered
(the whole model and AdamW state on every rank), and checkpoint write/load time and size per
rank, sharded (torch.distributed.checkpoint) against one full file.

    python bench/sharded_growth.py                                  # 218M parameters, 2 and 4 ranks
    python bench/sharded_growth.py --layers 4 --hidden 128 --worlds 2   # a quick check

For each world size it starts `torchrun --nproc_per_node=W` (gloo on the CPU; the code path is
the GPU one). Every rank builds the model at half the final depth and width (schedule=all_at_once,
operator=msg: one event grows layers, hidden, heads and FFN), shards it, gives AdamW state to every
parameter, and then:

* grows it with the sharded event, sampling its resident memory (RSS, /proc/self/statm, every
  2 ms) for the peak above what it held before the event;
* writes the grown model and optimizer as a sharded checkpoint and as one full file (gathered,
  written by rank 0; what train.distributed=ddp writes), and loads each back into the shards;
* builds the small sharded model again and grows it the gathered way (gather, grow the plain
  model, shard again), with the same sampling.

Each rank's peak is printed beside the issue's goal, (full grown state / world size) + the
largest parameter group + a fixed margin, as its two parts: the rank's share of the grown state,
and what the event held beyond it, in units of the largest parameter (its full fp32 size: the
event's transient is a few full-size copies of one parameter: its init, its gathered source,
the transplant's intermediates, one moment). RSS counts what the process holds, not what torch
allocated: the workers run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_),
so every tensor-sized block is returned to the system when freed and RSS follows live memory;
otherwise glibc raises the threshold after the first large free, keeps later blocks on its heap,
and an event measured after another one looks cheaper than it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

GB = 1e9


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident memory above the level at entry, sampled from a thread."""

    def __enter__(self):
        self.base = self.high = rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.is_set():
            self.high = max(self.high, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.high = max(self.high, rss())
        self.extra = self.high - self.base


def worker(a) -> None:
    from common import compose_config

    from msgrun import checkpoint, distributed
    from msgrun.growth.engine import GrowthEngine
    from msgrun.model import Transformer
    from msgrun.optim import build_adamw
    from msgrun.preflight import fill_optimizer_state
    from msgrun.train import final_model_args

    torch.set_num_threads(1)
    dist = distributed.setup("fsdp")
    cfg = compose_config([f"model.layers={a.layers}", f"model.hidden={a.hidden}", f"model.heads={a.hidden // 64}",
                          "model.head_dim=64", f"model.ffn={4 * a.hidden}", f"data.vocab_size={a.vocab}",
                          "model.seq_len=128", "schedule=all_at_once", "operator=msg"], batch=32)
    final = final_model_args(cfg.model, a.vocab)

    def small():
        engine = GrowthEngine(cfg, final, world_size=dist.world_size)
        model = Transformer(engine.initial_args(), generator=torch.Generator().manual_seed(0))
        distributed.shard(model, dist)
        opt = build_adamw(model, 1e-3, cfg.optim, "cpu")
        fill_optimizer_state(model, opt)
        return engine, model, opt

    out = {"rank": dist.rank, "world": dist.world_size}
    engine, model, opt = small()
    stage = engine.stages[0]
    out["params_before"] = model.num_params()
    torch_barrier(dist)
    with PeakRSS() as pk:
        result = engine.grow(model, opt, stage, torch.Generator().manual_seed(1), 0, dist=dist)
        torch_barrier(dist)
    del model, opt
    grown, grown_opt = result.model, result.optimizer
    out["sharded_event_extra"], out["sharded_event_seconds"] = pk.extra, result.seconds_operator
    out["params_after"] = grown.num_params()
    out["largest_param"] = max(p.numel() for p in grown.parameters())

    # checkpoints of the grown model and its optimizer
    made = tempfile.mkdtemp(prefix="msgrun-bench-ckpt-", dir=a.tmp) if dist.rank == 0 else None
    root = Path(distributed.broadcast(made, dist))
    optim_state = distributed.optimizer_state_by_name(grown, grown_opt)
    meta = {"model_args": dict(vars(grown.args)), "counters": {"step": 1},
            "optimizer_keys": {n: list(e) for n, e in optim_state.items()}}
    torch_barrier(dist)
    t0 = time.perf_counter()
    path = checkpoint.save_sharded(root / "sharded", 1, meta, {"model": grown.state_dict(), "optimizer": optim_state},
                                   keep=1, dist=dist)
    out["sharded_write_s"] = time.perf_counter() - t0
    out["sharded_bytes"] = (path / f"__{dist.rank}_0.distcp").stat().st_size
    state = checkpoint.load(path)
    torch_barrier(dist)
    t0 = time.perf_counter()
    checkpoint.restore_tensors(state, {"model": grown.state_dict(), "optimizer": optim_state})
    torch_barrier(dist)
    out["sharded_load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model_full, optim_full = distributed.full_state(grown, grown_opt)
    full_path = root / "full" / "checkpoints" / "step_000000001.pt"
    if dist.rank == 0:
        (root / "full").mkdir()
        checkpoint.save(root / "full", 1, {**meta, "model": model_full, "optimizer": optim_full}, keep=1)
    del model_full, optim_full
    torch_barrier(dist)
    out["full_write_s"] = time.perf_counter() - t0
    out["full_bytes"] = full_path.stat().st_size if dist.rank == 0 else 0
    t0 = time.perf_counter()
    # every rank reads the whole file (checkpoint.prepare_run_dir); mapped, so four ranks' copies do
    # not have to fit in memory at once
    state = checkpoint.load(full_path, mmap=True)
    checkpoint.restore_tensors(state, {"model": grown.state_dict(), "optimizer": optim_state})
    del state
    torch_barrier(dist)
    out["full_load_s"] = time.perf_counter() - t0
    del grown, grown_opt, optim_state, result
    torch_barrier(dist)
    if dist.rank == 0:
        shutil.rmtree(root, ignore_errors=True)

    # today's way: gather, grow the plain model, shard again
    engine, model, opt = small()
    torch_barrier(dist)
    with PeakRSS() as pk:
        t0 = time.perf_counter()
        plain, plain_opt = distributed.gather_plain(model, opt, 1e-3, cfg.optim)
        result = engine.grow(plain, plain_opt, stage, torch.Generator().manual_seed(1), 0)
        del plain, plain_opt
        new_opt = distributed.shard_with_optimizer(result.model, result.optimizer, dist, 1e-3, cfg.optim)
        torch_barrier(dist)
    out["gathered_event_extra"], out["gathered_event_seconds"] = pk.extra, time.perf_counter() - t0
    del new_opt, result
    print("RANK " + json.dumps(out), flush=True)
    distributed.teardown(dist)


def torch_barrier(dist) -> None:
    import torch.distributed as torch_dist

    torch_dist.barrier()


def launch(world: int, a) -> list[dict]:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={world}", __file__, "--worker", "--layers", str(a.layers),
           "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--tmp", a.tmp]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"torchrun with {world} processes failed:\n{r.stderr[-3000:]}")
    return sorted((json.loads(line[5:]) for line in r.stdout.splitlines() if line.startswith("RANK ")),
                  key=lambda x: x["rank"])


def report(world: int, ranks: list[dict]) -> str:
    r0 = ranks[0]
    state = r0["params_after"] * 4 * 3  # fp32 weights and AdamW's two moments
    largest = r0["largest_param"] * 4
    lines = [f"world {world}: grown state {state / GB:.2f} GB (weights + AdamW moments; {state / world / GB:.2f} GB "
             f"per rank), largest parameter {largest / GB:.3f} GB",
             f"{'rank':>4}  {'sharded event':>13} (beyond state/{world})  {'gathered event':>14}  "
             f"{'ckpt write s':>12}  {'ckpt load s':>11}  {'ckpt GB/rank':>12}  (sharded | full)"]
    for r in ranks:
        beyond = (r["sharded_event_extra"] - state / world) / largest
        lines.append(f"{r['rank']:>4}  {r['sharded_event_extra'] / GB:>10.2f} GB ({beyond:+5.1f} x largest)"
                     f"  {r['gathered_event_extra'] / GB:>11.2f} GB  "
                     f"{r['sharded_write_s']:>5.1f} | {r['full_write_s']:<4.1f}  {r['sharded_load_s']:>4.1f} | "
                     f"{r['full_load_s']:<4.1f}  {r['sharded_bytes'] / GB:>5.2f} | {r['full_bytes'] / GB:.2f}")
    lines.append(f"event seconds (rank 0): sharded {r0['sharded_event_seconds']:.1f}, gathered "
                 f"{r0['gathered_event_seconds']:.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16, help="final depth (the event grows from half)")
    p.add_argument("--hidden", type=int, default=1024, help="final width (heads of 64, FFN 4x)")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--worlds", default="2,4", help="process counts, comma-separated")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where checkpoints are written (then removed)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    from msgrun.model import ModelArgs, count_params

    full = ModelArgs(vocab_size=a.vocab, layers=a.layers, hidden=a.hidden, heads=a.hidden // 64, head_dim=64,
                     ffn=4 * a.hidden, max_seq_len=128)
    print(f"final model {a.layers}L x {a.hidden}H ({count_params(full):,} parameters), grown from half depth and "
          f"width in one event (schedule=all_at_once, operator=msg); peaks are resident memory above the level "
          f"before the event, per rank")
    for world in (int(w) for w in a.worlds.split(",")):
        print(report(world, launch(world, a)), flush=True)


if __name__ == "__main__":
    main()
