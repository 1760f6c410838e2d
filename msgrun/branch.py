"""train.branch_from=RUN_DIR: start a run from another run's checkpoint with a new budget.

Under `optim.decay=wsd` the LR holds its peak after the warmup and decays over the last
`optim.decay_fraction` of the budget, so until a decay starts, a run's state does not depend
on its budget. A long constant-LR run's checkpoints can therefore branch into short decays: each
branch, given its own budget (`train.max_steps`, `max_tokens` or `max_flops`), equals a run
trained with that budget from the start, and gives an annealed baseline at that budget for the
cost of its decay (docs/protocol.md).

The branch starts from the parent's newest checkpoint that lies before both decays (the
parent's and its own), restores it exactly as a resume does (model, optimizer, LR schedule,
counters, random states), and copies the parent's log lines up to that checkpoint, so its
`metrics.jsonl`, `flops` and `tokens` include the parent's. It records its parent
(`summary.json` → `branch_from`: directory, step, the checkpoint's SHA-256; `branch.json` in its
run directory). Once it has written a checkpoint of its own it resumes from that like any run,
without reading the parent again.

Refused before any compute (`find_parent`, called before the memory pre-flight and before the
run directory is touched): a decay other than wsd, a parent with another configuration (anything
but the budget, logging and placement), other data, or no checkpoint before the decays. A branch
that has its record and checkpoints of its own is a resume, checked by the resume machinery
instead (its parent may be gone by then); only if all of its own checkpoints are damaged does it
branch again after the pre-flight, and then the same refusals come there.
"""

from __future__ import annotations

import json
from pathlib import Path

from msgrun import checkpoint
from msgrun.errors import ConfigError
from msgrun.files import atomic_write
from msgrun.growth.schedule import Budget
from msgrun.report.matching import BUDGET_KEYS, flatten, incidental
from msgrun.rundir import config_json


def parent_budget(config: dict) -> Budget:
    t, m = config["train"], config["model"]
    return Budget(t["max_steps"], t["batch_size"] * m["seq_len"], t.get("max_tokens"), t.get("max_flops"))


RECORD = "branch.json"  # the parent's record, kept in the run directory for the run's resumes


def find_parent(cfg, run_dir: Path, budget: Budget, fingerprints: dict) -> tuple[dict, dict] | None:
    """Before any compute and before the run directory is touched: for a branch that has no
    checkpoint of its own, the parent's checkpoint to start from, with every refusal raised here.
    None: no branch, or a started one that resumes (prepare reads its record back)."""
    if not cfg.train.branch_from or ((run_dir / RECORD).exists() and checkpoint.list_checkpoints(run_dir)):
        return None
    return choose(cfg, budget, fingerprints)


def prepare(cfg, run_dir: Path, budget: Budget, fingerprints: dict, resumed: bool, log,
            found: tuple[dict, dict] | None = None) -> tuple[dict | None, dict | None]:
    """The parent's record (None: no branch) and, when this run starts by branching, the parent's
    checkpoint state to load (`found`: find_parent's answer); a resumed branch reads its record
    back and loads nothing here."""
    if not cfg.train.branch_from:
        return None, None
    path = run_dir / RECORD
    if resumed and path.exists():
        return json.loads(path.read_text()), None
    # a branch whose own checkpoints all failed to load starts over here (find_parent saw files)
    record, state = found if found is not None else choose(cfg, budget, fingerprints)
    copy_lines(Path(record["run_dir"]), run_dir, state["log_lines"])
    atomic_write(path, lambda f: f.write(json.dumps(record).encode()))
    log(f"branched from {record['run_dir']} at step {record['step']} ({record['flops']:.3e} FLOPs)")
    return record, state


def choose(cfg, budget: Budget, fingerprints: dict) -> tuple[dict, dict]:
    """The parent's newest checkpoint before both decays: its record and its state (for
    Trainer.load_state_dict). Reads the parent only."""
    parent = Path(cfg.train.branch_from)
    if cfg.optim.decay != "wsd":
        raise ConfigError(f"train.branch_from needs optim.decay=wsd (it is {cfg.optim.decay}): only a warmup-stable-"
                          "decay schedule's checkpoints are the same whatever the budget, so that a branch equals a "
                          "run given its budget from the start.")
    stable_end = 1.0 - cfg.optim.decay_fraction
    found = []
    for path in reversed(checkpoint.list_checkpoints(parent)):
        state, _ = checkpoint.open_checkpoint(path)
        if state is None:
            continue
        c = state["counters"]
        config = json.loads(state["config"])
        theirs = parent_budget(config).progress(c["step"], c["tokens"], c["flops"])
        mine = budget.progress(c["step"], c["tokens"], c["flops"])
        found.append(c["step"])
        if theirs <= stable_end and mine <= stable_end:
            check_parent(cfg, fingerprints, parent, config, state)
            record = {"run_dir": str(parent), "step": c["step"], "tokens": c["tokens"], "flops": c["flops"],
                      "checkpoint_sha256": checkpoint.checksum(path)}
            return record, state
    raise ConfigError(
        f"train.branch_from={parent}: no checkpoint there lies before both the parent's and this run's decay "
        f"(checkpoints at steps {', '.join(map(str, sorted(found))) or 'none'}; the decay starts at "
        f"{stable_end:.0%} of each budget). Give the parent train.checkpoint_every=N and a large "
        "train.keep_checkpoints, or branch with a longer budget.")


def check_parent(cfg, fingerprints: dict, parent: Path, config: dict, state: dict) -> None:
    mine = flatten(json.loads(config_json(cfg)))
    theirs = flatten(config)
    differ = sorted(k for k in set(mine) | set(theirs)
                    if mine.get(k) != theirs.get(k) and k not in BUDGET_KEYS and not incidental(k))
    if differ:
        listing = ", ".join(f"{k} ({theirs.get(k)} there, {mine.get(k)} here)" for k in differ[:6])
        raise ConfigError(f"train.branch_from={parent}: the parent differs from this run outside the budget in "
                          f"{listing}. A branch continues the parent's training: only the budget may change.")
    if state["fingerprints"] != fingerprints:
        raise ConfigError(f"train.branch_from={parent}: the parent trained on other data or another tokenizer "
                          f"({state['fingerprints']} there, {fingerprints} here).")


def copy_lines(parent: Path, run_dir: Path, counts: dict) -> None:
    """The parent's metrics and growth lines up to its checkpoint start the branch's logs."""
    for name in ("metrics", "growth"):
        source = parent / f"{name}.jsonl"
        if source.exists():
            with open(source, "rb") as f:
                lines = f.readlines()[:counts[name]]
            atomic_write(run_dir / f"{name}.jsonl", lambda f: f.writelines(lines))
