"""Files that are either complete or absent: the one atomic-write helper every part of msgrun uses
(checkpoints, summaries, data caches, shards' manifests)."""

from __future__ import annotations

import os
import uuid
from typing import Callable


def temp_path(path: str) -> str:
    """A name beside `path` that no other process uses and no shard glob matches."""
    d, name = os.path.split(path)
    return os.path.join(d, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _publish(tmp: str, path: str, first_wins: bool) -> None:
    """Move a finished temp file into place. first_wins: if another run already published this
    path, keep theirs (every racer then reads the same file back); otherwise replace it."""
    try:
        if first_wins:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path, write: Callable, first_wins: bool = False) -> None:
    """write(f) (a binary file) into a temp file beside path, fsync it, then move it into place
    and fsync the directory: a killed or failed write leaves `path` as it was (at most a stray
    temp file after a SIGKILL), never a truncated file. Temp names are unique per process, so
    two writers never share one."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _publish(tmp, path, first_wins)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path) -> None:
    """Make a rename in `path` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
