"""What every part of msgrun.data shares: its error type, short hashes and atomic file writes
(msgrun/files.py)."""

from __future__ import annotations

import hashlib

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
