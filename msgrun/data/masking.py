"""BERT's masked-LM batches with static shapes, and the byte count bits-per-byte divides by."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def _mlm_generator(seed: int, offset: int) -> torch.Generator:
    # a stream of its own, keyed by (seed, offset): resuming at an offset reproduces its masks,
    # and no other RNG (init, data order) shifts them
    digest = hashlib.blake2b(f"mlm:{seed}:{offset}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "big") & (2**63 - 1))


def mlm_count(seq_len: int, probability: float) -> int:
    """Positions predicted per sequence: fixed, so MLM batches have static shapes."""
    return max(1, round(probability * seq_len))


def mlm_batch(
    inputs: torch.Tensor,
    offset: int,
    seed: int,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT masking with static shapes: exactly M = max(1, round(probability*T)) positions per
    row, uniform without replacement, sorted. Returns (masked inputs, positions int64 (B, M),
    labels (B, M) = original tokens there). At each position: 80% mask_id, 10% a random
    non-special id, 10% unchanged. No boolean indexing, so no host sync and compile-friendly."""
    B, T = inputs.shape
    M = mlm_count(T, probability)
    g = _mlm_generator(seed, offset)
    cpu = inputs.detach().to("cpu", torch.int64)
    positions = torch.rand(B, T, generator=g).argsort(dim=1)[:, :M].sort(dim=1).values
    labels = cpu.gather(1, positions)
    u = torch.rand(B, M, generator=g)
    # a uniform non-special id: draw from [0, V - S) and step over each special id in turn
    specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
    random_ids = torch.randint(0, vocab_size - len(specials), (B, M), generator=g)
    for s in specials:
        random_ids += (random_ids >= s).long()
    new = torch.where(u < 0.8, torch.full_like(labels, mask_id),
                      torch.where(u < 0.9, random_ids, labels))
    masked = cpu.scatter(1, positions, new)
    dev = inputs.device
    return masked.to(dev), positions.to(dev), labels.to(dev)


def target_bytes(token_bytes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Total UTF-8 bytes of the predicted tokens (negative targets = ignored), for
    bits-per-byte = sum_nll / (ln 2 * target_bytes). Stays on the device: no host sync."""
    valid = targets >= 0
    return (token_bytes[targets.clamp(min=0)] * valid).sum()

