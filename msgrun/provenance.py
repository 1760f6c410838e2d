"""What a result was produced with: code version, packages, hardware (summary.json, wandb)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("msgrun", "torch", "hydra-core", "omegaconf", "numpy", "tokenizers", "wandb", "datasets")


def git_state(path: Path) -> dict:
    """Commit and dirty flag of the checkout msgrun runs from (None when installed from a wheel)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def collect(device: torch.device, world_size: int = 1) -> dict:
    info = {
        **git_state(Path(__file__).resolve().parent),
        "versions": versions(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world_size,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        # how busy the machine was (1, 5, 15-minute load averages against its CPUs): wall-clock
        # measured on a loaded machine measures the load; msgrun-report warns about it
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info
