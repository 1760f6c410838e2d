"""Depth layer maps of the block-expansion family: LLaMA-Pro, SOLAR, MIDAS (and LEMON's depth).

Each method is a *layer map* (growth/surgery.py): for every layer of the deeper model, the old
layer it copies. Methods whose new blocks must enter as the identity also name the layers whose
output projections (attn.proj, mlp.proj: weights and biases) are zeroed after copying; in a
pre-norm block x + attn(norm(x)) + mlp(norm(.)) that block is then exactly the identity, while
its input weights (qkv, fc, norms) are trained copies, so it receives gradients at once.

  llama_pro  (Wu et al., ACL 2024; TencentARC/LLaMA-Pro scripts/block_expansion.py, lines 20-40)
             P = L' - L new blocks, split = int(L / P); after every old block i with
             (i + 1) % split == 0, a copy of it with its output projections zeroed. That adds
             floor(L / split) blocks, which is P for some (L, P) even where P does not divide L
             (32 -> 38: split 5, copies after blocks 4, 9, 14, 19, 24, 29), and not for others
             (3 -> 5: split 1 adds 3 blocks): there the reference's final assert fails, and
             ours refuses before training (so does P > L, where split = 0 divides by zero).
             Exact (pre-norm only). The reference zeroes o_proj and down_proj (LLaMA has no
             biases); our biased GPT blocks have their biases zeroed too.
  solar      (Kim et al., 2023, depth up-scaling) two copies of the stack, the top m layers of
             the first and the bottom m of the second dropped, concatenated: L' = 2L - 2m
             (32 -> 48 with m = 8). Ours for odd L': the first copy keeps the bottom ceil(L'/2)
             layers and the second the top floor(L'/2). Not function preserving.
  midas      (Saunshi et al., NeurIPS 2024, gradual middle stacking) each stage grows by one
             block of b = L' - L layers: the middle block of the current stack is duplicated
             in place (f_1..f_s, B, B, f_(s+b+1)..). The paper's blocks tile the stack; ours picks
             the block starting at s = b * floor((L/b - 1)/2) when b divides L (the lower middle
             one for an even number of blocks), else at floor((L - b)/2). Not function preserving.
  lemon      (Wang et al., ICLR 2024; YiteWang/lemon-pytorch lm/vlm/inflate_bert_utils.py and
             inflate_postlnbert_lemon_utils.py, `inflate_LEMON`): the first 2L - L' old layers stay
             single and each of the top L' - L is followed by a copy whose output projections
             (attention output, FFN output: weights and biases) are zero, so 3 -> 5 is
             0, 1, 1', 2, 2'. The reference asserts L' <= 2L; ours refuses more. Pre-norm: the
             copy is the identity. Post-norm (BERT), as the reference's post-LN code: the
             original's FFN norm and the copy's attention norm become identity LayerNorms
             (gain 1, bias 0) and the copy keeps the original's FFN norm, so the pair computes
             LN_2(h) = gamma * norm(norm(h)) + beta, exact up to the norm's eps. The reference
             takes the copy's *added* width units (a width growth in the same event) from layer
             i + 1 (AKI); ours copies layer i's.
"""

from __future__ import annotations

import re

import torch

from msgrun.errors import ConfigError
from msgrun.growth.methods import Method

IDENTITY_ENTRY = ("llama_pro", "lemon")  # new blocks enter as the identity (zeroed output projections)
OUTPUT_PROJECTIONS = ("attn.proj.weight", "attn.proj.bias", "mlp.proj.weight", "mlp.proj.bias")


def layer_sources(method: str, old: int, new: int) -> tuple[list[int], list[bool]]:
    """Source layer of each new layer, and which new layers have their output projections zeroed."""
    if method == "llama_pro":
        split = llama_pro_split(old, new)
        sources, zeroed = [], []
        for i in range(old):
            copy = (i + 1) % split == 0
            sources += [i, i] if copy else [i]
            zeroed += [False, True] if copy else [False]
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
        single = 2 * old - new
        sources = list(range(single)) + [i for i in range(single, old) for _ in (0, 1)]
        return sources, [False] * single + [False, True] * (old - single)
    raise KeyError(method)


def llama_pro_split(old: int, new: int) -> int:
    """The reference's group size int(L / P): a zeroed copy follows every split-th old block."""
    return old // (new - old)


def llama_pro_runs(old: int, new: int) -> bool:
    """Whether the reference's block expansion runs for old -> new (split > 0, its final assert holds)."""
    return 0 < new - old <= old and old + old // llama_pro_split(old, new) == new


def llama_pro_targets(old: int) -> list[int]:
    """Every depth the reference's block expansion reaches from `old` layers."""
    return [n for n in range(old + 1, 2 * old + 1) if llama_pro_runs(old, n)]


def check_depth(method: str, old: int, new: int, family: str, where: str) -> None:
    """Refuse, before training, a depth growth the method cannot do."""
    if method == "llama_pro" and family != "gpt":
        raise ConfigError(
            f"{where} grows layers {old} -> {new} with operator.layers={method}, whose new blocks enter as the "
            "identity through zeroed output projections; that holds in a pre-norm block only, and model.family="
            f"{family} is post-norm (norm(x + 0) is not x). Use operator.layers=lemon (identity LayerNorms, "
            "exact) or msg for an exact depth growth of a post-norm model, or stack for a copying one.")
    limit = {"llama_pro": 2 * old, "solar": 2 * old, "midas": 2 * old, "lemon": 2 * old}.get(method)
    if limit is not None and new > limit:
        why = {"llama_pro": "adds at most one block per old block (one copy after each group)",
               "solar": "concatenates two copies of the stack with m >= 0 layers dropped from each",
               "midas": "duplicates one block of the current stack, so one stage adds at most its depth",
               "lemon": "follows each old layer with at most one zero-output copy (the reference asserts "
                        "L' <= 2L)"}[method]
        raise ConfigError(f"{where} grows layers {old} -> {new}, but operator.layers={method} {why}: at most "
                          f"{limit} layers from {old}. Split the growth into more stages.")
    if method == "llama_pro" and new > old and not llama_pro_runs(old, new):
        raise ConfigError(
            f"{where} grows layers {old} -> {new} with operator.layers=llama_pro. The reference "
            "(TencentARC/LLaMA-Pro scripts/block_expansion.py) puts a copy after every int(L / P)-th block "
            f"(P = {new - old} new blocks), which from {old} layers does not give {new} (its final assert "
            f"fails). Depths it reaches from {old}: "
            f"{', '.join(map(str, llama_pro_targets(old)))}.")


@torch.no_grad()
def zero_output_projections(model, zeroed: list[bool]) -> None:
    """The listed blocks' branch outputs become 0: in a pre-norm block, the identity. In a
    post-norm block (LEMON only; each zeroed block directly follows its original) the original's
    FFN norm and the copy's attention norm become identity LayerNorms: the original then outputs
    norm(h), the copy renormalises it (a no-op up to eps) and applies the original's FFN norm."""
    for i, z in enumerate(zeroed):
        if z:
            block = model.blocks[i]
            for name, p in block.named_parameters():
                if re.sub(r"^mlp\.experts\.\d+\.", "mlp.", name) in OUTPUT_PROJECTIONS:  # each expert's too
                    p.zero_()
            if model.args.family == "bert":
                for norm in (model.blocks[i - 1].mlp_norm, block.attn_norm):
                    norm.weight.fill_(1.0)
                    if norm.bias is not None:
                        norm.bias.zero_()


def method(name: str, about: str, **hooks) -> Method:
    """A block-expansion depth method: its layer map, with no masks; where its blocks enter as the
    identity, their output projections are zeroed."""
    def sources(old: int, new: int, cfg):
        src, zeroed = layer_sources(name, old, new)
        return src, [False] * new, zeroed

    def check(dim, old, new, family, where, cfg):
        check_depth(name, old, new, family, where)

    return Method(name, ("layers",), about, layer_sources=sources, check=check, **hooks)


METHODS = (
    method("llama_pro", "a zero-output copy after every int(L/P)-th block; exact, pre-norm only (LLaMA-Pro)",
           freezes_old=True),
    method("solar", "two copies of the stack with the seam's layers dropped (SOLAR's depth up-scaling; not exact)"),
    method("midas", "the middle block duplicated in place (MIDAS gradual stacking; not exact)"),
)
