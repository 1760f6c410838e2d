"""The comparison: labels and seed groups, which baseline each group is compared with, seed
pairs, targets, FLOPs-to-target, the loss gap at equal FLOPs, and the checks that the runs are
comparable at all (data, tokenizer, evaluation settings, data order).

Definitions (also printed as the report's footnotes, see tables.footnotes):

* Runs whose configurations differ only in the seed form a *group*. A group is compared with a
  *baseline* group (from scratch, schedule=none): its *matched* baseline when one exists, i.e.
  one trained with train.max_flops within MATCH_TOLERANCE of the group's FLOPs (annealed end
  point against annealed end point); otherwise the from-scratch group with the largest budget;
  or the one named by --baseline.
* Runs with the same seed read the same tokens in the same order: an arm's run and its
  baseline's run of one seed are a *pair*, and every statistic is computed per pair first.
* Per pair, the *target* is the worse (higher) of the two runs' final values, which both runs
  reach (or --target). Each run's cost to the target is where its curve crosses the target *and
  stays at or below it* (a noisy early dip does not count), linearly interpolated between the
  two evaluations that bracket that crossing. Speedup = baseline's cost / arm's cost: above 1
  the arm is cheaper. When the arm ends better, this is FLOPs to the baseline's final loss
  (G_stack's construction); when it ends worse, the baseline's FLOPs to the arm's final loss.
* Δ at equal FLOPs: the arm's value minus the baseline's, both interpolated at the smaller of
  the two runs' final evaluated FLOPs.
* Over pairs: the mean (geometric for speedups) with a 95% Student-t interval (stats.py), and
  "not distinguishable" where the interval covers 1x / 0.
* Cost ratio: the baseline's total FLOPs / the arm's (MSG's fixed-step cost ratio; read it with
  the final values, it says nothing about quality by itself).

Why: docs/architecture.md section 4."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from msgrun.report import frontier, matching, wallclock
from msgrun.report.runs import METRICS, SEED_KEYS, MixedDataError, ReportError, Run
from msgrun.report.stats import Interval, mean_interval, ratio_interval

MATCH_TOLERANCE = 0.02  # a train.max_flops within 2% of an arm's FLOPs is matched to it
# Settings that must agree between compared runs: evaluation and data order
COMPARED_SETTINGS = {
    "train.eval_tokens": "held-out tokens per evaluation",
    "model.seq_len": "evaluation sequence length",
    "model.family": "model family (causal or masked loss)",
    "data.shuffle_chunk": "data order (shuffle chunk)",
}


@dataclass(eq=False)
class Group:
    """Runs that differ only by seed."""

    label: str
    runs: list[Run]

    @property
    def from_scratch(self) -> bool:
        return self.runs[0].choices.get("schedule") == "none"

    @property
    def flops(self) -> float | None:
        return _mean_or_none([r.final_flops for r in self.runs])

    @property
    def budget(self) -> float | None:
        """The train.max_flops all its runs were given (None if any ran without one)."""
        budgets = [r.max_flops for r in self.runs]
        return None if None in budgets else float(np.mean(budgets))

    def curves(self, metric: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [c for c in (r.curve(metric) for r in self.runs) if len(c[0])]


def label_runs(runs: list[Run]) -> None:
    """Give each run a label naming what distinguishes it from the others, seeds excepted.

    Always the schedule and operator choices; the model choice and other config groups when
    the runs differ in them; and every other override whose value differs between the runs it
    matters to. A setting of a config group a run does not use is incidental and never part of
    its label: `operator.*` or `schedule.*` with schedule=none (nothing grows, so the operator
    is shown as none too), `<group>.*` with `<group>=none`."""
    described = [r for r in runs if r.choices or r.overrides]
    choices = {id(r): _used_choices(r) for r in described}
    overrides = {id(r): _parse_overrides(r) for r in described}
    group_keys = {k for r in described for k in r.choices}

    def differing(values_of) -> list[str]:
        keys = sorted({k for r in described for k in values_of(r)})
        return [k for k in keys
                if len({values_of(r).get(k) for r in described if not _incidental(r, k)}) > 1]

    choice_keys = [k for k in differing(lambda r: choices[id(r)]) if k not in ("schedule", "operator")]
    override_keys = [k for k in differing(lambda r: overrides[id(r)]) if k not in group_keys]
    for run in runs:
        if run not in described:
            run.label = run.name  # nothing known about it: it stands alone
            continue
        chosen, ov = choices[id(run)], overrides[id(run)]
        parts = []
        if "model" in choice_keys and "model" in chosen:
            parts.append(chosen["model"])
        parts.append(f"{chosen.get('schedule', '?')}/{chosen.get('operator', '?')}")
        parts += [f"{k}={chosen[k]}" for k in choice_keys if k != "model" and k in chosen]
        parts += [f"{k}={_short(ov[k])}" for k in override_keys if k in ov and not _incidental(run, k)]
        run.label = " ".join(parts)


def _incidental(run: Run, key: str) -> bool:
    """Whether a setting cannot change what this run trains (see label_runs)."""
    group = key.split(".")[0]
    if group in ("schedule", "operator") and run.choices.get("schedule") == "none":
        return True
    return "." in key and run.choices.get(group) == "none"


def _used_choices(run: Run) -> dict[str, str]:
    chosen = dict(run.choices)
    if chosen.get("schedule") == "none" and "operator" in chosen:
        chosen["operator"] = "none"  # nothing grows: the operator never runs
    return chosen


def _short(value: str) -> str:
    # budgets written by hand or by a sweep (1.847e+11, 184700000000.0) read the same way
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if abs(number) >= 1e5 else value


def _parse_overrides(run: Run) -> dict[str, str]:
    """The run's overrides other than its seed."""
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
class Crossing:
    """Where a run's curve crosses a target and stays at or below it."""

    flops: float
    wall: float
    before: tuple[float, float] | None  # (FLOPs, value) of the last evaluation above the target
    after: tuple[float, float]  # (FLOPs, value) of the first evaluation of the stretch below it


@dataclass
class Pair:
    """An arm's run and its baseline's run of the same seed (same data in the same order)."""

    seed: int | None
    run: str
    baseline_run: str
    target: float | None
    arm: Crossing | None  # None: the arm's run did not reach the target
    base: Crossing | None
    speedup_flops: float | None
    speedup_wall: float | None
    speedup_wall_normalised: float | None
    gap: float | None  # arm minus baseline at equal FLOPs
    gap_flops: float | None
    cost_ratio: float | None  # baseline's total FLOPs / the arm's


@dataclass
class Row:
    """One line of the comparison table. None means "not available"; see the footnotes."""

    label: str
    n: int
    status: str
    is_baseline: bool  # a baseline of at least one other row
    baseline: str | None  # label of the baseline this row is compared with
    baseline_kind: str | None  # matched | largest budget | --baseline
    final_mean: float | None
    final_std: float | None
    flops: float | None
    wall_time: float | None
    reached: int  # runs (with a baseline: pairs) that reached the target
    flops_to_target: float | None  # mean over runs or pairs, only when all of them reached it
    wall_to_target: float | None
    speedup_flops: Interval | None
    speedup_wall: Interval | None  # None when raw wall-clock cannot be compared (wall_problems)
    speedup_wall_normalised: Interval | None
    gap: Interval | None
    gap_flops: float | None  # mean FLOPs at which the per-pair gaps were measured
    cost_ratio: float | None
    growth_events: tuple[int, int]  # (min, max) over runs
    runs: list[str]
    pairs: list[Pair]
    wall_problems: list[str]
    downstream: dict[str, float]  # mean of each eval/<task>/<metric> over the runs that have it


@dataclass
class Comparison:
    metric: str
    target: float | None  # --target; None: a target per pair
    target_source: str
    baselines: list[Group]
    groups: list[Group]
    rows: list[Row]
    notes: list[str]
    definitions: list[str] = field(default_factory=list)  # footnotes added by later analyses (frontier.py)
    frontier: object = None  # frontier.FrontierResult, where from-scratch runs at several budgets exist

    @property
    def downstream_keys(self) -> list[str]:
        return sorted({k for r in self.rows for k in r.downstream})


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
    """Group the runs, check that they are comparable, pair each group with its baseline, and
    compute the table.

    target: a fixed target for every run (default: one per pair, see the module doc).
    baseline: a group label (or a unique part of one) to compare every group with (default: per
    group, its matched from-scratch baseline, else the from-scratch group with the largest budget).
    Raises MixedDataError if data, tokenizer, evaluation settings or data order differ (unless
    allow_mixed_data), ReportError for other unusable input."""
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
    assigned, primary, why = _assign_baselines(groups, baseline)
    notes += why
    baselines = [g for g in groups if g is primary or any(b is g for b, _ in assigned.values())]
    notes += _check_fingerprints(runs, baselines[0] if baselines else None, allow_mixed_data)
    notes += _check_settings(runs, allow_mixed_data)
    notes += wallclock.placement_notes(runs)

    rows = []
    for g in groups:
        base, kind = assigned.get(id(g), (None, None))
        rows.append(_row(g, base, kind, metric, target, is_baseline=any(g is b for b in baselines), notes=notes))
    incomplete = [r.name for r in runs if r.status != "completed"]
    if incomplete:
        notes.append(f"not completed (no summary.json, or status failed): {', '.join(incomplete)}")
    target_source = "--target" if target is not None else "per pair: the worse of the two runs' final values"
    comp = Comparison(metric, target, target_source, baselines, groups, rows, notes)
    comp.frontier = frontier.analyse_frontier(comp)  # from-scratch runs at 3+ budgets: multipliers
    return comp


def _row(g: Group, base: Group | None, kind: str | None, metric: str, target: float | None,
         is_baseline: bool, notes: list[str]) -> Row:
    finals = [c[2][-1] for c in g.curves(metric)]
    pairs, problems = [], []
    if base is not None:
        pairs = _pairs(g, base, metric, target, notes)
        problems = wallclock.wall_problems(g.runs, base.runs)
        if problems:
            notes.append(f"{g.label!r} against {base.label!r}: raw wall-clock speedup not shown: " + "; ".join(problems))
    if pairs:
        costs = [p.arm for p in pairs]
    elif target is not None:
        costs = [crossing(r, metric, target) for r in g.runs]
    else:
        costs = []
    all_reached = bool(costs) and all(c is not None for c in costs)
    downstream: dict[str, list[float]] = {}
    for run in g.runs:
        for key, value in run.downstream.items():
            downstream.setdefault(key, []).append(value)

    def over_pairs(field: str, interval):
        # every pair or none: averaging only the pairs that reached the target would drop exactly
        # the seeds that speak against the group
        values = [getattr(p, field) for p in pairs]
        return None if None in values else interval(values)

    return Row(
        label=g.label,
        n=len(g.runs),
        status=_status(g),
        is_baseline=is_baseline,
        baseline=base.label if base is not None else None,
        baseline_kind=kind,
        final_mean=float(np.mean(finals)) if finals else None,
        final_std=float(np.std(finals, ddof=1)) if len(finals) > 1 else None,
        flops=g.flops,
        wall_time=_mean_or_none([r.final_wall_time for r in g.runs]),
        reached=sum(c is not None for c in costs),
        flops_to_target=float(np.mean([c.flops for c in costs])) if all_reached else None,
        wall_to_target=_mean_or_none([c.wall for c in costs]) if all_reached else None,
        speedup_flops=over_pairs("speedup_flops", ratio_interval),
        speedup_wall=None if problems else over_pairs("speedup_wall", ratio_interval),
        speedup_wall_normalised=over_pairs("speedup_wall_normalised", ratio_interval),
        gap=over_pairs("gap", mean_interval),
        gap_flops=_mean_or_none([p.gap_flops for p in pairs]),
        cost_ratio=_mean_or_none([p.cost_ratio for p in pairs]),
        growth_events=(min(len(r.growth) for r in g.runs), max(len(r.growth) for r in g.runs)),
        runs=[r.name for r in g.runs],
        pairs=pairs,
        wall_problems=problems,
        downstream={k: float(np.mean(v)) for k, v in downstream.items()},
    )


def _pairs(g: Group, base: Group, metric: str, target: float | None, notes: list[str]) -> list[Pair]:
    """Per-seed comparisons of an arm with its baseline."""
    by_seed = _by_seed(base)
    pairs, unpaired = [], []
    # one FLOP/s per shape for both sides: the shapes they share then cost the same, and the
    # estimate does not carry which side ran while the machine was busier
    rates = wallclock.throughput(g.runs + base.runs)
    for run in _by_seed(g).values():
        other = by_seed.get(run.seed)
        arm_curve, base_curve = run.curve(metric), other.curve(metric) if other else None
        if other is None or not len(arm_curve[0]) or not len(base_curve[0]):
            unpaired.append(run.name)
            continue
        pair_target = target if target is not None else max(arm_curve[2][-1], base_curve[2][-1])
        mine, theirs = crossing(run, metric, pair_target), crossing(other, metric, pair_target)
        both = mine is not None and theirs is not None
        at = min(arm_curve[0][-1], base_curve[0][-1])
        est_mine = both and wallclock.normalised_wall(run, rates, mine.flops)
        est_theirs = both and wallclock.normalised_wall(other, rates, theirs.flops)
        pairs.append(Pair(
            seed=run.seed, run=run.name, baseline_run=other.name, target=pair_target, arm=mine, base=theirs,
            speedup_flops=_ratio(theirs.flops, mine.flops) if both else None,
            speedup_wall=_ratio(theirs.wall, mine.wall) if both else None,
            speedup_wall_normalised=_ratio(est_theirs, est_mine) if both else None,
            gap=float(np.interp(at, arm_curve[0], arm_curve[2]) - np.interp(at, base_curve[0], base_curve[2])),
            gap_flops=float(at),
            cost_ratio=_ratio(other.final_flops, run.final_flops),
        ))
    if unpaired:
        notes.append(f"{g.label!r}: no run of the same seed in its baseline {base.label!r} for "
                     f"{', '.join(unpaired)}: left out of the paired statistics")
    return pairs


def _by_seed(g: Group) -> dict:
    runs: dict = {}
    for run in g.runs:
        runs.setdefault(run.seed, run)  # a repeated seed: the first run found counts
    return runs


def crossing(run: Run, metric: str, target: float) -> Crossing | None:
    """Where `run`'s curve crosses `target` for good: the first evaluation after which every
    evaluation is at or below the target, linearly interpolated from the evaluation before it.
    None if the last evaluation is above the target."""
    flops, wall, value = run.curve(metric)
    above = np.flatnonzero(value > target)
    if not len(value) or (len(above) and above[-1] == len(value) - 1):
        return None
    if not len(above):
        # at or below from the first evaluation on: the crossing is at (or before) that point
        return Crossing(float(flops[0]), float(wall[0]), None, (float(flops[0]), float(value[0])))
    i = int(above[-1]) + 1
    frac = (value[i - 1] - target) / (value[i - 1] - value[i])

    # the same weight on both axes: the crossing is one moment of training
    def at(x: np.ndarray) -> float:
        return float(x[i - 1] + frac * (x[i] - x[i - 1]))

    return Crossing(at(flops), at(wall), (float(flops[i - 1]), float(value[i - 1])),
                    (float(flops[i]), float(value[i])))


def to_target(run: Run, metric: str, target: float) -> tuple[float, float] | None:
    """(FLOPs, wall-clock seconds) at which `run` reaches `target` for good (see crossing)."""
    hit = crossing(run, metric, target)
    return None if hit is None else (hit.flops, hit.wall)


def _assign_baselines(groups: list[Group], wanted: str | None) -> tuple[dict, Group | None, list[str]]:
    """{id(group): (baseline group, kind)} for every group that has a baseline; the main
    baseline (--baseline, else the from-scratch group with the largest budget); notes.

    Only a from-scratch group whose saved configuration equals the group's outside the growth
    choices and the budget (matching.py) is a candidate: matched (train.max_flops within
    MATCH_TOLERANCE of the group's FLOPs), else the one with the same or the largest budget. A
    group without a candidate gets no baseline and a note naming the keys that disqualified the
    others. --baseline is obeyed, but a baseline that differs is labelled "NOT matched"."""
    if wanted:
        matches = [g for g in groups if g.label == wanted] or [g for g in groups if wanted in g.label]
        if len(matches) != 1:
            raise ReportError(
                f"--baseline {wanted!r} matches {len(matches)} groups; the labels are: "
                + "; ".join(repr(g.label) for g in groups)
            )
        chosen, assigned, notes = matches[0], {}, []
        for g in groups:
            if g is chosen:
                continue
            diff = matching.group_differences(g.runs, chosen.runs)
            kind = "--baseline"
            if diff:
                kind = f"--baseline, NOT matched: differs in {', '.join(diff)}"
                notes.append(f"WARNING: {g.label!r} is compared with {chosen.label!r} (--baseline), which differs "
                             f"from it outside the growth choices and the budget: "
                             f"{matching.describe(diff, g.runs, chosen.runs)}. Its speedups measure those "
                             "differences too.")
            assigned[id(g)] = (chosen, kind)
        return assigned, chosen, notes
    scratch = [g for g in groups if g.from_scratch]
    if not scratch:
        return {}, None, ["no baseline: no group has schedule=none (from scratch); speedups need one "
                          "(--baseline LABEL picks another). For annealed baselines at the groups' budgets run "
                          + _commands(groups)]
    # budget-matched baselines trained with train.max_flops; the rest ran their own budgets
    budgeted = [g for g in scratch if g.budget]
    full = [g for g in scratch if g not in budgeted] or scratch
    primary = max(full, key=lambda g: g.flops or 0.0)
    assigned, notes, unmatched, refused = {}, [], [], []
    for g in groups:
        if g is primary:
            continue
        differ = {id(b): matching.group_differences(g.runs, b.runs) for b in scratch if b is not g}
        fits = [b for b in scratch if b is not g and not differ[id(b)]]
        # matched on the declared budget: a run stops at the first step past it, so its own FLOPs
        # overshoot by up to one step
        matched = [b for b in fits if b in budgeted and g.flops and abs(b.budget / g.flops - 1) <= MATCH_TOLERANCE]
        others = [b for b in fits if b in full]
        if matched:
            assigned[id(g)] = (min(matched, key=lambda b: abs(b.budget / g.flops - 1)), "matched")
        elif others:
            largest = max(others, key=lambda b: b.flops or 0.0)
            kind = "same budget" if _same_budget(largest, g) else "largest budget"
            assigned[id(g)] = (largest, kind)  # same budget: both ran their own schedule to the same FLOPs
            if kind == "largest budget" and not g.from_scratch:
                unmatched.append(g)
        else:
            refused.append(g)
            if not g.from_scratch:
                unmatched.append(g)
        for b in scratch:
            if not g.from_scratch and b is not g and differ[id(b)]:
                notes.append(f"not matched: {b.label!r} is not a baseline of {g.label!r}: it differs outside the "
                             f"growth choices and the budget in {matching.describe(differ[id(b)], g.runs, b.runs)}.")
    if refused:
        notes.append("no baseline for " + "; ".join(repr(g.label) for g in refused) + ": every from-scratch "
                     "group differs from it outside the growth choices and the budget (see the 'not matched' "
                     "notes), so no speedup is shown rather than one that measures those differences.")
    if unmatched:
        notes.append(
            "no matched baseline (schedule=none trained with train.max_flops within "
            f"{MATCH_TOLERANCE:.0%} of the group's FLOPs and the same settings otherwise) for "
            + "; ".join(repr(g.label) for g in unmatched)
            + (f": compared with {primary.label!r}, the from-scratch group with the largest budget, which is "
               "mid-schedule where it is compared" if any(id(g) in assigned for g in unmatched) else "")
            + ". For annealed baselines at these budgets run " + _commands(unmatched))
    return assigned, primary, notes


def _commands(arms: list[Group]) -> str:
    return (" and ".join(f"`{c}`" for c in matching.matched_commands(arms)) + ", then report both sweeps "
            "together (or train arms and baselines in one multirun: protocol=matched).")


def _same_budget(a: Group, b: Group) -> bool:
    return bool(a.flops and b.flops) and abs(a.flops / b.flops - 1) <= MATCH_TOLERANCE


def _check_settings(runs: list[Run], allow_mixed: bool) -> list[str]:
    """Refuse runs evaluated differently or fed data in a different order (COMPARED_SETTINGS)."""
    differing = []
    for key, meaning in COMPARED_SETTINGS.items():
        values: dict[str, list[str]] = {}
        for run in runs:
            value = run.setting(key)
            if run.config:
                values.setdefault(repr(value), []).append(run.name)
        if len(values) > 1:
            listing = "; ".join(f"{value} in {', '.join(names)}" for value, names in values.items())
            differing.append(f"{key} ({meaning}): {listing}")
    if not differing:
        return []
    message = ("refusing to compare runs evaluated or fed differently: " + " | ".join(differing) + ". Losses "
               "measured on other held-out tokens or lengths, or after another data order, differ for reasons "
               "that are not the growth method. Rerun with the same settings, or pass --allow-mixed-data.")
    if not allow_mixed:
        raise MixedDataError(message)
    return ["WARNING (--allow-mixed-data): " + message]


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
