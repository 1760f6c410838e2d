"""The baseline's loss-vs-FLOPs frontier and each arm's effective-compute multiplier.

Definitions (also the report's footnotes, via `definitions`):

* Frontier points: the final (annealed) value of every from-scratch run (schedule=none) that is
  a matched baseline of the arm in all but the budget (matching.py), one point per run: runs
  trained to several budgets, each with its own full LR schedule (train.max_flops, matched
  baselines, or WSD decay branches).
* Frontier: a saturating power law L(C) = E + A * C^(-alpha) with A > 0, alpha > 0 and E >= 0
  (it falls monotonically towards the irreducible value E; a loss cannot go below 0), fitted by
  least squares on L: for a fixed alpha, E and A are a linear least-squares fit (E = 0 where
  the unconstrained E would be negative); alpha (in [0.001, 3]) is chosen by a grid
  then a golden-section search on the squared residuals. Residuals (point minus fit) are
  reported for every point.
* Seed offsets (pairing): runs of one seed read the same data in the same order, so a seed's
  losses share an offset. The offset of seed s is the mean residual of its frontier points; an
  arm's run of seed s is read against the frontier shifted by it.
* Effective-compute multiplier of an arm's run: the FLOPs the (seed-shifted) frontier needs to
  reach the run's final value, C_f(L) = (A / (L - E))^(1/alpha), divided by the run's FLOPs.
  Above 1 the arm is cheaper than from-scratch training. Over seeds: geometric mean and 95%
  Student-t interval (stats.ratio_interval). A value at or below E is beyond the frontier's
  reach: no multiplier. A multiplier that needs the frontier beyond its largest budget is
  flagged as extrapolated.
* Two accountings: total (every FLOP of the run, the small model's training included) and sunk
  (the run's FLOPs from its first growth event on: the small model before it is treated as an
  existing checkpoint; operator work, e.g. LiGO's fitting, is always counted).
* Speed-up at several targets: the highest (worst) of the arm's runs' values at 50%, 75% and
  100% of their FLOPs are targets, which every run reaches; per run, C_f(target) / the run's FLOPs to reach it (crossing: stays at or below).
  The frontier holds annealed end points while an arm's earlier points are mid-schedule, so the
  earlier targets understate what an arm annealed there would give.
* Change with budget: where the same arm ran at two budgets (groups equal in all but the budget),
  per seed the larger budget's total multiplier divided by the smaller one's, and (where both
  budgets have a matched baseline) the same ratio of the FLOPs speed-ups against the matched
  baselines; geometric mean and 95% t interval over seeds. Below 1 the speed-up shrinks as
  training grows longer.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msgrun.report import matching
from msgrun.report.stats import Interval, ratio_interval

MIN_POINTS = 3  # three parameters: fewer points cannot be fitted
TARGET_FRACTIONS = (0.5, 0.75, 1.0)


class FitError(ValueError):
    """The points do not determine a falling frontier."""


@dataclass
class Frontier:
    E: float
    A: float
    alpha: float
    flops: list[float]
    values: list[float]
    seeds: list[object]
    residuals: list[float]

    def __call__(self, flops) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(flops, dtype=float), -self.alpha)

    def flops_for(self, value: float, offset: float = 0.0) -> float | None:
        """FLOPs at which the frontier (shifted by `offset`) reaches `value`; None beyond E."""
        gap = value - offset - self.E
        return None if gap <= 0 else float((self.A / gap) ** (1.0 / self.alpha))

    def offset(self, seed) -> float | None:
        mine = [r for r, s in zip(self.residuals, self.seeds) if s == seed]
        return float(np.mean(mine)) if mine else None


def _linear_fit(c: np.ndarray, values: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(E, A, squared error) of the least-squares L = E + A * x with x = C^(-alpha), E >= 0: for a
    fixed exponent the model is linear in E and A. A loss (or bits per byte) cannot fall below 0,
    so where the unconstrained E is negative the best E >= 0 is E = 0 (the squared error is convex
    in E), and A is the one-parameter fit of L = A * x. Unconstrained, points that fall like log C
    over the budgets fitted drive alpha to its lower bound and E far below 0 (seen: E = -563,
    alpha = 0.001), and every reading beyond the points then follows that line."""
    x = np.power(c, -alpha)
    x = x / x.max()  # scaled for conditioning; A is scaled back below
    design = np.stack([np.ones_like(x), x], axis=1)
    (E, a), *_ = np.linalg.lstsq(design, values, rcond=None)
    if E < 0:
        E, a = 0.0, float(x @ values / (x @ x))
    sse = float(np.sum((values - E - a * x) ** 2))
    return float(E), float(a / np.power(c, -alpha).max()), sse


def fit(flops, values, seeds=None) -> Frontier:
    """The least-squares saturating power law through (FLOPs, value) points (see module doc)."""
    c, v = np.asarray(flops, dtype=float), np.asarray(values, dtype=float)
    if len(c) < MIN_POINTS or len(set(c.tolist())) < MIN_POINTS:
        raise FitError(f"a frontier needs from-scratch runs at {MIN_POINTS} or more budgets; got {len(set(c.tolist()))}")

    def sse(log_alpha: float) -> float:
        _, A, err = _linear_fit(c, v, math.exp(log_alpha))
        return err if A > 0 else math.inf  # A <= 0: a rising curve, not a frontier

    grid = np.linspace(math.log(1e-3), math.log(3.0), 200)
    errors = [sse(x) for x in grid]
    i = int(np.argmin(errors))
    if not math.isfinite(errors[i]):
        raise FitError("the values do not fall with FLOPs: no monotone frontier fits them")
    # golden-section refinement between the neighbouring grid points
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        x1, x2 = b - g * (b - a), a + g * (b - a)
        if sse(x1) < sse(x2):
            b = x2
        else:
            a = x1
    alpha = math.exp((a + b) / 2)
    E, A, _ = _linear_fit(c, v, alpha)
    residuals = (v - (E + A * np.power(c, -alpha))).tolist()
    return Frontier(E, A, alpha, c.tolist(), v.tolist(), list(seeds) if seeds is not None else [None] * len(c),
                    residuals)


@dataclass
class ArmResult:
    label: str
    n: int
    multiplier: Interval | None  # total accounting
    multiplier_sunk: Interval | None  # the small model's training not counted
    at_targets: list[tuple[float, Interval | None]]  # (target value, multiplier at it)
    paired: bool  # every run read against its own seed's offset
    points: list[tuple[float, float]] = field(default_factory=list)  # (FLOPs, final value) per run
    notes: list[str] = field(default_factory=list)


@dataclass
class BudgetTrend:
    """The same arm at a smaller and a larger budget: per seed, the larger budget's figure over the
    smaller's (below 1: the speed-up shrinks as training grows longer)."""

    smaller: str
    larger: str
    multiplier: Interval | None  # effective-compute multipliers
    speedup: Interval | None  # FLOPs speed-ups against each budget's matched baseline


@dataclass
class FrontierResult:
    metric: str
    frontier: Frontier
    points: list[str]  # run names of the frontier points
    arms: list[ArmResult]
    budget_trends: list[BudgetTrend] = field(default_factory=list)


def sunk_flops(run) -> float | None:
    """The run's FLOPs before its first growth event (the small model's training)."""
    starts = [float(e["flops"]) for e in run.growth if isinstance(e.get("flops"), (int, float))]
    return min(starts) if starts else None


def multipliers(runs, frontier: Frontier, metric: str) -> tuple[list[float | None], list[float | None], bool]:
    """Per run: total and sunk multipliers, and whether every run had its seed's offset."""
    total, sunk, paired = [], [], True
    for run in runs:
        f, _, value = run.curve(metric)
        offset = frontier.offset(run.seed)
        paired &= offset is not None
        need = frontier.flops_for(float(value[-1]), offset or 0.0) if len(value) else None
        spent = run.final_flops
        total.append(need / spent if need and spent else None)
        small = sunk_flops(run)
        sunk.append(need / (spent - small) if need and spent and small is not None and spent > small else None)
    return total, sunk, paired


def at_targets(runs, frontier: Frontier, metric: str) -> list[tuple[float, Interval | None]]:
    from msgrun.report.compare import crossing

    curves = [r.curve(metric) for r in runs]
    out = []
    for frac in TARGET_FRACTIONS:
        levels = [float(np.interp(frac * c[0][-1], c[0], c[2])) for c in curves if len(c[0])]
        if not levels:
            continue
        target = max(levels)  # the worst run's value there: every run reaches it
        ratios = []
        for run in runs:
            hit = crossing(run, metric, target)
            need = frontier.flops_for(target, frontier.offset(run.seed) or 0.0)
            ratios.append(need / hit.flops if hit is not None and need and hit.flops > 0 else None)
        out.append((target, None if None in ratios else ratio_interval(ratios)))
    return out


def analyse_frontier(comp) -> FrontierResult | None:
    """Fit the frontier of the comparison's from-scratch groups and read every growth arm
    against it; None (with a note) where fewer than MIN_POINTS budgets exist."""
    scratch = [g for g in comp.groups if g.from_scratch]
    arms = [g for g in comp.groups if not g.from_scratch]
    if len({round(g.flops or 0, -6) for g in scratch}) < MIN_POINTS or not arms:
        return None  # not a frontier sweep
    metric = comp.metric
    # the points: from-scratch runs matched to the first arm in everything but the budget
    usable = [g for g in scratch if not matching.group_differences(arms[0].runs, g.runs)]
    runs = [r for g in usable for r in g.runs if len(r.curve(metric)[0]) and r.final_flops]
    try:
        frontier = fit([r.final_flops for r in runs], [float(r.curve(metric)[2][-1]) for r in runs],
                       [r.seed for r in runs])
    except FitError as e:
        comp.notes.append(f"no effective-compute multiplier: {e} (train from-scratch baselines at several budgets, "
                          "e.g. protocol=matched, or train.max_flops=C1,C2,C3 with schedule=none)")
        return None
    results, per_run = [], {}
    for g in arms:
        diff = matching.group_differences(g.runs, usable[0].runs)
        if diff:
            comp.notes.append(f"frontier: {g.label!r} not read against it: it differs from the frontier's runs "
                              f"in {', '.join(diff)}")
            continue
        total, sunk, paired = multipliers(g.runs, frontier, metric)
        per_run[g.label] = (g, {r.seed: m for r, m in zip(g.runs, total)})
        notes = []
        needed = max((m * r.final_flops for r, m in zip(g.runs, total) if m), default=0.0)
        if needed > max(frontier.flops) * (1 + 1e-9):
            notes.append(f"extrapolated: reading it needs the frontier at up to {needed:.3g} FLOPs, beyond its largest "
                         f"from-scratch budget {max(frontier.flops):.3g} (add one there, e.g. protocol.frontier=[0.25,0.5,2])")
        if None in total:
            notes.append("a run ends at or below the frontier's asymptote E (or has no final value): no multiplier")
        results.append(ArmResult(
            g.label, len(g.runs),
            None if None in total else ratio_interval(total),
            None if None in sunk or not sunk else ratio_interval(sunk),
            at_targets(g.runs, frontier, metric), paired,
            [(r.final_flops, float(r.curve(metric)[2][-1])) for r in g.runs if len(r.curve(metric)[0])], notes))
    matched = {row.label: {p.seed: p.speedup_flops for p in row.pairs}
               for row in comp.rows if row.baseline_kind == "matched"}
    result = FrontierResult(metric, frontier, [r.name for r in runs], results, budget_trends(per_run, matched))
    comp.notes.extend(summary_lines(result))
    comp.definitions.append(DEFINITION)
    return result


def budget_trends(per_run: dict, matched_speedups: dict) -> list[BudgetTrend]:
    """The same arm at two budgets, paired by seed: the larger budget's multiplier over the
    smaller's, and its FLOPs speed-up against its matched baseline over the smaller's."""
    by_budget = sorted(((g.budget, label) for label, (g, _) in per_run.items() if g.budget), key=lambda item: item[0])

    def ratio(small: dict, large: dict) -> Interval | None:
        ratios = [large[s] / small[s] for s in small if small[s] and large.get(s)]
        return ratio_interval(ratios) if ratios else None

    trends = []
    for i, (small_budget, small) in enumerate(by_budget):
        for large_budget, large in by_budget[i + 1:]:
            a, b = per_run[small][0].runs, per_run[large][0].runs
            # the same arm: equal outside the budget, growth choices included (group_differences
            # lets those differ, as an arm and its from-scratch baseline do)
            if large_budget <= small_budget or matching.group_differences(a, b) or matching.growth_differences(a, b):
                continue
            speedup = (ratio(matched_speedups[small], matched_speedups[large])
                       if small in matched_speedups and large in matched_speedups else None)
            trends.append(BudgetTrend(small, large, ratio(per_run[small][1], per_run[large][1]), speedup))
    return trends


DEFINITION = (
    "⁶ Effective-compute multiplier: the FLOPs the from-scratch frontier L(C) = E + A·C^(-alpha) (least squares "
    "on the annealed end points of from-scratch runs at several budgets; residuals in frontier.csv) needs to "
    "reach a run's final value, divided by the run's FLOPs, the frontier shifted by the run's seed's mean "
    "residual (paired); geometric mean and 95% t interval over seeds. Total: every FLOP counted; sunk: FLOPs "
    "from the first growth event on (the small model treated as an existing checkpoint; operator work counted). "
    "At targets: the worst of the arm's runs' values at 50/75/100% of their FLOPs. Definitions: msgrun/report/frontier.py, "
    "docs/protocol.md.")


def fmt(iv: Interval | None) -> str:
    if iv is None:
        return "—"
    if iv.lo is None:
        return f"{iv.estimate:.3g}× (n=1)"
    verdict = ", not distinguishable from 1×" if not iv.distinguishable else ""
    return f"{iv.estimate:.3g}× [{iv.lo:.3g}×, {iv.hi:.3g}×] n={iv.n}{verdict}"


def summary_lines(result: FrontierResult) -> list[str]:
    f = result.frontier
    rms = math.sqrt(float(np.mean(np.square(f.residuals))))
    lines = [f"frontier ({len(f.flops)} from-scratch runs): {result.metric} = {f.E:.4g} + {f.A:.4g}·C^-{f.alpha:.4g}, "
             f"residuals rms {rms:.3g}, max |{max(map(abs, f.residuals)):.3g}| (frontier.csv lists them)"
             + ("; E at its bound 0: the points show no saturation over these budgets, so readings beyond them "
                "assume a pure power law" if f.E <= 1e-3 * min(f.values) else "")]
    for arm in result.arms:
        targets = "; ".join(f"{t:.4g}: {fmt(iv)}" for t, iv in arm.at_targets)
        lines.append(f"effective-compute multiplier of {arm.label!r}: {fmt(arm.multiplier)} (total), "
                     f"{fmt(arm.multiplier_sunk)} (sunk)" + ("" if arm.paired else ", unpaired (no frontier run of "
                                                                                 "some seed)")
                     + f"; at targets {targets}" + "".join(f"; {n}" for n in arm.notes))
    for t in result.budget_trends:
        lines.append(f"change with budget, {t.larger!r} over {t.smaller!r}, paired by seed: multiplier {fmt(t.multiplier)}; "
                     f"speed-up against the matched baseline {fmt(t.speedup)} (below 1: the speed-up shrinks as "
                     "training grows longer)")
    return lines


def write(result: FrontierResult | None, out_dir: Path) -> list[Path]:
    """frontier.csv (points, fit, residuals; then the arms' multipliers) and frontier.png."""
    if result is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    f = result.frontier
    path = out_dir / "frontier.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "seed", "flops", result.metric, "fit", "residual"])
        for name, seed, c, v, r in zip(result.points, f.seeds, f.flops, f.values, f.residuals):
            w.writerow([name, seed, f"{c:.6g}", f"{v:.6g}", f"{float(f(c)):.6g}", f"{r:+.4g}"])
        w.writerow([])
        w.writerow(["group", "n", "multiplier_total", "lo", "hi", "multiplier_sunk", "lo", "hi", "paired"])
        for arm in result.arms:
            cells = []
            for iv in (arm.multiplier, arm.multiplier_sunk):
                cells += [f"{iv.estimate:.4g}", iv.lo, iv.hi] if iv is not None else ["", "", ""]
            w.writerow([arm.label, arm.n, *cells, arm.paired])
        if result.budget_trends:
            w.writerow([])
            w.writerow(["smaller budget", "larger budget", "multiplier_ratio", "lo", "hi", "n",
                        "matched_speedup_ratio", "lo", "hi", "n"])
            for t in result.budget_trends:
                cells = []
                for iv in (t.multiplier, t.speedup):
                    cells += [f"{iv.estimate:.4g}", iv.lo, iv.hi, iv.n] if iv else ["", "", "", ""]
                w.writerow([t.smaller, t.larger, *cells])
    return [path, plot(result, out_dir / "frontier.png")]


def plot(result: FrontierResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = result.frontier
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    xs = np.geomspace(min(f.flops) / 2, max(f.flops) * 2, 200)
    ax.plot(xs, f(xs), color="black", lw=1.2, label=f"frontier {f.E:.3g} + {f.A:.3g}·C^-{f.alpha:.3g}")
    ax.scatter(f.flops, f.values, color="black", s=14, zorder=3, label="from-scratch runs (annealed)")
    for arm in result.arms:
        xs_arm, ys_arm = zip(*arm.points) if arm.points else ((), ())
        ax.scatter(xs_arm, ys_arm, s=22, marker="D", zorder=4, label=f"{arm.label}: {fmt(arm.multiplier)}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(result.metric)
    # below the axes: with several arms a legend inside covers the points it labels
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
