"""AdamW construction and the learning-rate schedule, including its policies across growth.

The LR is a function of the run's budget progress p in [0, 1] (see growth.schedule.Budget), so
runs with different step counts or batch schedules decay over the same budget:

    lr = peak * warmup(step) * shape(clip((p - decay_start) / decay_span, 0, 1))

with linear warmup over `optim.warmup_steps` and shape `cosine`, `linear` or `constant`, ending
at `min_lr_ratio * peak`. The decay starts where the warmup ends, *in budget progress*: the
progress is read when the warmup's last step is done, whichever budget (steps, tokens, FLOPs)
ends the run. (Placing it at warmup_steps / max_steps is wrong when a token or FLOPs budget ends
the run first: the decay would begin before the warmup is over and the peak would never be
reached.)

`wsd` (warmup-stable-decay) holds the peak after the warmup and decays linearly to
`min_lr_ratio * peak` over the last `optim.decay_fraction` of the budget. Its stable phase does
not depend on the budget, so a constant-LR run's checkpoints are the same whatever budget it
was given.

Across a growth event:

* continue: nothing changes.
* rewind:   the MSG reference's policy. At the first two growth events only, the decay jumps
            back to the peak with the *same slope* (decay_start moves to the event, decay_span
            stays) and no new warmup, so the run ends above the minimum LR. Under wsd the LR is
            at its peak until the decay window, so there is nothing to rewind: no change.
* restart:  G_stack's code's policy. A fresh warmup from the event, then a full decay over the
            rest of the budget (wsd: the same decay window).
* lemon:    LEMON's recipe for an expanded model (Wang et al., ICLR 2024): back to the peak LR at
            the event, without warmup, and an accelerated decay that reaches the minimum after
            LEMON_DECAY_SPAN of the remaining budget, then stays there. The paper shortens the
            expanded model's schedule; the fraction at this scale is ours.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch

LEMON_DECAY_SPAN = 0.5  # lr_policy=lemon: fraction of the remaining budget over which the LR decays
# A warmup longer than this share of train.max_steps leaves little of the run to decay in (the
# warmup is counted in steps, not in budget, so it does not shrink with a short run)
WARMUP_SHARE = 0.25
# A run "ended annealed" when the LR at the end of its budget is within this share of the peak
# above the floor (min_lr_ratio)
ANNEALED_WITHIN = 0.05


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Biases, norm gains and position tables are not weight-decayed (GPT-2/BERT practice)."""
    return p.dim() < 2 or name.startswith("pos_emb")


def build_adamw(model: torch.nn.Module, lr: float, cfg, device_type: str) -> torch.optim.AdamW:
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=device_type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


DECAYS = ("cosine", "linear", "constant", "wsd")  # optim.decay (config.CHOICES reads these)
LR_POLICIES = ("continue", "rewind", "restart", "lemon")  # operator.lr_policy: LRSchedule.on_growth


@dataclass
class LRSchedule:
    peak: float
    warmup_steps: int
    decay: str  # one of DECAYS
    min_ratio: float
    warmup_start: int = 0  # step at which the current warmup began
    decay_start: float | None = 0.0  # progress at which the decay began; None: at the end of the warmup
    decay_span: float = 1.0  # progress over which the decay reaches min_ratio
    rewinds: int = 0

    @staticmethod
    def create(peak: float, cfg) -> "LRSchedule":
        """cfg is an optim config that passed config.check_config (its choices and ranges)."""
        if cfg.decay == "wsd":
            return LRSchedule(peak, cfg.warmup_steps, cfg.decay, cfg.min_lr_ratio, 0,
                              1.0 - cfg.decay_fraction, cfg.decay_fraction)
        start = 0.0 if cfg.warmup_steps == 0 else None
        return LRSchedule(peak, cfg.warmup_steps, cfg.decay, cfg.min_lr_ratio, 0, start, 1.0)

    def __call__(self, step: int, progress: float) -> float:
        """The LR for the optimizer step `step`, taken when `progress` of the budget is spent.
        Called once per step, in order: the first call after the warmup fixes where the decay
        starts."""
        warm = min(1.0, (step - self.warmup_start + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.decay_start is None:
            if step - self.warmup_start < self.warmup_steps:
                return self.peak * warm  # still warming up: the decay has not begun
            self.decay_start = min(progress, 0.999)
            self.decay_span = 1.0 - self.decay_start
        x = min(max((progress - self.decay_start) / self.decay_span, 0.0), 1.0)
        if self.decay == "cosine":
            shape = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * x))
        elif self.decay in ("linear", "wsd"):
            shape = 1.0 - (1 - self.min_ratio) * x
        else:
            shape = 1.0
        return self.peak * warm * shape

    def on_growth(self, policy: str, step: int, progress: float) -> None:
        if policy == "rewind":
            if self.rewinds < 2 and self.decay != "wsd":
                self.decay_start, self.rewinds = progress, self.rewinds + 1
        elif policy == "restart":
            self.warmup_start = step
            if self.decay != "wsd":
                self.decay_start = None if self.warmup_steps else min(progress, 0.999)
                self.decay_span = 1.0 - (self.decay_start or 0.0)
        elif policy == "lemon":
            self.warmup_start = step - self.warmup_steps  # no new warmup, and any running one ends
            self.decay_start, self.decay_span = progress, max((1.0 - progress) * LEMON_DECAY_SPAN, 1e-9)
        elif policy != "continue":
            raise ValueError(f"unknown LR policy {policy!r}; one of {LR_POLICIES}")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def warmup_warning(warmup_steps: int, max_steps: int) -> str | None:
    """Before training: a fixed warmup that takes a large share of a short run. (A token or FLOPs
    budget can only end the run sooner, so the share is at least this.)"""
    if max_steps <= 0 or warmup_steps <= WARMUP_SHARE * max_steps:
        return None
    return (f"warning: optim.warmup_steps={warmup_steps} is {warmup_steps / max_steps:.0%} of train.max_steps="
            f"{max_steps}: the learning rate reaches its peak late and has little of the run left to decay. "
            f"For a short run lower it, e.g. optim.warmup_steps={max(1, round(0.06 * max_steps))} (6% of the steps).")


def annealing_warning(schedule: LRSchedule, step: int, lr_policy: str) -> str | None:
    """After training: the LR the schedule had reached at the end of the budget, when it is well
    above the floor. A run that ends unannealed reports a loss its budget could have beaten, so
    comparing it with an annealed run measures the schedule, not the growth."""
    if schedule.decay == "constant" or schedule.peak <= 0:
        return None
    final = copy.copy(schedule)(step, 1.0) / schedule.peak  # a copy: reading it must not fix the decay start
    if final <= schedule.min_ratio + ANNEALED_WITHIN:
        return None
    if schedule.decay_start is None:
        why = (f"the warmup (optim.warmup_steps={schedule.warmup_steps}) had not finished when the run ended; "
               "lower optim.warmup_steps")
    elif lr_policy in ("rewind", "lemon") and (schedule.rewinds or lr_policy == "lemon"):
        why = (f"operator.lr_policy={lr_policy} moved the decay at the growth events (the MSG reference's rewind "
               "ends above the floor by design); operator.lr_policy=continue ends annealed")
    else:
        why = "the decay did not reach the end of the budget; check optim.warmup_steps and the budget keys"
    return (f"warning: the run ended at {final:.0%} of its peak learning rate (floor optim.min_lr_ratio="
            f"{schedule.min_ratio:g}): it was not annealed, because {why}. Its final loss is not what this "
            "budget gives an annealed run; compare it with runs that end the same way.")
