"""Research-scale data on this machine: memory that does not grow with the corpus, reading cost
per step, and msgrun-prepare's throughput.

    python bench/data.py                                  # 1 B tokens (2 GB of llm.c shards in a temp dir)
    python bench/data.py --tokens 4_000_000 --steps 2 --prepare-docs 40     # a smoke run

It writes a synthetic corpus of llm.c-format shards (uint16 ids below 4,096) into a temporary directory (after checking the free space), and deletes it at the end. Figures:

1. peak RSS of a short training run (`msgrun data=shards`, one fresh process each) on the full
   corpus (its first start scans every id; the second reads the cached scan) and on its first
   shards (about 1/8 of it, whole files, linked): memory must not grow with the corpus;
2. the time to read one step's batch from the memory-mapped shards, against the step itself,
   measured interleaved in one process (what a step waits for on the CPU, where batches are not
   read ahead);
3. msgrun-prepare's tokens/s and peak RSS turning the standard library's sources into shards with
   a given 8,192-token BPE (files source, then the same texts as JSON lines through data=hf with
   hf_streaming=true), with the tokenizers library limited to 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# ids below the default job's vocabulary: at GPT-2's 50,257 the model's own logits (batch x seq x
# vocab floats, several copies in the backward pass) take GBs and would hide what the data costs
VOCAB = 4096
SHARD_TOKENS = 100_000_000  # what llm.c's FineWeb shards hold


def write_llmc(path: Path, n: int, seed: int) -> None:
    """A shard of n random ids below VOCAB, written in blocks (bounded memory)."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, n]
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        left = n
        while left:
            k = min(left, 1 << 24)
            f.write(rng.integers(0, VOCAB, size=k, dtype=np.uint16).tobytes())
            left -= k


# Runs a module as __main__ and prints its peak RSS at exit. The child's own VmHWM, not wait4's
# ru_maxrss: that one also counts the image forked from this (large, after section 2) process.
_PEAK = ("import atexit, runpy, sys\n"
         "def peak():\n"
         "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
         "    print('VmHWM-kB', hwm[0].split()[1] if hwm else -1, flush=True)\n"
         "atexit.register(peak)\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, output) of `python -m module args...` in a child process."""
    assert cmd[:2] == [sys.executable, "-m"]
    cmd = [sys.executable, "-c", _PEAK, *cmd[2:]]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
    except BaseException:
        p.kill()  # never leave a child behind when this script is stopped
        raise
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    kb = re.findall(r"^VmHWM-kB (\d+)", out, re.M)
    return (int(kb[-1]) if kb else usage.ru_maxrss) / 1024, time.perf_counter() - t0, out


def train_cmd(train_glob: str, val_glob: str, run_dir: Path, cache: Path, steps: int, model: str) -> list[str]:
    return [sys.executable, "-m", "msgrun", f"model={model}", "data=shards", f"data.train={train_glob}",
            f"data.val={val_glob}", f"data.vocab_size={VOCAB}", f"data.cache_dir={cache}", "logger=none",
            "logger.console=plain", f"train.max_steps={steps}", "train.eval_every=1000000", "train.log_every=1000000",
            "train.eval_tokens=16384",
            "train.preflight=false", f"hydra.run.dir={run_dir}"]


def load_vs_step(train_glob: str, val_glob: str, cache: Path, steps: int, model: str) -> tuple[float, float]:
    """Median seconds to read one step's batch, and median seconds of the training step."""
    from common import build_trainer

    trainer = build_trainer(["data=shards", f"data.train={train_glob}", f"data.val={val_glob}",
                             f"data.vocab_size={VOCAB}", f"data.cache_dir={cache}", f"model={model}"])
    layout = trainer.engine.layout(trainer.engine.shape)
    rows, T = layout.rows, layout.seq_len
    trainer.train_step()  # warm-up
    loads, step_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.host_batch(trainer.tokens + rows * T, rows, T)  # the next step's batch, from the shards
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.train_step()  # reads its own batch too, as in a run
        step_times.append(time.perf_counter() - t0)
    return statistics.median(loads), statistics.median(step_times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000_000, help="training tokens of the large corpus")
    ap.add_argument("--steps", type=int, default=20, help="training steps per measured run")
    ap.add_argument("--model", default="gpt_tiny")
    ap.add_argument("--prepare-docs", type=int, default=0, help="cap on stdlib files for the prepare figure (0: all)")
    ap.add_argument("--dir", default=None, help="where to write the corpus (default: a temp dir under $TMPDIR)")
    args = ap.parse_args()

    # a kill (timeout, Ctrl-C) still removes the corpus: SIGTERM unwinds like an exception
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="msgrun-bench-data-", dir=args.dir))
    need = args.tokens * 2 + (64 << 20)
    free = shutil.disk_usage(root).free
    print(f"corpus: {args.tokens:,} tokens ({need / 1e9:.2f} GB) in {root}; {free / 1e9:.1f} GB free there")
    if free < need * 1.5:
        shutil.rmtree(root)
        raise SystemExit(f"not enough free space in {root.parent} for {need / 1e9:.2f} GB (and a margin): "
                         "pass --dir or fewer --tokens")
    env = {**os.environ, "RAYON_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    env.pop("HYDRA_FULL_ERROR", None)
    try:
        big, small, cache = root / "big", root / "small", root / "cache"
        for d in (big, small, cache):
            d.mkdir()
        t0 = time.perf_counter()
        n_shards = max(1, -(-args.tokens // SHARD_TOKENS))
        for k in range(n_shards):
            write_llmc(big / f"train_{k:06d}.bin", min(SHARD_TOKENS, args.tokens - k * SHARD_TOKENS), seed=k)
        write_llmc(root / "val_000000.bin", 1_000_000, seed=10_000)
        small_tokens = 0
        for k in range(n_shards):  # the first shards up to 1/8 of the tokens (whole files), linked, not copied
            if small_tokens and small_tokens >= args.tokens // 8:
                break
            os.symlink(big / f"train_{k:06d}.bin", small / f"train_{k:06d}.bin")
            small_tokens += min(SHARD_TOKENS, args.tokens - k * SHARD_TOKENS)
        print(f"wrote {n_shards} llm.c shards in {time.perf_counter() - t0:.0f} s")

        val = str(root / "val_*.bin")
        print(f"\n1. peak RSS of a {args.steps}-step run of {args.model} (data=shards, vocab {VOCAB}), one process each")
        rss = {}
        for name, d, n, attempt in (("full corpus", big, args.tokens, "first start (scans ids)"),
                                    ("full corpus", big, args.tokens, "second start"),
                                    ("first shards", small, small_tokens, "second start")):
            run_dir = root / f"run-{len(rss)}"
            mb, secs, out = run_measured(train_cmd(str(d / "train_*.bin"), val, run_dir, cache, args.steps,
                                                   args.model), env)
            rss[(name, attempt)] = mb
            opened = next((line for line in out.splitlines() if line.startswith("data: shards")), "")
            print(f"   {name:12s} {n:>14,} tokens  {attempt:24s} peak RSS {mb:7.0f} MB  wall {secs:6.1f} s")
            print(f"      {opened}")
            shutil.rmtree(run_dir)
        growth = rss[("full corpus", "second start")] - rss[("first shards", "second start")]
        print(f"   RSS difference, full corpus - first shards: {growth:+.0f} MB for {args.tokens - small_tokens:,} "
              "more tokens")

        print(f"\n2. reading a step's batch vs the step ({args.model}, median of {args.steps}, interleaved)")
        load, step = load_vs_step(str(big / "train_*.bin"), val, cache, args.steps, args.model)
        print(f"   read batch {load * 1e3:8.3f} ms   train step {step * 1e3:8.1f} ms   ratio {load / step:.2%}")

        print("\n3. msgrun-prepare (RAYON_NUM_THREADS=2): the standard library's sources with a given 8192-token BPE")
        from msgrun.config import DataConfig
        from msgrun.data import list_documents, prepare_data

        cap = args.prepare_docs or None
        tok = prepare_data(DataConfig(max_docs=300, vocab_size=8192, cache_dir=str(cache)), log=lambda _: None)
        docs, _ = list_documents(DataConfig(max_docs=cap))
        rows = root / "stdlib.jsonl"
        with open(rows, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d.read()}) + "\n")
        mb_text = sum(d.size for d in docs) / 1e6
        del docs
        base = [sys.executable, "-m", "msgrun.prepare", f"data.tokenizer_path={tok.tokenizer_path}",
                f"data.cache_dir={cache}", "progress=plain"]
        sources = {"pystdlib (files)": ["data=pystdlib"] + ([f"data.max_docs={cap}"] if cap else []),
                   "hf json, streaming": ["data=hf", "data.hf_path=json", f"data.hf_data_files=[{rows}]",
                                          "data.hf_streaming=true"]}
        env_hf = {**env, "HF_DATASETS_CACHE": str(root / "hf"), "HF_DATASETS_OFFLINE": "1"}
        for name, extra in sources.items():
            out_dir = root / f"prepared-{name.split()[0]}"
            mb, secs, out = run_measured([*base, *extra, f"out_dir={out_dir}"], env_hf)
            manifest = json.loads((out_dir / "manifest.json").read_text())
            n = manifest["train_tokens"] + manifest["val_tokens"]
            # the command's own figure: reading, encoding and writing, without interpreter start-up
            rate = re.search(r"\(([\d,]+) tokens/s this run, ([\d.]+) s\)", out)
            print(f"   {name:20s} {mb_text:6.1f} MB of text  {n:>11,} tokens  {rate.group(1):>10} tokens/s "
                  f"({rate.group(2)} s; {secs:.1f} s with start-up)  peak RSS {mb:5.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"\nremoved {root}")


if __name__ == "__main__":
    main()
