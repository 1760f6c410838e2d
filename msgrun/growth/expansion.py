"""Depth layer maps of the block-expansion family: LLaMA-Pro, SOLAR, MIDAS (and LEMON's depth).

Each method is a *layer map* (growth/surgery.py): for every layer of the deeper model, the old
layer it copies. Methods whose new blocks must enter as the identity also name the layers whose
output projections (attn.proj, mlp.proj: weights and biases) are zeroed after copying; in a
pre-norm block x + attn(norm(x)) + mlp(norm(.)) that block is then exactly the identity, while
its input weights (qkv, fc, norms) are trained copies, so it receives gradients at once.

  llama_pro  (Wu et al., ACL 2024; TencentARC/LLaMA-Pro scripts/block_expansion.py)
             P = L' - L new blocks; the L old blocks are cut into P consecutive groups and a copy
             of each group's last block, output projections zeroed, is placed right after the
             group. Exact (pre-norm only). The reference needs L divisible by P (it asserts);
             where it is not, ours cuts the groups as evenly as floor(g L / P) allows, which is
             the reference's split whenever it applies. The reference zeroes o_proj and
             down_proj (LLaMA has no biases); our biased GPT blocks have their biases zeroed too.
  solar      (Kim et al., 2023, depth up-scaling) two copies of the stack, the top m layers of
             the first and the bottom m of the second dropped, concatenated: L' = 2L - 2m
             (32 -> 48 with m = 8). Ours for odd L': the first copy keeps the bottom ceil(L'/2)
             layers and the second the top floor(L'/2). Not function preserving.
  midas      (Saunshi et al., NeurIPS 2024, gradual middle stacking) each stage grows by one
             block of b = L' - L layers: the middle block of the current stack is duplicated
             in place (f_1..f_s, B, B, f_(s+b+1)..). The paper's blocks tile the stack; ours picks
             the block starting at s = b * floor((L/b - 1)/2) when b divides L (the lower middle
             one for an even number of blocks), else at floor((L - b)/2). Not function preserving.
  lemon      (Wang et al., ICLR 2024) lossless depth as we read it: every old layer followed by
             its copies (0,0,1,1,...), the copies' output projections zeroed, as llama_pro.
"""

from __future__ import annotations

import re

import torch

from msgrun.errors import ConfigError

DEPTH_METHODS = ("llama_pro", "solar", "midas", "lemon")
IDENTITY_ENTRY = ("llama_pro", "lemon")  # new blocks enter as the identity (zeroed output projections)
OUTPUT_PROJECTIONS = ("attn.proj.weight", "attn.proj.bias", "mlp.proj.weight", "mlp.proj.bias")


def layer_sources(method: str, old: int, new: int) -> tuple[list[int], list[bool]]:
    """Source layer of each new layer, and which new layers have their output projections zeroed."""
    if method == "llama_pro":
        sources, zeroed = [], []
        extra = new - old
        for g in range(extra):
            group = list(range(g * old // extra, (g + 1) * old // extra))
            sources += group + [group[-1]]
            zeroed += [False] * len(group) + [True]
        return sources, zeroed
    if method == "solar":
        bottom = (new + 1) // 2
        top = new - bottom
        return list(range(bottom)) + list(range(old - top, old)), [False] * new
    if method == "midas":
        b = new - old
        s = b * ((old // b - 1) // 2) if old % b == 0 else (old - b) // 2
        block = list(range(s, s + b))
        return list(range(s + b)) + block + list(range(s + b, old)), [False] * new
    if method == "lemon":
        sources = [k * old // new for k in range(new)]
        return sources, [k > 0 and sources[k - 1] == s for k, s in enumerate(sources)]
    raise KeyError(method)


def check_depth(method: str, old: int, new: int, family: str, where: str) -> None:
    """Refuse, before training, a depth growth the method cannot do."""
    if method in IDENTITY_ENTRY and family != "gpt":
        raise ConfigError(
            f"{where} grows layers {old} -> {new} with operator.layers={method}, whose new blocks enter as the "
            "identity through zeroed output projections; that holds in a pre-norm block only, and model.family="
            f"{family} is post-norm (norm(x + 0) is not x). Use operator.layers=msg for an exact depth growth of "
            "a post-norm model, or stack for a copying one.")
    limit = {"llama_pro": 2 * old, "solar": 2 * old, "midas": 2 * old}.get(method)
    if limit is not None and new > limit:
        why = {"llama_pro": "adds at most one block per old block (one copy after each group)",
               "solar": "concatenates two copies of the stack with m >= 0 layers dropped from each",
               "midas": "duplicates one block of the current stack, so one stage adds at most its depth"}[method]
        raise ConfigError(f"{where} grows layers {old} -> {new}, but operator.layers={method} {why}: at most "
                          f"{limit} layers from {old}. Split the growth into more stages.")


def new_blocks(method: str, old: int, new: int) -> list[int]:
    """Indices of the blocks an identity-entry expansion added (LLaMA-Pro trains only these)."""
    return [i for i, z in enumerate(layer_sources(method, old, new)[1]) if z]


def check_options(cfg, methods: dict) -> None:
    if cfg.freeze_old and methods["layers"] != "llama_pro":
        raise ConfigError(f"operator.freeze_old=true trains only the blocks a LLaMA-Pro expansion added, but "
                          f"operator.layers = {methods['layers']!r}; set operator.layers=llama_pro or "
                          "operator.freeze_old=false.")


@torch.no_grad()
def zero_output_projections(model, zeroed: list[bool]) -> None:
    """The listed blocks' branch outputs become 0: in a pre-norm block, the identity."""
    for i, z in enumerate(zeroed):
        if z:
            block = model.blocks[i]
            for name, p in block.named_parameters():
                if re.sub(r"^mlp\.experts\.\d+\.", "mlp.", name) in OUTPUT_PROJECTIONS:  # each expert's too
                    p.zero_()
