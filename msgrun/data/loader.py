"""Batches for the training step, read ahead in the background where that pays.

On a GPU the step only queues kernels, so the host is free while it runs: a background thread
reads the next batch from the shards, masks it (BERT) and pins it, and the step then only issues
a non-blocking copy. On the CPU the step itself occupies every core, and reading a batch from the
memory map costs a small fraction of it (bench/data.py measures both), so batches are made in
place. Batches are pure functions of (offset, rows, seq_len), so reading ahead changes nothing a
run computes: resume stays exact.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Optional, Tuple

import torch

Key = Tuple[int, int, int]  # (token offset, rows, seq_len)


class BatchLoader:
    """get(offset, rows, T, ahead) returns the batch at `offset` on `device` and, in background
    mode, starts reading the one at offset + ahead (the same micro-batch of the next step, if
    the layout stays; after a growth event the guess misses once and that batch is read in
    place)."""

    def __init__(self, make: Callable[[int, int, int], Dict[str, torch.Tensor]], device: torch.device,
                 background: Optional[bool] = None):
        self.make, self.device = make, device
        self.pin = device.type == "cuda"
        background = self.pin if background is None else background
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="msgrun-batches") if background else None
        self.pending: Dict[Key, Future] = {}
        self.hits = self.misses = 0

    def _host_batch(self, key: Key) -> Dict[str, torch.Tensor]:
        batch = self.make(*key)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def get(self, offset: int, rows: int, T: int, ahead: int = 0) -> Dict[str, torch.Tensor]:
        key = (offset, rows, T)
        future = self.pending.pop(key, None)
        if future is not None:
            self.hits += 1
            batch = future.result()  # re-raises a failure of the background read here
        else:
            self.misses += 1
            batch = self._host_batch(key)
        # guesses the run went past (a growth event changed the layout) are never used
        for stale in [k for k in self.pending if k[0] <= offset]:
            self.pending.pop(stale).cancel()
        if self.pool is not None and ahead > 0:
            nxt = (offset + ahead, rows, T)
            if nxt not in self.pending:
                self.pending[nxt] = self.pool.submit(self._host_batch, nxt)
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=self.pin) for k, v in batch.items()}

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True)
            self.pool = None
