"""MSG's masks (Yao et al., ICLR 2024), installed into a grown model and removed after the ramp.

A mask over a grown dimension is c = 1 on old units and alpha on new ones; alpha ramps 0 -> 1
over `operator.ramp_steps` optimizer steps. At alpha = 0 the grown model computes exactly the
small model's function, whatever the new weights hold, and at alpha = 1 the masks are the plain
model, under either placement (`operator.mask_placement`); the placements differ mid-ramp.

reference (the MSG reference, cofe-ai/MSG model_ex/bert_ex_v2.py):
* hidden: every norm takes masked statistics over the active units and multiplies its output
  by c; nothing else is masked. In post-norm BERT every residual value is such a norm output
  (the embedding norm's included: the raw embeddings go into it unmasked). In pre-norm GPT the
  residual stream's new units are not masked, but every reader of the stream is a masked norm
  (block norms, final norm), so alpha = 0 is still exact.
* ffn: the FFN's new pre-activations are multiplied by c (act(c * fc(x)); SwiGLU: gate and up).
* heads: the new heads' q, k and v are multiplied by c, so their scores scale with alpha^2
  and their output with alpha.

ours (msgrun's earlier placement):
* hidden: as reference, and also the embedding output and every branch output (attn.proj,
  mlp.proj), so new residual units are alpha times what they would be (GPT: exactly 0 at alpha 0).
* ffn: the activations are multiplied by c after the nonlinearity, before mlp.proj.
* heads: new heads' channels are multiplied by c before attn.proj (scores unmasked).

Both: a new pre-norm block enters as x + alpha * branch(x) (both branch outputs scaled); a new
post-norm (BERT) block as alpha * block(x) + (1 - alpha) * x, as the reference's encoder does.

Masks are installed by swapping a module's class for a masked subclass: parameters stay the same
objects under the same names (optimizer state, checkpoints and tied weights are untouched), and
swapping back after the ramp removes every trace of the mask code path. alpha is one device
tensor shared by all masks of a growth event, updated in place: no host sync, no recompile.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from msgrun.model import Block


def mask_factor(new: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """1 on old units, alpha on new ones (`new` is a float 0/1 indicator)."""
    return 1.0 + new * (alpha - 1.0)


class MaskedLinear(nn.Linear):
    """in_new: new input units (masked before the matmul); out_new: new output units;
    out_alpha: scale the whole output by alpha (a new pre-norm block's branch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_new is not None:
            x = x * mask_factor(self.in_new, self.alpha).to(x.dtype)
        y = F.linear(x, self.weight, self.bias)
        if self.out_new is not None:
            y = y * mask_factor(self.out_new, self.alpha).to(y.dtype)
        if self.out_alpha:
            y = y * self.alpha.to(y.dtype)
        return y


class MaskedEmbedding(nn.Embedding):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = super().forward(idx)
        return y * mask_factor(self.out_new, self.alpha).to(y.dtype)


def masked_norm(x: torch.Tensor, c: torch.Tensor, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    """Norm over the active units only, weighting unit i by c_i, then output * c.
    In fp32: autocast does not upcast hand-written norms, and sum(c * x) / sum(c) in bf16 loses
    the small-model statistics that function preservation depends on. sum(c) stays a tensor
    (no .item()), so there is no host sync per norm."""
    xf, cf = x.float(), c.float()
    denom = cf.sum()
    if rms:
        y = xf * torch.rsqrt((cf * xf * xf).sum(-1, keepdim=True) / denom + eps)
    else:
        mu = (cf * xf).sum(-1, keepdim=True) / denom
        var = (cf * (xf - mu) ** 2).sum(-1, keepdim=True) / denom
        y = (xf - mu) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return (y * cf).to(x.dtype)


class MaskedLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_norm(x, mask_factor(self.out_new, self.alpha), self.weight, self.bias, self.eps, rms=False)


class MaskedRMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(torch.float32).eps
        return masked_norm(x, mask_factor(self.out_new, self.alpha), self.weight, None, eps, rms=True)


class BlendedBlock(Block):
    """A new post-norm block entering as identity."""

    def forward(self, x: torch.Tensor, rope=None, context: torch.Tensor | None = None) -> torch.Tensor:
        a = self.alpha.to(x.dtype)
        return a * super().forward(x, rope, context=context) + (1.0 - a) * x


MASKED_CLASS = {
    nn.Linear: MaskedLinear,
    nn.Embedding: MaskedEmbedding,
    nn.LayerNorm: MaskedLayerNorm,
    nn.RMSNorm: MaskedRMSNorm,
    Block: BlendedBlock,
}
PLAIN_CLASS = {v: k for k, v in MASKED_CLASS.items()}
MASK_ATTRS = ("alpha", "in_new", "out_new", "out_alpha")


def _install(module: nn.Module, alpha: torch.Tensor, in_new=None, out_new=None, out_alpha=False) -> None:
    """Turn `module` into its masked class, or extend the masks it already has (an event that
    grows several dimensions masks one module for each of them)."""
    if type(module) in MASKED_CLASS:
        module.__class__ = MASKED_CLASS[type(module)]
        module.register_buffer("alpha", alpha, persistent=False)
        module.register_buffer("in_new", None, persistent=False)
        module.register_buffer("out_new", None, persistent=False)
        module.out_alpha = False
    assert module.alpha is alpha, "masks of two growth events overlap (the schedule validator forbids it)"
    if in_new is not None:
        module.in_new = in_new.float() if module.in_new is None else torch.maximum(module.in_new, in_new.float())
    if out_new is not None:
        module.out_new = out_new.float() if module.out_new is None else torch.maximum(module.out_new, out_new.float())
    module.out_alpha = module.out_alpha or out_alpha


def install_masks(model, alpha: torch.Tensor, new_units: dict[str, torch.Tensor], new_layers: list[bool],
                  placement: str = "reference") -> None:
    """Mask the new units of each grown dimension in `new_units` (entry-level 0/1 indicators:
    hidden over H, heads over A*d_h channels, kv_heads over K*d_h, ffn over F) and the new layers in `new_layers`,
    where `placement` (reference | ours) puts the masks."""
    dev = alpha.device
    reference = placement == "reference"
    hidden = new_units.get("hidden")
    if hidden is not None:
        hidden = hidden.to(dev)
        for name, module in model.named_modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                _install(module, alpha, out_new=hidden)
        if not reference:
            for emb in (model.tok_emb, model.pos_emb):
                if emb is not None:
                    _install(emb, alpha, out_new=hidden)
            for block in model.blocks:
                _install(block.attn.proj, alpha, out_new=hidden)
                for ffn in block.ffns():  # a mixture's output is a weighted sum of its experts'
                    _install(ffn.proj, alpha, out_new=hidden)
    if "heads" in new_units or "kv_heads" in new_units:
        args = model.args
        heads = new_units.get("heads", torch.zeros(args.attn_width)).to(dev)
        kv = new_units.get("kv_heads", torch.zeros(args.kv_width)).to(dev)
        for block in model.blocks:
            if reference:  # rows of the fused projection: [q heads | k heads | v heads]
                _install(block.attn.qkv, alpha, out_new=torch.cat([heads, kv, kv]))
            else:
                _install(block.attn.proj, alpha, in_new=heads)
    if "ffn" in new_units:
        ffn = new_units["ffn"].to(dev)
        for mlp in (m for block in model.blocks for m in block.ffns()):
            if reference:  # before the nonlinearity; swiglu's fc rows are [gate | up]
                _install(mlp.fc, alpha, out_new=ffn.repeat(2 if mlp.swiglu else 1))
            else:
                _install(mlp.proj, alpha, in_new=ffn)
    for block, is_new in zip(model.blocks, new_layers):
        if not is_new:
            continue
        if block.post_norm:
            _install(block, alpha)
        else:
            _install(block.attn.proj, alpha, out_alpha=True)
            for mlp in block.ffns():
                _install(mlp.proj, alpha, out_alpha=True)


_UNMASKED_SHARDED: dict[type, type] = {}


def plain_class(cls: type) -> type | None:
    """The class a masked module returns to (None: `cls` is not masked). FSDP2's fully_shard gives
    each sharded module a class of its own, FSDP<Name>(FSDPModule, <Name>), so a block masked
    before sharding is an FSDPBlendedBlock: its plain class is the same construction on Block,
    which keeps the module sharded and drops the blend (looking `cls` up in PLAIN_CLASS alone
    missed it, and a new block kept blending at alpha = 1 for the rest of the run)."""
    if cls in PLAIN_CLASS:
        return PLAIN_CLASS[cls]
    masked = [b for b in cls.__bases__ if b in PLAIN_CLASS]
    if not masked:
        return None
    if cls not in _UNMASKED_SHARDED:
        bases = tuple(PLAIN_CLASS.get(b, b) for b in cls.__bases__)
        name = cls.__name__.replace(masked[0].__name__, PLAIN_CLASS[masked[0]].__name__)
        _UNMASKED_SHARDED[cls] = type(name, bases, {})
    return _UNMASKED_SHARDED[cls]


def remove_masks(model: nn.Module) -> int:
    """Swap every masked module back to its plain class; returns how many were unmasked."""
    count = 0
    for module in model.modules():
        plain = plain_class(type(module))
        if plain is not None:
            module.__class__ = plain
            for attr in MASK_ATTRS:
                if attr in module._buffers:
                    del module._buffers[attr]
                elif hasattr(module, attr):
                    delattr(module, attr)
            count += 1
    return count


def masked_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if plain_class(type(m)) is not None]
