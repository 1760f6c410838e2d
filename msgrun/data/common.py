"""What every part of msgrun.data shares: its error type, short hashes and atomic file writes
(msgrun/files.py)."""

from __future__ import annotations

import errno
import hashlib
import os

from msgrun.errors import MsgrunError
from msgrun.files import atomic_write as _atomic_write  # noqa: F401 - data's name for it
from msgrun.files import temp_path  # noqa: F401


class DataError(MsgrunError, ValueError):
    """The data configuration cannot produce a corpus (missing files, empty corpus, bad tokenizer,
    corrupt shard)."""


def _hash(data: bytes, n: int = 8) -> str:
    return hashlib.blake2b(data, digest_size=n).hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def broken_link(path: str) -> str | None:
    """Why a path that glob or os.walk lists (they list links without following them) cannot be
    opened: a dangling symbolic link or a loop of links; None when it can be (or is no link).
    Leaving such a file out silently would train on less data than the user listed."""
    try:
        os.stat(path)
        return None
    except OSError as e:
        if not os.path.islink(path):
            return None
        target = os.readlink(path)
        if e.errno == errno.ELOOP:
            return f"is a symbolic link to {target!r} that leads back to itself (a loop of links)"
        return f"is a symbolic link to {target!r}, which does not exist"
