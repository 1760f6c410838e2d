"""LEMON's lossless width growth (Wang et al., ICLR 2024, "Lossless Model Expansion") to any size.

Heads and FFN units (LEMON's MLP/MHA expansion): the new units copy the old ones circularly
(0..n-1, 0, 1, ...: with a non-multiple size the first ones get one copy more), and the weights
that *read* a unit's k copies take shares alpha_1..alpha_k of the original that sum to 1 but
differ (LEMON's symmetry breaking: alpha != beta). Exact for any size: the copies sum to the
original. A head is copied whole (q, k, v rows; its attn.proj columns split), head size fixed.

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
needs eps / c^2 as well (the paper's derivation has no eps). The grown model carries
model.norm_eps * k H / H' (ModelArgs.norm_eps; checkpoints keep it); with multiples c = 1.

Post-norm (BERT): the paper's post-LN code supports divisible widths only (a norm *output* is the
stream, and avg(gamma * n + beta) is not a norm output); ours refuses a non-multiple hidden for
BERT and grows multiples as x* = [x, ..., x] with split consumers, which is exact.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from msgrun.errors import ConfigError
from msgrun.growth.surgery import UnitMap, parameter_axes
from msgrun.model import ModelArgs, Transformer


def check_width(dim: str, old: int, new: int, family: str, where: str) -> None:
    if dim == "hidden" and family == "bert" and new % old:
        raise ConfigError(
            f"{where} grows hidden {old} -> {new} with operator.hidden=lemon on a post-norm model (model.family=bert). "
            "LEMON's average expansion keeps the residual stream's norm statistics only where the stream is not a "
            "norm's output; for post-LN the paper supports divisible widths only. Grow hidden to a multiple of "
            f"{old} (e.g. {2 * old}), or use operator.hidden=msg.")


def unit_map(dim: str, old: int, new: int, eta: float, gen: torch.Generator) -> UnitMap:
    if dim == "hidden":
        k = new // old
        index = torch.cat([torch.arange(k * old) % old, torch.full((new - k * old,), -1)])
    else:
        index = torch.arange(new) % old
    return UnitMap(index, shares(index, old, eta, gen))


def shares(index: torch.Tensor, old: int, eta: float, gen: torch.Generator) -> torch.Tensor:
    """Factors of the weights reading each unit: (1 + eta u_j) / (sum over its copies), u_j ~ U(-1, 1):
    they differ between copies and sum to 1 (a unit without copies gets raw / raw = 1 exactly)."""
    new = index.numel()
    raw = 1.0 + eta * (2.0 * torch.rand(new, generator=gen) - 1.0)
    copied = index >= 0
    group_sum = torch.zeros(old).index_add_(0, index[copied], raw[copied])
    scale = torch.ones(new)
    scale[copied] = raw[copied] / group_sum[index[copied]]
    return scale


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
