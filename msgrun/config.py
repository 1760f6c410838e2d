"""The typed schema behind the Hydra config tree.

Every YAML file in ``conf/`` is merged into these dataclasses, so a misspelled key or a value of
the wrong type fails at composition time with OmegaConf's message naming the key. Rules that
types cannot express (``heads > 0``, a valid choice) are checked by ``check_config`` below before
any compute is spent; schedule and operator rules by the growth engine (msgrun/growth/), which
the CLI also builds before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    """The *final* architecture. Growth schedules start smaller and must end here."""

    family: str = "gpt"  # gpt: causal, pre-norm | bert: bidirectional, post-norm, MLM head
    layers: int = 4
    hidden: int = 128  # residual width H
    heads: int = 4  # attention width is heads * head_dim, independent of hidden
    head_dim: int = 32
    kv_heads: Optional[int] = None  # key/value heads (grouped-query attention), dividing heads; null: = heads
    ffn: int = 512
    experts: int = 1  # FFN experts per layer (mixture of experts, msgrun/model.py MoE); 1: a dense FFN
    experts_per_token: int = 2  # top-k routing when experts > 1
    router_aux_coef: float = 0.01  # weight of the load-balancing loss in the training loss (experts > 1)
    seq_len: int = 128  # training and evaluation context length
    dropout: float = 0.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu
    gelu: str = "tanh"  # tanh (GPT-2) | exact (BERT): the GELU of the FFN and of BERT's MLM transform
    pos: str = "learned"  # learned | rope
    tie_embeddings: bool = True
    bias: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    rope_base: float = 10000.0
    mlm_probability: float = 0.15  # bert only: fraction of positions predicted
    lr: float = 1e-3  # this model's peak learning rate; train.lr defaults to it (see conf/model/*.yaml)


@dataclass
class DataConfig:
    name: str = "pystdlib"  # pystdlib | pysite | files | hf | shards
    paths: List[str] = field(default_factory=list)  # files: paths or glob patterns
    hf_path: Optional[str] = None  # hf: datasets.load_dataset path (name, or a local builder like "json")
    hf_name: Optional[str] = None  # hf: dataset config name
    hf_split: str = "train"
    hf_text_field: str = "text"
    hf_data_files: List[str] = field(default_factory=list)  # hf: local files for builders like json/text
    hf_streaming: bool = False
    max_docs: Optional[int] = None  # cap on documents read (hf, files)
    max_bytes: Optional[int] = None  # cap on corpus bytes (pysite is hundreds of MB)
    val_fraction: float = 0.05  # held-out fraction, split by document (file)
    shuffle_chunk: Optional[int] = None  # tokens per shuffled unit of the training stream; null: model.seq_len
    split_seed: int = 0
    vocab_size: int = 4096  # BPE vocabulary when training a tokenizer; shards: ids are below it (without a tokenizer)
    tokenizer_path: Optional[str] = None  # an existing tokenizer.json instead of training one
    train: Optional[str] = None  # shards: glob of the training shard files
    val: Optional[str] = None  # shards: glob of the validation shard files
    raw_dtype: Optional[str] = None  # shards: uint16 | uint32 for headerless files (nanoGPT's train.bin)
    cache_dir: str = "${oc.env:MSGRUN_CACHE,${oc.env:HOME,/tmp}/.cache/msgrun}"


@dataclass
class OptimConfig:
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay, msgrun/optim.py)
    decay_fraction: float = 0.2  # wsd only: the last share of the budget over which the LR decays
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_tokens: Optional[int] = None  # optional budget: stop when this many tokens were trained
    max_flops: Optional[float] = None  # optional budget: stop at this many training FLOPs
    max_minutes: Optional[float] = None  # optional wall-clock budget
    batch_size: int = 32  # sequences per optimizer step (global, across ranks)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    eval_every: int = 100
    eval_tokens: int = 65536  # held-out tokens per evaluation (the same tokens every time)
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0: none by count (checkpoint_minutes, growth events and the end still write)
    checkpoint_minutes: float = 15.0  # also checkpoint after this many minutes since the last one; 0 disables
    keep_checkpoints: int = 2
    skip_nonfinite: bool = False
    distributed: str = "none"  # none | ddp | fsdp (under torchrun)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    preflight: bool = True  # replay the last growth event and a final-shape step first (msgrun/preflight.py)
    branch_from: Optional[str] = None  # a run directory: start from its checkpoint with this budget (msgrun/branch.py)


@dataclass
class GrowSpec:
    """Target sizes of one growth event. An int is absolute, a float in (0, 1] a fraction of the
    final model (so one schedule file serves every model size)."""

    layers: Any = None
    hidden: Any = None
    heads: Any = None
    ffn: Any = None
    seq_len: Any = None
    kv_heads: Any = None  # unset: the group size (heads per key/value head) stays as it was
    experts: Any = None  # FFN experts (1: dense); growing 1 -> E is sparse upcycling


@dataclass
class StageConfig:
    # exactly one trigger
    at_step: Optional[int] = None
    at_tokens: Optional[int] = None
    at_flops: Optional[float] = None
    at_fraction: Optional[float] = None  # fraction of the run's budget progress (see train.py)
    grow: GrowSpec = field(default_factory=GrowSpec)


@dataclass
class ScheduleConfig:
    name: str = "none"
    start: GrowSpec = field(default_factory=GrowSpec)  # unset dims start at the final size
    stages: List[StageConfig] = field(default_factory=list)
    # G_stack growth-timing guideline (schedule=gstack_guideline); see growth/schedule.py
    guideline: Optional[str] = None  # null | gstack
    # G_stack's growth factor g: start at model.layers / g layers (refused unless a whole number);
    # null: schedule.start.layers sets the start depth
    depth_factor: Optional[int] = None


@dataclass
class OperatorConfig:
    """The named presets (conf/operator/*.yaml) set every choice their paper's reference code makes;
    docs/fidelity.md lists each choice beside the paper and the reference code."""

    name: str = "none"
    # per-dimension method; null means the operator cannot grow that dimension
    layers: Optional[str] = None
    hidden: Optional[str] = None
    heads: Optional[str] = None
    ffn: Optional[str] = None
    seq_len: Optional[str] = None  # warmup | pool | auto (pool for bert, warmup for gpt)
    experts: Optional[str] = None  # copy: dense -> experts (sparse upcycling), experts -> more (duplication)
    # experts -> more: fixed (top-k stays model.experts_per_token: not exact) | grow (k grows with the
    # experts, E -> mE runs mk: exact; growth/moe.py)
    expert_top_k: str = "fixed"
    # MSG
    ramp_steps: Any = 0.05  # increments of the mask strength alpha 0 -> 1: int steps, or float fraction of the run
    ramp_start: str = "zero"  # zero (the event's step trains at alpha 0: reference) | increment (at 1/R)
    mask_placement: str = "reference"  # reference (q,k,v; FFN pre-activation; norms only) | ours
    # depth: where new layers come from
    depth_init: str = "copy"  # copy | random
    depth_order: str = "stack"  # stack (0..L-1,0..L-1) | interleave (0,0,1,1,...)
    depth_remainder: str = "top"  # non-multiple growth copies the top layers (MSG) | bottom (CompoundGrowth) | refuse
    # width by copying (bert2bert, hyperclone)
    mapping: str = "random"  # random | left  (which source unit each new unit copies)
    variant: str = "fpi"  # fpi | aki
    symmetry_noise: float = 1e-3  # relative +-eta on copies' consuming weights (cancels exactly)
    # RaPTr
    rescale: str = "none"  # none | inverse_keep_prob
    # optimizer and LR across a growth event
    optimizer_state: str = "carry"  # carry (by provenance) | reset (fresh optimizer)
    new_layer_state: str = "fresh"  # fresh (new layers start with no AdamW state: MSG reference) | carry (source's)
    new_moments: str = "zero"  # zero (MSG reference) | mean (second moment from the source's mean)
    lr_policy: str = "continue"  # continue | rewind (MSG reference) | restart (fresh warmup)
    # block expansion and learned growth (growth/expansion.py, growth/ligo.py)
    freeze_old: bool = False  # layers=llama_pro: after the event only the new blocks train (LLaMA-Pro's recipe)
    ligo_steps: int = 100  # LiGO: steps fitting the growth operator (training compute, charged to the run)
    ligo_lr: float = 2e-4  # LiGO: peak AdamW learning rate of the operator's fitting (the reference's)
    ligo_warmup: int = 10000  # LiGO: linear warmup steps of the fitting's LR (the reference's config: 10000)
    ligo_weight_decay: float = 0.1  # LiGO: AdamW weight decay of the fitting
    ligo_clip: float = 1.0  # LiGO: gradient-norm clipping of the fitting (0: none)
    ligo_noise: float = 0.03  # LiGO: U(0, noise) added to the one-hot depth init (stackbert_noisy; 0: exact one-hot)


@dataclass
class WandbConfig:
    # online | offline | disabled. As in wandb, an explicit value (command line, config file) wins
    # over the WANDB_MODE environment variable, which wins over the default, offline.
    mode: str = "${oc.env:WANDB_MODE,offline}"
    project: str = "msgrun"
    entity: Optional[str] = None
    group: Optional[str] = None  # defaults to the multirun sweep directory
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None  # defaults to the run directory


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    console: str = "auto"  # auto (rich on a terminal) | rich | plain


@dataclass
class ObjectiveConfig:
    """What a job returns to a Hydra sweeper (e.g. Optuna). A search must not optimise seed noise:
    `seeds` runs every trial once per seed (in seed<N>/ subdirectories) and averages."""

    metric: str = "final_val_loss"  # final_val_loss | flops_to_target
    target: Optional[float] = None  # validation loss that flops_to_target measures
    seeds: List[int] = field(default_factory=list)  # empty: train.seed only
    penalty: float = 2.0  # a run that never reaches the target scores penalty x its total FLOPs


@dataclass
class TextSourceConfig:
    """Held-out text for eval.perplexity: files (paths or glob patterns) or a Hugging Face dataset,
    read as msgrun.data reads a training corpus (the same keys as `data`)."""

    name: str = "files"  # files | hf
    paths: List[str] = field(default_factory=list)
    hf_path: Optional[str] = None
    hf_name: Optional[str] = None
    hf_split: str = "test"
    hf_text_field: str = "text"
    hf_data_files: List[str] = field(default_factory=list)
    hf_streaming: bool = False
    max_docs: Optional[int] = None
    max_bytes: Optional[int] = None
    join: bool = False  # true: the documents are one text (HF rows that are lines, as wikitext's)
    max_tokens: int = 262144  # tokens scored (the first ones of the text, in windows of model.seq_len)


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks on the exported model (pip install 'msgrun[eval]')."""

    tasks: List[str] = field(default_factory=list)  # empty: no lm-eval
    include_path: Optional[str] = None  # a folder of task YAML files (local tasks; see eval_tasks/)
    limit: Optional[float] = None  # examples per task (int), or a fraction of each task (float < 1)
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    device: Optional[str] = None  # null: the training device


@dataclass
class EvalConfig:
    """Downstream evaluation: results land in metrics.jsonl and summary.json as eval/<task>/<metric>."""

    at_end: bool = True
    at_growth: bool = False  # also on the model each growth event grows (just before it)
    every: int = 0  # also every N steps; 0: never
    # task name -> held-out text, each a TextSourceConfig (typed when msgrun.evaluate reads it: Hydra cannot
    # assign a whole mapping from the command line to a dict of dataclasses)
    perplexity: Dict[str, Any] = field(default_factory=dict)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class ProtocolConfig:
    """What a job trains besides its run (msgrun/protocol.py)."""

    name: str = "none"  # none | matched (each growth arm also trains its compute-matched baseline)
    # matched: more from-scratch budgets, as multiples of the arm's planned FLOPs (e.g. [0.25, 0.5]), the
    # points of the frontier the report reads the arm against (msgrun/protocol.py)
    frontier: List[float] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="msgrun_schema", node=Config)


# Every string key with a fixed set of values, and where that set is defined: the module that
# dispatches on the value owns the tuple, and check_config asks there (imported on demand, so
# composing a config does not import the training stack). Growth-method keys (operator.*) are
# checked by the growth-method registry, msgrun/growth/methods.py.
CHOICES = {
    "model.family": ("msgrun.model", "ModelArgs.FAMILIES"),
    "model.norm": ("msgrun.model", "ModelArgs.NORMS"),
    "model.mlp": ("msgrun.model", "ModelArgs.MLPS"),
    "model.pos": ("msgrun.model", "ModelArgs.POSITIONS"),
    "model.gelu": ("msgrun.model", "ModelArgs.GELUS"),
    "data.name": ("msgrun.data.sources", "DATA_NAMES"),
    "optim.decay": ("msgrun.optim", "DECAYS"),
    "operator.lr_policy": ("msgrun.optim", "LR_POLICIES"),
    "train.device": ("msgrun.distributed", "DEVICES"),
    "train.precision": ("msgrun.distributed", "PRECISIONS"),
    "train.distributed": ("msgrun.distributed", "MODES"),
    "logger.wandb.mode": ("msgrun.tracking", "WANDB_MODES"),
    "logger.console": ("msgrun.tracking", "CONSOLES"),
    "objective.metric": ("msgrun.callbacks", "METRICS"),
    "protocol.name": ("msgrun.protocol", "PROTOCOLS"),
}


def valid_choices(key: str) -> tuple:
    import importlib

    module, attribute = CHOICES[key]
    value = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


# Allowed ranges of every numeric key, in interval notation; null stays allowed where the schema
# allows it. Seeds take any integer. Checked elsewhere, where the rule needs more context:
# schedule stages and sizes (msgrun.growth.schedule), operator.ramp_steps under MSG
# (msgrun.growth.operator), data.vocab_size (at least the 256 bytes + special tokens, msgrun.data).
RANGES = {
    **{f"model.{k}": "[1, inf)" for k in ("layers", "hidden", "heads", "head_dim", "kv_heads", "ffn", "seq_len",
                                          "experts", "experts_per_token")},
    "model.router_aux_coef": "[0, inf)",
    "model.dropout": "[0, 1)",
    "model.norm_eps": "(0, inf)",
    "model.init_std": "(0, inf)",
    "model.rope_base": "(1, inf)",
    "model.mlm_probability": "(0, 1)",
    "model.lr": "(0, inf)",
    "data.max_docs": "[1, inf)",
    "data.max_bytes": "[1, inf)",
    "data.val_fraction": "(0, 1)",
    "data.shuffle_chunk": "[1, inf)",
    "data.vocab_size": "[1, inf)",
    "optim.eps": "(0, inf)",
    "optim.weight_decay": "[0, inf)",
    "optim.grad_clip": "[0, inf)",
    "optim.warmup_steps": "[0, inf)",
    "optim.min_lr_ratio": "[0, 1]",
    "optim.decay_fraction": "(0, 1]",
    **{f"train.{k}": "[1, inf)" for k in ("max_steps", "max_tokens", "batch_size", "grad_accum", "eval_every",
                                          "eval_tokens", "log_every", "keep_checkpoints")},
    "train.max_flops": "(0, inf)",
    "train.max_minutes": "(0, inf)",
    "train.lr": "(0, inf)",
    "train.checkpoint_every": "[0, inf)",
    "train.checkpoint_minutes": "[0, inf)",
    "train.threads": "[0, inf)",
    "schedule.depth_factor": "[2, inf)",
    "operator.ramp_steps": "[0, inf)",
    "operator.symmetry_noise": "[0, inf)",
    "operator.ligo_steps": "[1, inf)",
    "operator.ligo_lr": "(0, inf)",
    "operator.ligo_warmup": "[0, inf)",
    "operator.ligo_weight_decay": "[0, inf)",
    "operator.ligo_clip": "[0, inf)",
    "operator.ligo_noise": "[0, inf)",
    "eval.every": "[0, inf)",
    "eval.lm_eval.limit": "(0, inf)",
    "eval.lm_eval.num_fewshot": "[0, inf)",
    "eval.lm_eval.batch_size": "[1, inf)",
    "objective.target": "(0, inf)",
    "objective.penalty": "[1, inf)",
}
# why a value outside its range is impossible, where that is not obvious
RANGE_NOTES = {
    "model.heads": " (model.heads=0 would leave no attention at all)",
    "train.max_minutes": " (or null for no wall-clock budget)",
    "train.checkpoint_every": " (0: no checkpoints by step count)",
    "eval.every": " (0: never)",
    "eval.lm_eval.limit": " (examples per task, or a fraction below 1; null for every example)",
    "data.val_fraction": " (the held-out share of the documents: both splits need some)",
    "train.checkpoint_minutes": " (0: no checkpoints by wall-clock)",
    "train.keep_checkpoints": " (the newest checkpoint is always kept)",
    "objective.penalty": " (a run that never reaches the target must score worse than one that reaches it late)",
}


def in_range(value, spec: str) -> bool:
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    above = value >= lo if spec[0] == "[" else value > lo
    below = value <= hi if spec[-1] == "]" else value < hi
    return above and below


def unknown_keys(node, schema, prefix: str = "") -> list[tuple[str, type]]:
    """Keys present in the composed config but not in the schema: `+model.layer=3` adds one that
    nothing reads (Hydra's own hint for a misspelled key), which would train with it ignored."""
    import dataclasses
    import typing

    from omegaconf import DictConfig, ListConfig

    out = []
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
        return out
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            out.append((path, schema))
            continue
        child, hint = node._get_node(key), hints[key]
        if isinstance(child, ListConfig) and typing.get_args(hint):
            item = typing.get_args(hint)[0]
            for i, element in enumerate(child):
                out += unknown_keys(element, item, f"{path}.{i}.")
        else:
            out += unknown_keys(child, hint, f"{path}.")
    return out


def valid_keys_message(full_key: str | None, schema) -> str | None:
    """"Valid keys of <node>: ..." for a misspelled key of a schema node."""
    import dataclasses

    if not full_key or not dataclasses.is_dataclass(schema):
        return None
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else "the top level"
    return f"Valid keys of {parent}: {', '.join(f.name for f in dataclasses.fields(schema))}."


def check_section(cfg, section: str) -> None:
    """The choices and ranges of the keys under `section` ("" for all; "data" for msgrun-prepare,
    whose config holds the same `data` node)."""
    import os

    from omegaconf import OmegaConf

    from msgrun.errors import ConfigError

    def keys(table):
        return [k for k in table if not section or k.startswith(section + ".")]

    for key in keys(CHOICES):
        value, valid = OmegaConf.select(cfg, key), valid_choices(key)
        if value not in valid:
            source = " (from the WANDB_MODE environment variable)" if (
                key == "logger.wandb.mode" and value == os.environ.get("WANDB_MODE")) else ""
            raise ConfigError(f"{key} = {value!r}{source} is not a valid choice; choose one of {', '.join(valid)}.")
    for key in keys(RANGES):
        value = OmegaConf.select(cfg, key)
        if value is not None and not in_range(value, RANGES[key]):
            raise ConfigError(f"{key} = {value} is out of range: it must lie in {RANGES[key]}"
                              f"{RANGE_NOTES.get(key, '')}.")


def check_config(cfg) -> None:
    """Rules the schema's types cannot express, checked before anything runs. Schedule and
    operator rules live with them (msgrun.growth), data rules in msgrun.data."""
    from msgrun.errors import ConfigError

    for key, schema in unknown_keys(cfg, Config):
        raise ConfigError(f"{key} is not a msgrun setting, so nothing would read it (a '+' override adds a key "
                          f"without checking it). {valid_keys_message(key, schema)} Fix the name and drop the '+'.")
    check_section(cfg, "")
    m = cfg.model
    if m.kv_heads is not None:
        from msgrun.model import kv_heads_problem

        problem = kv_heads_problem(m.heads, m.kv_heads)
        if problem:
            raise ConfigError(f"model.kv_heads = {m.kv_heads}: {problem}. Set model.kv_heads to one of those, or "
                              "null for one key/value head per query head.")
    if m.experts > 1 and m.experts_per_token > m.experts:
        raise ConfigError(f"model.experts_per_token = {m.experts_per_token} exceeds model.experts = {m.experts}: each "
                          f"token runs on its top-k experts, so k must lie in 1..{m.experts}.")
    if m.pos == "rope" and m.head_dim % 2:
        raise ConfigError(f"model.head_dim = {m.head_dim} must be even with model.pos=rope (rotary embeddings rotate "
                          "pairs of channels).")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"optim.betas = {betas}: AdamW needs two decay rates (beta1, beta2), each in [0, 1), "
                          "e.g. optim.betas=[0.9,0.95].")
    if cfg.objective.metric == "flops_to_target" and cfg.objective.target is None:
        raise ConfigError("objective.metric=flops_to_target needs objective.target (the validation loss to reach).")
    from msgrun.protocol import check as check_protocol

    check_protocol(cfg)
    if cfg.logger.wandb.mode == "online" and not wandb_logged_in():
        raise ConfigError(
            "logger.wandb.mode=online needs a W&B API key, and none is set (no WANDB_API_KEY, no key in ~/.netrc). "
            "Run `wandb login` (or export WANDB_API_KEY=...), or log offline with logger.wandb.mode=offline and "
            "upload later with `wandb sync <run_dir>/wandb/offline-run-*`, or turn W&B off with logger=none.")


def wandb_logged_in() -> bool:
    """Whether wandb would find an API key: WANDB_API_KEY, or ~/.netrc (or $NETRC) for its host,
    where `wandb login` stores it."""
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])
