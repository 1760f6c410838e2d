"""Shared by the bench scripts: a Trainer built from the real config tree, without a run directory."""

from __future__ import annotations

import contextlib
import io
import tempfile

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from msgrun.config import check_config, register_configs
from msgrun.train import Trainer, peak_flops


def compose_config(overrides: list[str], batch: int | None = None, compile: bool = False):
    """The run's config from the real config tree, with the bench scripts' defaults."""
    register_configs()
    GlobalHydra.instance().clear()
    cuda = torch.cuda.is_available()
    defaults = ["logger=none", "logger.console=plain", f"train.batch_size={batch or (16 if cuda else 32)}",
                f"train.compile={str(compile).lower()}", "train.max_steps=100000", "optim.warmup_steps=10"]
    with initialize_config_module("msgrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*defaults, *overrides])
    check_config(cfg)
    return cfg


def build_trainer(overrides: list[str], batch: int | None = None, compile: bool = False) -> Trainer:
    """A Trainer ready to step (wrapped and compiled as in a run), logging nothing."""
    cfg = compose_config(overrides, batch, compile)
    with contextlib.redirect_stdout(io.StringIO()):  # data-preparation chatter
        trainer = Trainer(cfg, tempfile.mkdtemp(prefix="msgrun-bench-"))
    trainer.console.enabled = False
    trainer._wrap()
    return trainer


def compile_stats() -> dict:
    """Dynamo's counters since the last `torch._dynamo.utils.counters.clear()`: graphs captured,
    frames compiled (a first compile or a recompile: a call that missed every cached graph), and
    graph breaks. Structural figures: unlike timings, a loaded machine does not move them."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "compiles": counters["frames"]["ok"],
            "graph_breaks": sum(counters["graph_break"].values())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak(device: torch.device) -> float | None:
    return peak_flops(device)
