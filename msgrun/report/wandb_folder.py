"""Reading a wandb offline run folder (its binary .wandb transaction log) into a Run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from msgrun.report.runs import (SHAPE_KEYS, ReportError, Run, clean_choices, display_name, downstream_results,
                                read_run_dir, split_rows)


def is_wandb_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.wandb"))


def read_wandb_folder(folder: Path, name: str) -> Run:
    logs = sorted(folder.glob("*.wandb"))
    try:
        if len(logs) != 1:
            raise _WandbUnreadable(f"expected one .wandb file in the folder, found {len(logs)}")
        records = _wandb_records(logs[0])
    except _WandbUnreadable as e:
        # msgrun writes its wandb folder inside the run directory (<run>/wandb/offline-run-*),
        # and that directory's metrics.jsonl holds the same history and more
        run_dir = folder.parent.parent
        if (run_dir / "metrics.jsonl").is_file():
            run = read_run_dir(run_dir, display_name(run_dir, run_dir.parent))
            run.notes.append(f"{folder}: could not read the wandb log ({e}); used {run_dir / 'metrics.jsonl'} instead")
            return run
        raise ReportError(
            f"{folder}: cannot read this wandb offline run ({e}). The report reads a wandb folder "
            "through wandb's own decoder of its binary transaction log (`wandb leet inspect "
            "--json` in wandb >= 0.2x, or the Python DataStore of older wandb), and neither worked "
            "here. msgrun writes the same history to metrics.jsonl in the run directory (the "
            "wandb folder normally sits at <run dir>/wandb/offline-run-*), but no metrics.jsonl "
            f"was found at {run_dir}: pass the run directory instead."
        ) from None
    return _run_from_wandb(folder, name, records)


class _WandbUnreadable(Exception):
    pass


def _wandb_records(log_file: Path) -> list[tuple[str, object]]:
    """The .wandb transaction log as (kind, payload) pairs: ("history", row), ("config", dict),
    ("tags", list), ("summary", dict), ("exit", exit_code).

    The log is wandb's binary record format (protobuf records in a block-framed file). Rather
    than decode it ourselves, ask the installed wandb: versions from 0.2x ship
    `wandb leet inspect --json`, which prints one JSON object per record; older versions had a
    Python reader, `wandb.sdk.internal.datastore.DataStore`."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false")
    try:
        # cwd: a ./wandb folder there must not shadow the package for `python -m wandb`
        proc = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log_file)],
            capture_output=True, text=True, timeout=300, cwd=log_file.parent, env=env,
        )
        leet_error = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode == 0:
            return _records_from_leet(proc.stdout)
    except (OSError, subprocess.TimeoutExpired) as e:
        leet_error = str(e)
    try:
        return _records_from_datastore(log_file)
    except ImportError:
        raise _WandbUnreadable(
            f"`wandb leet inspect --json` failed: {leet_error}; and this wandb has no Python DataStore"
        ) from None


def _records_from_leet(stdout: str) -> list[tuple[str, object]]:
    records: list[tuple[str, object]] = []
    for line in stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = rec.get("type")
        body = rec.get(kind) or {}
        if kind == "history":
            records.append(("history", body.get("item") or {}))
        elif kind == "run":
            records.append(("config", (body.get("config") or {}).get("update") or {}))
            records.append(("tags", list(body.get("tags") or [])))
        elif kind == "config":
            records.append(("config", body.get("update") or {}))
        elif kind == "summary":
            records.append(("summary", body.get("update") or {}))
        elif kind == "exit":
            records.append(("exit", int(body.get("exit_code") or 0)))
    return records


def _records_from_datastore(log_file: Path) -> list[tuple[str, object]]:
    # Older wandb (before its Python internals moved into the Go core). Raises ImportError
    # where it does not exist.
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    def items(entries) -> dict:
        return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}

    store = DataStore()
    store.open_for_scan(str(log_file))
    records: list[tuple[str, object]] = []
    while True:
        data = store.scan_data()
        if data is None:
            break
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            records.append(("history", items(rec.history.item)))
        elif kind == "run":
            records.append(("config", items(rec.run.config.update)))
            records.append(("tags", list(rec.run.tags)))
        elif kind == "config":
            records.append(("config", items(rec.config.update)))
        elif kind == "summary":
            records.append(("summary", items(rec.summary.update)))
        elif kind == "exit":
            records.append(("exit", rec.exit.exit_code))
    return records


def _run_from_wandb(folder: Path, name: str, records: list[tuple[str, object]]) -> Run:
    rows: list[dict] = []
    config: dict = {}
    tags: list = []
    summary: dict = {}
    exit_code = None
    for kind, payload in records:
        if kind == "history":
            rows.append(payload)
        elif kind == "config":
            config.update(payload)
        elif kind == "tags":
            tags = payload
        elif kind == "summary":
            summary.update(payload)
        elif kind == "exit":
            exit_code = payload
    train, evals = split_rows(rows)

    # msgrun's wandb config is the resolved config, which has no Hydra choices; the run's tags
    # name them ("schedule=depth_first", ...), and each group's `name` field is the fallback
    choices = _find_key(config, "choices")
    if not isinstance(choices, dict):
        choices = {
            group: config[group]["name"]
            for group in ("model", "schedule", "operator", "data")
            if isinstance(config.get(group), dict) and config[group].get("name") is not None
        }
        choices.update(tag.split("=", 1) for tag in tags if isinstance(tag, str) and "=" in tag)
    overrides = _find_key(config, "overrides")
    if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
        overrides = []
    seed = summary.get("seed", _find_key(config.get("train") or {}, "seed"))
    if summary.get("status"):
        status = str(summary["status"])
    else:
        status = {None: "incomplete", 0: "completed"}.get(exit_code, "failed")
    growth = _growth_from_history(rows)
    notes = [f"{name}: read from wandb's transaction log"]
    if not growth:
        growth = _growth_from_shapes(train or evals)
        if growth:
            notes.append(f"{name}: growth events inferred from shape changes in the wandb history")
    return Run(
        path=folder,
        name=name,
        train=train,
        evals=evals,
        growth=growth,
        summary=summary or None,
        choices=clean_choices(choices),
        overrides=overrides,
        seed=seed,
        status=status,
        data_fingerprint=_find_key(summary, "data_fingerprint") or _find_key(config, "data_fingerprint"),
        tokenizer_fingerprint=_find_key(summary, "tokenizer_fingerprint") or _find_key(config, "tokenizer_fingerprint"),
        source="wandb",
        notes=notes,
        config=config,
        downstream=downstream_results(summary, rows),
    )


def _growth_from_history(rows: list[dict]) -> list[dict]:
    # msgrun logs each growth event to wandb as its own row of "growth/<field>" numbers
    events = []
    for row in rows:
        event = {k[len("growth/"):]: v for k, v in row.items() if k.startswith("growth/")}
        if event:
            event.setdefault("flops", row.get("flops"))
            event.setdefault("wall_time", row.get("wall_time"))
            events.append(event)
    return events


def _growth_from_shapes(rows: list[dict]) -> list[dict]:
    # wandb's history has no growth.jsonl, but every line carries the model's shape: a change
    # between two logged lines is a growth event. It is placed at the last line before the
    # change, so it can be up to one logging interval early.
    events = []
    for prev, row in zip(rows, rows[1:]):
        before = {k: prev[k] for k in SHAPE_KEYS if k in prev and k in row}
        after = {k: row[k] for k in before}
        dims = [k for k in before if before[k] != after[k]]
        if dims:
            events.append({
                "step": prev.get("step"), "flops": prev.get("flops"), "wall_time": prev.get("wall_time"),
                "dims": dims, "before": before, "after": after, "inferred": True,
            })
    return events


def _find_key(obj, key):
    """First non-None value of `key` anywhere in nested dicts (depth first)."""
    if isinstance(obj, dict):
        if obj.get(key) is not None:
            return obj[key]
        for value in obj.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None
