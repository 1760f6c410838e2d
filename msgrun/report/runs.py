"""One run as the report sees it, and reading it from a run directory (metrics.jsonl,
growth.jsonl, summary.json, .hydra/*.yaml). The file formats are the contract of
docs/architecture.md section 3."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

METRICS = ("val_loss", "val_bpb")
METRIC_NAMES = {"val_loss": "validation loss [nats/token]", "val_bpb": "validation bits per byte"}
SHAPE_KEYS = ("layers", "hidden", "heads", "ffn", "seq_len")
# Overrides that only change the seed: runs differing only in these are repeats of one arm.
SEED_KEYS = {"train.seed", "seed"}
NOT_REACHED = "not reached"
DASH = "—"


class ReportError(Exception):
    """Bad or unusable input, shown to the user as a message (the CLI exits with code 2)."""


class MixedDataError(ReportError):
    """Runs with different data, tokenizer, evaluation settings or data order were asked to be
    compared."""


@dataclass(eq=False)  # runs are compared by identity: two runs never "equal" each other
class Run:
    """One training run as read from its files."""

    path: Path
    name: str  # short display name (path relative to what the user passed)
    train: list[dict]  # training lines of metrics.jsonl, in step order
    evals: list[dict]  # evaluation lines (those with val_loss / val_bpb)
    growth: list[dict]  # growth events
    summary: dict | None  # summary.json (None: the run crashed or is still running)
    choices: dict  # Hydra config-group choices, e.g. {"schedule": "depth_first", ...}
    overrides: list[str]  # Hydra task overrides, e.g. ["schedule=depth_first", "train.seed=1"]
    seed: int | None
    status: str  # completed | failed | incomplete
    data_fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    source: str = "metrics.jsonl"
    notes: list[str] = field(default_factory=list)
    label: str = ""  # set by label_runs(): depends on which runs are compared
    config: dict = field(default_factory=dict)  # the run's config (.hydra/config.yaml, or wandb's)
    downstream: dict = field(default_factory=dict)  # eval/<task>/<metric> results (downstream_results)

    def setting(self, dotted: str):
        """A config value by its dotted key (train.eval_tokens), or None where unknown."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def provenance(self) -> dict:
        """Where the run trained: the keys of summary.json that say so (msgrun/provenance.py)."""
        s = self.summary or {}
        return {k: s.get(k) for k in ("device", "device_name", "world_size", "host", "cpus", "loadavg")}

    @property
    def max_flops(self) -> float | None:
        """The run's train.max_flops budget, if it had one."""
        value = self.setting("train.max_flops")
        if value is None:
            value = next((o.partition("=")[2] for o in self.overrides if o.lstrip("+").startswith("train.max_flops=")),
                         None)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flops, wall_time, value) of the evaluation points that logged `metric`.

        Non-finite values (a diverged run) are dropped: they cannot be interpolated."""
        rows = [r for r in self.evals if finite(r.get(metric)) and finite(r.get("flops"))]
        flops = np.array([float(r["flops"]) for r in rows])
        wall = np.array([float(r["wall_time"]) if finite(r.get("wall_time")) else np.nan for r in rows])
        value = np.array([float(r[metric]) for r in rows])
        return flops, wall, value

    @property
    def final_flops(self) -> float | None:
        return self._final("flops")

    @property
    def final_wall_time(self) -> float | None:
        return self._final("wall_time")

    def _final(self, key: str) -> float | None:
        if self.summary and finite(self.summary.get(key)):
            return float(self.summary[key])
        values = [float(r[key]) for r in self.train + self.evals if finite(r.get(key))]
        return max(values) if values else None

    def wall_at_flops(self, flops: float) -> float | None:
        """Wall-clock at a FLOPs count, from the logged (flops, wall_time) pairs."""
        pairs = sorted(
            (float(r["flops"]), float(r["wall_time"]))
            for r in self.train + self.evals
            if finite(r.get("flops")) and finite(r.get("wall_time"))
        )
        if not pairs:
            return None
        xs, ys = zip(*pairs)
        return float(np.interp(flops, xs, ys))


def read_run_dir(d: Path, name: str) -> Run:
    notes: list[str] = []
    rows = read_jsonl(d / "metrics.jsonl", notes)
    train, evals = split_rows(rows)
    growth = read_jsonl(d / "growth.jsonl", notes) if (d / "growth.jsonl").is_file() else []
    summary = read_json(d / "summary.json", notes)
    hydra = (read_yaml(d / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}
    config = read_yaml(d / ".hydra" / "config.yaml") or {}

    # summary.json is written at the end of a run; a crashed or running one only has Hydra's
    # files, which hold the same choices and overrides
    s = summary or {}
    choices = s.get("choices") or (hydra.get("runtime") or {}).get("choices") or {}
    overrides = s.get("overrides") or (hydra.get("overrides") or {}).get("task") or []
    seed = s.get("seed")
    if seed is None:
        seed = (config.get("train") or {}).get("seed")
    if summary is None:
        status = "incomplete"
    else:
        status = str(summary.get("status") or "completed")
    return Run(
        path=d,
        name=name,
        train=train,
        evals=evals,
        growth=growth,
        summary=summary,
        choices=clean_choices(choices),
        overrides=[str(o) for o in overrides],
        seed=seed,
        status=status,
        data_fingerprint=s.get("data_fingerprint"),
        tokenizer_fingerprint=s.get("tokenizer_fingerprint"),
        notes=notes,
        config=config,
        downstream=downstream_results(summary, rows),
    )


def downstream_results(summary: dict | None, rows: list[dict]) -> dict[str, float]:
    """Downstream evaluation results, the `eval/<task>/<metric>` keys: from summary.json, else
    the last metrics line that carries them."""
    for source in [summary or {}, *reversed(rows)]:
        found = {k: float(v) for k, v in source.items() if k.startswith("eval/") and finite(v)}
        if found:
            return found
    return {}


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training lines and evaluation lines (a wandb row can be both: wandb merges what was
    logged at one step)."""
    evals = [r for r in rows if any(r.get(m) is not None for m in METRICS)]
    train = [r for r in rows if r.get("loss") is not None]
    return _drop_rewound(train), _drop_rewound(evals)


def _drop_rewound(rows: list[dict]) -> list[dict]:
    # A resumed run logs again the steps between its last checkpoint and the crash. The later
    # lines belong to the run that went on, so they replace the earlier ones; without this the
    # curve would zig-zag back in FLOPs and interpolation would be meaningless.
    kept: list[dict] = []
    for row in rows:
        step = row.get("step")
        while kept and step is not None and kept[-1].get("step") is not None and kept[-1]["step"] >= step:
            kept.pop()
        kept.append(row)
    return kept


def read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # typically the last line of a run killed while writing it
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    if bad:
        notes.append(f"{path}: skipped {bad} unreadable line(s)")
    return rows


def read_json(path: Path, notes: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        notes.append(f"{path}: unreadable ({e}); run treated as incomplete")
        return None
    return obj if isinstance(obj, dict) else None


def read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return obj if isinstance(obj, dict) else None


def clean_choices(choices) -> dict:
    # Hydra also records its own groups (hydra/launcher, hydra/job_logging, ...): not the
    # experiment's choices
    if not isinstance(choices, dict):
        return {}
    return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra/")}




def display_name(d: Path, base: Path) -> str:
    try:
        return str(d.relative_to(base))
    except ValueError:
        return str(d)


def natural_key(text: str):
    # job directories 0, 1, ..., 10 sort as numbers, not as strings
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
