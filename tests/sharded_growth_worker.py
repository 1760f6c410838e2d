"""Run by tests/test_sharded_growth.py under torchrun (gloo, CPU): one growth event grown two ways
on every rank, the plain model as a whole (the single-process growth) and the FSDP2 model one
parameter at a time (growth/sharded.py), then compared: parameters, AdamW state, logits before
and after two training steps through the MSG ramp. Prints one JSON line (rank 0)."""

import copy
import json
import sys

import torch
import torch.distributed as torch_dist

sys.path.insert(0, sys.argv[1])  # tests/, for conftest's Hydra composition
from conftest import compose_cfg  # noqa: E402

from msgrun import distributed  # noqa: E402
from msgrun.growth.engine import GrowthEngine  # noqa: E402
from msgrun.growth.masks import masked_modules  # noqa: E402
from msgrun.growth.sharded import unsupported  # noqa: E402
from msgrun.model import Transformer  # noqa: E402
from msgrun.optim import build_adamw  # noqa: E402
from msgrun.train import final_model_args  # noqa: E402


def batch(seed, vocab, rows=4, T=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def train(model, opt, engine, step, seed, dist=None):
    """dist: this rank's rows of the batch only (FSDP averages the ranks' gradients)."""
    engine.before_step(step)
    inputs, targets = batch(seed, model.args.vocab_size)
    if dist is not None:
        inputs, targets = inputs[dist.rank::dist.world_size], targets[dist.rank::dist.world_size]
    model(inputs, targets)[1].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # as the trainer clips (optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    engine.after_step(step)


def logits(model, seed):
    model.eval()
    with torch.no_grad():
        out = model(batch(seed, model.args.vocab_size)[0])[0]
    model.train()
    return out


def main():
    overrides = json.loads(sys.argv[2])
    dist = distributed.setup("fsdp")
    cfg = compose_cfg(overrides)
    final = final_model_args(cfg.model, cfg.data.vocab_size)
    plain_engine = GrowthEngine(cfg, final, world_size=dist.world_size)
    sharded_engine = GrowthEngine(cfg, final, world_size=dist.world_size)
    model = Transformer(plain_engine.initial_args(), generator=torch.Generator().manual_seed(1))
    opt = build_adamw(model, 1e-3, cfg.optim, "cpu")
    for step in range(2):  # some AdamW state to move
        train(model, opt, plain_engine, step, seed=step)
    plain, plain_opt = model, opt
    sharded = copy.deepcopy(model)
    _, optim_state = distributed.full_state(plain, plain_opt)
    distributed.shard(sharded, dist)
    sharded_opt = build_adamw(sharded, 1e-3, cfg.optim, "cpu")
    distributed.load_optimizer_state(sharded, sharded_opt, optim_state)

    # as the trainer's growth probe: a forward without backward leaves FSDP's root holding its
    # gathered parameters under their names (distributed.reshard)
    logits(sharded, 9)
    stage = plain_engine.stages[0]
    a = plain_engine.grow(plain, plain_opt, stage, torch.Generator().manual_seed(7), 2)
    why = unsupported(sharded_engine.operator, stage)
    if why is not None:
        if dist.rank == 0:
            print("RESULT " + json.dumps({"dims": list(stage.dims), "unsupported": why}), flush=True)
        distributed.teardown(dist)
        return
    b = sharded_engine.grow(sharded, sharded_opt, stage, torch.Generator().manual_seed(7), 2, dist=dist)
    report = {"dims": list(stage.dims), "masked": masked_modules(b.model) == masked_modules(a.model)}
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    report["params"] = max((pa[k] - distributed.full_tensor(pb[k])).abs().max().item() for k in pa)
    sa, sb = distributed.optimizer_state_by_name(a.model, a.optimizer), \
        distributed.optimizer_state_by_name(b.model, b.optimizer)
    report["optim_names"] = sorted(sa) == sorted(sb)
    report["optim"] = max([(sa[n][k] - distributed.full_tensor(sb[n][k])).abs().max().item()
                           for n in sa for k in sa[n]] or [0.0])
    diffs = [(logits(a.model, 10) - logits(b.model, 10)).abs().max().item()]
    for step in (2, 3):  # through the ramp: new units and layers now matter
        train(a.model, a.optimizer, plain_engine, step, seed=step)
        train(b.model, b.optimizer, sharded_engine, step, seed=step, dist=dist)
        diffs.append((logits(a.model, 10) - logits(b.model, 10)).abs().max().item())
    report["logits"] = diffs
    if dist.rank == 0:
        print("RESULT " + json.dumps(report), flush=True)
    torch_dist.barrier()
    distributed.teardown(dist)


if __name__ == "__main__":
    main()
