"""What a run directory holds, and what this command may write into it or remove from it.

Light on purpose (no torch): the CLI decides here whether a run directory can be used *before*
Hydra's records (.hydra/), the data preparation and the pre-flight, so a refused command costs
nothing and changes nothing. Two rules:

* A directory holding a finished run, or an unfinished run of another configuration, is refused.
  (The same configuration resumes: msgrun.checkpoint.)
* A refused command removes only what it created itself: the files it wrote and the directories
  Hydra made for it, never a directory that existed before the command, whatever it holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from msgrun.errors import CheckpointError, MsgrunError

# keys that may differ between the interrupted and the resuming command
# (eval: downstream evaluation reads the model and never changes training, so a resumed run may
# add or drop tasks)
# train.distributed: a run resumes in another mode and at another world size (checkpoint.py)
RESUME_FREE_KEYS = ("train.max_minutes", "train.threads", "train.preflight", "train.checkpoint_minutes",
                    "train.distributed", "logger", "eval")
# what msgrun itself writes into a run directory before the first training step
OWN_SETUP_FILES = (".hydra", "config.json")

# RUN mode: run directory -> the outermost directory this command created for it (None: the run
# directory existed already). Filled by msgrun.callbacks.OutputDirCheck before Hydra creates it.
CREATED_ROOT: dict[str, Path | None] = {}


LOCK_FILE = ".msgrun.lock"


class RunDirBusy(MsgrunError):
    """Another live process holds the run directory's lock: this command must write nothing there."""


def launching_rank() -> int:
    """This process's rank as its launcher set it (torchrun: RANK; SLURM tasks: SLURM_PROCID), before
    torch.distributed exists. Only rank 0 locks and writes the run directory's records."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


class RunDirLock:
    """An exclusive lock on a run directory, held for the whole run: two commands on one directory
    would otherwise resume from each other's checkpoints and rewind each other's metrics.jsonl.

    flock on .msgrun.lock: the kernel releases it when the holder dies (SIGKILL, OOM), so a stale
    file never blocks a rerun. The file records who holds it (pid, host, command) for the refusal
    message, and is removed on release so a finished run directory holds nothing of it. Removing a
    lock file lets a process that opened the old file lock an orphaned inode, so an acquirer
    re-checks that the path still names the file it locked and starts over when it does not."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunDirLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirBusy(self.busy_message()) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: nobody can lock this inode meanwhile
        os.close(self.fd)
        self.fd = None

    def busy_message(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            who = f"process {owner['pid']} on {owner['host']} (started {owner['since']}: {owner['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process (it has not recorded itself yet)"
        return (f"The run directory {self.path.parent} is in use by {who}. Two commands in one run directory would "
                "resume from each other's checkpoints and overwrite each other's metrics.jsonl, so this one writes "
                "nothing there. Wait for that process to end (rerunning this command afterwards resumes or refuses "
                "as usual), stop it, or write this run elsewhere with hydra.run.dir=NEW_PATH.")

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def comparable_config(cfg) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUME_FREE_KEYS:
        parts = key.split(".")
        node = c
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    return c


def config_json(cfg) -> str:
    """The configuration that identifies a run (config.json, and every checkpoint's copy)."""
    return json.dumps(comparable_config(cfg), sort_keys=True)


def first_missing(path: Path) -> Path | None:
    """The outermost directory that creating `path` would create (None: it exists)."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def holds_run(run_dir: Path) -> bool:
    return ((run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("step_*.pt"))
            or any((run_dir / "checkpoints").glob("step_*.dcp")))


def is_finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def check_run_dir(run_dir: Path, this_config: str) -> str:
    """Whether this command may train in `run_dir`: "new" (nothing of a run there), "resume" (an
    unfinished run of this configuration) or "finished" (this configuration, already finished: a
    sweep rerun skips it). Raises CheckpointError for a run of another configuration, finished or
    not."""
    run_dir = Path(run_dir)
    stored = (run_dir / "config.json").read_text() if (run_dir / "config.json").is_file() else None
    finished = is_finished(run_dir)
    if finished and stored != this_config:
        raise CheckpointError(finished_run_message(run_dir))
    if finished:
        return "finished"
    if not holds_run(run_dir):
        return "new"
    if stored is not None and stored != this_config:
        raise CheckpointError(different_run_message(run_dir))
    return "resume"


def finished_run_message(run_dir: Path) -> str:
    return (f"The run directory {run_dir} holds a finished run (summary.json says completed); msgrun never "
            "overwrites one. To train again, write elsewhere with hydra.run.dir=NEW_PATH; to train longer, "
            "start a new run from scratch with a larger budget.")


def different_run_message(run_dir: Path) -> str:
    return (f"The run directory {run_dir} holds a different run (its configuration differs from this command's). "
            "msgrun never overwrites one: rerun the original command to resume it, or write this run elsewhere "
            "with hydra.run.dir=NEW_PATH.")


def write_hydra_record(run_dir: Path, task_cfg) -> None:
    """Write Hydra's record of the job (.hydra/config.yaml, hydra.yaml, overrides.yaml) unless the
    directory has one: a resume keeps the original command's record. (conf/config.yaml sets
    hydra.output_subdir=null so Hydra does not write it before msgrun has checked the directory.)"""
    from hydra.core.hydra_config import HydraConfig

    record = Path(run_dir) / ".hydra"
    if record.exists():
        return
    hydra_cfg = HydraConfig.instance().cfg
    record.mkdir(parents=True)
    OmegaConf.save(task_cfg, record / "config.yaml")
    OmegaConf.save(hydra_cfg, record / "hydra.yaml")
    OmegaConf.save(hydra_cfg.hydra.overrides.task, record / "overrides.yaml")


def remove_own_setup(dirs: list[Path], existed: dict, created: dict, lock: RunDirLock | None = None) -> None:
    """After a refusal before the first step: remove the setup files this command wrote in each of
    `dirs` (seed directories before their parent), release the lock, then remove the directories
    Hydra created for it (run directory and new parents), each only if empty. Nothing that existed
    before the command is touched. The files go while the lock is held (another command could
    write its own .hydra/ as soon as it is free); the lock file must be gone before a directory
    can be removed."""
    import shutil

    for d in dirs:
        d = Path(d)
        if holds_run(d) and not ({"metrics.jsonl", "checkpoints"} & existed[d]):
            continue  # training started: what it wrote is the run's record
        for name in OWN_SETUP_FILES:
            if name not in existed[d]:
                path = d / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    if lock is not None:
        lock.release()
    for d in dirs:
        root = created[d]
        if root is None:
            continue
        d = Path(d).absolute()
        while True:
            try:
                d.rmdir()  # only if empty
            except OSError:
                break
            if d == root or root not in d.parents:
                break
            d = d.parent
