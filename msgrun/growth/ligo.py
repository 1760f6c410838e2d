"""LiGO, a learned linear growth operator (Wang et al., ICLR 2023, "Learning to Grow Pretrained Models").
Reference code: VITA-Group/LiGO, ligo.py (`create_ligo_from_model`, `FusedLinear`, `FusedWidthParams`,
`FusedDepthParams`), run_grow_distributed.py (the fitting loop) and configs/bert_wiki.txt, run as the
README's "Train LiGO" command (--tune_width --tune_depth --fuse_init_scheme stackbert_noisy rand
--max_steps 100). Every choice below is the reference's unless marked "ours".

The grown model's parameters are a linear function of the small model's:

* depth: each parameter of large layer l is sum_j d_lj W_j over the small layers' parameters of the
  same kind, one coefficient vector per module per large layer (weights and biases separately; q,
  k and v separately: ours splits the fused qkv and SwiGLU's gate/up into those chunks). Init
  `stackbert_noisy`: U(0, noise) + a one at l mod L, normalised to sum 1 (noise 0.03). The depth
  coefficients exist even where depth does not grow, as in the reference.
* width, applied after the depth mixture: W' = B_out W B_in^T with B = [I; B_new], only B_new
  learned (the identity block is fixed), and no factor at all for a dimension that does not grow.
  B_new starts as random convex mixtures of the old units (`rand`: rows U(0, 1) normalised to sum
  1). Factors: one hidden factor for the embeddings, every norm and every block's hidden axes;
  per large layer, its own factors for q, k, v (attention channels) and the FFN (attn.proj reads
  v's factor; ours: both SwiGLU halves share the FFN factor); BERT's MLM-head transform has its own
  width factor (its dense rows, its norm and an untied decoder's columns; a tied decoder is the
  embedding and follows the hidden factor: one tensor cannot take two expansions).
* fitting: `operator.ligo_steps` AdamW steps on the training loss of the grown model they define
  (lr `operator.ligo_lr`, weight decay `operator.ligo_weight_decay`, Adam eps 1e-6, gradient norm
  clipped to `operator.ligo_clip`, and the linear warmup-then-decay schedule with
  `operator.ligo_warmup` warmup steps, over ligo_steps steps: the README's command keeps the
  config's 10000 warmup steps at 100 fitting steps, so the LR rises to 2e-6 of its 2e-4 peak).
  Then the grown model is materialised once.

Data: the fitting reads the batches the next `ligo_steps` training steps will read (same token
offsets, same micro-batches); the grown model then trains on them again. Compute: the fitting is
training compute. `fit` returns its FLOPs, counted from the shapes that execute with the
conventions of msgrun/flops.py: the grown model's forward and backward (every block parameter
depends on the depth coefficients, so their weight gradients are computed; the head's weight
gradient only where hidden grows, since otherwise nothing it reads depends on the operator) plus
every expansion matmul, forward and backward (an operand's gradient only where autograd needs it),
plus the final materialisation's forward. tests compare it with FlopCounterMode. The trainer adds
it to the run's `flops`, runs it inside `wall_time`, and logs it per event as `operator_flops`.

Ours: biases and norm parameters are expanded like the weights' rows (the reference does the
same for its LayerNorms and biases); there is no provenance, so the optimizer state of the grown
model is always fresh; micro-batches follow train.grad_accum and run in fp32 (no autocast);
distributed training is refused (every rank would have to fit on the same data). torch's AdamW
applies the decoupled weight decay before the Adam update, transformers' (the reference's) after.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from torch.func import functional_call

from msgrun.flops import head_matmul_params, train_flops
from msgrun.growth.methods import Method
from msgrun.growth.surgery import parameter_axes
from msgrun.model import ModelArgs, Transformer

WIDTH = ("hidden", "heads", "ffn")
ADAM_EPS = 1e-6  # the reference's --adam_epsilon default (param.py)


class Tally:
    """FLOPs of the expansion matmuls, forward and the backward autograd will run."""

    def __init__(self, backward: bool):
        self.backward, self.flops = backward, 0

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a @ b
        f = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        self.flops += f + (f * (a.requires_grad + b.requires_grad) if self.backward else 0)
        return out


def convex_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """The reference's `rand` width init: each new unit a random convex mixture of the old ones."""
    w = torch.rand(rows, cols, generator=gen)
    return w / w.sum(-1, keepdim=True)


def stackbert_noisy(new: int, old: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """The reference's `stackbert_noisy` depth init: row l is U(0, noise) with a one at l mod L,
    normalised to sum 1 (noise 0: exact stacking)."""
    d = torch.rand(new, old, generator=gen) * noise
    d[torch.arange(new), torch.arange(new) % old] = 1.0
    return d / d.sum(-1, keepdim=True)


def lr_factor(k: int, steps: int, warmup: int) -> float:
    """Linear warmup then linear decay to 0 at `steps` (transformers' get_linear_schedule_with_warmup,
    as the reference's fitting loop uses it); step k = 0 runs at 0."""
    if k < warmup:
        return k / max(1, warmup)
    return max(0.0, (steps - k) / max(1, steps - warmup))


class LigoOperator(nn.Module):
    def __init__(self, old: Transformer, new_args: ModelArgs, gen: torch.Generator, noise: float):
        super().__init__()
        o, n = old.args, new_args
        self.old_args, self.new_args = o, n
        self.old = {k: v.detach() for k, v in old.named_parameters()}
        self.width = nn.ParameterDict()

        def factor(key: str, small: int, large: int) -> None:
            if large > small:  # a dimension that does not grow has no factor
                self.width[key] = nn.Parameter(convex_rows(large - small, small, gen))

        factor("hidden", o.hidden, n.hidden)
        if o.family == "bert":
            factor("cls", o.hidden, n.hidden)
        for i in range(n.layers):
            for c in "qkv":
                factor(f"{c}_{i}", o.attn_width, n.attn_width)
            factor(f"ffn_{i}", o.ffn, n.ffn)
        self.depth = nn.ParameterDict()
        for name in self.old:
            m = re.match(r"^blocks\.0\.(.*)$", name)
            if m:
                for c in range(self.depth_chunks(name)):
                    self.depth[self.depth_key(m.group(1), c)] = nn.Parameter(stackbert_noisy(n.layers, o.layers,
                                                                                             noise, gen))
        self.to(next(old.parameters()).device)

    @staticmethod
    def depth_key(kind: str, chunk: int) -> str:
        return f"{kind.replace('.', '/')}/{chunk}"

    def depth_chunks(self, name: str) -> int:
        """q, k, v (and SwiGLU's gate, up) are separate modules in the reference: own depth coefficients."""
        axes = parameter_axes(name, self.old_args)
        return sum(chunks for _, chunks in axes[0].segments) if axes else 1  # qkv: [q | k, v]

    def factors(self, name: str, axis_dim: str, chunks: int, fan_in: bool) -> list[str]:
        leaf = re.sub(r"^blocks\.(\d+)\.", "", name)
        layer = re.match(r"^blocks\.(\d+)\.", name)
        if axis_dim == "heads":  # attention channels: q, k, v rows each their own; attn.proj reads v
            return [f"v_{layer.group(1)}"] if leaf == "attn.proj.weight" else [f"{c}_{layer.group(1)}" for c in "qkv"]
        if axis_dim == "ffn":
            return [f"ffn_{layer.group(1)}"] * chunks
        # BERT's MLM-head transform: its dense reads the stream (hidden) and writes the head's own
        # width (cls), which its norm and an untied decoder then index
        reads_stream = name == "mlm_head.dense.weight" and fan_in
        head_side = name.startswith(("mlm_head.", "lm_head.")) and not reads_stream
        return ["cls" if head_side and "cls" in self.width else "hidden"] * chunks

    def widen(self, name: str, value: torch.Tensor, tally: Tally) -> torch.Tensor:
        """[I; B_new] applied along every axis of `value` that indexes a grown dimension."""
        for axis, ax in enumerate(parameter_axes(name, self.old_args)):
            if ax.dim not in WIDTH:
                continue
            keys = self.factors(name, ax.dim, ax.chunks, ax.fan_in)
            if keys[0] not in self.width:
                continue
            moved = value.movedim(axis, 0)
            rest = moved.shape[1:]
            flat = moved.reshape(moved.shape[0], -1)
            parts = []
            for key, part in zip(keys, flat.chunk(len(keys), dim=0)):
                parts += [part, tally.mm(self.width[key], part)]
            value = torch.cat(parts).reshape(-1, *rest).movedim(0, axis)
        return value

    def materialize(self, tally: Tally) -> dict[str, torch.Tensor]:
        out, per_kind = {}, {}
        for name, value in self.old.items():
            m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
            if m is None:
                out[name] = self.widen(name, value, tally)
            else:
                per_kind.setdefault(m.group(2), []).append(value)
        for kind, layers in per_kind.items():  # depth first (at the small width), then each layer's width
            name0 = f"blocks.0.{kind}"
            chunks = self.depth_chunks(name0)
            stacked = torch.stack(layers)  # L x (parameter shape)
            mixed = torch.cat([tally.mm(self.depth[self.depth_key(kind, c)], part.reshape(len(layers), -1))
                               .reshape(-1, *part.shape[1:])
                               for c, part in enumerate(stacked.chunk(chunks, dim=1))], dim=1)
            for i in range(self.new_args.layers):
                out[f"blocks.{i}.{kind}"] = self.widen(f"blocks.{i}.{kind}", mixed[i], tally)
        return out


def skipped_backward_flops(args: ModelArgs, rows: int, T: int, predicted: int | None, grown_hidden: bool) -> int:
    """Backward FLOPs that 3 x forward counts but the fitting never runs. Where hidden does not grow,
    the embeddings, the head and (BERT) the embedding norm do not depend on the operator: the head's
    weight gradients are not computed, and in a post-norm model block 0's q, k, v projections read
    that constant input directly, so their input gradient is not computed either (a pre-norm block
    reads it through its own norm, whose gain does depend on the operator)."""
    if grown_hidden:
        return 0
    head = (T if predicted is None else predicted) * 2 * head_matmul_params(args)
    first_qkv_input = 2 * T * args.hidden * 3 * args.attn_width if args.family == "bert" else 0
    return rows * (head + first_qkv_input)


def fit(old: Transformer, new_args: ModelArgs, gen: torch.Generator, opts, data) -> tuple[Transformer, int]:
    """The grown model LiGO builds after fitting its operator for `opts.ligo_steps` steps on
    `data(k)` (the micro-batches of fitting step k), and the FLOPs that executed. `opts`: the
    operator config (ligo_steps, ligo_lr, ligo_warmup, ligo_weight_decay, ligo_clip, ligo_noise)."""
    op = LigoOperator(old, new_args, gen, opts.ligo_noise)
    template = Transformer(new_args, generator=gen).to(next(old.parameters()).device)
    grown_hidden = new_args.hidden > old.args.hidden
    flops, steps = 0, opts.ligo_steps
    if data is not None and steps > 0:
        opt = torch.optim.AdamW(op.parameters(), lr=opts.ligo_lr, weight_decay=opts.ligo_weight_decay, eps=ADAM_EPS)
        for k in range(steps):
            micro = data(k)
            for batch in micro:
                tally = Tally(backward=True)
                params = op.materialize(tally)
                _, loss = functional_call(template, params, (batch["inputs"], batch["targets"], batch.get("positions")))
                (loss / len(micro)).backward()
                rows, T = batch["inputs"].shape
                predicted = batch["positions"].shape[1] if "positions" in batch else None
                flops += (tally.flops + train_flops(new_args, rows, T, predicted_per_seq=predicted)
                          - skipped_backward_flops(new_args, rows, T, predicted, grown_hidden))
            if opts.ligo_clip > 0:
                torch.nn.utils.clip_grad_norm_(op.parameters(), opts.ligo_clip)
            for group in opt.param_groups:
                group["lr"] = opts.ligo_lr * lr_factor(k, steps, opts.ligo_warmup)
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        tally = Tally(backward=False)
        for name, value in op.materialize(tally).items():
            dict(template.named_parameters())[name].copy_(value)
        flops += tally.flops
    return template, flops


METHOD = Method("ligo", ("layers", "hidden", "heads", "ffn"), "a learned linear operator for every grown "
                "dimension, fitted on training batches (LiGO, Wang et al. 2023)", single_process=True, build=fit)
