"""One Transformer for both families, readable top to bottom.

family="gpt":  causal, pre-norm  (x + attn(norm(x)); GPT-2 or LLaMA flavoured by options)
family="bert": bidirectional, post-norm (norm(x + attn(x))), embedding norm, MLM head;
               optionally length pooling (CompoundGrowth's small-model input, see forward)
experts > 1:   every FFN is a mixture of experts (MoE below); experts = 1 is the dense FFN

Shapes: L layers, H hidden (residual width), A heads of fixed size d_h (attention width A*d_h is
independent of H, so heads and hidden can grow separately), K key/value heads (grouped-query
attention: query head h reads key/value head h // (A/K); K = A is plain multi-head attention),
F FFN inner width, V vocabulary.
The model knows nothing of growth: growth operators build a larger `Transformer` from a
`ModelArgs` and fill its parameters; MSG wraps submodules with masks from the outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    family: str = "gpt"
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    head_dim: int = 32
    kv_heads: int | None = None  # key/value heads, dividing heads; None: one per query head
    ffn: int = 512
    experts: int = 1  # FFN experts per layer; 1: a dense FFN (MoE below)
    experts_per_token: int = 2  # top-k routing (experts > 1 only)
    router_aux_coef: float = 0.01  # weight of the load-balancing loss added to the training loss
    max_seq_len: int = 128  # size of the position table / RoPE cache
    dropout: float = 0.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu
    # Which GELU, in the FFN *and* BERT's MLM transform (one function for both, as HF's
    # `hidden_act`): tanh (GPT-2's gelu_new) | exact (erf; BERT's, the MSG reference's "gelu").
    gelu: str = "tanh"
    pos: str = "learned"  # learned | rope
    tie_embeddings: bool = True
    bias: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    rope_base: float = 10000.0

    # the values each architecture switch above accepts (config.CHOICES reads them from here)
    FAMILIES = ("gpt", "bert")
    NORMS = ("layernorm", "rmsnorm")
    MLPS = ("gelu", "swiglu")
    GELUS = ("tanh", "exact")
    POSITIONS = ("learned", "rope")

    def __post_init__(self):
        # one spelling per architecture: K = A is stored as None, so MHA args compare (and
        # checkpoint) as they did before grouped-query attention existed
        if self.kv_heads == self.heads:
            object.__setattr__(self, "kv_heads", None)
        problem = kv_heads_problem(self.heads, self.n_kv_heads)
        assert problem is None, problem

    @property
    def moe(self) -> bool:
        return self.experts > 1

    @property
    def active_experts(self) -> int:
        """Experts each token runs on: top-k, at most all (a schedule's smaller stages may have fewer than k)."""
        return min(self.experts_per_token, self.experts)

    @property
    def causal(self) -> bool:
        return self.family == "gpt"

    @property
    def n_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim


def kv_heads_problem(heads: int, kv_heads: int) -> str | None:
    """Why `kv_heads` key/value heads cannot serve `heads` query heads (None: they can). The
    config and the schedule validators ask here, naming their keys."""
    if kv_heads < 1 or heads % kv_heads:
        fits = [k for k in range(1, heads + 1) if heads % k == 0]
        return (f"{kv_heads} key/value heads cannot serve {heads} query heads: grouped-query attention gives every "
                f"key/value head the same number of query heads, so kv_heads must divide heads (here one of "
                f"{', '.join(map(str, fits))})")
    return None


def count_params(args: "ModelArgs") -> int:
    """Parameters of a model of shape `args`, without allocating it (built on the meta device)."""
    with torch.device("meta"):
        return Transformer(args).num_params()


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows rounded up so the LM-head matmul has tensor-core friendly shapes."""
    return (vocab_size + multiple - 1) // multiple * multiple


def make_norm(args: ModelArgs, width: int) -> nn.Module:
    if args.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=args.norm_eps)
    return nn.LayerNorm(width, eps=args.norm_eps, bias=args.bias)


def rope_cache(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim/2) for rotary position embedding."""
    half = args.head_dim // 2
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, A, T, d_h); rotate the two halves of each head as complex pairs
    T = x.size(-2)
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def gelu_approximation(args: ModelArgs) -> str:
    """F.gelu's `approximate` for args.gelu. Until this knob existed BERT mixed the tanh GELU (FFN)
    with the exact one (MLM transform), which no single HF `hidden_act` reproduces."""
    return "tanh" if args.gelu == "tanh" else "none"


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal = args.heads, args.n_kv_heads, args.head_dim, args.causal
        self.dropout = args.dropout
        # q, k and v of all heads in one matmul; rows are [q heads (A) | k heads (K) | v heads (K)]
        self.qkv = nn.Linear(args.hidden, args.attn_width + 2 * args.kv_width, bias=args.bias)
        self.proj = nn.Linear(args.attn_width, args.hidden, bias=args.bias)
        self.resid_drop = nn.Dropout(args.dropout)

    def heads_of(self, y: torch.Tensor, n: int) -> torch.Tensor:
        return y.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # (B, T, n*d_h) -> (B, n, T, d_h)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """`context`: the tokens keys and values come from, when they are not `x` itself."""
        B, T, _ = x.shape
        W, Wkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if context is None:
            q, k, v = self.qkv(x).split([W, Wkv, Wkv], dim=-1)
        else:
            # the q rows on the queries, the k and v rows on the context: no wasted projections.
            # Slicing the weight bypasses any mask on qkv's output: MSG's reference placement
            # masks new heads there, so growth/operator.py refuses it with length pooling.
            bias = self.qkv.bias
            q = F.linear(x, self.qkv.weight[:W], None if bias is None else bias[:W])
            k, v = F.linear(context, self.qkv.weight[W:], None if bias is None else bias[W:]).chunk(2, dim=-1)
        q, k, v = self.heads_of(q, self.heads), self.heads_of(k, self.kv_heads), self.heads_of(v, self.kv_heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # enable_gqa: query head h attends with key/value head h // (A/K), as repeat_interleave of
        # k and v would give (and transformers' repeat_kv), without materialising the copies
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.heads,
        )
        y = y.transpose(1, 2).reshape(B, T, W)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.swiglu = args.mlp == "swiglu"
        self.gelu = gelu_approximation(args)
        # swiglu: rows are [gate | up], both of width F
        self.fc = nn.Linear(args.hidden, (2 if self.swiglu else 1) * args.ffn, bias=args.bias)
        self.proj = nn.Linear(args.ffn, args.hidden, bias=args.bias)
        self.resid_drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu)
        return self.resid_drop(self.proj(h))


def scaled(y: torch.Tensor, scale: float | None) -> torch.Tensor:
    return y if scale is None else y * scale


class MoE(nn.Module):
    """Mixture of experts (Mixtral's routing): the router's softmax over E experts, each token's
    top k experts, their probabilities renormalised to sum to 1, and the token's output the so
    weighted sum of those experts' outputs. Dropless: no capacity limit, every token runs on all
    k of its experts whatever the load (nothing is dropped or re-routed), so the function does
    not depend on the batch. Every expert is a dense FFN of width F.

    Load balancing (Switch Transformer's loss, as transformers' Mixtral computes it per layer):
    aux = E * sum_e f_e * P_e, with f_e the fraction of tokens that picked expert e among their k
    and P_e the mean router probability of e; 1 * k when the load is uniform. It is kept in
    `aux_loss` after each forward; the model adds router_aux_coef x its mean over layers to the
    training loss (model.forward)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.active_experts
        self.router = nn.Linear(args.hidden, args.experts, bias=False)
        self.experts = nn.ModuleList(MLP(args) for _ in range(args.experts))
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> router probabilities (N, E) in fp32, chosen experts (N, k), their weights (N, k)."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.k, dim=-1)
        return probs, chosen, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, chosen, weights = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # each expert runs on the tokens that chose it, only
            token, slot = torch.nonzero(chosen == e, as_tuple=True)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None].to(x.dtype))
        picked = F.one_hot(chosen, len(self.experts)).sum(dim=1).float()  # (N, E): 1 where e is among the k
        self.aux_loss = len(self.experts) * (picked.mean(dim=0) * probs.mean(dim=0)).sum()
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.post_norm = args.family == "bert"
        self.attn_norm = make_norm(args, args.hidden)
        self.attn = Attention(args)
        self.mlp_norm = make_norm(args, args.hidden)
        self.mlp = MoE(args) if args.moe else MLP(args)

    def ffns(self) -> list[MLP]:
        """The dense FFNs of this block: the MLP, or each expert of a mixture."""
        return list(self.mlp.experts) if isinstance(self.mlp, MoE) else [self.mlp]

    def forward(self, x: torch.Tensor, rope=None, scale: float | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """`scale` multiplies both branch outputs before they join the residual stream (RaPTr's
        compensation for dropped layers); None is the plain block. `context` (post-norm only):
        attention reads keys and values from it instead of from x (length pooling)."""
        if self.post_norm:
            x = self.attn_norm(x + scaled(self.attn(x, rope, context), scale))
            return self.mlp_norm(x + scaled(self.mlp(x), scale))
        assert context is None, "length pooling is defined for post-norm (BERT) blocks only"
        x = x + scaled(self.attn(self.attn_norm(x), rope), scale)
        return x + scaled(self.mlp(self.mlp_norm(x)), scale)


class MLMHead(nn.Module):
    """BERT's transform before the decoder: dense -> GELU -> norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden, args.hidden, bias=args.bias)
        self.norm = make_norm(args, args.hidden)
        self.gelu = gelu_approximation(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x), approximate=self.gelu))


def init_std(name: str, args: ModelArgs) -> float:
    """The standard deviation a fresh matrix `name` is drawn with (Transformer.reset_parameters)."""
    return args.init_std / math.sqrt(2 * args.layers) if name.endswith("proj.weight") else args.init_std


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, generator: torch.Generator | None = None):
        super().__init__()
        self.args = args
        V = padded_vocab(args.vocab_size)
        self.tok_emb = nn.Embedding(V, args.hidden)
        self.pos_emb = nn.Embedding(args.max_seq_len, args.hidden) if args.pos == "learned" else None
        if args.pos == "rope":
            cos, sin = rope_cache(args)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.emb_norm = make_norm(args, args.hidden) if args.family == "bert" else None
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.layers))
        self.final_norm = make_norm(args, args.hidden) if args.family == "gpt" else None
        self.mlm_head = MLMHead(args) if args.family == "bert" else None
        self.lm_head = nn.Linear(args.hidden, V, bias=args.family == "bert")
        if args.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: N(0, std) everywhere, residual projections scaled by 1/sqrt(2L) so the
        residual stream's variance does not grow with depth; zero biases, unit norm gains."""
        for name, p in self.named_parameters():
            if p.dim() == 1:  # biases and norm parameters
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, init_std(name, self.args), generator=generator)

    def compile_units(self) -> None:
        """torch.compile each block and the head as separate units, shapes static.

        Per block, not the whole model: a new layer of an existing shape reuses the block's
        cached graph, and RaPTr's changing paths (the `layers` list, a Python value a whole-model
        graph would guard on) never recompile (docs/architecture.md section 5). The head is its own unit
        because, left eager, its cross-entropy runs as separate log_softmax / nll_loss kernels
        over B*T*V logits forward and backward (plus a B*T*V zero fill for nll_loss's gradient);
        compiled, forward and backward are each one fused pass. On gpt_tiny (CPU) that eager
        loss was the whole gap between per-block compiling and compiling the whole model.
        The embeddings stay eager: two row gathers and an add, nothing to fuse."""
        if "head" in self.__dict__:
            return  # already compiled (a second call would wrap the compiled head again)
        # Dynamo caches graphs per code object: all blocks of every model of the run share
        # Block.forward's cache, the head's likewise. Each phase of a growing run adds a few
        # legitimate variants (a new shape, masked or not, train or eval mode, a RaPTr scale), so a
        # two-event MSG run that evaluates already needs more than the default 8; past the limit
        # Dynamo runs the unit eagerly for the rest of the process, with only a log warning.
        # Recompiles *per step* are what the limit guards against; tests/test_gpu.py checks those.
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        for block in self.blocks:
            block.compile(dynamic=False)
        # an instance attribute shadows the method (as nn.Module.compile stores its compiled
        # call on the instance); growth builds a new Transformer, which the trainer compiles anew
        self.head = torch.compile(self.head, dynamic=False)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        layers: list[int] | None = None,
        layer_scale: dict[int, float] | None = None,
        pool: int = 1,
        with_logits: bool = True,
    ):
        """idx (B, T) token ids. gpt: targets (B, T). bert: `positions` (B, M) of the predicted
        tokens and `targets` (B, M) their labels; the head runs on those positions only (static
        shapes, and BERT's FLOPs count the MLM head on masked tokens only). `layers`: indices of
        the blocks to run, in order (RaPTr's random paths); default all. `layer_scale`: a factor on
        the branch outputs of the listed blocks (block index -> factor); others run plain.
        `pool` > 1 (bert): CompoundGrowth's length pooling, below.
        Returns logits, or (logits, mean cross-entropy in fp32) when targets are given;
        `with_logits=False` returns (None, loss): what the training step asks for (see head)."""
        B, T = idx.shape
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        context = None
        if pool > 1:
            # Length pooling (Gu et al.'s CompoundGrowth, BERT only): the blocks run on T/pool
            # means of `pool` consecutive embedded tokens, followed by the embedded tokens at the
            # predicted positions, which carry the predictions; the first block's attention reads
            # keys and values from the full-length input (and the predicted tokens), so no input
            # token is lost. Every position embedding keeps training.
            assert self.args.family == "bert" and positions is not None and T % pool == 0
            predicted = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.size(-1)))
            context = torch.cat([x, predicted], dim=1)
            x = torch.cat([x.unflatten(1, (T // pool, pool)).mean(2), predicted], dim=1)
        rope = (self.rope_cos, self.rope_sin) if self.args.pos == "rope" else None
        ran = range(len(self.blocks)) if layers is None else layers
        for i in ran:
            scale = layer_scale.get(i) if layer_scale else None
            extra = {"context": context} if context is not None else {}
            # the plain call keeps its two-argument form: masked blocks (MSG) take no scale
            x = self.blocks[i](x, rope, **extra) if scale is None else self.blocks[i](x, rope, scale, **extra)
            context = None  # only the first block reads the full-length input
        out = self.head(x, targets, positions, pool, with_logits)
        if self.args.moe and targets is not None and self.training and self.args.router_aux_coef:
            # the load-balancing loss joins the training loss only: evaluation reports cross-entropy
            aux = torch.stack([self.blocks[i].mlp.aux_loss for i in ran]).mean()
            out = (out[0], out[1] + self.args.router_aux_coef * aux)
        return out

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None, positions: torch.Tensor | None = None,
             pool: int = 1, with_logits: bool = True):
        """Final norm, (bert) the predicted positions and the MLM transform, the LM head and the
        loss: one unit, compiled on its own under train.compile (compile_units).

        `with_logits=False` (the training step) keeps the logits inside the unit. The logits are
        the step's largest tensor (B*T*V: 64 MB in fp32 for gpt_tiny's default CPU batch, 1.6 GB
        in bf16 for 16 x 1024 tokens and GPT-2's 50k vocabulary). Compiled, the loss's backward writes the logits' gradient into
        their own buffer in place, unless the logits are also an output the caller may still
        hold: then every step allocates a second buffer of that size; returned as a
        differentiable output they would moreover get a zero-filled gradient of that size each
        step. Eager, returning them only keeps them alive longer (peak memory)."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.mlm_head is not None:
            if pool > 1:
                x = x[:, -positions.size(1):]
            elif positions is not None:
                x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.size(-1)))
            x = self.mlm_head(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return (logits if with_logits else None), loss
