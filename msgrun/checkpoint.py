"""Checkpoints that resume a run exactly, and run directories that are never damaged.

A checkpoint holds everything the next step depends on: the model at its *current* shape and
its optimizer state, the LR schedule, the counters, every RNG (torch, CUDA, numpy, python, and
the init generator that future growth events draw new weights from), the growth state (stages
done, an ongoing MSG ramp, the RaPTr path length), the partial logging window, and the resolved
config. Files are written atomically (temporary file, fsync, rename) with a SHA-256 sidecar; a
checkpoint whose bytes do not match, or which matches but does not load, is skipped for the
previous one. A write that fails (disk full, a file-size limit) removes its temporary file, keeps
the previous checkpoints and ends the run with one paragraph. Loading uses
`torch.load(weights_only=True)`, so a checkpoint cannot execute code.

Resuming truncates metrics.jsonl and growth.jsonl to what the checkpoint had logged, so a
resumed run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from msgrun import distributed
from msgrun.errors import CheckpointError
from msgrun.model import ModelArgs, Transformer
from msgrun.optim import build_adamw
from msgrun.rundir import check_run_dir, config_json, different_run_message, finished_run_message


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file that replaces `path` only once complete; on any failure
    the temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    return sorted(d.glob("step_*.pt")) if d.is_dir() else []


def is_valid(path: Path) -> bool:
    side = path.with_name(path.name + ".sha256")
    return side.exists() and side.read_text().strip() == sha256(path)


def newest_valid(run_dir: Path, warn=print) -> Path | None:
    for path in reversed(list_checkpoints(run_dir)):
        if is_valid(path):
            return path
        warn(f"warning: checkpoint {path} is corrupt or incomplete (checksum mismatch); trying the previous one.")
    return None


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def newest_loadable(run_dir: Path, warn=print) -> tuple[Path | None, dict | None]:
    """The newest checkpoint whose checksum matches and which loads (a file can match its sidecar
    and still not load: written by another torch, or damaged before its sidecar was computed),
    with its state."""
    for path in reversed(list_checkpoints(run_dir)):
        if not is_valid(path):
            warn(f"warning: checkpoint {path} is corrupt or incomplete (checksum mismatch); trying the previous one.")
            continue
        try:
            state = load(path)
            state["counters"]["step"]  # noqa: B018 - a file that loads but is not a msgrun checkpoint
        except Exception as e:  # noqa: BLE001 - any failure to read it means: use the previous one
            warn(f"warning: checkpoint {path} does not load ({type(e).__name__}: {str(e)[:200]}); trying the "
                 "previous one.")
            continue
        return path, state
    return None, None


def last_save_time(trainer) -> float:
    """When the trainer last wrote a checkpoint (monotonic clock); the first call starts the clock."""
    if getattr(trainer, "_last_save_time", None) is None:
        trainer._last_save_time = time.monotonic()
    return trainer._last_save_time


def last_good_message(trainer) -> str:
    good = newest_valid(trainer.run_dir, warn=lambda *_: None)
    return f"The last good checkpoint is {good}." if good else "No checkpoint has been written yet."


def save(trainer) -> Path:
    """Write a checkpoint of the trainer's state and keep the newest K valid ones; returns its
    path. Every rank gathers (a collective under FSDP); rank 0 writes."""
    path = checkpoint_dir(trainer.run_dir) / f"step_{trainer.step:09d}.pt"
    if getattr(trainer, "_saved_step", None) == trainer.step:  # e.g. a signal right after a scheduled save
        return path
    model_state, optim_state = distributed.full_state(trainer.model, trainer.optimizer)
    # the global generators (dropout masks) are seeded per rank: each rank's state is saved
    rank_rng = distributed.all_gather(
        {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        trainer.dist)
    trainer._saved_step, trainer._last_save_time = trainer.step, time.monotonic()
    if not trainer.is_main:
        return path
    d = checkpoint_dir(trainer.run_dir)
    d.mkdir(exist_ok=True)
    state = {
        "format": 1,
        "model_args": dict(vars(trainer.model.args)),
        "model": model_state,
        "optimizer": optim_state,
        "lr_schedule": trainer.lr_schedule.state_dict(),
        "counters": {"step": trainer.step, "tokens": trainer.tokens, "flops": trainer.flops,
                     "wall_time": trainer.wall.total, "lr": getattr(trainer, "lr", 0.0)},
        "window": {k: (float(v) if torch.is_tensor(v) else v) for k, v in trainer.window.items()},
        "last_val": trainer.last_val, "last_record": getattr(trainer, "last_record", None),
        "warned_repeat": getattr(trainer, "_warned_repeat", False),
        "engine": trainer.engine.state_dict(),
        "rank_rng": rank_rng,
        "rng": {
            "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
            "python": random.getstate(),
            "init": trainer.init_gen.get_state(),
        },
        "config": config_json(trainer.cfg),
        "fingerprints": fingerprints(trainer),
        "log_lines": {"metrics": count_lines(trainer.run_dir / "metrics.jsonl"),
                      "growth": count_lines(trainer.run_dir / "growth.jsonl")},
    }
    side = path.with_name(path.name + ".sha256")
    written = False
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        written = True
        atomic_write(side, lambda f: f.write(sha256(path).encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (EFBIG, ENOSPC) as RuntimeError
        if written:  # this write replaced the file; without its sidecar it would only be skipped
            path.unlink(missing_ok=True)
        raise CheckpointError(
            f"Could not write checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). The disk may "
            f"be full or a file-size limit (ulimit -f) reached; the previous checkpoints are kept. "
            f"{last_good_message(trainer)} Free space or raise the limit, then rerun the same command to resume."
        ) from e
    keep = max(1, trainer.cfg.train.keep_checkpoints)
    valid = [p for p in list_checkpoints(trainer.run_dir) if is_valid(p)]
    for old in valid[:-keep]:  # never delete the newest valid ones (the only good one included)
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def truncate_lines(path: Path, n: int) -> None:
    if not path.exists():
        return
    with open(path, "rb") as f:
        lines = f.readlines()[:n]
    atomic_write(path, lambda f: f.writelines(lines))


def prepare_run_dir(trainer, resume: bool) -> bool:
    """Decide between a fresh start and a resume, refusing anything that would damage an existing
    run; on resume, load the newest good checkpoint into the trainer. Rank 0 decides and every
    rank follows (an error on rank 0 is raised on every rank, so none waits forever).
    Returns True on resume."""
    decision, state = None, None
    if trainer.is_main:
        try:
            path, state = choose_checkpoint(trainer, resume)
            decision = {"path": None if path is None else str(path)}
        except CheckpointError as e:
            decision = {"error": str(e)}
    decision = distributed.broadcast(decision, trainer.dist)
    if "error" in decision:
        raise CheckpointError(decision["error"])
    if decision["path"] is None:
        return False
    restore(trainer, state if state is not None else load(decision["path"]))
    if trainer.is_main:
        truncate_lines(trainer.run_dir / "metrics.jsonl", state["log_lines"]["metrics"])
        truncate_lines(trainer.run_dir / "growth.jsonl", state["log_lines"]["growth"])
        (trainer.run_dir / "summary.json").unlink(missing_ok=True)
    trainer.console.print(f"resuming from {decision['path']} (step {trainer.step})")
    return True


def choose_checkpoint(trainer, resume: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state ((None, None): a fresh start, after clearing an
    unresumable partial run of the same config), or a CheckpointError when the directory must not
    be touched. (The CLI has refused finished and different runs already, before anything was
    written; the check is repeated for callers other than the CLI.)"""
    run_dir = trainer.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".msgrun_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"The run directory {run_dir} is not writable ({e.strerror}). Choose another with "
                              "hydra.run.dir=PATH (hydra.sweep.dir=PATH for multiruns).") from e
    this_config = config_json(trainer.cfg)
    state_of_dir = check_run_dir(run_dir, this_config)
    if state_of_dir == "finished":
        raise CheckpointError(finished_run_message(run_dir))
    had_logs = (run_dir / "metrics.jsonl").exists()
    path, state = (newest_loadable(run_dir, warn=trainer.console.print) if state_of_dir == "resume"
                   else (None, None))
    if path is None:
        if had_logs:
            trainer.console.print(f"warning: {run_dir} has no valid checkpoint; starting the run from scratch.")
        for name in ("metrics.jsonl", "growth.jsonl", "summary.json"):
            (run_dir / name).unlink(missing_ok=True)
        atomic_write(run_dir / "config.json", lambda f: f.write(this_config.encode()))
        return None, None
    if state["config"] != this_config:
        raise CheckpointError(different_run_message(run_dir))
    saved_world = len(state["rank_rng"])
    if saved_world != trainer.dist.world_size:
        raise CheckpointError(
            f"The run in {run_dir} was trained by {saved_world} process(es) and this command starts "
            f"{trainer.dist.world_size}: each rank's random state (dropout) is saved, so a run resumes only at the "
            f"same world size (torchrun --nproc_per_node={saved_world}). To change it, start a new run with "
            "hydra.run.dir=NEW_PATH.")
    if state["fingerprints"] != fingerprints(trainer):
        raise CheckpointError(
            f"The run in {run_dir} was trained on other data or with another tokenizer (fingerprints "
            f"{state['fingerprints']} then, {fingerprints(trainer)} now): the same config now reads different "
            "files. Restore the original data/tokenizer.json to resume, or start a new run with hydra.run.dir=NEW_PATH.")
    return path, state


def fingerprints(trainer) -> dict:
    return {"data": trainer.corpus.data_fingerprint, "tokenizer": trainer.corpus.tokenizer_fingerprint}


def restore(trainer, state: dict) -> None:
    args = ModelArgs(**state["model_args"])
    model = Transformer(args).to(trainer.device)
    model.load_state_dict(state["model"])
    trainer.engine.load_state_dict(state["engine"])
    trainer.engine.restore_ramp(model, state["engine"])
    trainer.model = model
    trainer.optimizer = build_adamw(model, trainer.cfg.train.lr, trainer.cfg.optim, trainer.device.type)
    distributed.load_optimizer_state(model, trainer.optimizer, state["optimizer"])
    trainer.lr_schedule.load_state_dict(state["lr_schedule"])
    c = state["counters"]
    trainer.step, trainer.tokens, trainer.flops, trainer.lr = c["step"], c["tokens"], c["flops"], c["lr"]
    trainer.wall.total = c["wall_time"]
    w = dict(state["window"])
    w["loss"] = torch.tensor(w["loss"], device=trainer.device)
    trainer.window = w
    trainer.last_val, trainer.last_record = state["last_val"], state["last_record"]
    trainer._warned_repeat = state["warned_repeat"]
    own = state["rank_rng"][trainer.dist.rank]  # the same world size (choose_checkpoint)
    torch.set_rng_state(own["torch"])
    if own["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda"])
    rng = state["rng"]
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
    trainer.init_gen.set_state(rng["init"])
