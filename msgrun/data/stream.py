"""The training stream: the training tokens, chunk-shuffled per epoch, addressed by token offset.

    stream = TokenStream(corpus.train, chunk, seed)
    x, y = stream.batch(offset, batch_size, seq_len)      # offset advances by batch_size*seq_len

The stream is addressed by *token offset*, not by step: two runs with different batch sizes or
sequence lengths read the same tokens in the same order (docs/architecture.md section 4). Nothing here grows
with the corpus: an epoch's order is a keyed permutation computed per chunk index, and a read
copies only the tokens asked for from the memory-mapped shards.
"""

from __future__ import annotations

import numpy as np
import torch

from msgrun.data.common import DataError
from msgrun.data.shards import Tokens


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a cheap bijective scramble of 64-bit words (uint64 wraps)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ChunkPermutation:
    """A pseudo-random bijection of [0, n), evaluated index by index in O(1) memory: a balanced
    Feistel network on the smallest even number of bits covering n, with cycle walking (apply
    again until the value falls below n; each pass stays a bijection of [0, 2^bits), so the
    walk restricted to [0, n) is one too). Keys come from (seed, epoch). Materialising
    rng.permutation(n) instead would cost 8 bytes per chunk, which grows with the corpus."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = np.random.default_rng([seed, epoch]).integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            out = self._round_trip(np.asarray(idx, dtype=np.uint64))
            walk = out >= self.n
            while walk.any():
                out[walk] = self._round_trip(out[walk])
                walk = out >= self.n
        return out.astype(np.int64)


class TokenStream:
    """The infinite training stream: epoch 0, epoch 1, ..., where epoch e is the training tokens
    cut into chunks of `chunk` tokens, in the order ChunkPermutation(n_chunks, seed, e),
    concatenated. Global offset o is position o of that stream, so runs that change batch size
    or sequence length mid-training still read the same tokens in the same order, while
    consecutive rows of a batch come from chunks all over the corpus: shuffling whole documents
    instead would fill a batch from one or two files and make every step's gradient a sample of
    a single file. Chunks shorter than a row are joined like packed documents. The tail of fewer
    than `chunk` tokens is not used. The permutation is applied when reading, by index: no epoch
    is ever copied."""

    def __init__(self, tokens, chunk: int, seed: int):
        self.tokens = tokens if isinstance(tokens, Tokens) else Tokens([np.asarray(tokens)])
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
        self._perms: dict[int, ChunkPermutation] = {}

    def permutation(self, e: int) -> ChunkPermutation:
        if e not in self._perms:
            if len(self._perms) >= 2:  # a read spans at most the current and next epoch
                self._perms.pop(min(self._perms))
            self._perms[e] = ChunkPermutation(self.n_chunks, self.seed, e)
        return self._perms[e]

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
            first, last = pos // self.chunk, (pos + take - 1) // self.chunk
            sources = self.permutation(e)(np.arange(first, last + 1))
            for c, src in zip(range(first, last + 1), sources.tolist()):
                lo, hi = max(pos, c * self.chunk), min(pos + take, (c + 1) * self.chunk)
                self.tokens.read(src * self.chunk + lo - c * self.chunk, hi - lo,
                                 out=out[done + lo - pos:done + hi - pos])
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
