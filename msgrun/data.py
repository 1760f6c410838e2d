"""Corpora, tokenizer training and caching, the token stream, and MLM masking.

    corpus = prepare_data(cfg.data)                       # documents -> split -> BPE -> token ids
    stream = TokenStream(corpus.train, chunk, seed)           # chunk-shuffled per epoch
    x, y = stream.batch(offset, batch_size, seq_len)      # offset advances by batch_size*seq_len

The training stream is addressed by *token offset*, not by step: two runs with different batch
sizes or sequence lengths read the same tokens in the same order (docs/architecture.md section 4). Everything
here is deterministic given the config: the split hashes document names, the shuffle is seeded
by (seed, epoch) and MLM masks by (seed, offset).

Cache layout under cfg.cache_dir (every file is written to a temp file and renamed into place,
so a killed run leaves no half-written file and racing runs of a sweep are safe):

    <data_fp>/bpe-<vocab>/tokenizer.json
    <data_fp>/tokens-<tokenizer_fp>/{train,val,train_doc_bounds}.npy

This module knows nothing of models or Hydra: cfg is a DataConfig or anything with its attributes.
"""

from __future__ import annotations

import glob
import hashlib
import os
import site
import sysconfig
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch

from msgrun.errors import MsgrunError

EOT, MASK, PAD = "<|endoftext|>", "[MASK]", "[PAD]"
SPECIAL_TOKENS = (EOT, MASK, PAD)  # ids 0, 1, 2 in a tokenizer trained here
SOURCES = ("pystdlib", "pysite", "files", "hf")
_CACHE_VERSION = "1"  # bump when the cached bytes would change for the same inputs


class DataError(MsgrunError, ValueError):
    """The data configuration cannot produce a corpus (missing files, empty corpus, bad tokenizer)."""


# ----------------------------------------------------------------------------------------------
# Documents


@dataclass
class Document:
    name: str  # stable across machines: the split and the fingerprint hash it
    size: int  # bytes on disk (files) or UTF-8 bytes (hf)
    sig: str  # content hash, or a (size, mtime) signature where reading everything is too slow
    path: Optional[str] = None
    text: Optional[str] = None

    def read(self) -> str:
        if self.text is None:
            with open(self.path, "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        return self.text


def _hash(data: bytes, n: int = 8) -> str:
    return hashlib.blake2b(data, digest_size=n).hexdigest()


class _Caps:
    """max_docs / max_bytes: documents are taken in corpus order until the next one would exceed
    a cap; the corpus is then a prefix of the uncapped one, never a prefix plus stragglers."""

    def __init__(self, cfg):
        self.max_docs, self.max_bytes = cfg.max_docs, cfg.max_bytes
        for key, v in (("max_docs", self.max_docs), ("max_bytes", self.max_bytes)):
            if v is not None and v <= 0:
                raise DataError(f"data.{key}={v} must be a positive number, or null for no cap.")
        self.docs = self.bytes = 0
        self.stopped = False

    def admits(self, size: int) -> bool:
        if self.max_docs is not None and self.docs + 1 > self.max_docs:
            self.stopped = True
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            self.stopped = True
        if self.stopped:
            return False
        self.docs += 1
        self.bytes += size
        return True

    def full(self) -> bool:
        return self.stopped or (self.max_docs is not None and self.docs >= self.max_docs)


# Directory names skipped anywhere below a Python library root. Debian ships the stdlib without
# test/, so dropping every test directory makes pystdlib the same corpus on Debian and pyenv builds.
_SKIP_DIRS = {"test", "tests", "__pycache__", "site-packages", "dist-packages", "idlelib"}


def _skip_file(relpath: str) -> bool:
    # build-specific files: their content (build paths, compiler flags) differs between two builds
    # of the same Python version, which would make the fingerprint machine-dependent
    top = relpath.split("/", 1)[0]
    return top.startswith("config-") or top.startswith("_sysconfigdata")


def _py_files(root: str) -> List[str]:
    """Relative paths (with '/') of the .py files below root, minus test and build directories."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for fn in filenames:
            if fn.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
                if not _skip_file(rel):
                    out.append(rel)
    return sorted(out)


def _read_doc(name: str, path: str) -> Document:
    with open(path, "rb") as f:
        raw = f.read()
    return Document(name, len(raw), _hash(raw, 16), text=raw.decode("utf-8", errors="replace"))


def _pystdlib_docs(cfg) -> tuple[List[Document], str]:
    root = sysconfig.get_paths()["stdlib"]
    docs, caps = [], _Caps(cfg)
    for rel in _py_files(root):
        path = os.path.join(root, rel)
        size = os.path.getsize(path)
        if size and caps.admits(size):  # empty files (__init__.py) add nothing but an eot
            docs.append(_read_doc(rel, path))
        if caps.full():
            break
    return docs, f"the .py files of the standard library at {root} (without test directories)"


def _site_dirs() -> List[str]:
    dirs = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"]]
    out, seen = [], set()
    for d in dirs:
        real = os.path.realpath(d)
        if os.path.isdir(d) and real not in seen:
            seen.add(real)
            out.append(d)
    return out


def _pysite_docs(cfg) -> tuple[List[Document], str]:
    # site-packages can hold hundreds of MB, so the fingerprint uses (size, mtime) instead of a
    # content hash, and text is read lazily, only when the tokens are not cached yet.
    entries, seen = [], set()
    for root in _site_dirs():
        for rel in _py_files(root):
            path = os.path.join(root, rel)
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            st = os.stat(path)
            entries.append((rel, path, st.st_size, st.st_mtime_ns))
    entries.sort()  # by name, then path: names can repeat across site directories
    docs, caps = [], _Caps(cfg)
    for rel, path, size, mtime in entries:
        if size and caps.admits(size):
            docs.append(Document(rel, size, f"{size}:{mtime}", path=path))
        if caps.full():
            break
    return docs, "the .py files of " + ", ".join(_site_dirs())


_ACCEPTED_PATHS = (
    "Each entry of data.paths must be an existing file, a directory (all files beneath it, "
    "hidden ones skipped) or a glob pattern ('*', '?', '[...]', recursive '**'; '~' is expanded). "
    "Relative paths are resolved against the current working directory ({cwd})."
)


def _files_below(directory: str) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        # hidden entries (.git, .venv, ...) are almost never the text one means to train on
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        out += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return out


def _expand_paths(entries: Sequence[str]) -> List[str]:
    if not entries:
        raise DataError(
            "data.name=files needs data.paths: a list of files, directories or glob patterns, "
            "e.g. data.paths='[~/corpus/**/*.txt]'. " + _ACCEPTED_PATHS.format(cwd=os.getcwd())
        )
    files = []
    for entry in entries:
        pattern = os.path.expanduser(str(entry))
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            what = "glob pattern matches nothing"
        else:
            matches = [pattern] if os.path.exists(pattern) else []
            what = "path does not exist"
        if not matches:
            raise DataError(
                f"data.paths entry {entry!r}: this {what}. "
                + _ACCEPTED_PATHS.format(cwd=os.getcwd())
            )
        for m in matches:
            below = _files_below(m) if os.path.isdir(m) else [m]
            if not below:
                raise DataError(f"data.paths entry {entry!r}: the directory {m} holds no files (hidden files and "
                                "directories are skipped). " + _ACCEPTED_PATHS.format(cwd=os.getcwd()))
            files += below
    for f in files:
        if not os.path.exists(f):  # os.walk and glob list a dangling symbolic link like a file
            raise DataError(f"data.paths: {f} is a symbolic link to {os.readlink(f)!r}, which does not exist. "
                            "Fix or remove the link, or leave it out of data.paths.")
    return sorted({os.path.abspath(f) for f in files})


def _files_docs(cfg) -> tuple[List[Document], str]:
    paths = _expand_paths(list(cfg.paths or []))
    # names relative to the files' common directory, so the same tree elsewhere has the same
    # names (hence the same split and fingerprint)
    base = os.path.commonpath([os.path.dirname(p) for p in paths])
    docs, caps = [], _Caps(cfg)
    for path in paths:
        size = os.path.getsize(path)
        if size and caps.admits(size):
            try:
                docs.append(_read_doc(os.path.relpath(path, base).replace(os.sep, "/"), path))
            except OSError as e:
                raise DataError(f"data.paths: cannot read {path}: {e}") from e
        if caps.full():
            break
    return docs, f"data.paths={list(cfg.paths)} ({len(paths)} files under {base})"


def _hf_docs(cfg) -> tuple[List[Document], str]:
    if not cfg.hf_path:
        raise DataError(
            "data.name=hf needs data.hf_path: a dataset on the Hugging Face hub (e.g. "
            "data.hf_path=wikitext data.hf_name=wikitext-103-raw-v1) or a local builder "
            "(data.hf_path=json or text, with data.hf_data_files=[...])."
        )
    try:
        import datasets  # optional extra: only this source needs it
    except ImportError as e:
        raise DataError(
            "data.name=hf needs the 'datasets' package, which is not installed: "
            "pip install 'msgrun[hf]' (or pip install datasets), or choose another data.name."
        ) from e
    data_files = list(cfg.hf_data_files or []) or None
    call = (
        f"datasets.load_dataset({cfg.hf_path!r}, {cfg.hf_name!r}, split={cfg.hf_split!r}, "
        f"data_files={data_files!r}, streaming={bool(cfg.hf_streaming)})"
    )
    try:
        ds = datasets.load_dataset(
            cfg.hf_path, cfg.hf_name, split=cfg.hf_split, data_files=data_files,
            streaming=bool(cfg.hf_streaming),
        )
    except Exception as e:  # datasets raises many types; all mean "this config cannot load"
        raise DataError(f"data.name=hf: {call} failed: {type(e).__name__}: {e}") from e
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        raise DataError(f"data.name=hf: {call} returned {type(ds).__name__}; set data.hf_split.")

    field = cfg.hf_text_field
    columns = ds.column_names  # may be None for a streaming dataset without declared features
    if columns is not None and field not in columns:
        raise DataError(
            f"data.hf_text_field={field!r} is not a column of {cfg.hf_path}; "
            f"available columns: {list(columns)}."
        )
    if columns is not None:
        ds = ds.select_columns([field])  # do not decode other (possibly large) columns
    docs, caps = [], _Caps(cfg)
    for i, row in enumerate(ds):
        if field not in row:
            raise DataError(
                f"data.hf_text_field={field!r} is not a column of {cfg.hf_path}; "
                f"available columns: {list(row)}."
            )
        text = row[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"data.hf_text_field={field!r} holds {type(text).__name__} values, not text."
            )
        raw = text.encode("utf-8")
        if raw and caps.admits(len(raw)):
            docs.append(Document(str(i), len(raw), _hash(raw, 16), text=text))
        if caps.full():
            break
    return docs, call


def list_documents(cfg) -> tuple[List[Document], str]:
    """The documents of cfg.name in corpus order, with caps applied, and a phrase saying what was
    searched. Raises DataError when nothing (or only empty documents) is found."""
    sources = {"pystdlib": _pystdlib_docs, "pysite": _pysite_docs, "files": _files_docs,
               "hf": _hf_docs}
    if cfg.name not in sources:
        raise DataError(f"data.name={cfg.name!r} is not a corpus; choose one of {list(SOURCES)}.")
    docs, searched = sources[cfg.name](cfg)
    if not docs:
        raise DataError(
            f"data.name={cfg.name}: no non-empty documents found in {searched}"
            + (f" (caps: data.max_docs={cfg.max_docs}, data.max_bytes={cfg.max_bytes})"
               if cfg.max_docs or cfg.max_bytes else "")
            + ". Point the source at text, or choose another data.name."
        )
    return docs, searched


# ----------------------------------------------------------------------------------------------
# Split


def split_documents(names: Sequence[str], val_fraction: float, seed: int) -> List[bool]:
    """is_val for each name. A document is held out iff hash(seed:name) < val_fraction, so the
    decision depends on nothing but the name: adding a file never moves another one."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1).")
    keys = [
        int.from_bytes(hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest(), "big")
        / 2.0**64
        for n in names
    ]
    is_val = [k < val_fraction for k in keys]
    if len(names) >= 2:
        # both splits non-empty: move the document closest to the threshold (ties by position)
        if not any(is_val):
            is_val[min(range(len(keys)), key=lambda i: (keys[i], i))] = True
        if all(is_val):
            is_val[max(range(len(keys)), key=lambda i: (keys[i], -i))] = False
    return is_val


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _byte_alphabet() -> dict:
    """The byte-level BPE alphabet: one printable character per byte value (GPT-2's convention:
    printable Latin-1 bytes stand for themselves, the other 68 bytes for chr(256 + k))."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, k = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + k)] = b
            k += 1
    return table  # char -> byte


def _train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # no prefix space: a document's first token is what the text says, and decode(encode(t)) == t
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # listed first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str):
    """A tokenizer.json as (Tokenizer, fingerprint of its bytes). Special-token strings inside
    documents are encoded as plain text, so only the separators we insert are eot."""
    from tokenizers import Tokenizer

    with open(path, "rb") as f:
        raw = f.read()
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"data.tokenizer_path={path} is not a Hugging Face tokenizer.json ({e}). Point it at a "
                        "tokenizer.json saved by the `tokenizers` library, or set data.tokenizer_path=null to "
                        "train a BPE tokenizer on the corpus.") from e
    tok.encode_special_tokens = True
    return tok, _hash(raw)


def _special_ids(tok, path: str) -> tuple[int, int, int]:
    ids = {}
    for t in SPECIAL_TOKENS:
        ids[t] = tok.token_to_id(t)
    for t in (EOT, MASK):
        if ids[t] is None:
            raise DataError(
                f"data.tokenizer_path={path}: the tokenizer has no {t!r} token; msgrun needs "
                f"{EOT!r} (document separator) and {MASK!r} (MLM). Add them as special tokens, "
                "or set data.tokenizer_path=null to train a BPE tokenizer on the corpus."
            )
    pad = ids[PAD] if ids[PAD] is not None else ids[EOT]  # padding is never trained on
    return ids[EOT], ids[MASK], pad


def _vocab_size(tok) -> int:
    # ids can be sparse in a foreign tokenizer; arrays indexed by id need max id + 1
    return max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab().values()) + 1)


def token_byte_lengths(tok, vocab_size: int) -> np.ndarray:
    """int32[vocab_size]: UTF-8 bytes each id stands for (special tokens 0), for bits-per-byte.
    Exact for byte-level BPE, where every character of a token's string is one byte."""
    from tokenizers import decoders

    out = np.zeros(vocab_size, dtype=np.int32)
    added = tok.get_added_tokens_decoder()
    alphabet = _byte_alphabet()
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    for token, i in tok.get_vocab().items():
        if i in added:
            out[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif byte_level:
            out[i] = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in token)
        else:
            # other tokenizers: decoding one id is the best estimate (WordPiece '##' etc.)
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


# ----------------------------------------------------------------------------------------------
# Atomic cache files


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
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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


def _write_npy(path: str, arr: np.ndarray) -> None:
    # same inputs give the same bytes, so a racing run replacing ours is harmless
    _atomic_write(path, lambda f: np.save(f, arr))


# ----------------------------------------------------------------------------------------------
# Encoding


def _encode_documents(tok, texts: Iterable[str], eot_id: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate each document's ids followed by eot. Returns (tokens, document start offsets).
    Encodes in chunks of a few MB: Encoding objects and Python int lists cost far more memory
    than the final array."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: no offsets computed
    parts, starts, total = [], [], 0
    chunk, chunk_bytes = [], 0

    def flush():
        nonlocal total
        ids = []
        for enc in encode(chunk, add_special_tokens=False):
            starts.append(total + len(ids))
            ids.extend(enc.ids)
            ids.append(eot_id)
        parts.append(np.array(ids, dtype=dtype))
        total += len(ids)
        chunk.clear()

    for text in texts:
        chunk.append(text)
        chunk_bytes += len(text)
        if chunk_bytes > 8_000_000:
            flush()
            chunk_bytes = 0
    if chunk:
        flush()
    return np.concatenate(parts), np.array(starts, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# prepare_data


@dataclass
class Corpus:
    train: np.ndarray  # 1-D token ids, documents separated by eot
    val: np.ndarray
    train_doc_bounds: np.ndarray  # int64 start offset of each training document in `train`
    vocab_size: int  # tokenizer vocabulary size (the model pads it itself)
    token_bytes: np.ndarray  # int32[vocab_size]: UTF-8 bytes per id (special tokens 0)
    eot_id: int
    mask_id: int
    pad_id: int
    data_fingerprint: str  # the documents, their contents and their split
    tokenizer_fingerprint: str  # hash of the tokenizer.json bytes
    tokenizer_path: str
    num_train_docs: int
    num_val_docs: int
    train_bytes: int
    val_bytes: int

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted({self.eot_id, self.mask_id, self.pad_id}))


def _fingerprint(kind: str, docs: Sequence[Document], is_val: Sequence[bool]) -> str:
    # Everything that determines the token arrays and nothing else: the documents in corpus order,
    # their contents and their split. Seed, fraction and caps act only through these, so a cap
    # that does not bind, or another seed that gives the same split, keeps the fingerprint.
    h = hashlib.blake2b(digest_size=8)
    h.update(f"msgrun-data-v{_CACHE_VERSION}\0{kind}\n".encode())
    for d, v in zip(docs, is_val):
        h.update(f"{d.name}\0{d.size}\0{d.sig}\0{int(v)}\n".encode())
    return h.hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def prepare_data(cfg, log: Callable[[str], None] = print) -> Corpus:
    """Documents -> split -> tokenizer (trained or loaded, cached) -> token ids (cached)."""
    t0 = time.perf_counter()
    docs, searched = list_documents(cfg)
    is_val = split_documents([d.name for d in docs], cfg.val_fraction, cfg.split_seed)
    if len(docs) < 2:
        raise DataError(
            f"data.name={cfg.name}: found a single document in {searched}; the train/validation "
            "split is by document, so at least 2 are needed (add files or raise data.max_docs)."
        )
    garbled = [d.name for d in docs if d.text is not None and ("\x00" in d.text or "\ufffd" in d.text)]
    if garbled:
        log(f"warning: {len(garbled)} of {len(docs)} documents are binary or not valid UTF-8 (NUL bytes or "
            f"undecodable bytes, read as U+FFFD), e.g. {', '.join(garbled[:3])}; the model will train on them as "
            "they are. Leave such files out of data.paths if they are not text.")
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    data_fp = _fingerprint(cfg.name, docs, is_val)
    train_bytes, val_bytes = sum(d.size for d in train_docs), sum(d.size for d in val_docs)
    log(
        f"data: {cfg.name}: {len(docs)} documents, {_mb(train_bytes + val_bytes)} "
        f"({len(train_docs)} train / {len(val_docs)} val), fingerprint {data_fp} "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
    cache_dir = os.path.expanduser(str(cfg.cache_dir))
    if "${" in cache_dir:
        raise DataError(
            f"data.cache_dir={cache_dir!r} is an unresolved interpolation: pass the config "
            "through OmegaConf (Hydra does), or set data.cache_dir to a directory."
        )
    data_dir = os.path.join(cache_dir, data_fp)
    os.makedirs(data_dir, exist_ok=True)

    # tokenizer
    if cfg.tokenizer_path:
        tok_path = os.path.abspath(os.path.expanduser(str(cfg.tokenizer_path)))
        if not os.path.isfile(tok_path):
            raise DataError(
                f"data.tokenizer_path={cfg.tokenizer_path}: no such file. Give the path of a "
                "tokenizer.json (the 'tokenizers' library format), or set it to null to train "
                "a BPE tokenizer on the corpus."
            )
        try:
            tok, tok_fp = load_tokenizer(tok_path)
        except Exception as e:
            raise DataError(f"data.tokenizer_path={tok_path}: not a tokenizer.json: {e}") from e
        log(f"tokenizer: loaded {tok_path} (fingerprint {tok_fp})")
    else:
        vocab = int(cfg.vocab_size)
        if vocab < 256 + len(SPECIAL_TOKENS):
            raise DataError(
                f"data.vocab_size={vocab} is too small: a byte-level BPE needs the 256 byte "
                f"tokens plus {len(SPECIAL_TOKENS)} special tokens, so at least "
                f"{256 + len(SPECIAL_TOKENS)}."
            )
        tok_path = os.path.join(data_dir, f"bpe-{vocab}", "tokenizer.json")
        cached = os.path.isfile(tok_path)
        if not cached:
            t1 = time.perf_counter()
            trained = _train_tokenizer((d.read() for d in train_docs), vocab)
            os.makedirs(os.path.dirname(tok_path), exist_ok=True)
            # first writer wins: concurrent runs then all use one file, hence one fingerprint
            blob = trained.to_str().encode("utf-8")
            _atomic_write(tok_path, lambda f: f.write(blob), first_wins=True)
            log(
                f"tokenizer: trained {trained.get_vocab_size()}-token BPE on {_mb(train_bytes)} "
                f"in {time.perf_counter() - t1:.1f} s (cached at {tok_path})"
            )
        tok, tok_fp = load_tokenizer(tok_path)
        if cached:
            log(f"tokenizer: {vocab}-token BPE (cached at {tok_path}, fingerprint {tok_fp})")
    eot_id, mask_id, pad_id = _special_ids(tok, tok_path)
    vocab_size = _vocab_size(tok)
    if not cfg.tokenizer_path and vocab_size < int(cfg.vocab_size):
        log(f"warning: the tokenizer has {vocab_size} tokens, fewer than data.vocab_size={cfg.vocab_size}: the "
            "corpus is too small (or too repetitive) for BPE to learn that many merges. The model uses "
            f"{vocab_size}; use a larger corpus or a smaller data.vocab_size to silence this.")

    # token ids
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tok_dir = os.path.join(data_dir, f"tokens-{tok_fp}")
    files = {k: os.path.join(tok_dir, f"{k}.npy") for k in ("train", "val", "train_doc_bounds")}
    arrays = None
    if all(os.path.isfile(p) for p in files.values()):
        try:
            arrays = {k: np.load(p) for k, p in files.items()}
        except (OSError, ValueError) as e:  # unreadable (not half-written: writes are atomic)
            log(f"tokens: cache unreadable ({e}); re-encoding")
        if arrays is not None and len(arrays["train_doc_bounds"]) != len(train_docs):
            arrays = None
        if arrays is not None:
            log(
                f"tokens: {len(arrays['train']):,} train / {len(arrays['val']):,} val "
                f"(cached at {tok_dir})"
            )
    if arrays is None:
        t1 = time.perf_counter()
        train, bounds = _encode_documents(tok, (d.read() for d in train_docs), eot_id, dtype)
        val, _ = _encode_documents(tok, (d.read() for d in val_docs), eot_id, dtype)
        arrays = {"train": train, "val": val, "train_doc_bounds": bounds}
        os.makedirs(tok_dir, exist_ok=True)
        for k, p in files.items():
            _write_npy(p, arrays[k])
        log(
            f"tokens: encoded {len(train):,} train / {len(val):,} val tokens in "
            f"{time.perf_counter() - t1:.1f} s (cached at {tok_dir})"
        )

    return Corpus(
        train=arrays["train"], val=arrays["val"], train_doc_bounds=arrays["train_doc_bounds"],
        vocab_size=vocab_size, token_bytes=token_byte_lengths(tok, vocab_size),
        eot_id=eot_id, mask_id=mask_id, pad_id=pad_id,
        data_fingerprint=data_fp, tokenizer_fingerprint=tok_fp, tokenizer_path=tok_path,
        num_train_docs=len(train_docs), num_val_docs=len(val_docs),
        train_bytes=train_bytes, val_bytes=val_bytes,
    )


# ----------------------------------------------------------------------------------------------
# Training stream


class TokenStream:
    """The infinite training stream: epoch 0, epoch 1, ..., where epoch e is the training tokens
    cut into chunks of `chunk` tokens, in the order np.random.default_rng([seed, e]).permutation
    of the chunks, concatenated. Global offset o is position o of that stream, so runs that
    change batch size or sequence length mid-training still read the same tokens in the same
    order (docs/architecture.md section 4), while consecutive rows of a batch come from chunks all over the
    corpus: shuffling whole documents instead would fill a batch from one or two files and make
    every step's gradient a sample of a single file. Chunks shorter than a row are joined like
    packed documents. The tail of fewer than `chunk` tokens is not used."""

    def __init__(self, tokens: np.ndarray, chunk: int, seed: int):
        self.tokens = np.asarray(tokens)
        if chunk < 1:
            raise ValueError(f"TokenStream chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)
        self.n_chunks = len(self.tokens) // self.chunk
        if self.n_chunks == 0:
            raise DataError(f"the training split has {len(self.tokens):,} tokens, fewer than one shuffled chunk of "
                            f"{self.chunk} (data.shuffle_chunk, default model.seq_len); use a larger corpus.")
        if seed < 0:
            raise ValueError(f"TokenStream seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.n = self.n_chunks * self.chunk
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()  # the last two epochs used

    def _epoch_tokens(self, e: int) -> np.ndarray:
        if e not in self._epochs:
            perm = np.random.default_rng([self.seed, e]).permutation(self.n_chunks)
            self._epochs[e] = self.tokens[: self.n].reshape(self.n_chunks, self.chunk)[perm].reshape(-1)
            while len(self._epochs) > 2:  # a read spans at most the current and next epoch
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(e)
        return self._epochs[e]

    def epoch(self, offset: int) -> int:
        return offset // self.n

    @staticmethod
    def tokens_per_batch(batch_size: int, seq_len: int) -> int:
        return batch_size * seq_len

    def read(self, offset: int, n: int) -> np.ndarray:
        """n tokens starting at global offset `offset`, across epoch boundaries if need be."""
        if offset < 0 or n < 0:
            raise ValueError(f"read(offset={offset}, n={n}): both must be >= 0")
        out = np.empty(n, dtype=self.tokens.dtype)
        done = 0
        while done < n:
            e, pos = divmod(offset + done, self.n)
            take = min(n - done, self.n - pos)
            out[done:done + take] = self._epoch_tokens(e)[pos:pos + take]
            done += take
        return out

    def batch(self, offset: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 (batch_size, seq_len). Row r is read(offset + r*seq_len,
        seq_len + 1) split into inputs and next-token targets: rows tile the stream, and the
        batch advances `offset` by tokens_per_batch(batch_size, seq_len)."""
        ids = torch.from_numpy(self.read(offset, batch_size * seq_len + 1).astype(np.int64))
        inputs = ids[:-1].view(batch_size, seq_len).clone()  # own storage: callers mask in place
        targets = ids[1:].view(batch_size, seq_len)
        return inputs, targets


# ----------------------------------------------------------------------------------------------
# MLM masking and evaluation batches


def _mlm_generator(seed: int, offset: int) -> torch.Generator:
    # a stream of its own, keyed by (seed, offset): resuming at an offset reproduces its masks,
    # and no other RNG (init, data order) shifts them
    digest = hashlib.blake2b(f"mlm:{seed}:{offset}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") & (2**63 - 1))


def mlm_count(seq_len: int, probability: float) -> int:
    """Positions predicted per sequence: fixed, so MLM batches have static shapes."""
    return max(1, round(probability * seq_len))


def mlm_batch(
    inputs: torch.Tensor,
    offset: int,
    seed: int,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT masking with static shapes: exactly M = max(1, round(probability*T)) positions per
    row, uniform without replacement, sorted. Returns (masked inputs, positions int64 (B, M),
    labels (B, M) = original tokens there). At each position: 80% mask_id, 10% a random
    non-special id, 10% unchanged. No boolean indexing, so no host sync and compile-friendly."""
    B, T = inputs.shape
    M = mlm_count(T, probability)
    g = _mlm_generator(seed, offset)
    cpu = inputs.detach().to("cpu", torch.int64)
    positions = torch.rand(B, T, generator=g).argsort(dim=1)[:, :M].sort(dim=1).values
    labels = cpu.gather(1, positions)
    u = torch.rand(B, M, generator=g)
    # a uniform non-special id: draw from [0, V - S) and step over each special id in turn
    specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
    random_ids = torch.randint(0, vocab_size - len(specials), (B, M), generator=g)
    for s in specials:
        random_ids += (random_ids >= s).long()
    new = torch.where(u < 0.8, torch.full_like(labels, mask_id),
                      torch.where(u < 0.9, random_ids, labels))
    masked = cpu.scatter(1, positions, new)
    dev = inputs.device
    return masked.to(dev), positions.to(dev), labels.to(dev)


def target_bytes(token_bytes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Total UTF-8 bytes of the predicted tokens (negative targets = ignored), for
    bits-per-byte = sum_nll / (ln 2 * target_bytes). Stays on the device: no host sync."""
    valid = targets >= 0
    return (token_bytes[targets.clamp(min=0)] * valid).sum()


def fixed_eval_batches(
    corpus: Corpus,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    family: str = "gpt",
    seed: int = 0,
    mlm_probability: float = 0.15,
) -> List[dict]:
    """The same held-out batches for every run: eval_tokens tokens of corpus.val as rows of
    seq_len + 1 taken at evenly spaced offsets across the whole split (the first tokens alone
    can be one unrepresentative file), in order (the last batch may have fewer rows). gpt: {inputs, targets};
    bert: {inputs (masked), positions, labels} with masks fixed by `seed`. Every batch carries
    target_bytes (an int): the UTF-8 bytes of the tokens it predicts."""
    if family not in ("gpt", "bert"):
        raise ValueError(f"family must be 'gpt' or 'bert', got {family!r}")
    row = seq_len + 1
    rows = min(eval_tokens, len(corpus.val)) // row
    if rows == 0:
        raise DataError(
            f"the validation split has {len(corpus.val):,} tokens and train.eval_tokens="
            f"{eval_tokens:,}, fewer than one evaluation sequence of model.seq_len + 1 = {row} "
            "tokens. Raise data.val_fraction (or use a larger corpus), raise train.eval_tokens, "
            "or lower model.seq_len."
        )
    starts = np.arange(rows, dtype=np.int64) * ((len(corpus.val) - row) // max(rows - 1, 1)) if rows > 1 else [0]
    ids = torch.from_numpy(np.stack([corpus.val[s:s + row] for s in starts]).astype(np.int64))
    tb = torch.from_numpy(corpus.token_bytes.astype(np.int64))
    batches = []
    for start in range(0, rows, batch_size):
        chunk = ids[start:start + batch_size]
        if family == "gpt":
            inputs, targets = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            batches.append({"inputs": inputs, "targets": targets,
                            "target_bytes": int(target_bytes(tb, targets))})
        else:
            masked, positions, labels = mlm_batch(
                chunk[:, :-1].contiguous(), offset=start * row, seed=seed,
                mask_id=corpus.mask_id, vocab_size=corpus.vocab_size,
                special_ids=corpus.special_ids, probability=mlm_probability,
            )
            batches.append({"inputs": masked, "positions": positions, "labels": labels,
                            "target_bytes": int(target_bytes(tb, labels))})
    return batches
