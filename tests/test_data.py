"""Tests of msgrun.data: corpora, split, tokenizer cache, token stream, MLM masking, eval batches.

Synthetic corpora in tmp_path with a 300-token vocabulary keep the whole file to a few seconds;
one test reads a few files of the real standard library.
"""

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from msgrun import data
from msgrun.config import DataConfig
from msgrun.data import tokenizer
from msgrun.data.common import _atomic_write
from msgrun.data.stream import ChunkPermutation
from msgrun.data import (
    DataError, TokenStream, fixed_eval_batches, mlm_batch, prepare_data, split_documents,
)

WORDS = ("def class return self import for while if else lambda yield value index name "
         "data list dict None True False print range len").split()


def write_corpus(root, n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(int(rng.integers(5, 40))):
            words = rng.choice(WORDS, size=int(rng.integers(2, 10)))
            lines.append("    " * int(rng.integers(0, 3)) + " ".join(words) + f" = {i}")
        with open(os.path.join(root, f"doc{i:03d}.py"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(root)


def make_cfg(tmp_path, **kw):
    kw.setdefault("name", "files")
    if kw["name"] == "files":
        kw.setdefault("paths", [str(tmp_path / "corpus")])
    kw.setdefault("vocab_size", 300)
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(**kw)


def quiet(_):
    pass


@pytest.fixture
def corpus_dir(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def corpus(tmp_path, corpus_dir):
    return prepare_data(make_cfg(tmp_path), log=quiet)


def docs_of(tokens, eot):
    """Split a token array at eot into documents (each without its eot)."""
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e] for s, e in zip(starts, ends)]


# ---------------------------------------------------------------------------------------------
# split


def test_split_is_deterministic_disjoint_and_seeded():
    names = [f"file{i}.py" for i in range(200)]
    a = split_documents(names, 0.1, seed=0)
    assert a == split_documents(names, 0.1, seed=0)
    assert a != split_documents(names, 0.1, seed=1)
    assert 5 <= sum(a) <= 40  # about 10% held out
    # a document's side depends only on its own name: adding files moves nobody
    assert split_documents(names + ["new.py"], 0.1, seed=0)[:200] == a


def test_split_guarantees_both_sides():
    assert sum(split_documents(["a", "b"], 1e-9, seed=0)) == 1
    assert sum(split_documents(["a", "b", "c"], 0.999999, seed=0)) == 2


def test_prepare_splits_as_msgrun_does(tmp_path):
    """One split rule: 25 documents at val_fraction 0.05 hash none of them below the threshold;
    msgrun moves the closest one to validation, and msgrun-prepare must do the same (it used to
    train the tokenizer, write the train shard, then fail on an empty validation split)."""
    from msgrun.data.prepare import prepare_shards

    write_corpus(tmp_path / "corpus", n_docs=25)
    cfg = make_cfg(tmp_path, val_fraction=0.05)
    direct = prepare_data(cfg, log=quiet)
    assert direct.num_val_docs == 1
    manifest = prepare_shards(cfg, str(tmp_path / "shards"), log=quiet)
    assert manifest["val_tokens"] == len(direct.val) and manifest["train_tokens"] == len(direct.train)
    assert manifest["data_fingerprint"] == direct.data_fingerprint


def test_prepare_data_split_and_roundtrip(tmp_path, corpus_dir, corpus):
    c = corpus
    train, val = np.asarray(c.train), np.asarray(c.val)
    assert c.num_train_docs + c.num_val_docs == 40
    assert c.num_train_docs > 0 and c.num_val_docs > 0
    assert (c.eot_id, c.mask_id, c.pad_id) == (0, 1, 2)
    assert c.train.dtype == np.uint16 and c.vocab_size == 300
    assert c.train[-1] == c.eot_id and c.val[-1] == c.eot_id
    assert np.count_nonzero(train == c.eot_id) == c.num_train_docs
    assert c.train_doc_bounds.dtype == np.int64 and c.train_doc_bounds[0] == 0
    assert np.all(train[c.train_doc_bounds[1:] - 1] == c.eot_id)  # each doc ends right before the next

    # decoding gives back exactly the documents, each in one split only
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(c.tokenizer_path)
    texts = {}
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name)) as f:
            texts[name] = f.read()
    train_texts = [tok.decode(d.tolist()) for d in docs_of(train, c.eot_id)]
    val_texts = [tok.decode(d.tolist()) for d in docs_of(val, c.eot_id)]
    assert sorted(train_texts + val_texts) == sorted(texts.values())
    assert not set(train_texts) & set(val_texts)
    assert c.train_bytes + c.val_bytes == sum(len(t.encode()) for t in texts.values())

    # another split seed moves documents; the same seed in a fresh cache reproduces everything
    again = prepare_data(make_cfg(tmp_path, cache_dir=str(tmp_path / "c2")), log=quiet)
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)
    assert again.data_fingerprint == c.data_fingerprint
    assert again.tokenizer_fingerprint == c.tokenizer_fingerprint
    other = prepare_data(make_cfg(tmp_path, split_seed=7), log=quiet)
    assert other.data_fingerprint != c.data_fingerprint
    assert not np.array_equal(other.val, val)


def test_token_bytes_match_utf8_length(tmp_path, corpus):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(corpus.tokenizer_path)
    assert corpus.token_bytes.dtype == np.int32 and corpus.token_bytes.shape == (300,)
    assert list(corpus.token_bytes[:3]) == [0, 0, 0]
    text = "for value in range(len(data)):\n    print(self.name, index)  # ascii only ~!\n"
    ids = tok.encode(text).ids
    assert corpus.token_bytes[ids].sum() == len(text.encode())
    # whole corpus: the bytes behind the tokens are the bytes of the files
    assert corpus.token_bytes[np.asarray(corpus.train)].sum() == corpus.train_bytes
    # byte-level BPE is exact beyond ASCII too
    text = "naïve café — 日本語 ✓"
    assert corpus.token_bytes[tok.encode(text).ids].sum() == len(text.encode())


def test_literal_special_token_in_text_is_not_a_separator(tmp_path, corpus_dir):
    with open(os.path.join(corpus_dir, "doc000.py"), "a") as f:
        f.write('EOT = "<|endoftext|>"  and "[MASK]"\n')
    c = prepare_data(make_cfg(tmp_path), log=quiet)
    train, val = np.asarray(c.train), np.asarray(c.val)
    assert np.count_nonzero(train == c.eot_id) == c.num_train_docs
    assert np.count_nonzero(val == c.eot_id) == c.num_val_docs
    assert not np.any(train == c.mask_id) and not np.any(val == c.mask_id)


def test_omegaconf_config_is_accepted(tmp_path, corpus_dir):
    from omegaconf import OmegaConf
    cfg = OmegaConf.structured(make_cfg(tmp_path))
    c = prepare_data(cfg, log=quiet)
    assert c.num_train_docs + c.num_val_docs == 40


def test_caps(tmp_path, corpus_dir):
    c = prepare_data(make_cfg(tmp_path, max_docs=10), log=quiet)
    assert c.num_train_docs + c.num_val_docs == 10
    sizes = [os.path.getsize(os.path.join(corpus_dir, f)) for f in sorted(os.listdir(corpus_dir))]
    cap = sum(sizes[:5]) + sizes[5] // 2  # the 6th file would cross the cap
    c = prepare_data(make_cfg(tmp_path, max_bytes=cap), log=quiet)
    assert c.num_train_docs + c.num_val_docs == 5
    assert c.train_bytes + c.val_bytes == sum(sizes[:5])


# ---------------------------------------------------------------------------------------------
# caching


def test_second_prepare_uses_the_cache(tmp_path, corpus, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(tokenizer, "train_tokenizer", boom)
    monkeypatch.setattr(tokenizer, "encode_texts", boom)
    lines = []
    again = prepare_data(make_cfg(tmp_path), log=lines.append)
    assert again.data_fingerprint == corpus.data_fingerprint
    assert again.tokenizer_fingerprint == corpus.tokenizer_fingerprint
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)
    assert np.array_equal(again.train_doc_bounds, corpus.train_doc_bounds)
    assert any("cached" in line for line in lines)
    # nothing half-written is ever left behind
    for _, _, files in os.walk(tmp_path / "cache"):
        assert not [f for f in files if ".tmp-" in f]


def test_changed_file_changes_fingerprint(tmp_path, corpus_dir, corpus):
    path = os.path.join(corpus_dir, "doc005.py")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:  # same size, different content
        f.write(text.replace("def", "fed"))
    changed = prepare_data(make_cfg(tmp_path), log=quiet)
    assert changed.data_fingerprint != corpus.data_fingerprint
    with open(os.path.join(corpus_dir, "extra.py"), "w") as f:
        f.write("x = 1\n")
    added = prepare_data(make_cfg(tmp_path), log=quiet)
    assert added.data_fingerprint not in (corpus.data_fingerprint, changed.data_fingerprint)


def test_concurrent_runs_share_one_cache(tmp_path, corpus_dir):
    results, errors = [], []

    def run():
        try:
            results.append(prepare_data(make_cfg(tmp_path), log=quiet))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.tokenizer_fingerprint for r in results}) == 1
    assert all(np.array_equal(r.train, results[0].train) for r in results)
    for _, _, files in os.walk(tmp_path / "cache"):
        assert not [f for f in files if ".tmp-" in f]


def test_failed_write_leaves_nothing(tmp_path):
    def broken_write(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        _atomic_write(str(tmp_path / "x.json"), broken_write)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# tokenizer_path


def test_tokenizer_path_is_loaded(tmp_path, corpus, monkeypatch):
    path = str(tmp_path / "my_tokenizer.json")
    shutil.copy(corpus.tokenizer_path, path)
    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda *a: pytest.fail("must not train"))
    c = prepare_data(make_cfg(tmp_path, tokenizer_path=path, cache_dir=str(tmp_path / "c3")),
                     log=quiet)
    assert c.tokenizer_path == path
    assert c.tokenizer_fingerprint == corpus.tokenizer_fingerprint
    assert np.array_equal(c.train, corpus.train)


def test_tokenizer_path_errors(tmp_path, corpus_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    with pytest.raises(DataError, match="tokenizer_path.*no such file"):
        prepare_data(make_cfg(tmp_path, tokenizer_path=str(tmp_path / "nope.json")), log=quiet)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "[PAD]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["some text to train on"] * 10, trainer)
    path = str(tmp_path / "nomask.json")
    tok.save(path)
    with pytest.raises(DataError, match=r"no '\[MASK\]' token"):
        prepare_data(make_cfg(tmp_path, tokenizer_path=path), log=quiet)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_path_error(tmp_path, corpus_dir):
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg(tmp_path, paths=[corpus_dir, str(tmp_path / "missing.txt")]),
                     log=quiet)
    msg = str(e.value)
    assert "data.paths" in msg and "missing.txt" in msg and "does not exist" in msg
    assert "glob" in msg  # says what is accepted


def test_glob_matching_nothing_error(tmp_path, corpus_dir):
    with pytest.raises(DataError, match=r"data.paths entry .*\*\*/\*\.rs.*matches nothing"):
        prepare_data(make_cfg(tmp_path, paths=[str(tmp_path / "corpus" / "**" / "*.rs")]),
                     log=quiet)


def test_glob_and_directory_expansion(tmp_path, corpus_dir):
    os.makedirs(tmp_path / "corpus" / "sub" / ".git")
    (tmp_path / "corpus" / "sub" / "deep.txt").write_text("deep file text\n")
    (tmp_path / "corpus" / "sub" / ".git" / "HEAD").write_text("ref: main\n")
    docs, _ = data.list_documents(make_cfg(tmp_path, paths=[str(tmp_path / "corpus" / "**" / "*.txt")]))
    assert [d.name for d in docs] == ["deep.txt"]
    docs, _ = data.list_documents(make_cfg(tmp_path))  # a directory: everything not hidden
    names = [d.name for d in docs]
    assert names == sorted(names) and "sub/deep.txt" in names and len(names) == 41


def test_empty_corpus_and_other_config_errors(tmp_path):
    os.makedirs(tmp_path / "empty")
    for i in range(3):
        (tmp_path / "empty" / f"{i}.txt").write_text("")
    with pytest.raises(DataError, match="data.name=files: no non-empty documents"):
        prepare_data(make_cfg(tmp_path, paths=[str(tmp_path / "empty")]), log=quiet)
    (tmp_path / "empty" / "one.txt").write_text("only one")
    with pytest.raises(DataError, match="at least 2"):
        prepare_data(make_cfg(tmp_path, paths=[str(tmp_path / "empty")]), log=quiet)
    with pytest.raises(DataError, match="data.name='nope'"):
        prepare_data(make_cfg(tmp_path, name="nope"), log=quiet)
    with pytest.raises(DataError, match="data.paths"):
        prepare_data(make_cfg(tmp_path, paths=[]), log=quiet)
    write_corpus(tmp_path / "corpus", n_docs=3)
    with pytest.raises(DataError, match="data.vocab_size=100"):
        prepare_data(make_cfg(tmp_path, vocab_size=100), log=quiet)
    with pytest.raises(DataError, match="hf_path"):
        prepare_data(make_cfg(tmp_path, name="hf"), log=quiet)


# ---------------------------------------------------------------------------------------------
# real sources


def test_pystdlib_source_small(tmp_path):
    docs, searched = data.list_documents(make_cfg(tmp_path, name="pystdlib", max_docs=300))
    names = [d.name for d in docs]
    assert len(names) == 300 and names == sorted(names)
    for n in names:
        parts = n.split("/")
        assert n.endswith(".py") and not {"test", "tests", "__pycache__", "idlelib"} & set(parts)
        assert "site-packages" not in parts
    c = prepare_data(make_cfg(tmp_path, name="pystdlib", max_docs=20), log=quiet)
    assert c.num_train_docs + c.num_val_docs == 20 and len(c.train) > 1000


def test_hf_source_on_local_jsonl(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    path = tmp_path / "rows.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(30):
            text = "" if i == 3 else " ".join(rng.choice(WORDS, size=20)) + f" row {i}"
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    kw = dict(name="hf", hf_path="json", hf_data_files=[str(path)])
    c = prepare_data(make_cfg(tmp_path, **kw), log=quiet)
    assert c.num_train_docs + c.num_val_docs == 29  # the empty row is skipped
    streamed = prepare_data(make_cfg(tmp_path, hf_streaming=True, **kw), log=quiet)
    assert streamed.data_fingerprint == c.data_fingerprint  # same rows, same corpus
    capped = prepare_data(make_cfg(tmp_path, hf_streaming=True, max_docs=10, **kw), log=quiet)
    assert capped.num_train_docs + capped.num_val_docs == 10
    with pytest.raises(DataError, match=r"hf_text_field='body'.*available columns: \['text', 'id'\]"):
        prepare_data(make_cfg(tmp_path, hf_text_field="body", **kw), log=quiet)


# ---------------------------------------------------------------------------------------------
# TokenStream


def synthetic_stream(n_tokens=611, chunk=16, seed=0):
    """Distinct token values, so positions are identifiable; a tail that is not a whole chunk."""
    tokens = np.arange(n_tokens, dtype=np.int64) + 3
    return TokenStream(tokens, chunk, seed), tokens


def test_batches_tile_the_stream():
    s, *_ = synthetic_stream()
    x4, y4 = s.batch(17, 4, 8)
    xa, ya = s.batch(17, 2, 8)
    xb, yb = s.batch(17 + s.tokens_per_batch(2, 8), 2, 8)
    assert torch.equal(torch.cat([xa, xb]), x4) and torch.equal(torch.cat([ya, yb]), y4)
    assert x4.dtype == torch.int64 and x4.shape == (4, 8)
    # targets are inputs shifted by one; a row's last target is the next row's first input
    assert torch.equal(y4[:, :-1], x4[:, 1:])
    assert torch.equal(y4[:-1, -1], x4[1:, 0])
    assert torch.equal(x4.flatten(), torch.from_numpy(s.read(17, 32)))


def test_sequence_length_does_not_change_the_token_order():
    s, *_ = synthetic_stream()

    def inputs(batch_size, seq_len, n_batches):
        out, offset = [], 0
        for _ in range(n_batches):
            out.append(s.batch(offset, batch_size, seq_len)[0].flatten())
            offset += s.tokens_per_batch(batch_size, seq_len)
        return torch.cat(out)

    a = inputs(3, 8, 20)  # 480 tokens: crosses an epoch boundary
    b = inputs(5, 16, 6)
    assert torch.equal(a, b)


def test_epochs_are_chunk_permutations_and_wrap():
    s, tokens = synthetic_stream()
    n = (len(tokens) // 16) * 16  # the tail of fewer than 16 tokens is never read
    assert s.n == n and s.epoch(n - 1) == 0 and s.epoch(n) == 1 and s.epoch(5 * n + 3) == 5
    e0, e1 = s.read(0, n), s.read(n, n)
    assert not np.array_equal(e0, e1)  # reshuffled
    for epoch, arr in ((0, e0), (1, e1)):
        perm = ChunkPermutation(n // 16, 0, epoch)(np.arange(n // 16))
        assert sorted(perm.tolist()) == list(range(n // 16))  # every chunk exactly once
        expected = np.concatenate([tokens[i * 16:(i + 1) * 16] for i in perm])
        assert np.array_equal(arr, expected)
    # a read across the boundary, and one longer than an epoch
    assert np.array_equal(s.read(n - 5, 10), np.concatenate([e0[-5:], e1[:5]]))
    assert np.array_equal(s.read(0, 2 * n + 7)[: 2 * n], np.concatenate([e0, e1]))
    # a fresh stream (a resumed run) reads the same; another seed does not
    s2, _ = synthetic_stream()
    assert np.array_equal(s2.read(3 * n - 4, 50), s.read(3 * n - 4, 50))
    s3, _ = synthetic_stream(seed=1)
    assert not np.array_equal(s3.read(0, n), e0)


def test_rows_of_a_batch_come_from_all_over_the_corpus():
    s, tokens = synthetic_stream(n_tokens=16 * 1000)
    x, _ = s.batch(0, 8, 16)
    chunk_of_row = (x[:, 0] - 3) // 16
    assert len(set(chunk_of_row.tolist())) == 8  # eight rows, eight different chunks
    assert (chunk_of_row.max() - chunk_of_row.min()) > 100  # not neighbours


def test_stream_on_prepared_corpus(corpus):
    s = TokenStream(corpus.train, 32, seed=0)
    epoch = s.read(0, s.n)
    assert np.array_equal(np.sort(epoch), np.sort(corpus.train[: s.n]))
    assert not np.array_equal(epoch, corpus.train[: s.n])


# ---------------------------------------------------------------------------------------------
# MLM


def test_mlm_statistics_and_determinism():
    V, B, T = 300, 256, 128
    specials = (0, 1, 2, 150)  # 150: a special id in the middle of the range
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, 150, (B, T), generator=g)
    masked, pos, labels = mlm_batch(inputs, offset=4096, seed=0, mask_id=1, vocab_size=V,
                                    special_ids=specials)
    M = round(0.15 * T)
    assert pos.shape == labels.shape == (B, M) and pos.dtype == torch.int64
    assert torch.all(pos[:, 1:] > pos[:, :-1])  # sorted, no repeats
    assert torch.equal(labels, inputs.gather(1, pos))
    # outside the chosen positions nothing changes
    chosen = torch.zeros(B, T, dtype=torch.bool).scatter_(1, pos, True)
    assert torch.equal(masked[~chosen], inputs[~chosen])
    at = masked.gather(1, pos)
    frac_mask = (at == 1).float().mean().item()
    frac_same = (at == labels).float().mean().item()
    frac_rand = ((at != 1) & (at != labels)).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03
    assert abs(frac_rand - 0.1) < 0.03
    # random replacements are never special (mask id 1 only from the 80% branch)
    rand_vals = at[(at != 1) & (at != labels)]
    assert rand_vals.min() >= 3 and not torch.any(rand_vals == 150)
    assert rand_vals.max() < V and torch.any(rand_vals > 150)  # the whole range is used
    # chosen positions are uniform: every column gets picked about B*M/T times
    counts = chosen.sum(0).float()
    assert counts.min() > 0.4 * B * M / T and counts.max() < 1.8 * B * M / T
    # determined by (seed, offset) only
    again = mlm_batch(inputs, offset=4096, seed=0, mask_id=1, vocab_size=V, special_ids=specials)
    assert all(torch.equal(a, b) for a, b in zip(again, (masked, pos, labels)))
    other = mlm_batch(inputs, offset=4097, seed=0, mask_id=1, vocab_size=V, special_ids=specials)
    assert not torch.equal(other[1], pos)
    other = mlm_batch(inputs, offset=4096, seed=1, mask_id=1, vocab_size=V, special_ids=specials)
    assert not torch.equal(other[1], pos)
    assert not torch.equal(inputs, masked)  # the input itself is not modified in place
    assert mlm_batch(inputs[:, :3], 0, 0, 1, V, specials)[1].shape == (B, 1)


# ---------------------------------------------------------------------------------------------
# evaluation batches


def test_fixed_eval_batches_gpt(corpus):
    a = fixed_eval_batches(corpus, seq_len=16, batch_size=4, eval_tokens=300, family="gpt", seed=0)
    b = fixed_eval_batches(corpus, seq_len=16, batch_size=4, eval_tokens=300, family="gpt", seed=0)
    rows = min(300, len(corpus.val)) // 17
    assert sum(x["inputs"].shape[0] for x in a) == rows
    for x, y in zip(a, b):
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["targets"], y["targets"])
        assert torch.equal(x["targets"][:, :-1], x["inputs"][:, 1:])
        assert x["target_bytes"] == int(corpus.token_bytes[x["targets"].numpy()].sum())
    # rows are read at evenly spaced offsets spanning the whole split, first and last included
    stride = (len(corpus.val) - 17) // (rows - 1)
    first = torch.cat([x["inputs"] for x in a])[:, 0]
    assert torch.equal(first, torch.from_numpy(corpus.val[0: rows * stride: stride][:rows].astype(np.int64)))
    assert (rows - 1) * stride + 17 > len(corpus.val) - stride  # the last row lies near the end of val


def test_fixed_eval_batches_bert(corpus):
    a = fixed_eval_batches(corpus, seq_len=16, batch_size=4, eval_tokens=300, family="bert", seed=3)
    b = fixed_eval_batches(corpus, seq_len=16, batch_size=4, eval_tokens=300, family="bert", seed=3)
    val = torch.from_numpy(np.asarray(corpus.val).astype(np.int64))
    rows = min(300, len(corpus.val)) // 17
    stride = (len(corpus.val) - 17) // (rows - 1)
    original_rows = torch.stack([val[i * stride: i * stride + 16] for i in range(rows)])
    done = 0
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in ("inputs", "positions", "targets"))
        n = x["inputs"].shape[0]
        assert torch.equal(x["targets"], original_rows[done: done + n].gather(1, x["positions"]))
        assert x["target_bytes"] == int(corpus.token_bytes[x["targets"].numpy()].sum())
        done += n
    assert any(torch.any(x["inputs"] == corpus.mask_id) for x in a)


def test_eval_split_too_small(corpus):
    with pytest.raises(DataError, match="validation split.*model.seq_len"):
        fixed_eval_batches(corpus, seq_len=len(corpus.val), batch_size=2, eval_tokens=10**9)


def test_target_bytes_helper():
    tb = torch.tensor([0, 1, 2, 3])
    assert data.target_bytes(tb, torch.tensor([[1, 2], [3, -100]])).item() == 6
