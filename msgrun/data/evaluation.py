"""The fixed validation batches every run of a comparison evaluates on."""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from msgrun.data.common import DataError
from msgrun.data.masking import mlm_batch, target_bytes


def fixed_eval_batches(
    corpus,
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
    bert: {inputs (masked), positions, targets (the labels at those positions)} with masks fixed by `seed`. Every batch carries
    target_bytes (an int): the UTF-8 bytes of the tokens it predicts, 0 when the corpus has no
    tokenizer to say (shards read with data.vocab_size alone)."""
    if family not in ("gpt", "bert"):
        raise ValueError(f"family must be 'gpt' or 'bert', got {family!r}")
    if family == "bert" and corpus.mask_id is None:
        raise DataError(
            "model.family=bert masks tokens with a [MASK] id, and these shards come without a "
            "tokenizer that has one. Give data.tokenizer_path (a tokenizer.json with a '[MASK]' "
            "token, e.g. the one msgrun-prepare writes beside its shards), or train a gpt model."
        )
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
    tb = torch.from_numpy((corpus.token_bytes if corpus.token_bytes is not None
                           else np.zeros(corpus.vocab_size)).astype(np.int64))
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
            batches.append({"inputs": masked, "positions": positions, "targets": labels,
                            "target_bytes": int(target_bytes(tb, labels))})
    return batches
