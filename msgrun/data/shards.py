"""Token shards on disk: the formats msgrun reads and writes, memory-mapped, never loaded whole.

Formats, recognised by their first bytes:

* llm.c / modded-nanogpt (how FineWeb-10B is commonly distributed): a header of 256
  little-endian int32 (magic 20240520, version, token count), then the tokens: version 1 holds
  uint16 tokens (GPT-2), version 2 uint32 (llm.c's LLaMA-3 files).
* msgrun's own, written by `msgrun-prepare` and by the token cache: the 8 bytes ``msgrunTK``,
  a uint32 version, a uint32 length, then that many bytes of JSON describing the shard (dtype,
  token and document counts, largest id, eot id, tokenizer and data fingerprints), all inside a
  1,024-byte header; then the tokens; then one int64 start offset per document.
* headerless (nanoGPT's train.bin / val.bin): read only when data.raw_dtype says so, since
  nothing in such a file can be checked.

A shard is written to a temporary name and renamed when complete, so a killed writer never
leaves a file that looks like a shard. `Tokens` is the concatenation of a split's shards,
addressed by token index; the training stream reads it by index (msgrun.data.stream).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from msgrun.data.common import DataError, _atomic_write, _hash, temp_path

LLMC_MAGIC = 20240520
LLMC_VERSIONS = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
MSGRUN_MAGIC = b"msgrunTK"
MSGRUN_VERSION = 1
HEADER_BYTES = 1024  # both formats: the tokens start at byte 1,024
RAW_DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
_SCAN_BLOCK = 1 << 25  # bytes per read when scanning for the largest id: bounded memory


@dataclass
class Shard:
    path: str
    format: str  # llmc | msgrun | raw
    dtype: np.dtype
    offset: int  # byte offset of the first token
    tokens: int
    docs: Optional[int] = None  # msgrun: document start offsets follow the tokens
    max_id: Optional[int] = None  # msgrun: recorded by the writer; other formats are scanned
    eot_id: Optional[int] = None
    tokenizer_fingerprint: Optional[str] = None
    data_fingerprint: Optional[str] = None

    def memmap(self) -> np.ndarray:
        """The tokens as a read-only array over a memory map of the file. The stream reads chunks
        of a few hundred tokens at random places, so the map is advised MADV_RANDOM: without it the
        kernel reads ahead ~128 KiB per chunk (IO amplified 50-500x on a cold corpus) and maps
        neighbouring cached pages into the process on every fault (RSS that follows the page cache)."""
        if self.tokens == 0:
            return np.zeros(0, self.dtype)
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):  # Linux and macOS; elsewhere the default advice
            mm.madvise(mmap.MADV_RANDOM)
        return np.frombuffer(mm, dtype=self.dtype, count=self.tokens, offset=self.offset)

    def doc_starts(self) -> Optional[np.ndarray]:
        if self.docs is None:
            return None
        if self.docs == 0:
            return np.zeros(0, np.int64)
        return np.memmap(self.path, dtype=np.int64, mode="r", shape=(self.docs,),
                         offset=self.offset + self.tokens * self.dtype.itemsize)


def _bad(key: str, path: str, what: str) -> DataError:
    return DataError(f"{key}: {path} {what}")


def read_shard(path: str, key: str = "data.train", raw_dtype: Optional[str] = None) -> Shard:
    """The shard at `path`, its header checked against its size. Raises DataError naming `key`
    for an unknown magic or version, or a file shorter or longer than its header says."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise _bad(key, path, f"cannot be read: {e.strerror or e}.") from e
    if raw_dtype is not None:
        if raw_dtype not in RAW_DTYPES:
            raise DataError(f"data.raw_dtype={raw_dtype!r}: choose one of {list(RAW_DTYPES)} "
                            "(or null for files with an llm.c or msgrun header).")
        dtype = RAW_DTYPES[raw_dtype]
        if size % dtype.itemsize:
            raise _bad(key, path, f"has {size} bytes, not a whole number of {raw_dtype} tokens: it is "
                                  "truncated, or not a headerless token file of that dtype (data.raw_dtype).")
        return Shard(path, "raw", dtype, 0, size // dtype.itemsize)
    if head[:8] == MSGRUN_MAGIC:
        version, length = struct.unpack("<II", head[8:16])
        if version != MSGRUN_VERSION:
            raise _bad(key, path, f"is a msgrun shard of format version {version}; this msgrun reads "
                                  f"version {MSGRUN_VERSION}. Prepare it again with this msgrun-prepare.")
        try:
            meta = json.loads(head[16:16 + length].decode("utf-8"))
            if meta["dtype"] not in RAW_DTYPES:  # e.g. float16: its bit patterns would be read as ids
                raise ValueError(f"dtype {meta['dtype']!r}, and token ids are one of {list(RAW_DTYPES)}")
            dtype = np.dtype(meta["dtype"])
            shard = Shard(path, "msgrun", dtype, HEADER_BYTES, int(meta["tokens"]), int(meta["docs"]),
                          meta.get("max_id"), meta.get("eot_id"), meta.get("tokenizer_fingerprint"),
                          meta.get("data_fingerprint"))
        except (ValueError, KeyError, TypeError) as e:
            raise _bad(key, path, f"has a corrupt msgrun header ({e}).") from e
        expected = HEADER_BYTES + shard.tokens * dtype.itemsize + shard.docs * 8
    elif len(head) >= 12 and struct.unpack("<i", head[:4])[0] == LLMC_MAGIC:
        version, count = struct.unpack("<ii", head[4:12])
        if version not in LLMC_VERSIONS:
            raise _bad(key, path, f"is an llm.c shard of version {version}; msgrun reads versions "
                                  f"{sorted(LLMC_VERSIONS)} (1: uint16 tokens, 2: uint32).")
        dtype = LLMC_VERSIONS[version]
        shard = Shard(path, "llmc", dtype, HEADER_BYTES, count)
        expected = HEADER_BYTES + count * dtype.itemsize
    else:
        raise _bad(key, path, "is not a token shard: it starts with neither llm.c's magic number "
                              f"{LLMC_MAGIC} nor msgrun's {MSGRUN_MAGIC.decode()!r}. A headerless nanoGPT "
                              "train.bin/val.bin is read only when asked: data.raw_dtype=uint16 (or uint32).")
    if size < expected:
        raise _bad(key, path, f"is truncated: its header promises {shard.tokens:,} tokens "
                              f"({expected:,} bytes) and the file has {size:,} bytes. Copy or prepare it again.")
    if size > expected:
        raise _bad(key, path, f"has {size - expected:,} bytes more than its header's {shard.tokens:,} "
                              "tokens account for: it is not a shard of this format, or it is corrupt.")
    return shard


def scan_max_id(shard: Shard, cache_dir: Optional[str]) -> int:
    """The largest token id in a shard whose header does not record it. The file is read in
    blocks (not through the memory map, which would leave it all resident in this process) once,
    and the answer is cached by (path, size, mtime)."""
    if shard.max_id is not None:
        return int(shard.max_id)
    st = os.stat(shard.path)
    # ctime and inode too: copying with preserved times (cp -p, rsync -t) or `touch -r` keeps size
    # and mtime, but no user can set ctime, and a replaced file has a new inode
    key = _hash(f"{os.path.realpath(shard.path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0"
                f"{shard.offset}\0{shard.dtype}".encode())
    cached = os.path.join(cache_dir, "shard-scans", f"{key}.json") if cache_dir else None
    if cached and os.path.isfile(cached):
        try:
            with open(cached) as f:
                return int(json.load(f)["max_id"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable: scan again
    top = -1
    with open(shard.path, "rb") as f:
        f.seek(shard.offset)
        left = shard.tokens * shard.dtype.itemsize
        while left > 0:
            block = f.read(min(_SCAN_BLOCK, left))
            if not block:
                break
            left -= len(block)
            top = max(top, int(np.frombuffer(block, dtype=shard.dtype).max()))
    if cached:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        blob = json.dumps({"path": shard.path, "max_id": top}).encode()
        _atomic_write(cached, lambda f: f.write(blob))
    return top


def sample_fingerprint(shards: Sequence[Shard]) -> str:
    """Identifies a set of shards without reading them whole: per file its name, format, dtype,
    token count, and the first and last 64 KiB of its tokens."""
    h = hashlib.blake2b(digest_size=8)
    for s in shards:
        h.update(f"{os.path.basename(s.path)}\0{s.format}\0{s.dtype}\0{s.tokens}\n".encode())
        n = s.tokens * s.dtype.itemsize
        with open(s.path, "rb") as f:
            f.seek(s.offset)
            h.update(f.read(min(n, 1 << 16)))
            if n > 1 << 16:
                f.seek(s.offset + max(n - (1 << 16), 1 << 16))
                h.update(f.read(1 << 16))
    return h.hexdigest()


class ShardWriter:
    """Writes one msgrun shard: documents are appended to a temporary file as they come (memory
    stays bounded by one document), and `close` writes the document offsets and the header, then
    renames the file into place."""

    def __init__(self, path: str, dtype, meta: dict):
        self.path, self.dtype, self.meta = path, np.dtype(dtype), dict(meta)
        self.tmp = temp_path(path)
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER_BYTES)
        self.tokens, self.max_id, self.starts = 0, -1, []

    def add(self, ids: np.ndarray) -> None:
        """One document's ids (with its eot, if any)."""
        self.starts.append(self.tokens)
        if len(ids):
            self.f.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
            self.tokens += len(ids)
            self.max_id = max(self.max_id, int(ids.max()))

    def close(self) -> Shard:
        meta = {**self.meta, "dtype": self.dtype.name, "tokens": self.tokens, "docs": len(self.starts),
                "max_id": self.max_id}
        blob = json.dumps(meta, sort_keys=True).encode("utf-8")
        if 16 + len(blob) > HEADER_BYTES:
            raise ValueError(f"shard description too long for the header: {blob!r}")
        try:
            self.f.write(np.asarray(self.starts, dtype=np.int64).tobytes())
            self.f.seek(0)
            self.f.write(MSGRUN_MAGIC + struct.pack("<II", MSGRUN_VERSION, len(blob)) + blob)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)  # same inputs give the same bytes: replacing a racer's file is harmless
        except BaseException:
            self.abort()
            raise
        return read_shard(self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class Tokens:
    """A split's tokens: the concatenation of its shards (memory maps, or arrays in tests),
    addressed by token index. Reading copies only what is asked for."""

    def __init__(self, parts: Sequence[np.ndarray], shards: Sequence[Shard] = ()):
        self.parts = [np.asarray(p).reshape(-1) for p in parts]  # views: a memory map stays one
        self.bounds = np.concatenate([[0], np.cumsum([len(p) for p in self.parts], dtype=np.int64)])
        self.dtype = np.result_type(*[p.dtype for p in self.parts]) if self.parts else np.dtype(np.uint16)
        self.shards = list(shards)
        # (vocabulary size, where it comes from): every read checks its ids against it. The check
        # before training trusts a msgrun header's max_id and the scan cache; a lying header or a
        # file changed under the cache would otherwise reach the embedding as an index error
        # (a device-side assert on a GPU).
        self.limit: Optional[tuple[int, str]] = None

    @classmethod
    def open(cls, shards: Sequence[Shard]) -> "Tokens":
        return cls([s.memmap() for s in shards], shards)

    @property
    def doc_starts(self) -> Optional[np.ndarray]:
        """int64 start of each document, where every shard records them (built on request: it
        grows with the corpus, so nothing in training holds it)."""
        starts = [s.doc_starts() for s in self.shards]
        if not starts or any(d is None for d in starts):
            return None
        return np.concatenate([np.asarray(d, dtype=np.int64) + b for d, b in zip(starts, self.bounds[:-1])])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def size(self) -> int:
        return len(self)

    def read(self, start: int, n: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Tokens [start, start + n), across shard boundaries if need be."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"read({start}, {n}) outside {len(self)} tokens")
        if out is None:
            out = np.empty(n, dtype=self.dtype)
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        done = 0
        while done < n:
            part = self.parts[i]
            pos = start + done - int(self.bounds[i])
            take = min(n - done, len(part) - pos)
            out[done:done + take] = part[pos:pos + take]
            if self.limit is not None and take and out[done:done + take].max() >= self.limit[0]:
                self._id_error(i, pos, out[done:done + take])
            done += take
            i += 1
        return out

    def _id_error(self, i: int, pos: int, got: np.ndarray) -> None:
        where = self.shards[i].path if i < len(self.shards) else f"part {i}"
        k = int(np.argmax(got >= self.limit[0]))
        recorded = self.shards[i].max_id if i < len(self.shards) else None
        why = (f"its msgrun header says the largest id is {recorded}, which is false: the file is corrupt"
               if recorded is not None else "the file changed after its ids were checked (the scan is cached "
               "under data.cache_dir/shard-scans by path, size and times)")
        raise DataError(f"{where} holds token id {int(got[k])} at token {pos + k:,}, not below {self.limit[1]}; "
                        f"{why}. Prepare or copy the shard again, or give the right data.vocab_size or "
                        "data.tokenizer_path.")

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.read(start, max(stop - start, 0))
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            return self.read(k, 1)[0]
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class SplitWriter:
    """One split's shards, written in sequence: a shard is closed (and renamed into place) at the
    first document boundary at or past shard_tokens tokens (None: a single shard). Documents
    are never cut across shards, so "documents before index i are in finished shards" is a
    resumable position (msgrun.data.prepare)."""

    def __init__(self, out_dir: str, split: str, dtype, meta: dict, shard_tokens: Optional[int] = None,
                 first_index: int = 0, on_shard=None):
        self.out_dir, self.split, self.dtype, self.meta = out_dir, split, dtype, meta
        self.shard_tokens, self.index, self.on_shard = shard_tokens, first_index, on_shard
        self.current: Optional[ShardWriter] = None
        self.tokens = 0  # in this writer's finished and open shards

    def add(self, ids: np.ndarray, doc_index: int = 0) -> None:
        if self.current is None:
            self.current = ShardWriter(os.path.join(self.out_dir, shard_name(self.split, self.index)),
                                       self.dtype, {**self.meta, "split": self.split, "index": self.index})
        self.current.add(ids)
        self.tokens += len(ids)
        if self.shard_tokens and self.current.tokens >= self.shard_tokens:
            self._finish(doc_index + 1)

    def _finish(self, next_doc: int) -> None:
        shard = self.current.close()
        self.current = None
        self.index += 1
        if self.on_shard is not None:
            self.on_shard(self.split, shard, next_doc)

    def close(self, next_doc: int = 0) -> None:
        """Publish the last, partly filled shard (if any document went into it)."""
        if self.current is not None:
            self._finish(next_doc)

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None
