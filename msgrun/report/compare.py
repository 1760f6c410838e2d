"""The comparison: labels and seed groups, the baseline, targets, FLOPs-to-target by
interpolation, the loss gap at equal FLOPs, and the data/tokenizer fingerprint check.

Definitions and why: docs/architecture.md section 4."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from msgrun.report.runs import METRICS, SEED_KEYS, MixedDataError, ReportError, Run


@dataclass(eq=False)
class Group:
    """Runs that differ only by seed."""

    label: str
    runs: list[Run]

    def curves(self, metric: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [c for c in (r.curve(metric) for r in self.runs) if len(c[0])]


def label_runs(runs: list[Run]) -> None:
    """Give each run a label naming what distinguishes it from the others, seeds excepted.

    Always the schedule and operator choices; the model choice and other config groups when
    the runs differ in them; and every other override whose value differs between runs."""
    described = [r for r in runs if r.choices or r.overrides]
    overrides = {id(r): _parse_overrides(r) for r in described}
    group_keys = {k for r in described for k in r.choices}

    def differing(values_of) -> list[str]:
        keys = sorted({k for r in described for k in values_of(r)})
        return [k for k in keys if len({values_of(r).get(k) for r in described}) > 1]

    choice_keys = [k for k in differing(lambda r: r.choices) if k not in ("schedule", "operator")]
    override_keys = [k for k in differing(lambda r: overrides[id(r)]) if k not in group_keys]
    for run in runs:
        if run not in described:
            run.label = run.name  # nothing known about it: it stands alone
            continue
        parts = []
        if "model" in choice_keys and "model" in run.choices:
            parts.append(run.choices["model"])
        parts.append(f"{run.choices.get('schedule', '?')}/{run.choices.get('operator', '?')}")
        parts += [f"{k}={run.choices[k]}" for k in choice_keys if k != "model" and k in run.choices]
        ov = overrides[id(run)]
        parts += [f"{k}={ov[k]}" for k in override_keys if k in ov]
        run.label = " ".join(parts)


def _parse_overrides(run: Run) -> dict[str, str]:
    parsed = {}
    for text in run.overrides:
        key, _, value = text.partition("=")
        key = key.lstrip("+~")  # Hydra's add (+, ++) and delete (~) prefixes
        if key not in SEED_KEYS:
            parsed[key] = value
    return parsed


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups of runs with the same label, in the order first seen. Labels must be set."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.label, Group(run.label, [])).runs.append(run)
    return list(groups.values())




@dataclass
class Row:
    """One line of the comparison table. None means "not available"; see the footnotes."""

    label: str
    n: int
    status: str
    is_baseline: bool
    final_mean: float | None
    final_std: float | None
    flops: float | None
    wall_time: float | None
    reached: int  # runs that reached the target
    flops_to_target: float | None  # mean over runs, only when all of them reached it
    wall_to_target: float | None
    speedup_flops: float | None
    speedup_wall: float | None
    gap: float | None  # this group's metric minus the baseline's at equal FLOPs
    gap_flops: float | None  # where the gap was measured
    growth_events: tuple[int, int]  # (min, max) over runs
    runs: list[str]


@dataclass
class Comparison:
    metric: str
    target: float | None
    target_source: str
    baseline: Group | None
    groups: list[Group]
    rows: list[Row]
    notes: list[str]


def compare(runs: list[Run], target: float | None = None, metric: str = "val_loss", **kwargs) -> list[Row]:
    """Table rows for `runs` (see analyse() for the options)."""
    return analyse(runs, target=target, metric=metric, **kwargs).rows


def analyse(
    runs: list[Run],
    target: float | None = None,
    metric: str = "val_loss",
    baseline: str | None = None,
    allow_mixed_data: bool = False,
) -> Comparison:
    """Group the runs, check that they are comparable, and compute the table.

    baseline: a group label (or a unique part of one); default: the group with schedule=none.
    Raises MixedDataError if fingerprints differ (unless allow_mixed_data), ReportError for
    other unusable input."""
    if metric not in METRICS:
        raise ReportError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not runs:
        raise ReportError("no runs to compare")
    if not any(len(r.curve(metric)[0]) for r in runs):
        raise ReportError(
            f"no run has evaluation lines with {metric!r} in its metrics (yet); "
            "evaluation lines are written every train.eval_every steps"
        )
    notes = [n for r in runs for n in r.notes]
    label_runs(runs)
    groups = group_runs(runs)
    base, why = _pick_baseline(groups, baseline)
    if why:
        notes.append(why)
    notes += _check_fingerprints(runs, base, allow_mixed_data)

    if target is not None:
        target_source = "--target"
    elif base is not None and base.curves(metric):
        # The baseline's final value; over several seeds the *highest* one. The mean would be
        # missed by every seed that ends above it, and as to-target is only given when all
        # seeds reach the target, the baseline would have no to-target and no speedup at all.
        finals = [c[2][-1] for c in base.curves(metric)]
        target = float(np.max(finals))
        target_source = f"the baseline's final {metric}" + (
            f", the highest of its {len(finals)} seeds (mean {np.mean(finals):.4f})" if len(finals) > 1 else ""
        )
    else:
        target_source = "none"
        notes.append("no target: without a baseline, pass --target to get FLOPs-to-target")

    stats = {g.label: _group_stats(g, metric, target) for g in groups}
    base_stats = stats[base.label] if base else None
    if base_stats and target is not None and base_stats["reached"] < len(base.runs):
        notes.append(f"the baseline does not reach the target {target:.4g}: no speedups")
    rows = []
    for g in groups:
        s = stats[g.label]
        gap, gap_flops = (None, None) if base is None or g is base else _gap(g, base, metric)
        rows.append(Row(
            label=g.label,
            n=len(g.runs),
            status=_status(g),
            is_baseline=g is base,
            final_mean=s["final_mean"],
            final_std=s["final_std"],
            flops=_mean_or_none([r.final_flops for r in g.runs]),
            wall_time=_mean_or_none([r.final_wall_time for r in g.runs]),
            reached=s["reached"],
            flops_to_target=s["flops_to_target"],
            wall_to_target=s["wall_to_target"],
            speedup_flops=_ratio(base_stats and base_stats["flops_to_target"], s["flops_to_target"]),
            speedup_wall=_ratio(base_stats and base_stats["wall_to_target"], s["wall_to_target"]),
            gap=gap,
            gap_flops=gap_flops,
            growth_events=(min(len(r.growth) for r in g.runs), max(len(r.growth) for r in g.runs)),
            runs=[r.name for r in g.runs],
        ))
    incomplete = [r.name for r in runs if r.status != "completed"]
    if incomplete:
        notes.append(f"not completed (no summary.json, or status failed): {', '.join(incomplete)}")
    return Comparison(metric, target, target_source, base, groups, rows, notes)


def to_target(run: Run, metric: str, target: float) -> tuple[float, float] | None:
    """(FLOPs, wall-clock seconds) at which `run` first reaches `target` (value <= target),
    linear between the two evaluations that bracket the crossing; None if it never does."""
    flops, wall, value = run.curve(metric)
    below = np.flatnonzero(value <= target)
    if not len(below):
        return None
    i = int(below[0])
    if i == 0:
        return float(flops[0]), float(wall[0])  # already there at the first evaluation
    frac = (value[i - 1] - target) / (value[i - 1] - value[i])

    # the same weight on both axes: the crossing is one moment of training
    def at(x: np.ndarray) -> float:
        return float(x[i - 1] + frac * (x[i] - x[i - 1]))

    return at(flops), at(wall)


def _group_stats(group: Group, metric: str, target: float | None) -> dict:
    finals = [c[2][-1] for c in group.curves(metric)]
    hits = [to_target(r, metric, target) for r in group.runs] if target is not None else []
    reached = [h for h in hits if h is not None]
    all_reached = bool(hits) and len(reached) == len(hits)
    return {
        "final_mean": float(np.mean(finals)) if finals else None,
        "final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
        "reached": len(reached),
        "flops_to_target": float(np.mean([h[0] for h in reached])) if all_reached else None,
        "wall_to_target": _mean_or_none([h[1] for h in reached]) if all_reached else None,
    }


def _gap(group: Group, base: Group, metric: str) -> tuple[float | None, float | None]:
    """Mean metric of `group` minus the baseline's, both interpolated at the same FLOPs: the
    end of the shorter evaluated curve, so that neither is extrapolated."""
    curves, base_curves = group.curves(metric), base.curves(metric)
    if not curves or not base_curves:
        return None, None
    at = min(c[0][-1] for c in curves + base_curves)
    mine = np.mean([np.interp(at, c[0], c[2]) for c in curves])
    theirs = np.mean([np.interp(at, c[0], c[2]) for c in base_curves])
    return float(mine - theirs), float(at)


def _pick_baseline(groups: list[Group], wanted: str | None) -> tuple[Group | None, str | None]:
    if wanted:
        matches = [g for g in groups if g.label == wanted] or [g for g in groups if wanted in g.label]
        if len(matches) != 1:
            raise ReportError(
                f"--baseline {wanted!r} matches {len(matches)} groups; the labels are: "
                + "; ".join(repr(g.label) for g in groups)
            )
        return matches[0], None
    scratch = [g for g in groups if g.runs[0].choices.get("schedule") == "none"]
    if len(scratch) == 1:
        return scratch[0], None
    if not scratch:
        return None, "no baseline: no group has schedule=none (from scratch); speedups need one (--baseline LABEL picks another)"
    return None, (
        "no baseline: several from-scratch groups ("
        + "; ".join(repr(g.label) for g in scratch)
        + "); pick one with --baseline LABEL"
    )


def _check_fingerprints(runs: list[Run], base: Group | None, allow_mixed: bool) -> list[str]:
    """Refuse runs whose data or tokenizer differs from the baseline's (or from the majority's
    when there is no baseline). Returns notes for the table."""
    notes = []
    known = [r for r in runs if r.data_fingerprint or r.tokenizer_fingerprint]
    unknown = [r.name for r in runs if r not in known]
    if unknown:
        notes.append(f"data/tokenizer fingerprints unknown (not checked) for: {', '.join(unknown)}")
    if not known:
        return notes
    base_known = [r for r in known if base and r in base.runs]
    if base_known:
        ref_run = base_known[0]
        ref_name = f"the baseline {base.label!r} ({ref_run.name})"
    else:
        pairs = Counter((r.data_fingerprint, r.tokenizer_fingerprint) for r in known)
        ref_pair = pairs.most_common(1)[0][0]
        ref_run = next(r for r in known if (r.data_fingerprint, r.tokenizer_fingerprint) == ref_pair)
        ref_name = f"most runs (e.g. {ref_run.name})"

    def differs(a, b) -> bool:
        return a is not None and b is not None and a != b

    odd = [
        r for r in known
        if differs(r.data_fingerprint, ref_run.data_fingerprint)
        or differs(r.tokenizer_fingerprint, ref_run.tokenizer_fingerprint)
    ]
    if not odd:
        return notes
    listing = "; ".join(
        f"{r.name} [{r.label}]: data {r.data_fingerprint}, tokenizer {r.tokenizer_fingerprint}" for r in odd
    )
    message = (
        f"refusing to compare runs trained or evaluated on different data: {listing} — against "
        f"{ref_name}: data {ref_run.data_fingerprint}, tokenizer {ref_run.tokenizer_fingerprint}. "
        "A loss is only comparable on the same held-out tokens under the same tokenizer; with "
        "different data the curves and speedups would measure the data, not the growth method. "
        "Rerun those arms on the same data, or pass --allow-mixed-data to compare anyway."
    )
    if not allow_mixed:
        raise MixedDataError(message)
    notes.append("WARNING (--allow-mixed-data): " + message)
    return notes


def _status(group: Group) -> str:
    counts = Counter(r.status for r in group.runs)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator
