"""When a from-scratch run is a *matched* baseline of an arm, and the command that trains one.

A baseline is matched only if everything but the growth choices and the budget is equal
(docs/architecture.md section 4): the same model, batch, data, warmup, optimizer and numerics.
The report compares the runs' saved configurations (.hydra/config.yaml, or wandb's copy) key by
key; a baseline that differs anywhere else is never called matched, and the keys it differs in
are named.

What may differ:

* the growth choices: `schedule.*`, `operator.*` (and the `experiment`/`sweep`/`protocol` group
  choices that set them; group choices are not part of the saved config, their effect is);
* the budget: `train.max_steps`, `max_tokens`, `max_flops`, `max_minutes`, and where a branch
  starts (`train.branch_from`);
* the seed: runs are paired by it (compare.py);
* settings that cannot change what a run learns (INCIDENTAL): where and how often it logs,
  evaluates downstream and checkpoints, its device, threads, compilation and launcher.

Everything else, including keys this list has never heard of, must be equal. (Top-level keys
that are not settings, such as the `_wandb` record in a wandb copy of the config, are skipped.)
"""

from __future__ import annotations

import shlex

BASELINE_DIR = "matched_baseline"  # protocol=matched: an arm's matched baseline, inside the arm's directory

GROWTH_PREFIXES = ("schedule.", "operator.")
GROWTH_GROUPS = ("schedule", "operator", "experiment", "protocol")
BUDGET_KEYS = ("train.max_steps", "train.max_tokens", "train.max_flops", "train.max_minutes", "train.branch_from")
SEED_KEYS = ("train.seed", "seed")
# same training whatever their value: logging, checkpoints, placement, downstream evaluation,
# what a sweeper optimises, and where the data cache lives (the data fingerprint is checked apart)
INCIDENTAL = ("train.device", "train.compile", "train.eval_every", "train.log_every", "train.checkpoint_every",
              "train.checkpoint_minutes", "train.keep_checkpoints", "train.resume", "train.threads",
              "train.preflight", "train.distributed", "logger.", "eval.", "objective.", "data.cache_dir", "protocol.")


# not settings: what a wandb copy of the config carries beside them (wandb's own `_wandb` record)
METADATA = ("_", "choices", "overrides", "hydra")


def incidental(key: str) -> bool:
    """Whether a config key cannot change what a run learns (INCIDENTAL, METADATA)."""
    top = key.split(".")[0]
    return (top.startswith("_") or top in METADATA
            or any(key == k or (k.endswith(".") and key.startswith(k)) for k in INCIDENTAL))


def free_to_differ(key: str) -> bool:
    """Whether a config key may differ between an arm and its matched baseline."""
    return key.startswith(GROWTH_PREFIXES) or key in BUDGET_KEYS or key in SEED_KEYS or incidental(key)


def flatten(node, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a nested config (lists are values: a list differs as a whole)."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def resolved(config: dict) -> dict:
    """The config with its interpolations resolved (train.lr: ${model.lr}), so that a value set
    by hand and the same value reached through an interpolation compare equal. A config that
    does not resolve here (a resolver of another machine) is compared as written."""
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except Exception:  # noqa: BLE001 - any failure: compare the text as saved
        return config


def differences(arm_config: dict, base_config: dict) -> list[str] | None:
    """Keys outside the growth choices, the budget and the incidental settings whose values
    differ between two saved configurations; None when either configuration is unknown."""
    if not arm_config or not base_config:
        return None
    a, b = flatten(resolved(arm_config)), flatten(resolved(base_config))
    return sorted(k for k in set(a) | set(b) if not free_to_differ(k) and a.get(k, "<unset>") != b.get(k, "<unset>"))


def group_differences(arm_runs, base_runs) -> list[str] | None:
    """Keys in which any run of an arm differs from the baseline's run of the same seed (else
    its first run); None when no configuration is known on either side."""
    by_seed = {r.seed: r for r in reversed(base_runs)}
    found, known = set(), False
    for run in arm_runs:
        other = by_seed.get(run.seed, base_runs[0])
        diff = differences(run.config, other.config)
        if diff is not None:
            known = True
            found.update(diff)
    return sorted(found) if known else None


def growth_differences(runs_a, runs_b) -> list[str]:
    """The growth settings (schedule.*, operator.*) in which two groups' first runs differ: two
    groups are the same arm only where this is empty too."""
    a = flatten(resolved(next((r.config for r in runs_a if r.config), {})))
    b = flatten(resolved(next((r.config for r in runs_b if r.config), {})))
    return sorted(k for k in set(a) | set(b) if k.startswith(GROWTH_PREFIXES) and a.get(k) != b.get(k))


def describe(keys: list[str], arm_runs, base_runs, limit: int = 6) -> str:
    """"model.hidden (64 here, 128 in the baseline), ..." for the first `limit` keys."""
    a = flatten(resolved(next((r.config for r in arm_runs if r.config), {})))
    b = flatten(resolved(next((r.config for r in base_runs if r.config), {})))
    parts = [f"{k} ({a.get(k, 'unset')} here, {b.get(k, 'unset')} in the baseline)" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def baseline_overrides(overrides: list[str], keep: tuple[str, ...] = ()) -> list[str]:
    """A run's overrides with its growth choices, budget and seed taken out (except the keys in
    `keep`): what a matched baseline of it must be given too. Order and `+`/`~` prefixes kept."""
    kept = []
    for text in overrides:
        key = _key(text)
        if key not in keep and (key in GROWTH_GROUPS or key.startswith(GROWTH_PREFIXES) or key in BUDGET_KEYS
                                or key in SEED_KEYS):
            continue
        kept.append(text)
    return kept


def matched_commands(arms) -> list[str]:
    """The commands that train compute-matched baselines for `arms` (groups without one): one
    command per set of arm overrides (outside growth, budget and seed), each carrying those
    overrides exactly, with the budgets and seeds of its arms as sweeps.

    A sweep file the arms ran under (`sweep=X`) is kept, so its settings (steps, batch, warmup)
    are the baseline's too; its own sweep over growth choices is switched off
    (`hydra.sweeper.params=null`: the budgets and seeds on the command line are the only sweep;
    a command-line group choice wins over the sweep file's `override /schedule:`),
    and the growth choices are set to none (`experiment=baseline` where the arms chose an
    experiment)."""
    by_overrides: dict[tuple, list] = {}
    for g in arms:
        for run in g.runs:
            by_overrides.setdefault(tuple(baseline_overrides(run.overrides)), []).append((g, run))
    commands = []
    for overrides, members in by_overrides.items():
        budgets = list(dict.fromkeys(f"{g.flops:.4g}" for g, _ in members if g.flops))
        seeds = sorted({r.seed for _, r in members if r.seed is not None})
        keys = {_key(o) for o in overrides}
        sweep_file = next((o.partition("=")[2] for o in overrides if _key(o) == "sweep"), None)
        parts = ["msgrun", "-m"]
        if sweep_file is None:
            parts.append("sweep=matched_baselines")
        else:
            parts += ["hydra.sweeper.params=null", "schedule=none", "operator=none"]
        if any("experiment" in r.choices for _, r in members) and "experiment" not in keys:
            parts.append("experiment=baseline")
        parts.append(f"train.max_flops={','.join(budgets)}")
        if seeds:
            parts.append(f"train.seed={','.join(map(str, seeds))}")
        parts += list(overrides)
        commands.append(" ".join(shlex.quote(p) for p in parts))
    return commands
