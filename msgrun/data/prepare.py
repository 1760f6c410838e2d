"""Any text source (pystdlib, pysite, files, hf with or without streaming) into msgrun shards.

    prepare_shards(cfg.data, out_dir, shard_tokens=100_000_000)     # what msgrun-prepare runs

Documents are streamed from the source, split by name, encoded about 1 MB at a time (the
tokenizers library spreads each batch over all cores) and appended to the open shard of their
split, so memory stays bounded by one batch whatever the corpus size. Shards end at document
boundaries, are written under a temporary name and renamed when complete.

Resuming: progress.json records, per split, the finished shards and the index of the first
document not in one of them. A killed prepare run again with the same command re-reads the
source (to recompute the fingerprint), skips the documents already in finished shards without
encoding them, and continues with the next shard; the result is byte for byte the result of an
uninterrupted run. A finished directory has manifest.json instead, and preparing it again does
nothing. The tokenizer (given, or trained on the training documents) is written beside the
shards as tokenizer.json, so `data=shards data.tokenizer_path=<out_dir>/tokenizer.json` checks it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import time
from typing import Callable, Optional

from msgrun.data.common import DataError, _atomic_write
from msgrun.rundir import first_missing
from msgrun.data.shards import SplitWriter
from msgrun.data.sources import (
    SOURCES, Fingerprint, is_garbled, iter_documents, no_documents_message, split_corpus, warn_garbled,
)
from msgrun.data.tokenizer import (
    BATCH_BYTES, EOT, _vocab_size, encode_stream, get_tokenizer, load_tokenizer, token_dtype, warn_if_smaller,
)

FORMAT = "msgrun-shards-1"
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"(train|val)_\d{6}\.bin")  # msgrun.data.shards.shard_name
# the keys that decide what the shards hold (cache_dir and the data=shards keys do not)
_IDENTITY_KEYS = ("name", "paths", "hf_path", "hf_name", "hf_split", "hf_text_field", "hf_data_files",
                  "hf_streaming", "max_docs", "max_bytes", "val_fraction", "split_seed", "vocab_size",
                  "tokenizer_path")


def _identity(cfg, shard_tokens: int) -> dict:
    out = {"format": FORMAT, "shard_tokens": int(shard_tokens)}
    for k in _IDENTITY_KEYS:
        out[f"data.{k}"] = getattr(cfg, k, None)
    if cfg.tokenizer_path:
        out["data.vocab_size"] = None  # the given tokenizer decides it
    return json.loads(json.dumps(out, default=list))  # plain JSON types (lists from ListConfig), as read back


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}): it was not written by msgrun-prepare, or the disk is "
                        "damaged. Choose another out_dir.") from e


def _write_json(path: str, obj: dict) -> None:
    blob = json.dumps(obj, indent=1, sort_keys=True).encode()
    _atomic_write(path, lambda f: f.write(blob))


def _differences(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys)


class PrepareBusy(DataError):
    """out_dir is another msgrun-prepare's: this one removes nothing there, even a directory it
    saw missing (both commands may have seen it missing)."""


@contextlib.contextmanager
def _exclusive(out_dir: str):
    """One msgrun-prepare per directory: the second is refused rather than interleaving shards.
    (flock: a killed holder's lock dies with it.) A lock file this command created is removed
    again when nothing of a preparation is left beside it, so a refusal leaves no file behind; an
    acquirer therefore re-checks that the path still names the file it locked."""
    path = os.path.join(out_dir, ".prepare.lock")
    while True:
        existed = os.path.exists(path)
        lock = open(path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            lock.close()
            raise PrepareBusy(f"out_dir={out_dir}: another msgrun-prepare is writing to this directory. Wait for "
                              "it to finish, or choose another out_dir.") from e
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    try:
        yield
    finally:
        if not existed and not any(os.path.exists(os.path.join(out_dir, n)) for n in ("progress.json", "manifest.json")):
            os.unlink(path)
        lock.close()


def _progress(enabled: bool):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                    TextColumn("{task.fields[docs]:>12,} docs"), TextColumn("{task.completed:>16,.0f} tokens"),
                    TextColumn("{task.fields[rate]:>14}"), TimeElapsedColumn(), disable=not enabled)


def prepare_shards(cfg, out_dir: Optional[str], shard_tokens: int = 100_000_000, batch_bytes: int = BATCH_BYTES,
                   log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Write the shards of the text source cfg (a DataConfig) into out_dir; returns the manifest.
    Bad input raises DataError before anything is written."""
    if cfg.name not in SOURCES:
        raise DataError(f"data.name={cfg.name!r}: msgrun-prepare turns a text source into shards; choose one of "
                        f"{list(SOURCES)} (data=shards already is shards: train on it directly).")
    if not out_dir:
        raise DataError("msgrun-prepare needs out_dir=PATH, the directory the shards go to (created if need be; "
                        "an unfinished one is resumed, a finished one left as it is).")
    if shard_tokens < 1 or batch_bytes < 1:
        raise DataError(f"shard_tokens={shard_tokens} and batch_bytes={batch_bytes} must be positive.")
    out = os.path.abspath(os.path.expanduser(str(out_dir)))
    identity = _identity(cfg, shard_tokens)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"out_dir={out_dir} is a file, not a directory: the shards need a directory of their own. "
                        "Choose another out_dir.")
    created = first_missing(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a file where a directory is needed, no permission
        raise DataError(f"out_dir={out_dir} cannot be created ({e.strerror}: {e.filename}). Choose another "
                        "out_dir.") from e
    try:
        return _prepare_locked(cfg, out, identity, shard_tokens, batch_bytes, log, progress)
    except DataError as e:
        if created is not None and not isinstance(e, PrepareBusy):  # bad input leaves nothing (we made the directory)
            shutil.rmtree(created, ignore_errors=True)
        raise
    except OSError as e:  # writing failed: what was finished is recorded and resumes
        raise DataError(f"out_dir={out}: {e.strerror or e} ({e.filename or 'while writing'}). Free space or fix "
                        "the cause, then rerun the same command: the shards finished so far are kept and the "
                        "preparation resumes after them.") from e


def _prepare_locked(cfg, out, identity, shard_tokens, batch_bytes, log, progress) -> dict:
    with _exclusive(out):
        manifest_path, progress_path = os.path.join(out, "manifest.json"), os.path.join(out, "progress.json")
        manifest = _read_json(manifest_path)
        if manifest is not None:
            if manifest.get("identity") != identity:
                raise DataError(f"out_dir={out} holds the finished shards of another preparation "
                                f"({_differences(manifest.get('identity', {}), identity)}). Choose another out_dir.")
            if os.path.exists(progress_path):  # killed between writing the manifest and removing it
                os.unlink(progress_path)
            log(f"prepare: {out} already holds these shards ({manifest['train_tokens']:,} train / "
                f"{manifest['val_tokens']:,} val tokens); nothing to do.")
            return manifest
        state = _read_json(progress_path)
        if state is not None and state.get("identity") != identity:
            raise DataError(f"out_dir={out} holds the unfinished shards of another preparation "
                            f"({_differences(state.get('identity', {}), identity)}). Run that command again to "
                            "finish it, or choose another out_dir.")
        # everything that can be checked is checked before anything is written
        docs, searched = iter_documents(cfg)  # configuration errors surface here
        # the split needs every name (msgrun's rule keeps both splits non-empty): one listing pass,
        # before the tokenizer is trained, so a corpus that cannot be split costs nothing
        names = [d.name for d in iter_documents(cfg)[0]]
        val_names = {n for n, v in zip(names, split_corpus(cfg, names, searched)) if v}
        if cfg.tokenizer_path:
            given, _ = load_tokenizer(get_tokenizer_path(cfg))
            if given.token_to_id(EOT) is None:
                raise DataError(f"data.tokenizer_path={cfg.tokenizer_path}: the tokenizer has no {EOT!r} token, "
                                "which separates documents in the shards. Add it as a special token, or set "
                                "data.tokenizer_path=null to train a BPE tokenizer on the corpus.")
        tok_file = os.path.join(out, "tokenizer.json")
        if state is None and os.path.exists(tok_file):
            raise DataError(f"out_dir={out} already has a tokenizer.json but no record of a preparation "
                            "(progress.json or manifest.json): msgrun-prepare records one before it writes a "
                            "tokenizer, so this file is someone else's. Choose another out_dir.")
        # we hold the lock, so temp files here are leftovers of a killed prepare of this directory
        for name in os.listdir(out):
            if name.startswith(".") and ".tmp-" in name:
                os.unlink(os.path.join(out, name))
        started_here = state is None
        before = set(os.listdir(out))
        if started_here:
            # recorded before the tokenizer is trained, so a kill at any later moment leaves a
            # directory this command resumes (a trained tokenizer.json is kept and reused)
            state = {"identity": identity, "tokenizer_fingerprint": None,
                     "splits": {s: {"shards": [], "next_doc": 0, "prefix": None} for s in SPLITS}}
            _write_json(progress_path, state)
        try:
            return _start(cfg, out, docs, searched, val_names, state, tok_file, shard_tokens, batch_bytes, log,
                          progress)
        except DataError as e:
            if started_here:  # a refusal leaves nothing of this command behind (shards published but not
                # yet recorded included), and nothing that was there before it
                for name in set(os.listdir(out)) - before:
                    if name in ("progress.json", "tokenizer.json") or SHARD_NAME.fullmatch(name):
                        os.unlink(os.path.join(out, name))
                raise
            raise DataError(f"{e} (out_dir={out} keeps the unfinished preparation that an earlier command started; "
                            "to start over instead, remove its progress.json, tokenizer.json and "
                            "train_*.bin / val_*.bin files.)") from e


def get_tokenizer_path(cfg) -> str:
    path = os.path.abspath(os.path.expanduser(str(cfg.tokenizer_path)))
    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer_path={cfg.tokenizer_path}: no such file. Give the path of a tokenizer.json "
                        "(the 'tokenizers' library format), or set it to null to train a BPE tokenizer on the corpus.")
    return path


def _start(cfg, out, docs, searched, val_names, state, tok_file, shard_tokens, batch_bytes, log, progress) -> dict:
    def train_texts():
        for d in iter_documents(cfg)[0]:
            if d.name not in val_names:
                yield d.read()
    tok, tok_fp, tok_path = get_tokenizer(cfg, tok_file, train_texts, log)
    if state["tokenizer_fingerprint"] not in (None, tok_fp):
        raise DataError(f"out_dir={out}: the unfinished shards there were written with tokenizer "
                        f"{state['tokenizer_fingerprint']}, and this command's tokenizer is {tok_fp} (the file "
                        "data.tokenizer_path points at changed). Restore that tokenizer.json to finish them, or "
                        "choose another out_dir.")
    if tok_path != tok_file:  # a given tokenizer: the shards travel with a copy of it
        with open(tok_path, "rb") as f:
            blob = f.read()
        _atomic_write(tok_file, lambda f: f.write(blob))
    vocab = _vocab_size(tok)
    warn_if_smaller(cfg, vocab, log)
    if state["tokenizer_fingerprint"] is None:
        state["tokenizer_fingerprint"] = tok_fp
        _write_json(os.path.join(out, "progress.json"), state)
    _check_prefix(cfg, val_names, state)
    return _encode(cfg, docs, searched, val_names, tok, tok_fp, tok.token_to_id(EOT), token_dtype(vocab), out, shard_tokens,
                   batch_bytes, state, log, progress)


def _check_prefix(cfg, val_names, state) -> None:
    """On resume: the documents before each split's next_doc must be the ones already encoded (an
    edited, added, removed or renamed document there would be duplicated or dropped silently).
    One pass over the listing prefix, before anything new is written."""
    need = {s: st for s, st in state["splits"].items() if st["next_doc"] and st.get("prefix")}
    if not need:
        return
    docs, fp, seen = iter_documents(cfg)[0], Fingerprint(cfg.name), 0
    for n, prefix in sorted({st["next_doc"]: st["prefix"] for st in need.values()}.items()):
        for doc in itertools.islice(docs, n - seen):
            fp.update(doc, doc.name in val_names)
            seen += 1
        if seen < n or fp.hexdigest() != prefix:
            raise DataError(f"data.name={cfg.name}: the corpus changed since this preparation started: the "
                            f"first {n:,} documents, already encoded into shards, are no longer the same ones (a "
                            "document among them was added, removed, renamed or edited), so resuming would "
                            "duplicate or drop documents. Restore the corpus as it was to finish this preparation.")


def _encode(cfg, docs, searched, val_names, tok, tok_fp, eot_id, dtype, out, shard_tokens, batch_bytes, state, log,
            progress) -> dict:
    progress_path = os.path.join(out, "progress.json")
    resumed = {s: state["splits"][s]["next_doc"] for s in SPLITS}
    if any(resumed.values()):
        log(f"prepare: resuming {out}: " + ", ".join(
            f"{len(state['splits'][s]['shards'])} {s} shards done (documents before #{resumed[s]:,})" for s in SPLITS))

    fingerprint = Fingerprint(cfg.name)
    # fingerprint of the listing before document i, for the documents in flight: a resume checks
    # that the documents before next_doc are still these (_check_prefix)
    prefix = {}

    def on_shard(split, shard, next_doc):
        st = state["splits"][split]
        st["shards"].append({"name": os.path.basename(shard.path), "tokens": shard.tokens, "docs": shard.docs})
        st["next_doc"] = next_doc
        st["prefix"] = prefix.get(next_doc) or fingerprint.hexdigest()  # (the latter: the end of the listing)
        _write_json(progress_path, state)
        if not progress:
            log(f"prepare: {shard.path}: {shard.tokens:,} tokens, {shard.docs:,} documents")

    meta = {"tokenizer_fingerprint": tok_fp, "eot_id": eot_id}
    writers = {s: SplitWriter(out, s, dtype, meta, shard_tokens, first_index=len(state["splits"][s]["shards"]),
                              on_shard=on_shard) for s in SPLITS}
    seen = {"docs": 0}
    garbled = []
    start = time.perf_counter()

    def todo():
        for i, doc in enumerate(docs):
            split = "val" if doc.name in val_names else "train"
            fingerprint.update(doc, split == "val")
            seen["docs"] = i + 1
            if i >= resumed[split]:  # earlier documents of this split are in finished shards
                prefix[i + 1] = fingerprint.hexdigest()
                text = doc.read()
                if is_garbled(text):
                    garbled.append(doc.name)
                yield (i, split), text

    new_tokens = 0
    try:
        with _progress(progress) as bar:
            task = bar.add_task(f"prepare {cfg.name}", total=None, docs=0, rate="")
            for (i, split), ids in encode_stream(todo(), tok, eot_id, dtype, batch_bytes):
                writers[split].add(ids, doc_index=i)
                prefix.pop(i + 1, None)
                new_tokens += len(ids)
                if i % 64 == 0:
                    rate = new_tokens / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, completed=new_tokens, docs=seen["docs"], rate=f"{rate:,.0f} tok/s")
            if seen["docs"] == 0:
                raise DataError(no_documents_message(cfg, searched))
            for w in writers.values():
                w.close(next_doc=seen["docs"])
            rate = new_tokens / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=new_tokens, docs=seen["docs"], rate=f"{rate:,.0f} tok/s")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for s in SPLITS:
        if not state["splits"][s]["shards"]:
            raise DataError(f"data.name={cfg.name}: the {s} split of {searched} is empty ({seen['docs']} documents, "
                            f"data.val_fraction={cfg.val_fraction}); the split is by document: use more documents "
                            "or another data.val_fraction.")
    warn_garbled(garbled, seen["docs"], log)  # (a resumed run sees only the documents it encodes)
    seconds = time.perf_counter() - start
    manifest = {
        "identity": state["identity"], "tokenizer": "tokenizer.json", "tokenizer_fingerprint": tok_fp,
        "data_fingerprint": fingerprint.hexdigest(), "source": searched, "documents": seen["docs"],
        "splits": state["splits"],
        **{f"{s}_tokens": sum(x["tokens"] for x in state["splits"][s]["shards"]) for s in SPLITS},
    }
    _write_json(os.path.join(out, "manifest.json"), manifest)
    os.unlink(progress_path)
    log(f"prepare: {manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val tokens from "
        f"{seen['docs']:,} documents in {out} ({new_tokens / max(seconds, 1e-9):,.0f} tokens/s this run, "
        f"{seconds:.1f} s). Train on them with:\n"
        f"  msgrun data=shards data.train='{out}/train_*.bin' data.val='{out}/val_*.bin' "
        f"data.tokenizer_path={out}/tokenizer.json")
    return manifest
