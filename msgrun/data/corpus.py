"""A run's corpus: its training and validation tokens (memory-mapped shards), vocabulary and
fingerprints, from a text source (encoded once into msgrun shards in the cache) or from shards
on disk (data=shards).

One reading path: every corpus is read from shards. A text source (pystdlib, pysite, files, hf)
is listed, split, tokenized and written as one msgrun shard per split into the cache, then
memory-mapped like any shard set, so the default job and a FineWeb run share the stream, the
checks and the loader. Cache layout under cfg.cache_dir (every file is written to a temp file
and renamed into place, so a killed run leaves no half-written file and racing runs of a sweep
are safe):

    <data_fp>/bpe-<vocab>/tokenizer.json
    <data_fp>/shards-<tokenizer_fp>/{train,val}_000000.bin, manifest.json
    shard-scans/<key>.json          the largest id of an llm.c / headerless shard, scanned once
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np

from msgrun.data.common import DataError, _atomic_write, _mb, broken_link
from msgrun.data.shards import RAW_DTYPES, Shard, SplitWriter, Tokens, read_shard, sample_fingerprint, scan_max_id
from msgrun.data.sources import fingerprint, is_garbled, list_documents, split_corpus, warn_garbled
from msgrun.data.tokenizer import (
    EOT, MASK, PAD, special_ids, _vocab_size, encode_stream, get_tokenizer, load_tokenizer, token_byte_lengths,
    token_dtype, warn_if_smaller,
)


@dataclass
class Corpus:
    train: Tokens  # 1-D token ids, documents separated by eot (memory-mapped shards)
    val: Tokens
    vocab_size: int  # ids are below it (the model pads it itself)
    token_bytes: Optional[np.ndarray]  # int32[vocab_size]: UTF-8 bytes per id (special tokens 0); None without a tokenizer
    eot_id: Optional[int]
    mask_id: Optional[int]  # None: no [MASK] token (shards without a tokenizer), so no BERT
    pad_id: Optional[int]
    data_fingerprint: str  # the documents, their contents and their split (shards: sampled content)
    tokenizer_fingerprint: str  # hash of the tokenizer.json bytes (shards without one: as recorded, or vocab-<V>)
    tokenizer_path: Optional[str]
    num_train_docs: Optional[int]  # None where the format does not record documents
    num_val_docs: Optional[int]
    train_bytes: Optional[int]  # text bytes (text sources only)
    val_bytes: Optional[int]

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in (self.eot_id, self.mask_id, self.pad_id) if i is not None}))

    @property
    def train_doc_bounds(self) -> Optional[np.ndarray]:
        """int64 start offset of each training document in `train` (msgrun shards record them)."""
        return self.train.doc_starts


def _cache_dir(cfg) -> str:
    cache_dir = os.path.expanduser(str(cfg.cache_dir))
    if "${" in cache_dir:
        raise DataError(
            f"data.cache_dir={cache_dir!r} is an unresolved interpolation: pass the config "
            "through OmegaConf (Hydra does), or set data.cache_dir to a directory."
        )
    return cache_dir


def prepare_data(cfg, log: Callable[[str], None] = print) -> Corpus:
    """The corpus cfg describes: data.name=shards reads shards on disk, a text source is
    documents -> split -> tokenizer (trained or loaded, cached) -> msgrun shards (cached)."""
    if cfg.name == "shards":
        return open_shards(cfg, log)
    t0 = time.perf_counter()
    docs, searched = list_documents(cfg)
    is_val = split_corpus(cfg, [d.name for d in docs], searched)
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    data_fp = fingerprint(cfg.name, docs, is_val)
    train_bytes, val_bytes = sum(d.size for d in train_docs), sum(d.size for d in val_docs)
    log(
        f"data: {cfg.name}: {len(docs)} documents, {_mb(train_bytes + val_bytes)} "
        f"({len(train_docs)} train / {len(val_docs)} val), fingerprint {data_fp} "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
    data_dir = os.path.join(_cache_dir(cfg), data_fp)
    os.makedirs(data_dir, exist_ok=True)
    tok, tok_fp, tok_path = get_tokenizer(cfg, os.path.join(data_dir, f"bpe-{int(cfg.vocab_size)}", "tokenizer.json"),
                                          lambda: (d.read() for d in train_docs), log)
    eot_id, mask_id, pad_id = special_ids(tok, tok_path)
    vocab_size = _vocab_size(tok)
    warn_if_smaller(cfg, vocab_size, log)

    tok_dir = os.path.join(data_dir, f"shards-{tok_fp}")
    shards = _cached_shards(tok_dir, len(train_docs), log)
    if shards is None:
        t1 = time.perf_counter()
        os.makedirs(tok_dir, exist_ok=True)
        meta = {"tokenizer_fingerprint": tok_fp, "data_fingerprint": data_fp, "eot_id": eot_id}
        shards = {}
        writers = {split: SplitWriter(tok_dir, split, token_dtype(vocab_size), meta,
                                      on_shard=lambda split, shard, _: shards.setdefault(split, shard))
                   for split in ("train", "val")}
        garbled = []

        def texts():
            for d, v in zip(docs, is_val):
                text = d.read()
                if is_garbled(text):
                    garbled.append(d.name)
                yield ("val" if v else "train"), text

        try:
            for split, ids in encode_stream(texts(), tok, eot_id, token_dtype(vocab_size)):
                writers[split].add(ids)
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        warn_garbled(garbled, len(docs), log)
        manifest = {split: os.path.basename(s.path) for split, s in shards.items()}
        blob = json.dumps(manifest).encode()
        _atomic_write(os.path.join(tok_dir, "manifest.json"), lambda f: f.write(blob))
        log(
            f"tokens: encoded {shards['train'].tokens:,} train / {shards['val'].tokens:,} val tokens in "
            f"{time.perf_counter() - t1:.1f} s (cached at {tok_dir})"
        )
    return Corpus(
        train=Tokens.open([shards["train"]]), val=Tokens.open([shards["val"]]),
        vocab_size=vocab_size, token_bytes=token_byte_lengths(tok, vocab_size),
        eot_id=eot_id, mask_id=mask_id, pad_id=pad_id,
        data_fingerprint=data_fp, tokenizer_fingerprint=tok_fp, tokenizer_path=tok_path,
        num_train_docs=len(train_docs), num_val_docs=len(val_docs),
        train_bytes=train_bytes, val_bytes=val_bytes,
    )


def _cached_shards(tok_dir: str, n_train_docs: int, log) -> Optional[dict]:
    """The cached shards of this corpus and tokenizer, or None when they must be (re)written."""
    try:
        with open(os.path.join(tok_dir, "manifest.json")) as f:
            manifest = json.load(f)
        shards = {split: read_shard(os.path.join(tok_dir, manifest[split]), key=f"data.cache_dir ({split})")
                  for split in ("train", "val")}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:  # unreadable (not half-written: writes are atomic)
        log(f"tokens: cache unreadable ({e}); re-encoding")
        return None
    if shards["train"].docs != n_train_docs:
        return None
    log(f"tokens: {shards['train'].tokens:,} train / {shards['val'].tokens:,} val (cached at {tok_dir})")
    return shards


# ----------------------------------------------------------------------------------------------
# data=shards


_GLOB_HELP = ("data.train and data.val take a glob of shard files (e.g. data.train='/data/fineweb10B/"
              "fineweb_train_*.bin'): llm.c / modded-nanogpt shards, msgrun-prepare's shards, or headerless "
              "nanoGPT .bin files with data.raw_dtype=uint16. Relative paths are resolved against {cwd}.")


def _expand_shards(key: str, pattern) -> List[str]:
    if not pattern:
        raise DataError(f"data.name=shards needs {key}. " + _GLOB_HELP.format(cwd=os.getcwd()))
    expanded = os.path.expanduser(str(pattern))
    matches = sorted(glob.glob(expanded, recursive=True))
    for p in matches:
        reason = broken_link(p)
        if reason:
            raise DataError(f"{key}={pattern!r}: {p} {reason}. Fix or remove the link, or narrow the glob.")
    paths = [p for p in matches if os.path.isfile(p)]
    if not paths:
        raise DataError(f"{key}={pattern!r} matches no file. " + _GLOB_HELP.format(cwd=os.getcwd()))
    return [os.path.abspath(p) for p in paths]


def _check_finished(key: str, shards: List[Shard]) -> None:
    # msgrun-prepare writes manifest.json when it is done and keeps progress.json meanwhile: a
    # glob over an unfinished preparation would silently train on part of the corpus
    for d in sorted({os.path.dirname(s.path) for s in shards if s.format == "msgrun"}):
        if os.path.exists(os.path.join(d, "progress.json")) and not os.path.exists(os.path.join(d, "manifest.json")):
            raise DataError(f"{key}: {d} holds the shards of an unfinished msgrun-prepare (progress.json, no "
                            "manifest.json). Run the same msgrun-prepare command again to finish it.")


def open_shards(cfg, log: Callable[[str], None] = print) -> Corpus:
    """data=shards: memory-map the files of data.train and data.val after checking every header,
    the tokenizer they were written with, and that every id is below the vocabulary."""
    t0 = time.perf_counter()
    raw = getattr(cfg, "raw_dtype", None)
    if raw is not None and raw not in RAW_DTYPES:
        raise DataError(f"data.raw_dtype={raw!r}: choose one of {list(RAW_DTYPES)} (or null for files with an "
                        "llm.c or msgrun header).")
    splits = {}
    for split in ("train", "val"):
        key = f"data.{split}"
        splits[split] = [read_shard(p, key, raw) for p in _expand_shards(key, getattr(cfg, split, None))]
        _check_finished(key, splits[split])
    every = splits["train"] + splits["val"]
    # one file by its inode, so that a hard link (which realpath cannot see through) counts too
    train_files = {}
    for s in splits["train"]:
        st = os.stat(s.path)
        train_files[(st.st_dev, st.st_ino)] = s.path
    shared = []
    for s in splits["val"]:
        st = os.stat(s.path)
        twin = train_files.get((st.st_dev, st.st_ino))
        if twin is not None:
            shared.append(s.path if twin == s.path else f"{s.path} is {twin}")
    if shared:
        raise DataError(f"data.train and data.val share files ({', '.join(shared[:3])}; a hard or symbolic link "
                        "is the same file): validation tokens must be held out. Give data.val a glob of other "
                        "files.")

    recorded = sorted({s.tokenizer_fingerprint for s in every if s.tokenizer_fingerprint})
    if len(recorded) > 1:
        raise DataError(f"data.train and data.val mix shards written with different tokenizers (fingerprints "
                        f"{', '.join(recorded)}): every shard of a run must come from one tokenizer.")
    token_bytes = tok_path = None
    eot_id = next((s.eot_id for s in every if s.eot_id is not None), None)
    mask_id = pad_id = None
    if cfg.tokenizer_path:
        tok_path = os.path.abspath(os.path.expanduser(str(cfg.tokenizer_path)))
        if not os.path.isfile(tok_path):
            raise DataError(f"data.tokenizer_path={cfg.tokenizer_path}: no such file. Give the tokenizer.json the "
                            "shards were written with (it enables bits per byte), or set it to null and give "
                            "data.vocab_size.")
        tok, tok_fp = load_tokenizer(tok_path)
        if recorded and recorded[0] != tok_fp:
            raise DataError(f"data.tokenizer_path={tok_path} (fingerprint {tok_fp}) is not the tokenizer these "
                            f"shards were written with (fingerprint {recorded[0]}, in their headers). Give that "
                            "tokenizer.json (msgrun-prepare writes it beside the shards), or set it to null.")
        vocab_size = _vocab_size(tok)
        token_bytes = token_byte_lengths(tok, vocab_size)
        eot_id = tok.token_to_id(EOT) if eot_id is None else eot_id
        mask_id, pad_id = tok.token_to_id(MASK), tok.token_to_id(PAD)
        vocab_from = f"the vocabulary of data.tokenizer_path={tok_path} ({vocab_size} ids)"
    else:
        vocab_size = int(cfg.vocab_size)
        if vocab_size < 2:
            raise DataError(f"data.vocab_size={vocab_size}: give the vocabulary the shards were tokenized with "
                            "(50257 for GPT-2 shards such as FineWeb's llm.c files).")
        tok_fp = recorded[0] if recorded else f"vocab-{vocab_size}"
        vocab_from = f"data.vocab_size={vocab_size}"
    pad_id = pad_id if pad_id is not None else eot_id

    cache_dir = _cache_dir(cfg)
    for s in every:
        top = scan_max_id(s, cache_dir)
        if top >= vocab_size:
            raise DataError(f"{s.path} holds token id {top}, not below {vocab_from}: the shards were written with a "
                            "larger vocabulary. Give the right data.vocab_size or data.tokenizer_path.")
    data_fp = sample_fingerprint(every)
    train, val = Tokens.open(splits["train"]), Tokens.open(splits["val"])
    train.limit = val.limit = (vocab_size, vocab_from)
    docs = {k: (sum(s.docs for s in v) if all(s.docs is not None for s in v) else None) for k, v in splits.items()}
    log(f"data: shards: {len(train):,} train tokens in {len(splits['train'])} files, {len(val):,} val tokens in "
        f"{len(splits['val'])} files ({', '.join(sorted({s.format for s in every}))}, {train.dtype}), vocab "
        f"{vocab_size}, fingerprint {data_fp} [{time.perf_counter() - t0:.1f} s]")
    return Corpus(
        train=train, val=val, vocab_size=vocab_size, token_bytes=token_bytes,
        eot_id=eot_id, mask_id=mask_id, pad_id=pad_id,
        data_fingerprint=data_fp, tokenizer_fingerprint=tok_fp, tokenizer_path=tok_path,
        num_train_docs=docs["train"], num_val_docs=docs["val"], train_bytes=None, val_bytes=None,
    )
