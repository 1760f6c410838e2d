"""What every part of msgrun.data shares: its error type, short hashes and atomic file writes."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Callable

from msgrun.errors import MsgrunError


class DataError(MsgrunError, ValueError):
    """The data configuration cannot produce a corpus (missing files, empty corpus, bad tokenizer,
    corrupt shard)."""


def _hash(data: bytes, n: int = 8) -> str:
    return hashlib.blake2b(data, digest_size=n).hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


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


def _atomic_write(path: str, write: Callable, first_wins: bool = False) -> None:
    """write(f) into a temp file beside path, then move it into place: a killed run leaves at
    most a stray temp file, never a truncated cache entry."""
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
