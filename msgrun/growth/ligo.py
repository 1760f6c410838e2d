"""LiGO, a learned linear growth operator (Wang et al., ICLR 2023, "Learning to Grow Pretrained Models").

The grown model's parameters are a linear function of the small model's:

* width: one expansion matrix per grown dimension, shared by every layer and applied on *every*
  axis that indexes that dimension, producing and consuming alike (W' = B_out W B_in^T). hidden:
  B_h (H' x H) on embeddings, norms, every block matrix's hidden axes and the head; ffn: B_f on
  the FFN's inner axis (both SwiGLU halves and the down projection's input); attention: B_q, B_k,
  B_v over attention channels (A' d_h x A d_h) on the q, k, v rows, and B_v on attn.proj's input
  (it reads what v produced). Initialised as [I; N(0, 1/D')] (old units kept, new ones random
  mixtures), as a public reimplementation does (the operator is not function preserving at init).
* depth: each new layer's parameter of one kind is a learned mixture of the widened old layers'
  parameters of that kind (one L' x L matrix per parameter name), initialised as stacking
  (new layer l copies old layer l mod L).

The operator's matrices are fitted for `operator.ligo_steps` Adam steps (`operator.ligo_lr`) on
the training loss of the grown model they define, then the grown model is materialised once.
Data: the fitting reads the batches the next `ligo_steps` training steps will read (same token
offsets, same micro-batches); the grown model then trains on them again. Compute: the fitting is
training compute. `fit` returns its FLOPs, counted from the shapes that execute with the
conventions of msgrun/flops.py: the grown model's forward and backward (3 x forward: every
parameter is a function of the operator, so every weight gradient is computed) plus every
expansion matmul, forward and backward (the gradient of an operand is counted only where
autograd needs it), plus the final materialisation's forward. tests compare it with
FlopCounterMode. The trainer adds it to the run's `flops`, runs it inside `wall_time`, and logs
it per event in growth.jsonl as `operator_flops`.

Ours, where the paper or the code we read is silent or differs: the depth mixture is one matrix
per parameter name (the reimplementation splits q, k and v); dimensions that do not grow get a
matrix too (identity at init, learned); biases and norm parameters are expanded like the weights' rows;
there is no provenance, so the optimizer state of the grown model is always fresh; micro-batches
follow train.grad_accum and run in fp32 (no autocast); distributed training is refused (every
rank would have to fit on the same data).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from torch.func import functional_call

from msgrun.flops import train_flops
from msgrun.growth.methods import Method
from msgrun.growth.surgery import parameter_axes
from msgrun.model import ModelArgs, Transformer

WIDTH = ("hidden", "heads", "ffn")


class Tally:
    """FLOPs of the expansion matmuls, forward and the backward autograd will run."""

    def __init__(self, backward: bool):
        self.backward, self.flops = backward, 0

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a @ b
        f = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        self.flops += f + (f * (a.requires_grad + b.requires_grad) if self.backward else 0)
        return out


def width_init(new: int, old: int, gen: torch.Generator) -> torch.Tensor:
    return torch.cat([torch.eye(old), torch.randn(new - old, old, generator=gen) * (1.0 / new) ** 0.5])


class LigoOperator(nn.Module):
    def __init__(self, old: Transformer, new_args: ModelArgs, gen: torch.Generator):
        super().__init__()
        o, n = old.args, new_args
        self.old_args, self.new_args = o, n
        self.old = {k: v.detach() for k, v in old.named_parameters()}
        # every factor is learned, also for a dimension that does not grow (then it starts as the
        # identity): every grown parameter is then a function of the operator, so the fitting's
        # backward is the full 3 x forward of the grown model (and its FLOPs are what flops.py says)
        self.width = nn.ParameterDict({"hidden": nn.Parameter(width_init(n.hidden, o.hidden, gen)),
                                       "ffn": nn.Parameter(width_init(n.ffn, o.ffn, gen))})
        for c in "qkv":
            self.width[c] = nn.Parameter(width_init(n.attn_width, o.attn_width, gen))
        stack = torch.zeros(n.layers, o.layers)
        stack[torch.arange(n.layers), torch.arange(n.layers) % o.layers] = 1.0
        self.depth = nn.ParameterDict({m.group(1).replace(".", "/"): nn.Parameter(stack.clone())
                                       for m in map(re.compile(r"^blocks\.0\.(.*)$").match, self.old) if m})
        self.to(next(old.parameters()).device)

    def matrices(self, name: str, axis_dim: str, chunks: int) -> list[torch.Tensor]:
        if axis_dim == "heads":  # attention channels: q, k, v rows each their own; attn.proj reads v
            leaf = re.sub(r"^blocks\.\d+\.", "", name)
            return [self.width["v"]] if leaf == "attn.proj.weight" else [self.width[c] for c in "qkv"]
        return [self.width[axis_dim]] * chunks

    def widen(self, name: str, value: torch.Tensor, tally: Tally) -> torch.Tensor:
        """B applied along every axis of `value` that indexes a grown dimension."""
        for axis, ax in enumerate(parameter_axes(name, self.old_args)):
            if ax.dim not in WIDTH:
                continue
            mats = self.matrices(name, ax.dim, ax.chunks)
            moved = value.movedim(axis, 0)
            rest = moved.shape[1:]
            flat = moved.reshape(moved.shape[0], -1)
            parts = flat.chunk(len(mats), dim=0)
            value = torch.cat([tally.mm(m, p) for m, p in zip(mats, parts)]).reshape(-1, *rest).movedim(0, axis)
        return value

    def materialize(self, tally: Tally) -> dict[str, torch.Tensor]:
        out, per_kind = {}, {}
        for name, value in self.old.items():
            widened = self.widen(name, value, tally)
            m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
            if m is None:
                out[name] = widened
            else:
                per_kind.setdefault(m.group(2), []).append(widened)
        for kind, layers in per_kind.items():  # depth: a learned mixture of the old layers, one matmul
            stacked = torch.stack(layers).reshape(len(layers), -1)
            mixed = tally.mm(self.depth[kind.replace(".", "/")], stacked)
            for i in range(self.new_args.layers):
                out[f"blocks.{i}.{kind}"] = mixed[i].reshape(layers[0].shape)
        return out


def fit(old: Transformer, new_args: ModelArgs, gen: torch.Generator, steps: int, lr: float,
        data) -> tuple[Transformer, int]:
    """The grown model LiGO builds after fitting its operator for `steps` steps on `data(k)` (the
    micro-batches of fitting step k), and the FLOPs that executed."""
    op = LigoOperator(old, new_args, gen)
    template = Transformer(new_args, generator=gen).to(next(old.parameters()).device)
    flops = 0
    if data is not None and steps > 0:
        opt = torch.optim.Adam(op.parameters(), lr=lr)
        for k in range(steps):
            micro = data(k)
            for batch in micro:
                tally = Tally(backward=True)
                params = op.materialize(tally)
                _, loss = functional_call(template, params, (batch["inputs"], batch["targets"], batch.get("positions")))
                (loss / len(micro)).backward()
                rows, T = batch["inputs"].shape
                predicted = batch["positions"].shape[1] if "positions" in batch else None
                flops += tally.flops + train_flops(new_args, rows, T, predicted_per_seq=predicted)
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        tally = Tally(backward=False)
        for name, value in op.materialize(tally).items():
            dict(template.named_parameters())[name].copy_(value)
        flops += tally.flops
    return template, flops


def build(old: Transformer, new_args: ModelArgs, gen: torch.Generator, cfg, fit_data) -> tuple[Transformer, int]:
    return fit(old, new_args, gen, cfg.ligo_steps, cfg.ligo_lr, fit_data)


METHOD = Method("ligo", ("layers", "hidden", "heads", "ffn"), "a learned linear operator for every grown "
                "dimension, fitted on training batches (LiGO, Wang et al. 2023)", single_process=True, build=build)
