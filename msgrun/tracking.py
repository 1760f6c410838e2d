"""Where a run's figures go: metrics.jsonl / growth.jsonl / summary.json, the console, wandb.

The JSON-lines files are the contract (docs/architecture.md section 3): the report reads them and nothing
else, so every figure shown anywhere is first written there. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

from msgrun.files import atomic_write


def to_jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class JsonLines:
    """Append-only JSON lines, flushed per line so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps({k: to_jsonable(v) for k, v in record.items()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


CONSOLES = ("auto", "rich", "plain")  # logger.console: auto is rich on a terminal


class Console:
    """A rich live progress bar on a terminal, plain log lines otherwise (CI, SLURM logs)."""

    def __init__(self, mode: str, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.rich = enabled and (mode == "rich" or (mode == "auto" and sys.stdout.isatty()))
        self.progress = None
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
            self.task = self.progress.add_task("train", total=total_steps, status="")
            self.progress.start()

    def print(self, *items) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(*items)
        else:
            for item in items:
                if isinstance(item, str):
                    print(item, flush=True)
                else:
                    from rich.console import Console as RichConsole

                    RichConsole(file=sys.stdout, width=120).print(item)

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        status = format_status(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], status=status)
        else:
            print(f"step {record['step']:>6} | {status}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def format_status(r: dict) -> str:
    parts = [f"loss {r['loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"val {r['val_loss']:.4f} ({r['val_bpb']:.3f} bpb)")
    parts.append(f"lr {r['lr']:.2e}")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("compile_seconds"):
        parts.append(f"compile {r['compile_seconds']:.1f} s")
    parts.append(f"{r['flops']:.3e} FLOPs")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("alpha") is not None:
        parts.append(f"alpha {r['alpha']:.2f}")
    kv, experts = (f"/{r['kv_heads']}kv" if "kv_heads" in r else ""), (f"x{r['experts']}E" if "experts" in r else "")
    parts.append(f"{r['layers']}L/{r['hidden']}H/{r['heads']}A{kv}/{r['ffn']}F{experts}/T{r['seq_len']}")
    return " | ".join(parts)


WANDB_MODES = ("online", "offline", "disabled")  # logger.wandb.mode, as wandb.init's mode


class Wandb:
    """A wandb run that plots everything against cumulative FLOPs (tokens and wall-clock are
    logged too, as alternative x-axes). Offline by default: no API key needed, `wandb sync`
    uploads later. `finish` is always called (multirun jobs must never log into each other).

    One run directory is one wandb run for its whole life: the id is kept in <run_dir>/wandb.json
    and every segment (a resume after a kill or a preemption) opens it with resume="allow"; offline,
    each segment is a directory offline-run-<time>-<id> and `wandb sync` of them all uploads one
    run. History rows carry the training step as wandb's step. A resume rewinds to its checkpoint
    and recomputes the steps after it bit for bit; wandb.json records the last step a segment
    handed to wandb before it finished cleanly (a signal, an error, the end), and the next segment
    does not log those steps again. A segment killed without finishing (SIGKILL) records nothing,
    and offline its file holds no history at all: the next segment first logs the steps it lacks
    from metrics.jsonl and growth.jsonl (`backfill`), which hold every step up to the checkpoint
    exactly; online, wandb ignores a step below the resumed run's current one, so a step that did
    reach the server is not duplicated either."""

    def __init__(self, cfg, run_dir: Path, config: dict, name: str, group: str | None, tags: list[str]):
        self.run = None
        if cfg.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.record = Path(run_dir) / "wandb.json"
        state = json.loads(self.record.read_text()) if self.record.exists() else {}
        self.id = state.get("id") or secrets.token_hex(4)  # not `random`: the run's RNG streams stay untouched
        self.logged_through = state.get("logged_through", -1)
        self.last_step = self.logged_through
        write_json_atomic(self.record, {"id": self.id, "logged_through": self.logged_through})
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or group, tags=tags,
                              name=name, config=config, mode=cfg.mode, dir=str(cfg.dir or run_dir),
                              id=self.id, resume="allow", reinit="finish_previous")
        for axis in ("flops", "tokens", "wall_time"):
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric="flops")

    def _log(self, step: int, data: dict) -> None:
        if self.run is not None and step > self.logged_through:
            self.run.log(data, step=step)
            self.last_step = step

    def log(self, record: dict) -> None:
        self._log(record["step"], {k: v for k, v in record.items() if isinstance(v, (int, float))})

    def log_growth(self, record: dict) -> None:
        flat = {f"growth/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
        self._log(record["step"], {"flops": record["flops"], "tokens": record["tokens"], **flat})

    def backfill(self, metrics: Path, growth: Path) -> None:
        """Log the records of the run's files that this wandb run has not received, in order."""
        if self.run is None:
            return
        rows = [(r["step"], 0, r) for r in read_jsonl(metrics)] + [(r["step"], 1, r) for r in read_jsonl(growth)]
        for _, is_growth, record in sorted(rows, key=lambda row: row[:2]):
            self.log_growth(record) if is_growth else self.log(record)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
            write_json_atomic(self.record, {"id": self.id, "logged_through": self.last_step})


class Stopwatch:
    """Accumulates seconds of the phases that count as training wall-clock."""

    def __init__(self):
        self.total = 0.0
        self._start = None

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._start
