"""Analytic training FLOPs of the structure that actually executes.

Conventions (written down once; every figure in metrics.jsonl follows them):

* Training FLOPs = 3 x forward FLOPs (backward = 2 x forward), counted as 2 FLOPs per
  multiply-accumulate. No activation recomputation is counted (model FLOPs, not hardware FLOPs).
* Matmuls: every Linear of the executed blocks, plus the LM head (H x V_padded). The LM head is
  counted whether or not it is tied to the input embedding: tying shares the weight, not the work.
  Embedding lookups, norms, activations, softmax and the loss are not counted (they are not
  matmuls and are < 1% at these shapes).
* Grouped-query attention (K key/value heads): the K and V projections are K * d_h wide; the
  scores still cost what A query heads cost (each query head attends over its group's keys).
* Mixture of experts (`model.experts` > 1): the router (H x E) and the k = experts_per_token
  experts every token runs; the routing is dropless, so the experts process exactly k x tokens
  rows per layer. The softmax, top-k and the weighted sum are not counted (not matmuls).
* Attention scores: Q K^T and A V cost 2 * T * A * d_h FLOPs each per token per layer in the
  forward pass, counted for the *full* T x T square even for causal models (what the math
  kernel computes and what FlopCounterMode counts; flash kernels skip half of it, so causal MFU
  is conservative by that part).
* BERT: the MLM head (transform + decoder) runs on the predicted positions only, so it is
  counted per predicted token, not per input token.
* Only executed blocks count: a RaPTr step that runs 6 of 12 layers pays for 6.
* Length pooling (BERT, `pool` > 1): the blocks run on T/pool + M tokens (M predicted), except
  that the first block's K/V projections and attention scores read all T + M input tokens.
* Frozen weights (LLaMA-Pro's `operator.freeze_old`, gpt only): autograd computes no weight
  gradient for them, and no backward at all below the lowest trainable block; see
  `partially_frozen_train_flops`.
* Evaluation, growth probes and operator work are not training FLOPs and are never added.
"""

from __future__ import annotations

from msgrun.model import ModelArgs, padded_vocab


def block_matmul_params(args: ModelArgs) -> int:
    H, W, Fw = args.hidden, args.attn_width, args.ffn
    attn = H * (W + 2 * args.kv_width) + W * H
    mlp = H * (3 if args.mlp == "swiglu" else 2) * Fw
    if args.moe:  # the router, and k experts per token (dropless routing: exactly k, whatever the load)
        return attn + H * args.experts + args.active_experts * mlp
    return attn + mlp


def head_matmul_params(args: ModelArgs) -> int:
    """Matmul weights that run per *predicted* token (gpt: every token)."""
    dense = args.hidden * args.hidden if args.family == "bert" else 0
    return dense + args.hidden * padded_vocab(args.vocab_size)


def block_flops(args: ModelArgs, queries: int, keys: int) -> int:
    """Forward FLOPs of one block on one sequence: `queries` tokens run the Q projection, the
    output projection and the MLP and attend over `keys` tokens, whose K and V are projected.
    QK^T and AV are counted for the full queries x keys rectangle (see module doc)."""
    H, W = args.hidden, args.attn_width
    kv_params = 2 * H * args.kv_width
    return 2 * (queries * (block_matmul_params(args) - kv_params) + keys * kv_params) + 2 * 2 * queries * keys * W


def forward_flops(args: ModelArgs, batch: int, seq_len: int, layers_run: int | None = None,
                  predicted_per_seq: int | None = None, pool: int = 1) -> int:
    """Forward FLOPs of one batch of `batch` sequences of `seq_len` tokens.
    `layers_run` defaults to all layers; `predicted_per_seq` (bert) defaults to seq_len; `pool`:
    length pooling (model.forward)."""
    L = args.layers if layers_run is None else layers_run
    predicted = seq_len if predicted_per_seq is None else predicted_per_seq
    if pool == 1:
        blocks = L * block_flops(args, seq_len, seq_len)
    else:
        short = seq_len // pool + predicted
        blocks = block_flops(args, short, seq_len + predicted) + (L - 1) * block_flops(args, short, short)
    return batch * (blocks + predicted * 2 * head_matmul_params(args))


def train_flops(args: ModelArgs, batch: int, seq_len: int, layers_run: int | None = None,
                predicted_per_seq: int | None = None, pool: int = 1, trainable: list[int] | None = None) -> int:
    """Forward + backward FLOPs of one training batch. `trainable`: only these blocks train (the
    rest of the model is frozen)."""
    if trainable is not None:
        return partially_frozen_train_flops(args, batch, seq_len, trainable)
    return 3 * forward_flops(args, batch, seq_len, layers_run, predicted_per_seq, pool)


def partially_frozen_train_flops(args: ModelArgs, batch: int, seq_len: int, trainable: list[int]) -> int:
    """A causal model of which only the `trainable` blocks train (embeddings, other blocks, final
    norm and head frozen). Backward runs from the head down to the lowest trainable block: there
    every Linear computes its input gradient (1 x its forward) and, in trainable blocks only, its
    weight gradient (1 x); the attention scores' two matmuls take both operands' gradients
    (2 x); the frozen head computes its input gradient only. Below the lowest trainable block,
    nothing runs backward (no input there needs a gradient)."""
    assert args.family == "gpt" and trainable, "frozen blocks: causal models with some block training"
    T = seq_len
    scores = 2 * 2 * T * T * args.attn_width
    linears = block_flops(args, T, T) - scores
    head = T * 2 * head_matmul_params(args)
    backward = head + sum(linears * (2 if i in trainable else 1) + 2 * scores
                          for i in range(min(trainable), args.layers))
    return batch * (forward_flops(args, 1, T) + backward)
