"""The typed schema behind the Hydra config tree.

Every YAML file in ``conf/`` is merged into these dataclasses, so a misspelled key or a value of
the wrong type fails at composition time with OmegaConf's message naming the key. Rules that
types cannot express (``heads > 0``, a schedule that never shrinks, ...) are checked by
``msgrun.validate`` before any compute is spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    """The *final* architecture. Growth schedules start smaller and must end here."""

    family: str = "gpt"  # gpt: causal, pre-norm | bert: bidirectional, post-norm, MLM head
    layers: int = 4
    hidden: int = 128  # residual width H
    heads: int = 4  # attention width is heads * head_dim, independent of hidden
    head_dim: int = 32
    ffn: int = 512
    seq_len: int = 128  # training and evaluation context length
    dropout: float = 0.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu
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
    name: str = "pystdlib"  # pystdlib | pysite | files | hf
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
    vocab_size: int = 4096  # BPE vocabulary when training a tokenizer
    tokenizer_path: Optional[str] = None  # an existing tokenizer.json instead of training one
    cache_dir: str = "${oc.env:MSGRUN_CACHE,${oc.env:HOME,/tmp}/.cache/msgrun}"


@dataclass
class OptimConfig:
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant
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
    checkpoint_every: int = 0  # 0: only at the end and after growth events
    keep_checkpoints: int = 2
    resume: bool = False
    skip_nonfinite: bool = False
    distributed: str = "none"  # none | ddp | fsdp (under torchrun)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    preflight: bool = True  # replay the last growth event and a final-shape step first (msgrun/preflight.py)


@dataclass
class GrowSpec:
    """Target sizes of one growth event. An int is absolute, a float in (0, 1] a fraction of the
    final model (so one schedule file serves every model size)."""

    layers: Any = None
    hidden: Any = None
    heads: Any = None
    ffn: Any = None
    seq_len: Any = None


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
    guideline_factor: int = 4  # growth factor g of the stacked depth


@dataclass
class OperatorConfig:
    name: str = "none"
    # per-dimension method; null means the operator cannot grow that dimension
    layers: Optional[str] = None
    hidden: Optional[str] = None
    heads: Optional[str] = None
    ffn: Optional[str] = None
    seq_len: Optional[str] = None
    # MSG
    ramp_steps: int = 100  # steps for the mask strength alpha to go 0 -> 1
    # depth: where new layers come from
    depth_init: str = "copy"  # copy | random
    depth_order: str = "stack"  # stack (0..L-1,0..L-1) | interleave (0,0,1,1,...)
    # width by copying (bert2bert, hyperclone)
    mapping: str = "random"  # random | left  (which source unit each new unit copies)
    variant: str = "fpi"  # fpi | aki
    symmetry_noise: float = 1e-3  # relative +-eta on copies' consuming weights (cancels exactly)
    # RaPTr
    rescale: str = "none"  # none | inverse_keep_prob
    # optimizer and LR across a growth event
    optimizer_state: str = "carry"  # carry (by provenance) | reset (fresh optimizer)
    new_moments: str = "mean"  # zero (MSG reference) | mean (second moment from the source's mean)
    lr_policy: str = "continue"  # continue | rewind (MSG reference) | restart (fresh warmup)
    # issue-14 operators (growth/expansion.py, growth/lemon.py)
    freeze_old: bool = False  # layers=llama_pro: after the event only the new blocks train (LLaMA-Pro's recipe)
    ligo_steps: int = 100  # LiGO: steps fitting the growth operator (training compute, charged to the run)
    ligo_lr: float = 1e-3  # LiGO: Adam learning rate of the operator's fitting


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
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
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="msgrun_schema", node=Config)


DIMS = ("layers", "hidden", "heads", "ffn", "seq_len")


CHOICES = {
    "model.family": ("gpt", "bert"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "swiglu"),
    "model.pos": ("learned", "rope"),
    "data.name": ("pystdlib", "pysite", "files", "hf"),
    "optim.decay": ("cosine", "linear", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.distributed": ("none", "ddp", "fsdp"),
    "logger.wandb.mode": ("online", "offline", "disabled"),
    "logger.console": ("auto", "rich", "plain"),
    "objective.metric": ("final_val_loss", "flops_to_target"),
}


def check_config(cfg) -> None:
    """Rules the schema's types cannot express, checked before anything runs. Schedule and
    operator rules live with them (msgrun.growth), data rules in msgrun.data."""
    from omegaconf import OmegaConf

    from msgrun.errors import ConfigError

    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ConfigError(f"{key} = {value!r} is not a valid choice; choose one of {', '.join(valid)}.")
    m = cfg.model
    for key in ("layers", "hidden", "heads", "head_dim", "ffn", "seq_len"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key} = {getattr(m, key)} is impossible: every model size must be at least 1 "
                              f"(model.heads=0 would leave no attention at all).")
    if m.pos == "rope" and m.head_dim % 2:
        raise ConfigError(f"model.head_dim = {m.head_dim} must be even with model.pos=rope (rotary embeddings rotate "
                          "pairs of channels).")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout = {m.dropout} must lie in [0, 1).")
    if m.family == "bert" and not 0.0 < m.mlm_probability < 1.0:
        raise ConfigError(f"model.mlm_probability = {m.mlm_probability} must lie in (0, 1).")
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every", "eval_tokens"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} = {getattr(t, key)} must be at least 1.")
    if cfg.objective.metric == "flops_to_target" and cfg.objective.target is None:
        raise ConfigError("objective.metric=flops_to_target needs objective.target (the validation loss to reach).")
    if t.lr <= 0:
        raise ConfigError(f"train.lr = {t.lr} must be positive.")
