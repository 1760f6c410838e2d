"""Wall-clock that can be trusted, or a warning that it cannot.

Raw wall-clock measures the machine as much as the method: on shared hardware three seeds with
identical FLOPs took 58, 185 and 346 s. So the report (a) drops the raw wall-clock speedup when
an arm and its baseline ran on different devices or world sizes, or when the wall time per FLOP
of one group's seeds spreads by more than WALL_SPREAD, and (b) gives beside it a
*throughput-normalised* estimate: the FLOPs a run spent in each model shape divided by the
steady-state FLOP/s at that shape (the median over the logging intervals of every run of the
arm and its baseline that trained at that shape, the first interval of each shape left out as
it holds compilation), plus the measured seconds of its growth events. The estimate keeps what growth changes (smaller shapes run at other
FLOP/s, growth events cost time) and removes what the machine's load adds.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from msgrun.report.runs import SHAPE_KEYS, Run, finite

WALL_SPREAD = 1.25  # max / min wall time per FLOP across one group's seeds beyond which raw wall is unreliable
PLACEMENT_KEYS = ("device_name", "world_size")  # differing: raw wall-clock measures different hardware


def _intervals(run: Run) -> list[tuple[tuple, float, float, bool]]:
    """(shape, ΔFLOPs, Δwall, first interval at this shape) between consecutive training lines."""
    rows = [r for r in run.train if finite(r.get("flops")) and finite(r.get("wall_time"))]
    out, seen = [], set()
    prev_flops, prev_wall = 0.0, 0.0
    for row in rows:
        shape = tuple(row.get(k) for k in SHAPE_KEYS)
        d_flops, d_wall = float(row["flops"]) - prev_flops, float(row["wall_time"]) - prev_wall
        if d_flops > 0 and d_wall > 0:
            out.append((shape, d_flops, d_wall, shape not in seen))
        seen.add(shape)
        prev_flops, prev_wall = float(row["flops"]), float(row["wall_time"])
    return out


def throughput(runs: list[Run]) -> dict[tuple, float]:
    """Steady-state FLOP/s per shape, the median over the runs' logging intervals."""
    rates: dict[tuple, list[float]] = defaultdict(list)
    first: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        for shape, d_flops, d_wall, is_first in _intervals(run):
            (first if is_first else rates)[shape].append(d_flops / d_wall)
    # a shape seen in one interval only has nothing but its first interval
    return {shape: float(np.median(rates[shape] or first[shape])) for shape in {*rates, *first}}


def normalised_wall(run: Run, rates: dict[tuple, float], flops: float) -> float | None:
    """Seconds the run would have taken to `flops` at its group's steady-state FLOP/s per shape,
    plus its growth events' measured seconds."""
    intervals = _intervals(run)
    if not intervals or not rates:
        return None
    seconds, spent = 0.0, 0.0
    for shape, d_flops, _, _ in intervals:
        part = min(d_flops, flops - spent)
        if part <= 0:
            break
        seconds += part / rates[shape]
        spent += part
    events = [e for e in run.growth if finite(e.get("flops")) and float(e["flops"]) <= flops]
    return seconds + sum(float(e["seconds"]) for e in events if finite(e.get("seconds")))


def wall_problems(arm: list[Run], base: list[Run]) -> list[str]:
    """Why raw wall-clock between these runs cannot be read as a speedup (empty: it can)."""
    problems = []
    for key in PLACEMENT_KEYS:
        values = {r.provenance.get(key) for r in arm + base} - {None}
        if len(values) > 1:
            problems.append(f"the runs differ in {key} ({', '.join(sorted(map(str, values)))})")
    for runs in (arm, base):
        per_flop = [r.final_wall_time / r.final_flops for r in runs
                    if r.final_wall_time and r.final_flops]
        if len(per_flop) > 1 and max(per_flop) > WALL_SPREAD * min(per_flop):
            problems.append(f"wall time per FLOP of {runs[0].label!r} varies {max(per_flop) / min(per_flop):.2f}x "
                            f"across its seeds (more than {WALL_SPREAD}x: the machine's load, not the method)")
    return problems


def placement_notes(runs: list[Run]) -> list[str]:
    """Warnings about raw wall-clock that hold for the whole comparison."""
    notes = []
    if len({r.provenance.get("host") for r in runs} - {None}) > 1:
        notes.append("the runs trained on several hosts: raw wall-clock compares machines as well as methods")
    loaded = []
    for r in runs:
        load, cpus = r.provenance.get("loadavg"), r.provenance.get("cpus")
        if isinstance(load, list) and len(load) == 3 and finite(load[2]) and cpus and load[2] > cpus:
            loaded.append(f"{r.name} ({load[2]:.1f} on {cpus} CPUs)")
    if loaded:
        notes.append("the machine was busier than its CPU count when these runs ended (15-minute load average): "
                     + ", ".join(loaded) + "; their raw wall-clock includes waiting for other work")
    return notes
