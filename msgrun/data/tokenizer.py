"""Tokenizers: training a byte-level BPE on the corpus, loading a tokenizer.json, the special
ids msgrun needs, the bytes each id stands for (bits per byte), and batch encoding."""

from __future__ import annotations

import os
import time
from typing import Iterable, List, Optional

import numpy as np

from msgrun.data.common import DataError, _atomic_write, _hash, _mb

EOT, MASK, PAD = "<|endoftext|>", "[MASK]", "[PAD]"
SPECIAL_TOKENS = (EOT, MASK, PAD)  # ids 0, 1, 2 in a tokenizer trained here
# text per encode_batch call: enough documents to keep every core busy, while the Encoding objects
# (about 100 bytes per token) and Python id lists stay near 100 MB
BATCH_BYTES = 1_000_000


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


def train_tokenizer(texts: Iterable[str], vocab_size: int):
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


def special_ids(tok, path: str) -> tuple[int, int, int]:
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


def warn_if_smaller(cfg, vocab_size: int, log) -> None:
    """A trained BPE can stop short of data.vocab_size (too little, or too repetitive, text)."""
    if not cfg.tokenizer_path and vocab_size < int(cfg.vocab_size):
        log(f"warning: the tokenizer has {vocab_size} tokens, fewer than data.vocab_size={cfg.vocab_size}: the "
            "corpus is too small (or too repetitive) for BPE to learn that many merges. The model uses "
            f"{vocab_size}; use a larger corpus or a smaller data.vocab_size to silence this.")


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



def token_dtype(vocab_size: int):
    """The narrowest unsigned dtype that holds every id (uint16 up to 65,536 tokens)."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def encode_texts(tok, texts: List[str], eot_id: Optional[int], dtype) -> List[np.ndarray]:
    """Each text's ids followed by eot (if the tokenizer has one), one array per text. The
    tokenizers library encodes a batch on all cores; callers pass about 1 MB of text at a time,
    since Encoding objects and Python int lists cost far more memory than the arrays."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: no offsets computed
    out = []
    for enc in encode(texts, add_special_tokens=False):
        ids = enc.ids
        if eot_id is not None:
            ids.append(eot_id)
        out.append(np.array(ids, dtype=dtype))
    return out


def encode_stream(items: Iterable, tok, eot_id: Optional[int], dtype, batch_bytes: int = BATCH_BYTES):
    """(tag, text) pairs -> (tag, ids) pairs in the same order, encoded about 1 MB of text at a
    time (a batch is what the tokenizers library spreads over all cores)."""
    tags, texts, nbytes = [], [], 0
    for tag, text in items:
        tags.append(tag)
        texts.append(text)
        nbytes += len(text)
        if nbytes >= batch_bytes:
            yield from zip(tags, encode_texts(tok, texts, eot_id, dtype))
            tags, texts, nbytes = [], [], 0
    if texts:
        yield from zip(tags, encode_texts(tok, texts, eot_id, dtype))


def get_tokenizer(cfg, trained_path: str, train_texts, log):
    """(tokenizer, fingerprint, path): cfg.tokenizer_path when given, otherwise a byte-level BPE of
    cfg.vocab_size tokens at trained_path, trained on train_texts() the first time (the first
    writer wins a race, so concurrent runs share one file, hence one fingerprint)."""
    if cfg.tokenizer_path:
        tok_path = os.path.abspath(os.path.expanduser(str(cfg.tokenizer_path)))
        if not os.path.isfile(tok_path):
            raise DataError(
                f"data.tokenizer_path={cfg.tokenizer_path}: no such file. Give the path of a "
                "tokenizer.json (the 'tokenizers' library format), or set it to null to train "
                "a BPE tokenizer on the corpus."
            )
        tok, tok_fp = load_tokenizer(tok_path)
        log(f"tokenizer: loaded {tok_path} (fingerprint {tok_fp})")
        return tok, tok_fp, tok_path
    vocab = int(cfg.vocab_size)
    if vocab < 256 + len(SPECIAL_TOKENS):
        raise DataError(
            f"data.vocab_size={vocab} is too small: a byte-level BPE needs the 256 byte "
            f"tokens plus {len(SPECIAL_TOKENS)} special tokens, so at least "
            f"{256 + len(SPECIAL_TOKENS)}."
        )
    cached = os.path.isfile(trained_path)
    if not cached:
        t1 = time.perf_counter()
        nbytes = [0]

        def texts():
            for t in train_texts():
                nbytes[0] += len(t)
                yield t
        trained = train_tokenizer(texts(), vocab)
        os.makedirs(os.path.dirname(trained_path), exist_ok=True)
        blob = trained.to_str().encode("utf-8")
        _atomic_write(trained_path, lambda f: f.write(blob), first_wins=True)
        log(
            f"tokenizer: trained {trained.get_vocab_size()}-token BPE on {_mb(nbytes[0])} of text "
            f"in {time.perf_counter() - t1:.1f} s (cached at {trained_path})"
        )
    tok, tok_fp = load_tokenizer(trained_path)
    if cached:
        log(f"tokenizer: {vocab}-token BPE (cached at {trained_path}, fingerprint {tok_fp})")
    return tok, tok_fp, trained_path
