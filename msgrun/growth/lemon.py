"""LEMON's lossless width growth (Wang et al., ICLR 2024, "Lossless Model Expansion") to any size.

Heads and FFN units (LEMON's MLP/MHA expansion): the new units copy the old ones circularly
(0..n-1, 0, 1, ...: with a non-multiple size the first ones get one copy more). Symmetry breaking
as the first author's code does it (YiteWang/lemon-pytorch, lm/vlm/inflate_bert_utils.py
`project_linear`, circ_mode 'comp', used by `inflate_LEMON` with scalecirc 0.1): a consumer weight
A of a copied unit is split into random matrices [A - C, C], C = 0.1 x a fresh initialisation of
that weight. Ours: each extra copy j gets its own C_j and the original keeps A - sum_j C_j; this is
the reference's split wherever a unit has one extra copy (new <= 2 old); beyond that the reference
asserts (divisible widths) or projects unscaled random matrices, which we do not reproduce.
Exact for any size: the copies' columns sum to A. `operator.symmetry_noise` is the 0.1.
A head is copied whole (q, k, v rows; its attn.proj columns split), head size fixed.

Hidden (the residual width, read by every norm): LEMON's vector average expansion
x* = [x, ..., x, avg(x), ..., avg(x)]: k = H'//H copies of x, then H' mod H entries holding the
mean of x. Its mean is that of x and its variance k H / H' of x's, so a LayerNorm over x* gives
c = sqrt(H' / (k H)) times x's normalized values on the copies and exactly 0 on the mean entries;
the norms' gains on the copies are divided by c, and the weights reading the mean entries are
free (fresh init: LEMON's "arbitrary" columns) because they read 0. Every weight that writes the
residual stream (embeddings, attn.proj and mlp.proj rows and biases) writes the mean of its rows
into the mean entries, so the stream keeps that form through every block.
RMSNorm (not covered by the paper): the mean entries would change the root mean square, so ours
uses LEMON's zero expansion instead, x* = [x, ..., x, 0, ..., 0] (writers' new rows zero), whose
RMS is sqrt(k H / H') of x's: the same c.

The norms' epsilon: LayerNorm divides by sqrt(var + eps), and var shrinks by c^2, so exactness
needs eps / c^2 as well (the paper's derivation has no eps). The reference does exactly that
(`inflate_ln`: eps * (H'//H) * H / H'); the grown model carries model.norm_eps * k H / H'
(ModelArgs.norm_eps; checkpoints keep it); with multiples c = 1.

Post-norm (BERT): the paper's post-LN code supports divisible widths only (a norm *output* is the
stream, and avg(gamma * n + beta) is not a norm output); ours refuses a non-multiple hidden for
BERT and grows multiples as x* = [x, ..., x] with split consumers, which is exact.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from msgrun.errors import ConfigError
from msgrun.growth import expansion
from msgrun.growth.methods import Method
from msgrun.growth.surgery import UnitMap, parameter_axes, unit_size
from msgrun.model import ModelArgs, Transformer, init_std


def check_width(dim: str, old: int, new: int, family: str, where: str) -> None:
    if dim == "hidden" and family == "bert" and new % old:
        raise ConfigError(
            f"{where} grows hidden {old} -> {new} with operator.hidden=lemon on a post-norm model (model.family=bert). "
            "LEMON's average expansion keeps the residual stream's norm statistics only where the stream is not a "
            "norm's output; for post-LN the paper supports divisible widths only. Grow hidden to a multiple of "
            f"{old} (e.g. {2 * old}), or use operator.hidden=msg.")


def unit_map(dim: str, old: int, new: int) -> UnitMap:
    """Circular copies (hidden: k = new // old copies, then the mean entries, index -1). Consumers
    read each of k copies at 1/k here (so optimizer moments follow from_sources' rule);
    `split_consumers` then replaces those columns by the reference's random split."""
    if dim == "hidden":
        k = new // old
        index = torch.cat([torch.arange(k * old) % old, torch.full((new - k * old,), -1)])
    else:
        index = torch.arange(new) % old
    copied = index >= 0
    counts = torch.bincount(index[copied], minlength=old).float()
    scale = torch.ones(new)
    scale[copied] = 1.0 / counts[index[copied]]
    return UnitMap(index, scale)


@torch.no_grad()
def split_consumers(model: Transformer, dim: str, um: UnitMap, eta: float, gen: torch.Generator) -> None:
    """Every weight that reads `dim`: the columns of a unit's extra copies become C = eta x a fresh
    init, the original's column A - sum C (the group still sums to A: exact). Columns reading
    LEMON's mean entries (index -1, which carry 0 after a norm) become eta x their fresh init, as
    the reference's scalezero does."""
    args = model.args
    size = unit_size(dim, args)
    within = torch.arange(size)
    src = torch.where(um.index[:, None] >= 0, um.index[:, None] * size + within, -1).flatten()
    first = torch.zeros_like(src, dtype=torch.bool)
    seen = set()
    for e, s in enumerate(src.tolist()):
        first[e] = s >= 0 and s not in seen
        seen.add(s)
    extra, fresh_cols = (src >= 0) & ~first, src < 0
    n_old = int(src.max()) + 1
    for name, p in model.named_parameters():
        axes = parameter_axes(name, args)
        if p.dim() != 2 or not (axes[1].dim == dim and axes[1].fan_in):
            continue
        dev, rows = p.device, p.shape[0]
        cols = p.float()
        kept = (src >= 0).to(dev)
        # the group sums of the transplanted columns (A/k each) are A, per source unit
        a = torch.zeros(rows, n_old, device=dev).index_add_(1, src[src >= 0].to(dev), cols[:, kept])
        c = torch.randn(rows, int(extra.sum()), generator=gen).to(dev) * (eta * init_std(name, args))
        c_sum = torch.zeros(rows, n_old, device=dev).index_add_(1, src[extra].to(dev), c)
        out = cols.clone()
        out[:, extra.to(dev)] = c
        out[:, first.to(dev)] = (a - c_sum)[:, src[first].to(dev)]
        out[:, fresh_cols.to(dev)] *= eta
        p.copy_(out.to(p.dtype))


def norm_scale(old: int, new: int) -> float:
    """c^2 = H' / (k H): the factor by which the expanded stream's variance (or mean square) shrinks."""
    return new / ((new // old) * old)


def grown_args(old: ModelArgs, new: ModelArgs) -> ModelArgs:
    """The grown model's epsilon: the old model's (an earlier event may have changed it), divided by
    c^2 when hidden grows, so that sqrt(var + eps) scales exactly by 1/c."""
    return replace(new, norm_eps=old.norm_eps / norm_scale(old.hidden, new.hidden))


@torch.no_grad()
def finish_hidden(model: Transformer, old_hidden: int) -> None:
    """After the generic transplant: the residual writers' extra entries hold their rows' mean
    (LayerNorm) or zero (RMSNorm), and the norms' gains on the copies are divided by c."""
    args = model.args
    k = args.hidden // old_hidden
    extra = slice(k * old_hidden, args.hidden)
    c = math.sqrt(norm_scale(old_hidden, args.hidden))
    for name, p in model.named_parameters():
        axes = parameter_axes(name, args)
        if name.endswith("norm.weight"):
            p[: k * old_hidden] /= c
            continue
        if name.endswith("norm.bias"):
            continue
        for axis, ax in enumerate(axes):
            if ax.dim == "hidden" and not ax.fan_in:  # writes the residual stream
                view = p.movedim(axis, 0)
                if args.norm == "layernorm":
                    view[extra] = view[:old_hidden].mean(0, keepdim=True)
                else:
                    view[extra] = 0.0


def check(dim: str, old: int, new: int, family: str, where: str, cfg) -> None:
    if dim == "layers":
        expansion.check_depth("lemon", old, new, family, where)
    else:
        check_width(dim, old, new, family, where)


def layer_sources(old: int, new: int, cfg):
    """Each of the top L' - L layers followed by its zero-output copy (growth/expansion.py)."""
    sources, zeroed = expansion.layer_sources("lemon", old, new)
    return sources, [False] * new, zeroed


def finish(grown, old_model, dim, unit_maps, origins, cfg, gen) -> None:
    split_consumers(grown, dim, unit_maps[dim], cfg.symmetry_noise, gen)
    if dim == "hidden":  # after every other dimension's consumers (the operator finishes hidden last)
        finish_hidden(grown, old_model.args.hidden)


METHOD = Method(
    "lemon", ("layers", "hidden", "heads", "ffn"), "lossless expansion: copies with randomly split consumers, "
    "average-expanded hidden, zero-output layer copies (LEMON, Wang et al. 2024)",
    check=check, unit_map=lambda dim, old, new, cfg, gen: unit_map(dim, old, new), layer_sources=layer_sources,
    finish=finish, grown_args=grown_args)
