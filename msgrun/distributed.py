"""Process groups and data-parallel wrappers (torchrun: DDP or FSDP2), and seeds.

Growth under data parallelism (docs/architecture.md section 5): the plain model is grown on
every rank identically (same operator, same init RNG stream, same host-sampled paths), then
re-wrapped. The optimizer is built on the plain model's parameters, so its state is moved by
provenance exactly as in a single process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from msgrun.errors import ConfigError


def seed_for(seed: int, stream: str) -> int:
    """Independent, stable seeds per RNG stream (init, data order, MLM masks, RaPTr paths), so
    changing how one stream is consumed never shifts another."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest(), "little") >> 1


MODES = ("none", "ddp", "fsdp")  # train.distributed
DEVICES = ("auto", "cpu", "cuda")  # train.device
PRECISIONS = ("auto", "fp32", "bf16")  # train.precision: auto is bf16 on CUDA, fp32 on the CPU


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device on this machine; use "
                          "train.device=auto or cpu.")
    return torch.device(name)


@dataclass
class Dist:
    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def setup(mode: str) -> Dist:
    """mode is one of MODES (config.check_config has checked it)."""
    if mode == "none":
        return Dist()
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # one SLURM task per rank (Hydra's submitit launcher with tasks_per_node > 1): derive
        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    if "RANK" not in os.environ:
        raise ConfigError(f"train.distributed={mode} needs a torchrun launch (RANK/WORLD_SIZE are not set): "
                          f"torchrun --nproc_per_node=N -m msgrun train.distributed={mode} ..., or SLURM tasks "
                          "(hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=N).")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(mode, rank, world, local, device)


def teardown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def full_tensor(t):
    """The whole tensor behind an FSDP shard (a collective); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model state and optimizer state keyed by parameter name, the same format in
    every mode. Under FSDP every rank must call it, and does so in parameter order."""
    model_state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    optim_state = {}
    for name, p in model.named_parameters():
        if p in optimizer.state:
            optim_state[name] = {k: full_tensor(v) for k, v in optimizer.state[p].items()}
    return model_state, optim_state


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Register FSDP2's sharded parameters again. After a forward without backward (an
    evaluation, the growth probe) the root keeps its gathered parameters registered under their
    names, and those are not the tensors the optimizer holds; state_dict() reshards by itself,
    named_parameters() does not."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, as it is (shards stay shards): names, not
    the optimizer's parameter indices, survive growth and resharding."""
    reshard(model)
    return {name: dict(optimizer.state[p]) for name, p in model.named_parameters() if optimizer.state.get(p)}


def allocate_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             keys: dict[str, list[str]]) -> dict:
    """Zeroed AdamW state, shaped and sharded like each named parameter, for the parameters in
    `keys` (what a checkpoint holds); it is installed in `optimizer` and returned by name, to be
    filled in place (checkpoint.restore_tensors)."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    out = {}
    for name, p in model.named_parameters():
        if name not in keys:
            continue  # never updated yet (e.g. a layer RaPTr has not sampled): starts fresh
        entry = {}
        for k in keys[name]:
            # AdamW keeps `step` as a scalar on the host unless fused or capturable
            entry[k] = (torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu") if k == "step"
                        else torch.zeros_like(p))
        optimizer.state[p] = entry
        out[name] = entry
    return out


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_state` optimizer state, sharding it like each parameter under FSDP. A parameter
    without saved state (never updated yet, e.g. a layer RaPTr has not sampled) starts fresh."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        if name not in state:
            continue
        entry = {}
        for k, v in state[name].items():
            if k != "step" and isinstance(p, DTensor):
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            elif k != "step" or optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"):
                v = v.to(p.device)
            entry[k] = v
        optimizer.state[p] = entry


def shard(model: torch.nn.Module, dist: Dist) -> None:
    """FSDP2: shard each block, then the root (embeddings, final norm, head), in place. On CUDA the
    block computes in bf16 and reduces gradients in fp32; parameters stay fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if dist.device.type == "cuda" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def shard_with_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Dist, lr: float,
                         optim_cfg) -> torch.optim.Optimizer:
    """Shard a plain model in place and return an optimizer over its shards holding the plain
    optimizer's state, each rank its shard of it."""
    from msgrun.optim import build_adamw

    _, optim_state = full_state(model, optimizer)
    shard(model, dist)
    sharded_opt = build_adamw(model, lr, optim_cfg, dist.device.type)
    load_optimizer_state(model, sharded_opt, optim_state)
    return sharded_opt


def gather_plain(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float, optim_cfg):
    """The whole model and optimizer state as a plain model and optimizer, on every rank (a
    collective): what a growth method that cannot work shard by shard needs (growth/sharded.py)."""
    from msgrun.model import Transformer
    from msgrun.optim import build_adamw

    device = next(model.parameters()).device
    model_state, optim_state = full_state(model, optimizer)
    plain = Transformer(model.args).to(device)
    plain.load_state_dict(model_state)
    plain_opt = build_adamw(plain, lr, optim_cfg, device.type)
    load_optimizer_state(plain, plain_opt, optim_state)
    return plain, plain_opt


def wrap(model: torch.nn.Module, dist: Dist, find_unused: bool = False) -> torch.nn.Module:
    """What the training step calls. DDP needs `find_unused` when steps skip layers (RaPTr);
    FSDP2 shards in place (see `shard`), so the module itself is called."""
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buffers (RoPE tables, MSG masks and alpha) are computed identically on every rank: no
        # per-step broadcast
        return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                       find_unused_parameters=find_unused, broadcast_buffers=False)
    return model


def broadcast(obj, dist: Dist):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, dist: Dist) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank."""
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def maybe_no_sync(model: torch.nn.Module, dist: Dist, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if dist.mode == "ddp" and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def mean_across_ranks(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        t = t.clone()
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.AVG if dist.device.type == "cuda" else torch_dist.ReduceOp.SUM)
        if dist.device.type != "cuda":  # gloo has no AVG
            t /= dist.world_size
    return t
