"""What one optimizer step reads and runs: its layout over ranks and micro-batches, and the
forward/backward of one micro-batch. The training step, the memory pre-flight and LiGO's
fitting all read their batches through `StepLayout.micro_batches` and run them through
`forward_backward`, so the three cannot drift apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepLayout:
    """What one optimizer step reads and runs at a shape (all ranks, all micro-batches)."""

    rows: int  # sequences
    seq_len: int  # tokens per sequence read from the stream
    pool: int  # length pooling factor; 1: none
    predicted: int | None  # bert: predicted tokens per sequence

    def micro_batches(self, tokens: int, rank: int = 0, world_size: int = 1, accum: int = 1) -> list[tuple[int, int]]:
        """(stream offset, rows) of each micro-batch that `rank` reads in the step starting at
        stream position `tokens`: the step's rows split evenly over the ranks, each rank's share
        over `accum` micro-batches, so any world size reads the same tokens in the same order."""
        per_rank = self.rows // world_size
        micro = per_rank // accum
        return [(tokens + (rank * per_rank + k * micro) * self.seq_len, micro) for k in range(accum)]


def forward_backward(model, batch: dict, accum: int, autocast=None, pool: int = 1, layers=None,
                     layer_scale=None) -> torch.Tensor:
    """The loss of one micro-batch, backpropagated at 1/accum (micro-batches sum to the step's
    mean gradient); returns the detached loss. The logits are never asked for: the step does not
    read them (Transformer.head says why that matters)."""
    with autocast if autocast is not None else contextlib.nullcontext():
        _, loss = model(batch["inputs"], batch["targets"], batch.get("positions"), layers, layer_scale, pool,
                        with_logits=False)
    (loss / accum).backward()
    return loss.detach()
