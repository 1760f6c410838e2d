"""Checkpoints that resume a run exactly, and run directories that are never damaged.

A checkpoint holds everything the next step depends on: the model at its *current* shape and
its optimizer state, the LR schedule, the counters, every RNG (torch, CUDA, numpy, python, and
the init generator that future growth events draw new weights from), the growth state (stages
done, an ongoing MSG ramp, the RaPTr path length), the partial logging window, and the resolved
config. Files are written atomically (temporary file, fsync, rename) with a SHA-256 sidecar; a
checkpoint whose bytes do not match, or which matches but does not load, is skipped for the
previous one.

Two formats, one restore path (`restore_tensors`):

* `step_N.pt` (train.distributed=none or ddp): one file, full tensors, written by rank 0.
* `step_N.dcp/` (train.distributed=fsdp): a torch.distributed.checkpoint directory. Every rank
  writes its own shards of the model and of the AdamW moments (`__R_0.distcp`); rank 0 writes
  DCP's `.metadata` and `trainer.pt`, the rest of the state (counters, RNGs, growth state) with a
  SHA-256 sidecar. The directory is written as a temporary directory and renamed into place
  after every rank has finished, so it is complete or absent; on load, every shard file that
  DCP's metadata names must be present and long enough.

Either format restores at any world size and in any mode: the trainer builds the model at the
checkpoint's shape, shards it if it runs FSDP, allocates the optimizer state the checkpoint
has, and `restore_tensors` fills those tensors in place (DCP reshards; a single file is sliced
into each rank's shards). No rank ever holds more than its own shards of a sharded checkpoint. A write that fails (disk full, a file-size limit) removes its temporary file, keeps
the previous checkpoints and ends the run with one paragraph. Loading uses
`torch.load(weights_only=True)`, so a checkpoint cannot execute code.

Resuming truncates metrics.jsonl and growth.jsonl to what the checkpoint had logged, so a
resumed run's files equal an uninterrupted run's.

This module handles files only: the trainer assembles its state (Trainer.state_dict, a dict of
named states: the model's, the optimizer's, the LR schedule's, the growth engine's, the counters,
the RNGs) and loads it back (Trainer.load_state_dict); nothing here reads the trainer.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from msgrun import distributed
from msgrun.errors import CheckpointError
from msgrun.files import atomic_write, fsync_dir
from msgrun.rundir import check_run_dir, different_run_message, finished_run_message


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SHARDED = ".dcp"  # the directory suffix of a torch.distributed.checkpoint checkpoint
TRAINER_FILE = "trainer.pt"  # inside it: everything but the model's and optimizer's tensors


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split(".")[0].split("_")[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Every finished checkpoint of either format, oldest first (temporary ones start with a dot)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.glob("step_*.pt") if p.is_file()] + [p for p in d.glob(f"step_*{SHARDED}") if p.is_dir()]
    return sorted(found, key=checkpoint_step)


def is_sharded(path: Path) -> bool:
    return Path(path).suffix == SHARDED


def sidecar_file(path: Path) -> Path:
    """The file whose SHA-256 sidecar vouches for a checkpoint (a sharded one's trainer state)."""
    return Path(path) / TRAINER_FILE if is_sharded(path) else Path(path)


def checksum(path: Path) -> str:
    """The recorded SHA-256 that identifies a checkpoint (train.branch_from records it)."""
    f = sidecar_file(path)
    return f.with_name(f.name + ".sha256").read_text().strip()


def missing_shards(path: Path) -> str | None:
    """Why a sharded checkpoint's tensor files do not match DCP's metadata (None: they do). Checks
    presence and length of every byte range the metadata names, not the bytes themselves: hashing
    every shard of a large model on each resume would cost as much as reading it."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - absent or unreadable metadata: the write never finished
        return f"has no readable DCP metadata ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = Path(path) / name
        if not f.is_file():
            return f"lacks its shard file {name}"
        if f.stat().st_size < size:
            return f"has a truncated shard file {name} ({f.stat().st_size} of {size} bytes)"
    return None


def is_valid(path: Path) -> bool:
    """The bytes match the SHA-256 sidecar, and a sharded checkpoint's shard files match DCP's
    metadata (necessary, not sufficient: see open_checkpoint)."""
    f = sidecar_file(path)
    side = f.with_name(f.name + ".sha256")
    if not (f.is_file() and side.exists() and side.read_text().strip() == sha256(f)):
        return False
    return not is_sharded(path) or missing_shards(path) is None


def load(path: Path, mmap: bool = False) -> dict:
    """A checkpoint's state: with its tensors (single file), or without them (sharded: `sharded`
    names the directory that `restore_tensors` reads them from)."""
    if is_sharded(path):
        state = torch.load(Path(path) / TRAINER_FILE, map_location="cpu", weights_only=True)
        return {**state, "sharded": str(path)}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def open_checkpoint(path: Path, mmap: bool = False) -> tuple[dict | None, str | None]:
    """The one test of a good checkpoint (resume, retention and export all ask here): its bytes
    match its sidecar *and* it loads as a msgrun checkpoint. A file can match its sidecar and
    still not load: written by another torch, damaged before its sidecar was computed, or
    replaced together with it. Returns (state, None), or (None, why not). mmap=True maps the
    tensors instead of reading them, so checking a large checkpoint costs little."""
    if is_sharded(path) and missing_shards(path):
        return None, f"is incomplete: it {missing_shards(path)}"
    if not is_valid(path):
        return None, "is corrupt or incomplete (checksum mismatch)"
    try:
        state = load(path, mmap=mmap)
        state["counters"]["step"], state["model_args"], optimizer_keys(state)  # noqa: B018 - a msgrun checkpoint?
        if "sharded" not in state:
            state["model"]  # noqa: B018
    except Exception as e:  # noqa: BLE001 - any failure to read it means it is not a usable checkpoint
        return None, f"does not load ({type(e).__name__}: {str(e)[:200]})"
    return state, None


def newest_loadable(run_dir: Path, warn=print, mmap: bool = False) -> tuple[Path | None, dict | None]:
    """The newest good checkpoint (open_checkpoint) and its state; each newer one is warned about."""
    for path in reversed(list_checkpoints(run_dir)):
        state, why = open_checkpoint(path, mmap=mmap)
        if state is not None:
            return path, state
        warn(f"warning: checkpoint {path} {why}; trying the previous one.")
    return None, None


def newest_valid(run_dir: Path, warn=print) -> Path | None:
    return newest_loadable(run_dir, warn, mmap=True)[0]


def last_good_message(run_dir: Path) -> str:
    good = newest_valid(run_dir, warn=lambda *_: None)
    return f"The last good checkpoint is {good}." if good else "No checkpoint has been written yet."


def checkpoint_path(run_dir: Path, step: int, sharded: bool = False) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:09d}{SHARDED if sharded else '.pt'}"


def optimizer_keys(state: dict) -> dict[str, list[str]]:
    """The parameters that have AdamW state in a checkpoint, and their state's keys."""
    if "optimizer_keys" in state:
        return state["optimizer_keys"]
    return {name: list(entry) for name, entry in state["optimizer"].items()}


def _with_log_lines(run_dir: Path, state: dict) -> dict:
    return {"format": 1, **state,
            "log_lines": {"metrics": count_lines(run_dir / "metrics.jsonl"),
                          "growth": count_lines(run_dir / "growth.jsonl")}}


def _write_failed(path: Path, run_dir: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Could not write checkpoint {path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}). The "
        f"disk may be full or a file-size limit (ulimit -f) reached; the previous checkpoints are kept. "
        f"{last_good_message(run_dir)} Free space or raise the limit, then rerun the same command to resume.")


def save(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` (the trainer's named states, full tensors) as the single-file checkpoint of
    `step`, with the number of log lines written so far, and keep the newest `keep` valid ones;
    returns its path. Rank 0 only (the state was gathered on every rank)."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(exist_ok=True)
    state = _with_log_lines(run_dir, state)
    side = path.with_name(path.name + ".sha256")
    written = False
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        written = True
        atomic_write(side, lambda f: f.write(sha256(path).encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (EFBIG, ENOSPC) as RuntimeError
        if written:  # this write replaced the file; without its sidecar it would only be skipped
            path.unlink(missing_ok=True)
        raise _write_failed(path, run_dir, e) from e
    _retain(run_dir, keep)
    return path


def save_sharded(run_dir: Path, step: int, state: dict, tensors: dict, keep: int, dist) -> Path:
    """Write the sharded checkpoint of `step` (a collective: every rank calls it). `tensors` holds
    this rank's shards ({"model": ..., "optimizer": {name: {key: tensor}}}); `state`, the rest,
    is the same on every rank and rank 0 writes it. Everything goes into a temporary directory
    that rank 0 renames into place once every rank's write has succeeded: a killed or failed
    write leaves at most a dot-directory, which the next save removes."""
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, step, sharded=True)
    tmp = path.with_name(f".{path.name}.tmp")
    error = None
    if dist.rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".step_*{SHARDED}.tmp"):  # left by a killed write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    _agree(error, path, run_dir, dist, tmp)
    try:
        # single_file_per_rank: one file per rank, written in parallel; sync_files fsyncs each
        with warnings.catch_warnings():  # one process writing a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, no_dist=not dist.enabled,
                     storage_writer=dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True))
    except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException on every rank when one fails
        error = e
    if error is None and dist.rank == 0:
        try:
            trainer = tmp / TRAINER_FILE
            full = _with_log_lines(run_dir, {**state, "world_size": dist.world_size})
            atomic_write(trainer, lambda f: torch.save(full, f))
            atomic_write(trainer.with_name(TRAINER_FILE + ".sha256"), lambda f: f.write(sha256(trainer).encode()))
            fsync_dir(tmp)
            if path.exists():  # the same step written again (a rerun): replace it as a whole
                shutil.rmtree(path)
            os.rename(tmp, path)
            fsync_dir(path.parent)
        except OSError as e:
            error = e
    _agree(error, path, run_dir, dist, tmp)
    if dist.rank == 0:
        _retain(run_dir, keep)
    return path


def _agree(error: BaseException | None, path: Path, run_dir: Path, dist, tmp: Path) -> None:
    """Every rank learns whether any rank failed (a collective), so all raise or none does."""
    errors = distributed.all_gather(None if error is None else f"{type(error).__name__}: {error}", dist)
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        if dist.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(path, run_dir, error or RuntimeError(failed))


def _retain(run_dir: Path, keep: int) -> None:
    good = [p for p in list_checkpoints(run_dir) if open_checkpoint(p, mmap=True)[0] is not None]
    for old in good[:-max(1, keep)]:  # never delete the newest good ones (the only good one included)
        remove(old)


def restore_tensors(state: dict, targets: dict) -> None:
    """Fill `targets` ({"model": {name: tensor}, "optimizer": {name: {key: tensor}}}, allocated at
    the checkpoint's shapes: plain tensors, or DTensor shards under FSDP) in place from a
    checkpoint of either format, saved at any world size. The one restore path: resume, branch
    and export all come through here."""
    if "sharded" in state:
        import torch.distributed.checkpoint as dcp
        import torch.distributed as torch_dist

        # DCP reads only the byte ranges that overlap each target shard, whatever the saving ranks
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=dcp.FileSystemReader(state["sharded"]),
                     no_dist=not torch_dist.is_initialized())
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    sources = {"model": state["model"], "optimizer": state["optimizer"]}
    for group, entries in targets.items():
        for name, target in _flat(entries):
            source = _lookup(sources[group], name)
            if isinstance(target, DTensor):  # this rank's slice of the full tensor (a collective)
                # src_data_rank=None: every rank read the same file, so no rank sends anything
                target.to_local().copy_(distribute_tensor(source.to(target.device), target.device_mesh,
                                                          target.placements, src_data_rank=None).to_local())
            else:
                target.copy_(source)


def _flat(entries: dict, prefix: tuple = ()):
    for k, v in entries.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _lookup(tree: dict, keys: tuple):
    for k in keys:
        tree = tree[k]
    return tree


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


def prepare_run_dir(run_dir: Path, config: str, data_fingerprints: dict, dist, log) -> dict | None:
    """Decide between a fresh start and a resume, refusing anything that would damage an existing
    run; on resume, return the newest good checkpoint's state (None: a fresh start) after cutting
    the logs back to it. Rank 0 decides and every rank follows (an error on rank 0 is raised on
    every rank, so none waits forever)."""
    decision, state = None, None
    if dist.rank == 0:
        try:
            path, state = choose_checkpoint(run_dir, config, data_fingerprints, log)
            decision = {"path": None if path is None else str(path)}
        except CheckpointError as e:
            decision = {"error": str(e)}
    decision = distributed.broadcast(decision, dist)
    if "error" in decision:
        raise CheckpointError(decision["error"])
    if decision["path"] is None:
        return None
    state = state if state is not None else load(decision["path"])
    if dist.rank == 0:
        truncate_lines(run_dir / "metrics.jsonl", state["log_lines"]["metrics"])
        truncate_lines(run_dir / "growth.jsonl", state["log_lines"]["growth"])
        (run_dir / "summary.json").unlink(missing_ok=True)
    log(f"resuming from {decision['path']} (step {state['counters']['step']})")
    return state


def choose_checkpoint(run_dir: Path, this_config: str, data_fingerprints: dict, log) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state ((None, None): a fresh start, after clearing an
    unresumable partial run of the same config), or a CheckpointError when the directory must not
    be touched. (The CLI has refused finished and different runs already, before anything was
    written; the check is repeated for callers other than the CLI.)"""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".msgrun_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"The run directory {run_dir} is not writable ({e.strerror}). Choose another with "
                              "hydra.run.dir=PATH (hydra.sweep.dir=PATH for multiruns).") from e
    state_of_dir = check_run_dir(run_dir, this_config)
    if state_of_dir == "finished":
        raise CheckpointError(finished_run_message(run_dir))
    had_logs = (run_dir / "metrics.jsonl").exists()
    path, state = newest_loadable(run_dir, warn=log) if state_of_dir == "resume" else (None, None)
    if path is None:
        if had_logs:
            log(f"warning: {run_dir} has no valid checkpoint; starting the run from scratch.")
        for name in ("metrics.jsonl", "growth.jsonl", "summary.json"):
            (run_dir / name).unlink(missing_ok=True)
        atomic_write(run_dir / "config.json", lambda f: f.write(this_config.encode()))
        return None, None
    if state["config"] != this_config:
        raise CheckpointError(different_run_message(run_dir))
    if state["fingerprints"] != data_fingerprints:
        raise CheckpointError(
            f"The run in {run_dir} was trained on other data or with another tokenizer (fingerprints "
            f"{state['fingerprints']} then, {data_fingerprints} now): the same config now reads different "
            "files. Restore the original data/tokenizer.json to resume, or start a new run with hydra.run.dir=NEW_PATH.")
    return path, state


def rng_state(init_gen: torch.Generator, dist) -> dict:
    """Every generator the run draws from: the global ones per rank (dropout masks are seeded per
    rank; gathered, a collective), numpy's and python's, and the init generator that future growth
    events draw new weights from."""
    rank_rng = distributed.all_gather(
        {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        dist)
    np_state = np.random.get_state()
    return {"rank_rng": rank_rng,
            "rng": {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate(),
                    "init": init_gen.get_state()}}


def load_rng_state(state: dict, init_gen: torch.Generator, dist, seed: int) -> None:
    """Restore every generator. The shared ones (numpy, python, init) come back as saved whatever
    the world size. The per-rank global generators (dropout) come back as saved at the same
    world size; at another world size a rank's generator has no saved counterpart (each rank's
    share of the batch changes too), so every rank reseeds from (train.seed, rank, world size,
    step): a resume at M ranks is reproducible, but its dropout masks are not the N-rank run's."""
    if len(state["rank_rng"]) == dist.world_size:
        own = state["rank_rng"][dist.rank]
        torch.set_rng_state(own["torch"])
        if own["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["cuda"])
    else:
        stream = f"dropout/rank{dist.rank}/world{dist.world_size}/resumed-at{state['counters']['step']}"
        torch.manual_seed(distributed.seed_for(seed, stream))  # seeds CUDA's generators too
    rng = state["rng"]
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in rng["python"]))
    init_gen.set_state(rng["init"])
