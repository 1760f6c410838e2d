"""Corpora, tokenizers, token shards, the token stream, and MLM masking.

    corpus = prepare_data(cfg.data)                       # a text source or shards on disk -> Corpus
    stream = TokenStream(corpus.train, chunk, seed)       # chunk-shuffled per epoch, by index
    x, y = stream.batch(offset, batch_size, seq_len)      # offset advances by batch_size*seq_len

Every corpus is read from memory-mapped token shards, so memory does not grow with its size.
Everything is deterministic given the config: the split hashes document names, the shuffle is
keyed by (seed, epoch) and MLM masks by (seed, offset).

    sources.py     where documents come from (pystdlib, pysite, files, hf), the split, fingerprints
    tokenizer.py   BPE training, tokenizer.json loading, special ids, bytes per id, batch encoding
    shards.py      shard formats (llm.c, msgrun, headerless), writing them atomically, Tokens
    corpus.py      Corpus and prepare_data: a source through the shard cache, or data=shards
    stream.py      TokenStream: the training stream by token offset
    loader.py      background batch loading that overlaps the step (GPU)
    masking.py     BERT masking with static shapes, bytes of the predicted tokens
    evaluation.py  the fixed validation batches
    prepare.py     msgrun-prepare: any source into shards, in parallel, resumable

This package knows nothing of models: cfg is a DataConfig or anything with its attributes
(prepare.py alone composes the Hydra config of its command).
"""

from msgrun.data.common import DataError
from msgrun.data.corpus import Corpus, open_shards, prepare_data
from msgrun.data.evaluation import fixed_eval_batches
from msgrun.data.loader import BatchLoader
from msgrun.data.masking import mlm_batch, mlm_count, target_bytes
from msgrun.data.sources import SOURCES, Document, list_documents, split_documents
from msgrun.data.shards import Tokens, read_shard
from msgrun.data.stream import TokenStream
from msgrun.data.tokenizer import EOT, MASK, PAD, SPECIAL_TOKENS, encode_texts, load_tokenizer, special_ids

__all__ = [
    "BatchLoader", "Corpus", "DataError", "Document", "encode_texts", "EOT", "fixed_eval_batches",
    "list_documents", "load_tokenizer", "MASK", "mlm_batch", "mlm_count", "open_shards", "PAD",
    "prepare_data", "read_shard", "SOURCES", "special_ids", "SPECIAL_TOKENS", "split_documents",
    "target_bytes", "Tokens", "TokenStream",
]
