"""Which pip extra of msgrun installs a missing optional piece.

The extras themselves are defined once, in pyproject.toml; this module reads them back from the
installed package's metadata, so an error message names the extra that really carries the piece.
"""

from __future__ import annotations

import importlib.metadata
import re

# Hydra config-group options that only exist once a Hydra plugin is installed, and the
# distribution that registers each (plugins add their options to Hydra's ConfigStore on import)
PLUGIN_OPTIONS = {
    "hydra/launcher/joblib": "hydra-joblib-launcher",
    "hydra/launcher/submitit_local": "hydra-submitit-launcher",
    "hydra/launcher/submitit_slurm": "hydra-submitit-launcher",
    "hydra/sweeper/optuna": "hydra-optuna-sweeper",
}


def extra_providing(distribution: str) -> str | None:
    """The first extra of msgrun (other than `test`) that requires `distribution`."""
    try:
        requirements = importlib.metadata.requires("msgrun") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    want = re.sub(r"[-_.]+", "-", distribution).lower()
    for req in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", req)
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if name and extra and extra.group(1) != "test" and re.sub(r"[-_.]+", "-", name.group(0)).lower() == want:
            return extra.group(1)
    return None


def install_hint(distribution: str) -> str:
    extra = extra_providing(distribution)
    if extra is None:
        return f"pip install {distribution}"
    # msgrun installs from its checkout (README), not from a package index: 'msgrun[x]' would
    # ask the index for a package of that name
    return f"pip install -e '.[{extra}]' in the msgrun checkout"


def missing_plugin_message(group_path: str) -> str | None:
    """For a config-group option Hydra could not find (e.g. "hydra/launcher/joblib"): which
    extra installs it, or None when no plugin provides that option."""
    distribution = PLUGIN_OPTIONS.get(group_path.removesuffix(".yaml"))
    if distribution is None:
        return None
    group, _, option = group_path.rpartition("/")
    return (f"{group}={option} comes from the Hydra plugin {distribution}, which is not installed: "
            f"{install_hint(distribution)}.")
