"""msgrun-export: a trained msgrun model as a Hugging Face `transformers` directory.

    msgrun-export RUN_DIR --out DIR [--checkpoint PATH] [--tokenizer PATH]

writes safetensors weights, config.json, generation_config.json (causal models) and the run's
tokenizer as a PreTrainedTokenizerFast, so `AutoModelForCausalLM` / `AutoModelForMaskedLM` and
`AutoTokenizer` load it with no remote code. Three mappings are exact (same logits in fp32):

* family=gpt, layernorm, gelu, learned positions -> GPT2LMHeadModel. GPT-2's Conv1D stores
  weights as (in, out), the transpose of nn.Linear; `gelu_new` is the tanh GELU; a model without
  biases exports zero biases (GPT-2 always has them).
* family=gpt, rmsnorm, swiglu, rope -> LlamaForCausalLM. Both rotate the two halves of each head
  (HF's rotate_half is msgrun's apply_rope) with the same frequencies base^(-2i/d_h); head_dim is
  explicit, so it may differ from hidden/heads; q/k/v and gate/up are msgrun's fused rows split.
  Grouped-query attention (model.kv_heads) is num_key_value_heads: HF's repeat_kv gives query
  head h the key/value head h // (A/K), as msgrun's SDPA enable_gqa does.
* the same with model.experts > 1 (no biases) -> MixtralForCausalLM: the same softmax, top-k and
  renormalised weights; the router is mlp.gate, the experts' fused [gate | up] rows and down
  projections are stacked into gate_up_proj / down_proj.
* family=bert -> BertForMaskedLM (post-LN, embedding norm, MLM transform, decoder bias); msgrun
  has no token types, so one all-zero token-type embedding is exported.

The vocabulary keeps msgrun's padded size (logits identical, padding ids never trained on).
What no HF class expresses is refused with a paragraph naming the option (ExportError).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from msgrun import checkpoint, data
from msgrun.errors import MsgrunError
from msgrun.extras import install_hint
from msgrun.model import ModelArgs, Transformer, padded_vocab

EXPORT_INFO = "msgrun_export.json"
SHARD_BYTES = 5 * 10**9  # a streamed export's largest safetensors file (transformers' own default)


class ExportError(MsgrunError):
    """A model, checkpoint or output directory that cannot be exported."""


# ---------------------------------------------------------------------------------------------- what maps


def hf_architecture(args: ModelArgs) -> str:
    """The HF class that computes exactly what `args` describes, or an ExportError saying why none does."""
    if args.moe and ((args.norm, args.mlp, args.pos) != ("rmsnorm", "swiglu", "rope") or args.bias):
        raise ExportError(
            f"A mixture of experts (model.experts={args.experts}) exports as MixtralForCausalLM only, which needs the "
            "LLaMA layout without biases (model.norm=rmsnorm model.mlp=swiglu model.pos=rope model.bias=false); this "
            f"model has model.norm={args.norm}, model.mlp={args.mlp}, model.pos={args.pos}, model.bias={args.bias}.")
    if args.family == "bert":
        if (args.norm, args.mlp, args.pos) != ("layernorm", "gelu", "learned"):
            raise ExportError(
                f"A BERT with model.norm={args.norm}, model.mlp={args.mlp}, model.pos={args.pos} has no Hugging Face "
                "class: BertForMaskedLM needs model.norm=layernorm, model.mlp=gelu and model.pos=learned.")
        need_square(args, "BertForMaskedLM")
        return "BertForMaskedLM"
    combo = (args.norm, args.mlp, args.pos)
    if combo == ("layernorm", "gelu", "learned"):
        need_square(args, "GPT2LMHeadModel")
        return "GPT2LMHeadModel"
    if combo == ("rmsnorm", "swiglu", "rope"):
        if args.hidden % args.heads:
            # LlamaForCausalLM computes with any head_dim, but LlamaConfig (transformers 5) refuses to load
            raise ExportError(
                f"LlamaConfig requires model.hidden divisible by model.heads (head_dim itself is free); this model has "
                f"hidden {args.hidden} and {args.heads} heads. Train with a hidden size that is a multiple of the "
                "final head count.")
        return "MixtralForCausalLM" if args.moe else "LlamaForCausalLM"
    raise ExportError(
        f"model.norm={args.norm}, model.mlp={args.mlp}, model.pos={args.pos} matches no Hugging Face class exactly. "
        "msgrun exports family=gpt as GPT-2 (model.norm=layernorm, model.mlp=gelu, model.pos=learned) or as LLaMA "
        "(model.norm=rmsnorm, model.mlp=swiglu, model.pos=rope); other combinations are not exported.")


def need_square(args: ModelArgs, cls: str) -> None:
    if args.n_kv_heads != args.heads:
        raise ExportError(
            f"{cls} has one key/value head per query head; this model has grouped-query attention "
            f"(model.kv_heads={args.n_kv_heads} for {args.heads} heads). Only the LLaMA layout (model.norm=rmsnorm "
            "model.mlp=swiglu model.pos=rope) exports key/value groups; or train with model.kv_heads=null.")
    # GPT-2 and BERT derive the head size as hidden / heads; msgrun's attention width is free
    if args.heads * args.head_dim != args.hidden:
        fix = (f"model.head_dim={args.hidden // args.heads}" if args.hidden % args.heads == 0
               else "model.hidden a multiple of model.heads and model.head_dim = hidden / heads")
        raise ExportError(
            f"{cls} derives each head's size as hidden / heads, so it needs model.heads x model.head_dim == "
            f"model.hidden; this model has {args.heads} x {args.head_dim} = {args.heads * args.head_dim} != "
            f"{args.hidden}. Train with {fix}, or use the LLaMA layout (model.norm=rmsnorm model.mlp=swiglu "
            "model.pos=rope), whose head_dim is free.")


def check_state(masked: list[str], pool: int) -> None:
    """A model in the middle of a growth transition is not a plain Transformer."""
    if masked:
        raise ExportError(
            f"The model is in the middle of an MSG ramp: {len(masked)} modules carry masks (e.g. {masked[0]}), with "
            "masked norm statistics and alpha-scaled units that no Hugging Face class computes. Export a checkpoint "
            "written after the ramp ends (operator.ramp_steps steps after the growth event), e.g. the run's final one.")
    if pool > 1:
        raise ExportError(
            f"The model trains with length pooling (operator.seq_len=pool, factor {pool}): its blocks run on pooled "
            "input that BertForMaskedLM cannot compute. Export a checkpoint written after the last length stage.")


def hf_config(args: ModelArgs, special: dict):
    """The transformers config of `args` (fp32). `special`: eot/pad/mask ids of the run's tokenizer."""
    import transformers as tf

    arch = hf_architecture(args)
    V = padded_vocab(args.vocab_size)
    act = "gelu_new" if args.gelu == "tanh" else "gelu"  # gelu_new: the tanh approximation
    common = dict(vocab_size=V, tie_word_embeddings=args.tie_embeddings, pad_token_id=special["pad"],
                  architectures=[arch])
    if arch == "GPT2LMHeadModel":
        return tf.GPT2Config(n_positions=args.max_seq_len, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                             n_inner=args.ffn, activation_function=act, layer_norm_epsilon=args.norm_eps,
                             resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                             initializer_range=args.init_std, bos_token_id=special["eot"],
                             eos_token_id=special["eot"], **common)
    if arch == "MixtralForCausalLM":
        return tf.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, num_key_value_heads=args.n_kv_heads,
                                head_dim=args.head_dim, hidden_act="silu", max_position_embeddings=args.max_seq_len,
                                rms_norm_eps=args.norm_eps, rope_theta=args.rope_base, num_local_experts=args.experts,
                                num_experts_per_tok=args.active_experts, router_aux_loss_coef=args.router_aux_coef,
                                router_jitter_noise=0.0, sliding_window=None, initializer_range=args.init_std,
                                # transformers' default grouped_mm kernel refuses widths whose rows are not
                                # 16-byte multiples (odd F); the eager loop computes the same on any shape
                                experts_implementation="eager",
                                bos_token_id=special["eot"], eos_token_id=special["eot"], **common)
    if arch == "LlamaForCausalLM":
        return tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                              num_attention_heads=args.heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                              hidden_act="silu", max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
                              rope_theta=args.rope_base, attention_bias=args.bias, mlp_bias=args.bias,
                              initializer_range=args.init_std, bos_token_id=special["eot"],
                              eos_token_id=special["eot"], **common)
    return tf.BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         intermediate_size=args.ffn, hidden_act=act, max_position_embeddings=args.max_seq_len,
                         type_vocab_size=1, layer_norm_eps=args.norm_eps, hidden_dropout_prob=args.dropout,
                         attention_probs_dropout_prob=args.dropout, initializer_range=args.init_std, **common)


def hf_state(args: ModelArgs, sd: dict, layers=None, ends: bool = True) -> dict:
    """msgrun's state dict under the HF class's parameter names (new tensors; `sd` is untouched).
    `layers` (default all) and `ends` (embeddings, final norm, head) select a part, so a streamed
    export (`write_streamed`) converts one block at a time from a `sd` holding only that block."""
    arch = hf_architecture(args)
    layers = range(args.layers) if layers is None else layers
    W, F = args.attn_width, args.ffn
    out = {}

    def put(name, t):
        out[name] = t.detach().to("cpu", torch.float32).contiguous().clone()

    def bias(key, width):  # a model without biases exports zeros where the HF class has them
        return sd[key] if key in sd else torch.zeros(width)

    if arch == "GPT2LMHeadModel":
        if ends:
            put("transformer.wte.weight", sd["tok_emb.weight"])
            put("transformer.wpe.weight", sd["pos_emb.weight"])
        for i in layers:
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for src, dst, width in (("attn_norm", "ln_1", args.hidden), ("mlp_norm", "ln_2", args.hidden)):
                put(h + dst + ".weight", sd[b + src + ".weight"])
                put(h + dst + ".bias", bias(b + src + ".bias", width))
            for src, dst, width in (("attn.qkv", "attn.c_attn", 3 * W), ("attn.proj", "attn.c_proj", args.hidden),
                                    ("mlp.fc", "mlp.c_fc", F), ("mlp.proj", "mlp.c_proj", args.hidden)):
                put(h + dst + ".weight", sd[b + src + ".weight"].t())  # Conv1D: (in, out)
                put(h + dst + ".bias", bias(b + src + ".bias", width))
        if ends:
            put("transformer.ln_f.weight", sd["final_norm.weight"])
            put("transformer.ln_f.bias", bias("final_norm.bias", args.hidden))
            put("lm_head.weight", sd["lm_head.weight"])
        return out
    if arch in ("LlamaForCausalLM", "MixtralForCausalLM"):
        if ends:
            put("model.embed_tokens.weight", sd["tok_emb.weight"])
        for i in layers:
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            put(h + "input_layernorm.weight", sd[b + "attn_norm.weight"])
            put(h + "post_attention_layernorm.weight", sd[b + "mlp_norm.weight"])
            Wkv = args.kv_width
            parts = {"attn.qkv": [("self_attn.q_proj", 0, W), ("self_attn.k_proj", W, W + Wkv),
                                  ("self_attn.v_proj", W + Wkv, W + 2 * Wkv)],
                     "attn.proj": [("self_attn.o_proj", 0, None)],
                     "mlp.fc": [("mlp.gate_proj", 0, F), ("mlp.up_proj", F, 2 * F)],  # rows [gate | up]
                     "mlp.proj": [("mlp.down_proj", 0, None)]}
            if args.moe:  # Mixtral: the router, and every expert's [gate | up] and down stacked
                del parts["mlp.fc"], parts["mlp.proj"]
                put(h + "mlp.gate.weight", sd[b + "mlp.router.weight"])
                for src, dst in (("fc", "gate_up_proj"), ("proj", "down_proj")):
                    put(h + "mlp.experts." + dst,
                        torch.stack([sd[f"{b}mlp.experts.{e}.{src}.weight"] for e in range(args.experts)]))
            for src, dsts in parts.items():
                for dst, lo, hi in dsts:
                    put(h + dst + ".weight", sd[b + src + ".weight"][lo:hi])
                    if args.bias:
                        put(h + dst + ".bias", sd[b + src + ".bias"][lo:hi])
        if ends:
            put("model.norm.weight", sd["final_norm.weight"])
            put("lm_head.weight", sd["lm_head.weight"])
        return out
    e = "bert.embeddings."
    if ends:
        put(e + "word_embeddings.weight", sd["tok_emb.weight"])
        put(e + "position_embeddings.weight", sd["pos_emb.weight"])
        put(e + "token_type_embeddings.weight", torch.zeros(1, args.hidden))  # msgrun has no token types
        put(e + "LayerNorm.weight", sd["emb_norm.weight"])
        put(e + "LayerNorm.bias", bias("emb_norm.bias", args.hidden))
    for i in layers:
        b, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        qkv_w = sd[b + "attn.qkv.weight"]
        qkv_b = bias(b + "attn.qkv.bias", 3 * W)
        for j, name in enumerate(("query", "key", "value")):
            put(h + f"attention.self.{name}.weight", qkv_w[j * W:(j + 1) * W])
            put(h + f"attention.self.{name}.bias", qkv_b[j * W:(j + 1) * W])
        for src, dst, width in (("attn.proj", "attention.output.dense", args.hidden),
                                ("attn_norm", "attention.output.LayerNorm", args.hidden),
                                ("mlp.fc", "intermediate.dense", F), ("mlp.proj", "output.dense", args.hidden),
                                ("mlp_norm", "output.LayerNorm", args.hidden)):
            put(h + dst + ".weight", sd[b + src + ".weight"])
            put(h + dst + ".bias", bias(b + src + ".bias", width))
    if not ends:
        return out
    p = "cls.predictions."
    put(p + "transform.dense.weight", sd["mlm_head.dense.weight"])
    put(p + "transform.dense.bias", bias("mlm_head.dense.bias", args.hidden))
    put(p + "transform.LayerNorm.weight", sd["mlm_head.norm.weight"])
    put(p + "transform.LayerNorm.bias", bias("mlm_head.norm.bias", args.hidden))
    put(p + "decoder.weight", sd["lm_head.weight"])
    put(p + "bias", sd["lm_head.bias"])  # BERT's decoder bias is cls.predictions.bias
    return out


def to_hf(args: ModelArgs, state: dict, special: dict):
    """The HF model computing what a msgrun model of shape `args` with `state` (its full state
    dict) computes, in fp32 and eval mode."""
    import transformers as tf

    config = hf_config(args, special)
    cls = getattr(tf, config.architectures[0])
    hf = cls(config).float().eval()
    weights = hf_state(args, state)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    expected_params = {n for n, _ in hf.named_parameters(remove_duplicate=False)}
    unfilled = [k for k in missing if k in expected_params and not tied_alias(hf, k, weights)]
    if unexpected or unfilled:  # a mapping bug, never a user error
        raise RuntimeError(f"export mapping is incomplete: unfilled {unfilled}, unexpected {unexpected}")
    if args.tie_embeddings:
        hf.tie_weights()
    if config.architectures[0] != "BertForMaskedLM":
        hf.generation_config = generation_config(special)
    return hf


def generation_config(special: dict):
    """Causal models' generation defaults. No max_length: generate(max_new_tokens=...) would warn
    that both are set on every call, and the context limit is already config.json's."""
    import transformers as tf

    return tf.GenerationConfig(bos_token_id=special["eot"], eos_token_id=special["eot"], pad_token_id=special["pad"])


# HF parameters the class ties to the input embedding under tie_word_embeddings: a streamed export
# writes the embedding once and lets from_pretrained tie the head to it
TIED_HEAD = {"GPT2LMHeadModel": "lm_head.weight", "LlamaForCausalLM": "lm_head.weight",
             "MixtralForCausalLM": "lm_head.weight", "BertForMaskedLM": "cls.predictions.decoder.weight"}
INDEX = "model.safetensors.index.json"  # what from_pretrained reads for a sharded safetensors model


def model_parts(args: ModelArgs) -> list[tuple[dict, list[int], bool]]:
    """The export's units: the ends (embeddings, final norm, head), then each block; per unit its
    msgrun tensors' shapes, its layers and whether it is the ends (hf_state's arguments)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    ends = {k: v for k, v in shapes.items() if not k.startswith("blocks.")}
    return [(ends, [], True)] + [({k: v for k, v in shapes.items() if k.startswith(f"blocks.{i}.")}, [i], False)
                                 for i in range(args.layers)]


def write_streamed(args: ModelArgs, state: dict, folder: Path, max_shard_bytes: int) -> tuple[int, int]:
    """Write the HF weights of a checkpoint (either format) as safetensors shards with an index,
    reading one unit (model_parts) at a time: memory holds one unit and one shard being filled,
    never the model. Returns the number of shard files and the bytes written."""
    from safetensors.torch import save_file

    tied = TIED_HEAD[hf_architecture(args)] if args.tie_embeddings else None
    written, pending, size, total = [], {}, 0, 0

    def flush():
        name = f".part-{len(written)}.safetensors"  # renamed once the count is known
        save_file(pending, str(folder / name), metadata={"format": "pt"})
        written.append((name, list(pending)))
        pending.clear()

    for shapes, layers, ends in model_parts(args):
        sd = {k: torch.empty(shape) for k, shape in shapes.items()}
        checkpoint.restore_tensors(state, {"model": sd})  # this unit only; DCP reads only its bytes
        part = hf_state(args, sd, layers=layers, ends=ends)
        del sd
        part.pop(tied, None)
        for name, t in part.items():
            nbytes = t.numel() * t.element_size()
            if pending and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            pending[name] = t
            size += nbytes
            total += nbytes
    if pending:
        flush()
    weight_map = {}
    for j, (name, keys) in enumerate(written):
        final = f"model-{j + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map.update({k: final for k in keys})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return len(written), total


def tied_alias(hf, key: str, weights: dict) -> bool:
    """True when `key` is a parameter HF ties to one that was filled (e.g. BERT's decoder.bias)."""
    params = dict(hf.named_parameters(remove_duplicate=False))
    return any(params[key] is params[k] for k in weights if k in params)


@torch.no_grad()
def max_logit_diff(model: Transformer, hf, tokens: torch.Tensor) -> float:
    """max |msgrun logits - HF logits| on `tokens` (1, T), both in fp32 eval mode on the CPU."""
    model_was_training = model.training
    model.eval()
    ours = model(tokens)
    theirs = hf(input_ids=tokens).logits
    model.train(model_was_training)
    return (ours.float() - theirs.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------- tokenizer


def special_ids(tokenizer_path: str) -> dict:
    tok, _ = data.load_tokenizer(tokenizer_path)
    eot, mask, pad = data.special_ids(tok, tokenizer_path)
    return {"eot": eot, "mask": mask, "pad": pad}


def hf_tokenizer(tokenizer_path: str, max_len: int):
    """The run's tokenizer.json as a PreTrainedTokenizerFast with msgrun's special tokens.
    It adds no special tokens around text (as msgrun, whose documents are separated by eot)."""
    from transformers import PreTrainedTokenizerFast

    tok, _ = data.load_tokenizer(tokenizer_path)
    pad = data.PAD if tok.token_to_id(data.PAD) is not None else data.EOT  # as msgrun.data's pad id
    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, bos_token=data.EOT, eos_token=data.EOT,
                                   pad_token=pad, mask_token=data.MASK, model_max_length=max_len)


def find_tokenizer(cfg: dict, fingerprints: dict, given: str | None) -> str:
    """The tokenizer.json the run trained with: --tokenizer, data.tokenizer_path, or the BPE
    msgrun trained and cached; its bytes must match the run's tokenizer fingerprint."""
    if fingerprints["tokenizer"].startswith("vocab-"):
        raise ExportError(
            f"This run trained on token shards without data.tokenizer_path, so it recorded only its vocabulary size "
            f"({fingerprints['tokenizer']}) and no tokenizer.json can be checked against its ids; msgrun-export does "
            "not guess. To export, train the run again (under a new hydra.run.dir) with data.tokenizer_path=<the "
            "tokenizer.json the shards were written with>; msgrun-prepare writes it beside the shards.")
    d = cfg["data"]
    if given:
        candidates = [given]
    elif d.get("tokenizer_path"):
        candidates = [os.path.expanduser(d["tokenizer_path"])]
    else:
        candidates = [os.path.join(os.path.expanduser(d["cache_dir"]), fingerprints["data"], f"bpe-{d['vocab_size']}",
                                   "tokenizer.json")]
    path = os.path.abspath(candidates[0])
    if not os.path.isfile(path):
        raise ExportError(
            f"The run's tokenizer is not at {path} (it is trained once and cached under data.cache_dir). Pass the "
            "tokenizer.json the run used with --tokenizer PATH, or rerun the training command's data preparation "
            "(the same data and data.vocab_size recreate it).")
    _, fp = data.load_tokenizer(path)
    if fp != fingerprints["tokenizer"]:
        raise ExportError(
            f"{path} is not the tokenizer this run trained with (fingerprint {fp}, the run's is "
            f"{fingerprints['tokenizer']}): its ids would not match the model's. Pass the right file with "
            "--tokenizer PATH.")
    return path


# ---------------------------------------------------------------------------------------------- a run directory


def load_checkpoint(run_dir: Path, path: str | None) -> tuple[Path, dict]:
    """The checkpoint to export (by default the newest one that loads: checkpoint.open_checkpoint)
    and its state."""
    run_dir = Path(run_dir)
    if path is None:
        if not run_dir.is_dir():
            raise ExportError(f"{run_dir} is not a directory; give the run directory that msgrun wrote "
                              "(it holds metrics.jsonl and checkpoints/).")
        ckpt, state = checkpoint.newest_loadable(run_dir, warn=lambda m: print(m, file=sys.stderr))
        if ckpt is None:
            raise ExportError(f"{run_dir} holds no checkpoint that loads ({checkpoint.checkpoint_dir(run_dir)}/"
                              "step_*.pt with a matching .sha256, or step_*.dcp); a run writes one at the end and after every "
                              "growth event.")
        return ckpt, state
    ckpt = Path(path)
    if not (ckpt.is_file() or (checkpoint.is_sharded(ckpt) and ckpt.is_dir())):
        raise ExportError(f"--checkpoint {ckpt}: no such file (nor a sharded checkpoint directory step_N.dcp).")
    state, why = checkpoint.open_checkpoint(ckpt)
    if state is None:
        raise ExportError(f"--checkpoint {ckpt} {why}: it is not a usable msgrun checkpoint (it needs a matching "
                          f"{ckpt.name}.sha256). Omit --checkpoint to use the newest one that loads.")
    return ckpt, state


def checkpoint_model(state: dict) -> Transformer:
    check_args(state)
    model = Transformer(ModelArgs(**state["model_args"]))
    checkpoint.restore_tensors(state, {"model": model.state_dict()})  # either format (checkpoint.py)
    return model.float().eval()


def check_args(state: dict) -> None:
    if state["model_args"].get("family") == "bert" and "gelu" not in state["model_args"]:
        raise ExportError(
            "This BERT checkpoint predates model.gelu: its FFN used the tanh GELU and its MLM transform the exact "
            "one, and HF's BertForMaskedLM applies one hidden_act to both, so no export is exact. Retrain with the "
            "current msgrun (model.gelu=exact, the default for BERT models).")


def pool_of(state: dict, cfg: dict) -> int:
    """The length-pooling factor the checkpoint's model trains with (1: none)."""
    from msgrun.growth.registry import resolved

    shape_len = state["engine"]["shape"]["seq_len"]
    model = cfg["model"]
    method = resolved(cfg["operator"].get("seq_len"), model["family"], model.get("pos", "learned"))
    return model["seq_len"] // shape_len if method is not None and method.pools else 1


def fresh_output(out: Path) -> None:
    from msgrun.callbacks import unusable_dir_reason

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty directory; msgrun-export never overwrites files. "
                          "Choose a new directory.")
    reason = unusable_dir_reason(out.absolute())  # a file on the way, or no permission: before any work
    if reason:
        raise ExportError(f"--out {out} cannot be created: {reason}. Choose another directory.")


def save_hf(write, tokenizer, out: Path, info: dict) -> None:
    """Write everything (`write(folder)`: the weights and config) into a temporary sibling and
    rename it into place: no half export."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        _readable_as_umask_allows(tmp)
        if out.exists():
            out.rmdir()  # empty (fresh_output)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _readable_as_umask_allows(folder: Path) -> None:
    """mkdtemp makes a 0700 directory (and some writers 0600 files); an export is meant to be
    shared like any file the user writes, so give it the modes the user's umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def export_run(run_dir: Path, out: Path, checkpoint_path: str | None = None, tokenizer_path: str | None = None,
               log=print, max_shard_bytes: int = SHARD_BYTES) -> dict:
    """Export a run's checkpoint to `out`; returns what msgrun_export.json records. A sharded
    checkpoint (train.distributed=fsdp) is streamed: one block at a time into safetensors shards
    of at most `max_shard_bytes` with an index, never the whole model in memory; a single-file
    checkpoint is exported whole and its logits compared with msgrun's in process."""
    out = Path(out)
    fresh_output(out)
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ExportError(f"msgrun-export needs transformers and safetensors ({e}): {install_hint('transformers')}.") from e
    ckpt, state = load_checkpoint(Path(run_dir), checkpoint_path)
    cfg = json.loads(state["config"])
    if state["engine"].get("ramp") is not None:
        check_state([f"the ramp of growth event {state['engine']['ramp']['stage']}"], 1)
    check_state([], pool_of(state, cfg))
    check_args(state)
    args = ModelArgs(**state["model_args"])
    arch = hf_architecture(args)  # refuse before the tokenizer is looked for
    tok_path = find_tokenizer(cfg, state["fingerprints"], tokenizer_path)
    special = special_ids(tok_path)
    info = {"architecture": arch, "checkpoint": str(ckpt.absolute()), "step": state["counters"]["step"],
            "tokens": state["counters"]["tokens"], "flops": state["counters"]["flops"],
            "model_args": dict(state["model_args"]), "fingerprints": state["fingerprints"], "tokenizer": tok_path}
    tokenizer = hf_tokenizer(tok_path, args.max_seq_len)
    if checkpoint.is_sharded(ckpt):
        def write(folder):
            info["shards"], info["bytes"] = write_streamed(args, state, folder, max_shard_bytes)
            hf_config(args, special).save_pretrained(folder)
            if arch != "BertForMaskedLM":
                generation_config(special).save_pretrained(folder)

        # the in-process comparison would need the whole model in memory, which a streamed export avoids
        info["max_abs_logit_diff"] = None
        save_hf(write, tokenizer, out, info)
        log(f"exported {ckpt} (step {info['step']}) as {arch} to {out}: {info['shards']} safetensors shard(s), "
            f"{info['bytes']:,} bytes, streamed one block at a time (logits not compared in process)")
        return info
    model = checkpoint_model(state)
    hf = to_hf(model.args, model.state_dict(), special)
    probe = torch.arange(min(model.args.max_seq_len, 64)).unsqueeze(0) % model.args.vocab_size
    diff = max_logit_diff(model, hf, probe)
    info["max_abs_logit_diff"] = diff
    save_hf(lambda folder: hf.save_pretrained(folder, safe_serialization=True), tokenizer, out, info)
    log(f"exported {ckpt} (step {info['step']}) as {arch} to {out}; max |logit diff| vs msgrun {diff:.2e} (fp32)")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="msgrun-export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes a trained msgrun model as a Hugging Face transformers directory (safetensors weights, "
        "config.json,\ngeneration_config.json for causal models, the run's tokenizer), loadable with "
        "AutoModelForCausalLM /\nAutoModelForMaskedLM and AutoTokenizer, no remote code. gpt+layernorm -> "
        "GPT2LMHeadModel, gpt+rmsnorm+swiglu+rope ->\nLlamaForCausalLM, bert -> BertForMaskedLM; the export "
        "checks that its logits equal msgrun's (fp32) and refuses\nwhat no transformers class expresses "
        "(exit 2). Needs the eval extra: pip install -e '.[eval]'.",
        epilog="examples:\n"
        "  msgrun-export outputs/2026-11-23/10-00-00 --out exported/tiny\n"
        "  msgrun-export multirun/2026-11-23/10-00-00/3 --out exported/msg --checkpoint "
        "multirun/2026-11-23/10-00-00/3/checkpoints/step_000000400.pt\n"
        "  python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exported/tiny')\"\n"
        "  msgrun ... eval=example    export and evaluate at the end of training (docs/export.md)")
    parser.add_argument("run_dir", type=Path, help="a msgrun run directory")
    parser.add_argument("--out", type=Path, required=True, help="new directory for the Hugging Face files")
    parser.add_argument("--checkpoint", help="a checkpoint file or sharded checkpoint directory step_N.dcp "
                        "(default: the run's newest valid one)")
    parser.add_argument("--tokenizer", help="the run's tokenizer.json, if its cache moved")
    a = parser.parse_args(argv)
    try:
        export_run(a.run_dir, a.out, a.checkpoint, a.tokenizer)
    except MsgrunError as e:
        print(f"msgrun-export: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
