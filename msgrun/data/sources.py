"""Where documents come from: the corpus sources (pystdlib, pysite, files, hf), their caps, the
train/validation split by document name, and the fingerprint of what was read.

Each source yields Documents one at a time in a fixed corpus order, so `msgrun-prepare` can stream
a corpus of any size; `list_documents` collects them for the in-process cache of small corpora.
"""

from __future__ import annotations

import glob
import hashlib
import os
import site
import sysconfig
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

from msgrun.data.common import DataError, _hash, broken_link

SOURCES = ("pystdlib", "pysite", "files", "hf")  # text sources (iter_documents)
DATA_NAMES = SOURCES + ("shards",)  # data.name: shards are read as they are (corpus.prepare_data)
_CACHE_VERSION = "1"  # bump when the cached bytes would change for the same inputs

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


def _pystdlib_docs(cfg) -> tuple[Iterator[Document], str]:
    root = sysconfig.get_paths()["stdlib"]

    caps = _Caps(cfg)  # checks the caps before any document is read

    def docs():
        for rel in _py_files(root):
            path = os.path.join(root, rel)
            size = os.path.getsize(path)
            if size and caps.admits(size):  # empty files (__init__.py) add nothing but an eot
                yield _read_doc(rel, path)
            if caps.full():
                break
    return docs(), f"the .py files of the standard library at {root} (without test directories)"


def _site_dirs() -> List[str]:
    dirs = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"]]
    out, seen = [], set()
    for d in dirs:
        real = os.path.realpath(d)
        if os.path.isdir(d) and real not in seen:
            seen.add(real)
            out.append(d)
    return out


def _pysite_docs(cfg) -> tuple[Iterator[Document], str]:
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

    caps = _Caps(cfg)  # checks the caps before any document is read

    def docs():
        for rel, path, size, mtime in entries:
            if size and caps.admits(size):
                yield Document(rel, size, f"{size}:{mtime}", path=path)
            if caps.full():
                break
    return docs(), "the .py files of " + ", ".join(_site_dirs())


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
        reason = broken_link(f)
        if reason:
            raise DataError(f"data.paths: {f} {reason}. Fix or remove the link, or leave it out of data.paths.")
    return sorted({os.path.abspath(f) for f in files})


def _files_docs(cfg) -> tuple[Iterator[Document], str]:
    paths = _expand_paths(list(cfg.paths or []))
    # names relative to the files' common directory, so the same tree elsewhere has the same
    # names (hence the same split and fingerprint)
    base = os.path.commonpath([os.path.dirname(p) for p in paths])

    caps = _Caps(cfg)  # checks the caps before any document is read

    def docs():
        for path in paths:
            size = os.path.getsize(path)
            if size and caps.admits(size):
                try:
                    doc = _read_doc(os.path.relpath(path, base).replace(os.sep, "/"), path)
                except OSError as e:
                    raise DataError(f"data.paths: cannot read {path}: {e}") from e
                yield doc
            if caps.full():
                break
    return docs(), f"data.paths={list(cfg.paths)} ({len(paths)} files under {base})"


def _hf_docs(cfg) -> tuple[Iterator[Document], str]:
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

    caps = _Caps(cfg)  # checks the caps before any document is read

    def docs():
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
                yield Document(str(i), len(raw), _hash(raw, 16), text=text)
            if caps.full():
                break
    return docs(), call


def iter_documents(cfg) -> tuple[Iterator[Document], str]:
    """The documents of cfg.name in corpus order, with caps applied, one at a time, and a phrase
    saying what was searched. Configuration errors are raised here, unreadable documents while
    iterating."""
    sources = {"pystdlib": _pystdlib_docs, "pysite": _pysite_docs, "files": _files_docs,
               "hf": _hf_docs}
    if cfg.name not in sources:
        raise DataError(f"data.name={cfg.name!r} is not a corpus; choose one of {list(SOURCES)}.")
    return sources[cfg.name](cfg)


def is_garbled(text: str) -> bool:
    """Binary or not UTF-8: NUL bytes, or bytes that did not decode (read as U+FFFD)."""
    return "\x00" in text or "\ufffd" in text


def warn_garbled(garbled: List[str], total: int, log) -> None:
    if garbled:
        log(f"warning: {len(garbled)} of {total} documents are binary or not valid UTF-8 (NUL bytes or "
            f"undecodable bytes, read as U+FFFD), e.g. {', '.join(garbled[:3])}; the model trains on them as "
            "they are. Leave such files out of data.paths if they are not text.")


def no_documents_message(cfg, searched: str) -> str:
    return (
        f"data.name={cfg.name}: no non-empty documents found in {searched}"
        + (f" (caps: data.max_docs={cfg.max_docs}, data.max_bytes={cfg.max_bytes})"
           if cfg.max_docs or cfg.max_bytes else "")
        + ". Point the source at text, or choose another data.name."
    )


def list_documents(cfg) -> tuple[List[Document], str]:
    """The documents of cfg.name in corpus order, with caps applied, and a phrase saying what was
    searched. Raises DataError when nothing (or only empty documents) is found."""
    docs, searched = iter_documents(cfg)
    docs = list(docs)
    if not docs:
        raise DataError(no_documents_message(cfg, searched))
    return docs, searched


# ----------------------------------------------------------------------------------------------
# Split and fingerprint


def _split_key(seed: int, name: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "big") / 2.0**64


def split_documents(names: Sequence[str], val_fraction: float, seed: int) -> List[bool]:
    """is_val for each name. A document is held out iff hash(seed:name) < val_fraction, so the
    decision depends on nothing but the name: adding a file never moves another one. val_fraction
    lies in (0, 1) (config.RANGES; check_config refuses anything else)."""
    keys = [_split_key(seed, n) for n in names]
    is_val = [k < val_fraction for k in keys]
    if len(names) >= 2:
        # both splits non-empty: move the document closest to the threshold (ties by position)
        if not any(is_val):
            is_val[min(range(len(keys)), key=lambda i: (keys[i], i))] = True
        if all(is_val):
            is_val[max(range(len(keys)), key=lambda i: (keys[i], -i))] = False
    return is_val


def split_corpus(cfg, names: Sequence[str], searched: str) -> List[bool]:
    """The train/validation split of a corpus (cfg a DataConfig), by document name: the one rule
    that `msgrun` and `msgrun-prepare` share, so a corpus prepared into shards splits as the same
    corpus read directly. Refuses a corpus that cannot be split."""
    if not names:
        raise DataError(no_documents_message(cfg, searched))
    if len(names) < 2:
        raise DataError(
            f"data.name={cfg.name}: found a single document in {searched}; the train/validation "
            "split is by document, so at least 2 are needed (add files or raise data.max_docs)."
        )
    return split_documents(names, cfg.val_fraction, cfg.split_seed)


class Fingerprint:
    """Everything that determines the token arrays and nothing else: the documents in corpus order,
    their contents and their split. Seed, fraction and caps act only through these, so a cap that
    does not bind, or another seed that gives the same split, keeps the fingerprint. Updated one
    document at a time, so a streaming pass computes it too."""

    def __init__(self, kind: str):
        self._h = hashlib.blake2b(digest_size=8)
        self._h.update(f"msgrun-data-v{_CACHE_VERSION}\0{kind}\n".encode())

    def update(self, doc: Document, is_val: bool) -> None:
        self._h.update(f"{doc.name}\0{doc.size}\0{doc.sig}\0{int(is_val)}\n".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def fingerprint(kind: str, docs: Iterable[Document], is_val: Iterable[bool]) -> str:
    fp = Fingerprint(kind)
    for d, v in zip(docs, is_val):
        fp.update(d, v)
    return fp.hexdigest()
