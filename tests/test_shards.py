"""Token shards: llm.c / msgrun / headerless formats, msgrun-prepare, the index-permuted stream,
background loading, and the bad-input errors of data=shards. Tiny models, a few steps."""

import json
import mmap
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from msgrun.config import DataConfig
from msgrun.data import DataError, TokenStream, fixed_eval_batches, open_shards, prepare_data, read_shard
from msgrun.data.loader import BatchLoader
from msgrun.data.prepare import prepare_shards
from msgrun.data.shards import ShardWriter
from msgrun.data.stream import ChunkPermutation
from msgrun.errors import CheckpointError
from msgrun.train import Trainer

from conftest import read_jsonl

TINY = ["model.layers=1", "model.hidden=32", "model.heads=2", "model.head_dim=16", "model.ffn=64",
        "model.seq_len=32", "train.batch_size=4", "train.eval_tokens=256", "train.preflight=false",
        "train.log_every=2", "train.eval_every=2", "optim.warmup_steps=2"]


def quiet(_):
    pass


def write_llmc(path, tokens, version=1, count=None):
    """An llm.c / modded-nanogpt shard: 256 int32 header (magic, version, count), then the tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, version, len(tokens) if count is None else count]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2" if version == 1 else "<u4").tobytes())


def counting_tokens(n, vocab=64, seed=0):
    """A learnable language: runs that count upward mod vocab, restarting at random points."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    i = 0
    while i < n:
        run = int(rng.integers(20, 200))
        out[i:i + run] = (int(rng.integers(0, vocab)) + np.arange(min(run, n - i))) % vocab
        i += run
    return out


def over_mmap(a):
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap)


def shards_cfg(tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(name="shards", **kw)


# ---------------------------------------------------------------------------------------------
# reading


def test_llmc_shards_read_as_one_stream(tmp_path):
    tokens = counting_tokens(5000)
    cuts = [0, 1200, 1201, 3900, 5000]  # shards of odd sizes, one of a single token
    for k in range(4):
        write_llmc(tmp_path / f"fineweb_train_{k:06d}.bin", tokens[cuts[k]:cuts[k + 1]])
    write_llmc(tmp_path / "fineweb_val_000000.bin", counting_tokens(700, seed=1))
    c = open_shards(shards_cfg(tmp_path, train=str(tmp_path / "fineweb_train_*.bin"),
                               val=str(tmp_path / "fineweb_val_*.bin"), vocab_size=64), log=quiet)
    assert len(c.train) == 5000 and len(c.val) == 700 and c.vocab_size == 64
    assert all(over_mmap(p) for p in c.train.parts)  # mapped, never loaded
    assert np.array_equal(np.asarray(c.train), tokens)
    assert np.array_equal(c.train[1150:1250], tokens[1150:1250])  # a read across three files
    # the stream over the files is the stream over the same tokens in memory, chunk for chunk
    a, b = TokenStream(c.train, 32, seed=3), TokenStream(tokens, 32, seed=3)
    assert np.array_equal(a.read(100, 3 * a.n), b.read(100, 3 * b.n))
    assert c.token_bytes is None and c.mask_id is None and c.tokenizer_fingerprint == "vocab-64"
    # headerless nanoGPT files need data.raw_dtype; then they read the same way
    (tmp_path / "raw").mkdir()
    tokens.astype(np.uint16).tofile(tmp_path / "raw" / "train.bin")
    counting_tokens(700, seed=1).astype(np.uint16).tofile(tmp_path / "raw" / "val.bin")
    raw = dict(train=str(tmp_path / "raw" / "train.bin"), val=str(tmp_path / "raw" / "val.bin"), vocab_size=64)
    with pytest.raises(DataError, match="data.raw_dtype=uint16"):
        open_shards(shards_cfg(tmp_path, **raw), log=quiet)
    r = open_shards(shards_cfg(tmp_path, raw_dtype="uint16", **raw), log=quiet)
    assert np.array_equal(np.asarray(r.train), tokens) and np.array_equal(np.asarray(r.val), np.asarray(c.val))


def test_train_from_llmc_shards(tmp_path, make_cfg):
    d = tmp_path / "fineweb10B"
    d.mkdir()
    for k in range(3):
        write_llmc(d / f"fineweb_train_{k:06d}.bin", counting_tokens(20_000, seed=k))
    write_llmc(d / "fineweb_val_000000.bin", counting_tokens(4_000, seed=9))
    cfg = make_cfg("data=shards", f"data.train={d}/fineweb_train_*.bin", f"data.val={d}/fineweb_val_*.bin",
                   "data.vocab_size=64", *TINY, "train.max_steps=12", "train.lr=1e-2")
    summary = Trainer(cfg, tmp_path / "run").run()
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evals = [m for m in metrics if "val_loss" in m]
    assert summary["status"] == "completed" and summary["data"]["train_tokens"] == 60_000
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learns the counting language
    assert all(m["val_bpb"] == "nan" for m in evals)  # no tokenizer: bits per byte unknown (NaN)


# ---------------------------------------------------------------------------------------------
# preparing


def jsonl_corpus(path, n_rows=80, seed=0):
    words = "the model grows wider and deeper while the loss keeps falling on held out text".split()
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n_rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(10, 60)))) + f" {i}",
                                "id": i}) + "\n")
    return str(path)


def test_prepare_hf_streaming_then_train(tmp_path, make_cfg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    src = DataConfig(name="hf", hf_path="json", hf_data_files=[jsonl_corpus(tmp_path / "rows.jsonl")],
                     hf_streaming=True, vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "shards"
    manifest = prepare_shards(src, str(out), shard_tokens=800, log=quiet)
    names = sorted(p.name for p in out.iterdir())
    assert len(manifest["splits"]["train"]["shards"]) >= 3 and "tokenizer.json" in names
    assert not [n for n in names if ".tmp-" in n] and "progress.json" not in names
    shards = dict(train=f"{out}/train_*.bin", val=f"{out}/val_*.bin", tokenizer_path=f"{out}/tokenizer.json")
    c = open_shards(shards_cfg(tmp_path, **shards), log=quiet)
    assert len(c.train) == manifest["train_tokens"] and c.train.doc_starts[0] == 0
    # one code path: the same source read directly goes through the cache's shards to the same tokens
    direct = prepare_data(replace(src, tokenizer_path=f"{out}/tokenizer.json"), log=quiet)
    assert np.array_equal(np.asarray(direct.train), np.asarray(c.train))
    assert np.array_equal(np.asarray(direct.val), np.asarray(c.val))
    assert direct.tokenizer_fingerprint == c.tokenizer_fingerprint
    assert manifest["data_fingerprint"] == direct.data_fingerprint  # the streamed fingerprint too
    # preparing again is a no-op; another config into the same directory is refused
    assert prepare_shards(src, str(out), shard_tokens=800, log=quiet) == manifest
    with pytest.raises(DataError, match="another preparation.*data.max_docs"):
        prepare_shards(replace(src, max_docs=5), str(out), shard_tokens=800, log=quiet)

    cfg = make_cfg("data=shards", *[f"data.{k}={v}" for k, v in shards.items()], *TINY, "train.max_steps=4")
    summary = Trainer(cfg, tmp_path / "run").run()
    assert summary["status"] == "completed" and np.isfinite(summary["final_val_bpb"])
    assert summary["tokenizer_fingerprint"] == c.tokenizer_fingerprint


def test_killed_prepare_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = DataConfig(name="pystdlib", max_docs=40, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    whole = tmp_path / "whole"
    prepare_shards(src, str(whole), shard_tokens=20_000, log=quiet)
    tok = tmp_path / "tokenizer.json"
    shutil.copy(whole / "tokenizer.json", tok)
    src = replace(src, tokenizer_path=str(tok))
    prepare_shards(src, str(tmp_path / "a"), shard_tokens=20_000, log=quiet)

    close, published = ShardWriter.close, []

    def killed_after_third(self):
        published.append(close(self))
        if len(published) == 3:  # killed between renaming a shard and recording it
            raise KeyboardInterrupt
        return published[-1]

    monkeypatch.setattr(ShardWriter, "close", killed_after_third)
    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(src, str(b), shard_tokens=20_000, log=quiet)
    monkeypatch.undo()
    assert (b / "progress.json").exists() and not (b / "manifest.json").exists()
    assert not [p for p in b.iterdir() if ".tmp-" in p.name]  # the open shard was never renamed
    (b / ".train_000009.bin.tmp-1-dead").write_bytes(b"left by a SIGKILL")
    with pytest.raises(DataError, match="unfinished msgrun-prepare"):  # its shards are not a corpus yet
        open_shards(shards_cfg(tmp_path, train=f"{b}/train_*.bin", val=f"{b}/val_*.bin", vocab_size=300), log=quiet)

    # a changed tokenizer cannot finish it
    shutil.copy(tok, tmp_path / "saved.json")
    tok.write_text(tok.read_text().replace('"[PAD]"', '"[PAD2]"'))
    with pytest.raises(DataError, match="unfinished shards there were written with tokenizer"):
        prepare_shards(src, str(b), shard_tokens=20_000, log=quiet)
    shutil.copy(tmp_path / "saved.json", tok)

    lines = []
    prepare_shards(src, str(b), shard_tokens=20_000, log=lines.append)
    assert any("resuming" in line for line in lines)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len([f for f in files if f.endswith(".bin")]) > 4
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (b / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# the stream and the loader


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_chunk_permutation_is_a_bijection(n):
    p = ChunkPermutation(n, seed=0, epoch=0)(np.arange(n))
    assert sorted(p.tolist()) == list(range(n))


def test_chunk_permutation_shuffles_and_depends_on_seed_and_epoch():
    n = 10_000
    p = ChunkPermutation(n, 0, 0)(np.arange(n))
    assert np.abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.05  # no trace of the original order
    assert np.median(np.abs(np.diff(p))) > n / 10  # neighbours land far apart
    assert not np.array_equal(p, ChunkPermutation(n, 0, 1)(np.arange(n)))
    assert not np.array_equal(p, ChunkPermutation(n, 1, 0)(np.arange(n)))
    assert np.array_equal(p[[5, 77, 9000]], ChunkPermutation(n, 0, 0)(np.array([5, 77, 9000])))  # by index


def test_background_loader_gives_the_same_batches():
    stream = TokenStream(counting_tokens(20_000), 16, seed=0)
    make = lambda o, r, t: dict(zip(("inputs", "targets"), stream.batch(o, r, t)))  # noqa: E731
    bg = BatchLoader(make, torch.device("cpu"), background=True)
    offset = 0
    for rows, T in [(4, 16)] * 5 + [(2, 32)] * 3:  # a layout change midway (a growth event)
        got = bg.get(offset, rows, T, ahead=rows * T)
        want = make(offset, rows, T)
        assert all(torch.equal(got[k], want[k]) for k in want)
        offset += rows * T
    assert bg.hits == 6 and bg.misses == 2
    bg.close()

    def broken(o, r, t):
        raise OSError("disk gone")
    bad = BatchLoader(broken, torch.device("cpu"), background=True)
    with pytest.raises(OSError, match="disk gone"):
        bad.get(0, 2, 8, ahead=16)
    bad.close()


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_shards_are_named_with_their_key(tmp_path):
    good = counting_tokens(3000)
    write_llmc(tmp_path / "val.bin", good[:1000])

    def opens(name, **kw):
        return open_shards(shards_cfg(tmp_path, train=str(tmp_path / name), val=str(tmp_path / "val.bin"),
                                      **{"vocab_size": 64, **kw}), log=quiet)

    (tmp_path / "junk.bin").write_bytes(b"\x01\x02" * 1000)
    with pytest.raises(DataError, match=r"data.train: .*junk.bin is not a token shard.*raw_dtype"):
        opens("junk.bin")
    write_llmc(tmp_path / "v7.bin", good, version=7)
    with pytest.raises(DataError, match="version 7"):
        opens("v7.bin")
    write_llmc(tmp_path / "short.bin", good[:500], count=3000)
    with pytest.raises(DataError, match="short.bin is truncated: its header promises 3,000 tokens"):
        opens("short.bin")
    write_llmc(tmp_path / "long.bin", good, count=2000)
    with pytest.raises(DataError, match="bytes more than"):
        opens("long.bin")
    write_llmc(tmp_path / "big.bin", np.append(good, 200))
    with pytest.raises(DataError, match=r"big.bin holds token id 200, not below data.vocab_size=64"):
        opens("big.bin")
    assert opens("big.bin", vocab_size=201).vocab_size == 201
    with pytest.raises(DataError, match=r"data.train='.*nothing_\*.bin' matches no file"):
        opens("nothing_*.bin")
    with pytest.raises(DataError, match="data.train and data.val share files"):
        opens("val.bin")
    with pytest.raises(DataError, match="needs data.val"):
        open_shards(shards_cfg(tmp_path, train=str(tmp_path / "big.bin")), log=quiet)
    # a truncated msgrun shard, and one read with a tokenizer it was not written with
    w = ShardWriter(str(tmp_path / "m.bin"), np.uint16, {"tokenizer_fingerprint": "0123456789abcdef"})
    w.add(good[:2000])
    shard = w.close()
    assert read_shard(shard.path).max_id == good[:2000].max()
    with open(tmp_path / "m.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "m.bin") - 3)
    with pytest.raises(DataError, match="m.bin is truncated"):
        opens("m.bin")


def test_tokenizer_and_bert_errors(tmp_path):
    src = DataConfig(name="pystdlib", max_docs=30, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    prepare_shards(src, str(tmp_path / "s"), shard_tokens=10**9, log=quiet)
    other = prepare_data(replace(src, max_docs=12, vocab_size=290), log=quiet).tokenizer_path
    kw = dict(train=f"{tmp_path}/s/train_*.bin", val=f"{tmp_path}/s/val_*.bin")
    with pytest.raises(DataError, match="is not the tokenizer these shards were written with"):
        open_shards(shards_cfg(tmp_path, tokenizer_path=other, **kw), log=quiet)
    bare = open_shards(shards_cfg(tmp_path, vocab_size=300, **kw), log=quiet)
    with pytest.raises(DataError, match=r"model.family=bert .*data.tokenizer_path"):
        fixed_eval_batches(bare, 16, 4, 256, family="bert")
    full = open_shards(shards_cfg(tmp_path, tokenizer_path=f"{tmp_path}/s/tokenizer.json", **kw), log=quiet)
    assert fixed_eval_batches(full, 16, 4, 256, family="bert")[0]["target_bytes"] > 0
    with pytest.raises(DataError, match="msgrun-prepare turns a text source"):
        prepare_shards(shards_cfg(tmp_path, **kw), str(tmp_path / "x"), log=quiet)
    with pytest.raises(DataError, match="needs data.hf_path"):
        prepare_shards(DataConfig(name="hf"), str(tmp_path / "h"), log=quiet)
    assert not (tmp_path / "h").exists()  # bad input leaves no directory behind


def test_resuming_on_changed_shards_is_refused(tmp_path, make_cfg):
    d = tmp_path / "d"
    d.mkdir()
    write_llmc(d / "train.bin", counting_tokens(8000))
    write_llmc(d / "val.bin", counting_tokens(1000, seed=1))
    args = ["data=shards", f"data.train={d}/train.bin", f"data.val={d}/val.bin", "data.vocab_size=64", *TINY,
            "train.max_steps=2", "train.checkpoint_every=1"]
    Trainer(make_cfg(*args), tmp_path / "run").run()
    (tmp_path / "run" / "summary.json").unlink()  # as if killed before the end
    write_llmc(d / "train.bin", counting_tokens(8000, seed=5))  # same path, other tokens
    with pytest.raises(CheckpointError, match="other data or with another tokenizer"):
        Trainer(make_cfg(*args), tmp_path / "run").run()


def test_cli_empty_glob_is_one_paragraph_exit_2(tmp_path, cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    r = subprocess.run([sys.executable, "-m", "msgrun", "logger=none", "data=shards",
                        f"data.train={tmp_path}/none_*.bin", f"data.val={tmp_path}/none_*.bin",
                        f"data.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.train=" in r.stderr and "matches no file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    p = subprocess.run([sys.executable, "-m", "msgrun.prepare", "data=shards", f"out_dir={tmp_path}/o"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "msgrun-prepare: error: data.name='shards'" in p.stderr
    assert not (tmp_path / "o").exists()


def test_prepare_runs_msgrun_config_checks_before_any_work(tmp_path):
    """msgrun-prepare checks the data keys as msgrun does: data.val_fraction=0 was accepted, the
    whole corpus encoded into the train split, and the empty validation split refused at the end."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run([sys.executable, "-m", "msgrun.prepare", "data=pystdlib", "data.max_docs=20",
                        "data.val_fraction=0", f"out_dir={tmp_path}/o", "hydra.run.dir=."],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "msgrun-prepare: error: data.val_fraction = 0.0 is out of range" in p.stderr
    assert not (tmp_path / "o").exists()


def test_shard_globs_are_checked_like_data_files(tmp_path):
    """Issue 28, case 7: a dangling symlink or a loop of links in a shard glob was dropped silently
    (data=files refuses both); a validation shard hard-linked into the training glob was not seen."""
    d = tmp_path / "d"
    d.mkdir()
    write_llmc(d / "train_0.bin", counting_tokens(3000))
    write_llmc(tmp_path / "val.bin", counting_tokens(1000, seed=1))

    def opens(train, val=str(tmp_path / "val.bin")):
        return open_shards(shards_cfg(tmp_path, train=train, val=val, vocab_size=64), log=quiet)

    assert len(opens(f"{d}/train_*.bin").train) == 3000
    (d / "train_1.bin").symlink_to(tmp_path / "moved_away.bin")
    with pytest.raises(DataError, match=r"data.train=.*train_1.bin is a symbolic link to .*moved_away.bin.*does "
                                        r"not exist"):
        opens(f"{d}/train_*.bin")
    (d / "train_1.bin").unlink()
    (d / "train_1.bin").symlink_to(d / "train_2.bin")
    (d / "train_2.bin").symlink_to(d / "train_1.bin")
    with pytest.raises(DataError, match=r"data.train=.*train_1.bin .*loop of links"):
        opens(f"{d}/train_*.bin")
    (d / "train_1.bin").unlink()
    (d / "train_2.bin").unlink()
    os.link(tmp_path / "val.bin", d / "train_1.bin")  # the same file under another name
    with pytest.raises(DataError, match=r"share files .*val.bin is .*train_1.bin"):
        opens(f"{d}/train_*.bin")


def rewrite_header(path, **changes):
    """A msgrun shard whose header JSON says something else (same tokens)."""
    import struct

    raw = bytearray(path.read_bytes())
    length = struct.unpack("<I", raw[12:16])[0]
    meta = {**json.loads(raw[16:16 + length]), **changes}
    blob = json.dumps(meta).encode()
    raw[:1024] = (b"msgrunTK" + struct.pack("<II", 1, len(blob)) + blob).ljust(1024, b"\0")
    path.write_bytes(bytes(raw))
    return raw


def test_a_msgrun_header_holds_only_the_dtypes_the_format_defines(tmp_path):
    """Issue 28, case 7: "dtype": "float16" in a msgrun header was accepted and trained on bit patterns."""
    w = ShardWriter(str(tmp_path / "f.bin"), np.uint16, {})
    w.add(counting_tokens(500))
    w.close()
    rewrite_header(tmp_path / "f.bin", dtype="float16")
    with pytest.raises(DataError, match=r"f.bin has a corrupt msgrun header \(dtype 'float16'.*uint16"):
        read_shard(str(tmp_path / "f.bin"))


def test_ids_above_the_vocabulary_that_the_checks_missed_stop_the_run_with_one_paragraph(tmp_path, make_cfg):
    """Issue 28: a msgrun header whose max_id lies, or a shard rewritten under the id-scan cache
    with its size and mtime kept, let ids >= the vocabulary reach the embedding (a traceback)."""
    w = ShardWriter(str(tmp_path / "train.bin"), np.uint16, {})
    w.add(counting_tokens(6000))
    w.close()
    write_llmc(tmp_path / "val.bin", counting_tokens(1000, seed=1))
    raw = rewrite_header(tmp_path / "train.bin", max_id=60)  # the header lies ...
    tokens = np.frombuffer(raw, dtype=np.uint16, count=6000, offset=1024).copy()
    tokens[100::50] = 900  # ... about these ids
    raw[1024:1024 + 12000] = tokens.tobytes()
    (tmp_path / "train.bin").write_bytes(bytes(raw))
    args = ["data=shards", f"data.train={tmp_path}/train.bin", f"data.val={tmp_path}/val.bin", "data.vocab_size=64",
            f"data.cache_dir={tmp_path}/cache", *TINY, "train.max_steps=2"]
    with pytest.raises(DataError, match=r"train.bin holds token id 900 at token [\d,]+, not below "
                                        r"data.vocab_size=64; its msgrun header says the largest id is 60"):
        Trainer(make_cfg(*args), tmp_path / "run").run()

    # an llm.c shard changed under the scan cache, its size and mtime restored
    write_llmc(tmp_path / "l.bin", counting_tokens(6000))
    st = os.stat(tmp_path / "l.bin")
    cfg = shards_cfg(tmp_path, train=str(tmp_path / "l.bin"), val=str(tmp_path / "val.bin"), vocab_size=64)
    open_shards(cfg, log=quiet)  # scanned and cached
    changed = counting_tokens(6000)
    changed[10] = 900
    write_llmc(tmp_path / "l.bin", changed)
    os.utime(tmp_path / "l.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="l.bin holds token id 900"):
        open_shards(cfg, log=quiet)


# ---------------------------------------------------------------------------------------------
# msgrun-prepare: every state on disk resumes, a refusal leaves nothing (issue 28)


def text_corpus(d, n=12):
    d.mkdir(exist_ok=True)
    for i in range(n):
        (d / f"doc{i:02d}.txt").write_text(f"def function_{i}(x, y):\n    return x * {i} + y  # {i}\n" * (30 + i))
    return d


def files_cfg(tmp_path, corpus, **kw):
    return DataConfig(name="files", paths=[str(corpus)], vocab_size=kw.pop("vocab_size", 300),
                      cache_dir=str(tmp_path / "cache"), **kw)


def listing(d):
    return sorted(p.name for p in d.iterdir())


def test_a_prepare_killed_after_training_its_tokenizer_resumes_with_it(tmp_path, monkeypatch):
    """Issue 28, case 2: a SIGKILL between writing tokenizer.json and progress.json left a directory
    the rerun refused ("not written by this command"); the trained tokenizer was lost."""
    import msgrun.data.prepare as prep

    cfg = files_cfg(tmp_path, text_corpus(tmp_path / "corpus"))
    prepare_shards(cfg, str(tmp_path / "whole"), shard_tokens=2000, log=quiet)
    real = prep.get_tokenizer

    def killed_after_writing_it(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "get_tokenizer", killed_after_writing_it)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(cfg, str(tmp_path / "b"), shard_tokens=2000, log=quiet)
    monkeypatch.undo()
    assert (tmp_path / "b" / "tokenizer.json").exists()
    lines = []
    prepare_shards(cfg, str(tmp_path / "b"), shard_tokens=2000, log=lines.append)
    assert not any("trained" in line for line in lines)  # the tokenizer of the killed run, reused
    for name in listing(tmp_path / "whole"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_refused_prepares_leave_nothing_in_an_existing_out_dir(tmp_path, monkeypatch):
    """Issue 28, cases 3 and 6: an empty corpus, a tokenizer without <|endoftext|> and
    data.val_fraction=0 left shards, progress.json and tokenizer.json behind; the corrected command
    was refused as "another preparation", or reused a tokenizer trained on nothing."""
    out = tmp_path / "out"
    out.mkdir()  # the user's directory
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare_shards(files_cfg(tmp_path, tmp_path / "empty"), str(out), log=quiet)
    assert listing(out) == []

    corpus = text_corpus(tmp_path / "corpus")
    no_eot = tmp_path / "no_eot.json"
    prepare_shards(files_cfg(tmp_path, corpus), str(tmp_path / "ref"), log=quiet)
    no_eot.write_text((tmp_path / "ref" / "tokenizer.json").read_text().replace("<|endoftext|>", "<|end|>"))
    with pytest.raises(DataError, match="has no '<\\|endoftext\\|>' token"):
        prepare_shards(files_cfg(tmp_path, corpus, tokenizer_path=str(no_eot)), str(out), log=quiet)
    assert listing(out) == []

    # a refusal found after shards were written (as a document that cannot be read in the middle)
    close, published = ShardWriter.close, []

    def refused_after_second(self):
        published.append(close(self))
        if len(published) == 2:
            raise DataError("data.paths: cannot read a document")
        return published[-1]

    monkeypatch.setattr(ShardWriter, "close", refused_after_second)
    with pytest.raises(DataError, match="cannot read"):
        prepare_shards(files_cfg(tmp_path, corpus, vocab_size=280), str(out), shard_tokens=1500, log=quiet)
    assert len(published) == 2 and listing(out) == []

    # the same refusal in a preparation an earlier command started: kept, and the way to reset said
    published.clear()
    monkeypatch.setattr(ShardWriter, "close", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(files_cfg(tmp_path, corpus, vocab_size=280), str(out), shard_tokens=1500, log=quiet)
    monkeypatch.setattr(ShardWriter, "close", refused_after_second)
    with pytest.raises(DataError, match="cannot read.*keeps the unfinished preparation.*remove its progress.json"):
        prepare_shards(files_cfg(tmp_path, corpus, vocab_size=280), str(out), shard_tokens=1500, log=quiet)
    assert "progress.json" in listing(out)
    monkeypatch.undo()
    for name in ("progress.json", "tokenizer.json", *[n for n in listing(out) if n.endswith(".bin")]):
        (out / name).unlink()
    prepare_shards(files_cfg(tmp_path, corpus), str(out), log=quiet)  # the corrected command
    assert (out / "manifest.json").exists()
    for name in listing(tmp_path / "ref"):  # its tokenizer trained on the corpus, not on nothing
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_a_prepare_resumed_on_a_changed_corpus_is_refused(tmp_path, monkeypatch):
    """Issue 28, case 5: resumed after the corpus changed, a prepare duplicated two documents and
    dropped one, and its manifest carried the new corpus's fingerprint."""
    corpus = text_corpus(tmp_path / "corpus")
    cfg = files_cfg(tmp_path, corpus)
    prepare_shards(cfg, str(tmp_path / "whole"), shard_tokens=1500, log=quiet)
    close, published = ShardWriter.close, []

    def killed_after_second(self):
        published.append(close(self))
        if len(published) == 2:
            raise KeyboardInterrupt
        return published[-1]

    monkeypatch.setattr(ShardWriter, "close", killed_after_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(cfg, str(tmp_path / "b"), shard_tokens=1500, log=quiet)
    monkeypatch.undo()
    state = json.loads((tmp_path / "b" / "progress.json").read_text())
    assert state["splits"]["train"]["next_doc"] > 1
    saved = (corpus / "doc00.txt").read_text()
    (corpus / "doc00.txt").unlink()  # a document already encoded is gone
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    with pytest.raises(DataError, match="corpus changed since this preparation started.*Restore the corpus"):
        prepare_shards(cfg, str(tmp_path / "b"), shard_tokens=1500, log=quiet)
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before  # nothing new written
    (corpus / "doc00.txt").write_text(saved)
    prepare_shards(cfg, str(tmp_path / "b"), shard_tokens=1500, log=quiet)
    for name in listing(tmp_path / "whole"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_prepare_warns_about_binary_input_and_a_small_tokenizer(tmp_path):
    """Issue 28, cases 6 and 8: msgrun warns about both on its own data path; msgrun-prepare did not."""
    corpus = text_corpus(tmp_path / "corpus", n=4)
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 8)
    lines = []
    prepare_shards(files_cfg(tmp_path, corpus, vocab_size=4096), str(tmp_path / "out"), log=lines.append)
    assert any("binary or not valid UTF-8" in line and "blob.bin" in line for line in lines)
    assert any("fewer than data.vocab_size=4096" in line for line in lines)


def test_prepare_cli_errors_are_one_paragraph(tmp_path, monkeypatch, capsys):
    """Issue 28: a misspelled key, an out_dir that is a file, a full disk and Ctrl-C were tracebacks."""
    import errno

    from omegaconf import OmegaConf

    import msgrun.prepare as cli
    from msgrun.data import prepare as prep

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    (tmp_path / "a_file").write_text("x")
    r = subprocess.run([sys.executable, "-m", "msgrun.prepare", "out_dirr=x"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("msgrun-prepare: error: ") and "out_dirr" in r.stderr
    assert "Traceback" not in r.stderr and "out_dir" in r.stderr.replace("out_dirr", "")

    corpus = text_corpus(tmp_path / "corpus", n=4)
    cfg = OmegaConf.create({"data": vars(files_cfg(tmp_path, corpus)), "out_dir": str(tmp_path / "a_file"),
                            "shard_tokens": 1000, "batch_bytes": 1_000_000, "progress": "plain"})
    assert cli.run(cfg) == 2
    assert "a_file is a file, not a directory" in capsys.readouterr().err

    cfg.out_dir = str(tmp_path / "out")
    close = ShardWriter.close

    def disk_full(self):
        raise OSError(errno.ENOSPC, "No space left on device", self.tmp)

    monkeypatch.setattr(ShardWriter, "close", disk_full)
    assert cli.run(cfg) == 2
    err = capsys.readouterr().err
    assert err.startswith("msgrun-prepare: error: ") and "No space left on device" in err and "resumes" in err
    monkeypatch.setattr(ShardWriter, "close", close)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_encode", ctrl_c)
    assert cli.run(cfg) == 130
    assert "stopped by Ctrl-C" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.run(cfg) == 0 and (tmp_path / "out" / "manifest.json").exists()


def test_a_prepare_refused_by_anothers_lock_removes_nothing(tmp_path, monkeypatch):
    """Two prepares started together on a missing out_dir both see it missing; the one refused by
    the other's lock used to remove the directory the other was writing."""
    import fcntl

    import msgrun.data.prepare as prep

    out = tmp_path / "out"
    out.mkdir()
    (out / "progress.json").write_text("{}")  # the other one's work
    monkeypatch.setattr(prep, "first_missing", lambda path: out)  # as it was when this one started
    with open(out / ".prepare.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another msgrun-prepare is writing"):
            prepare_shards(files_cfg(tmp_path, text_corpus(tmp_path / "corpus", n=3)), str(out), log=quiet)
    assert (out / "progress.json").read_text() == "{}"
