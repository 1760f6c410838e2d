"""Rendering the comparison as figures: loss against FLOPs and against wall-clock (PNG, SVG).

Each figure has two panels: the whole runs, and the end of the runs on a y-range of its own
(an early loss spike would otherwise stretch the axis until the end, where the runs differ,
fills a corner). Every growth event is a marker on its group's curve: on the validation curve
where it has one, else (an event before the first evaluation) on the run's train-loss curve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msgrun.report.compare import Comparison, Group
from msgrun.report.runs import METRIC_NAMES, Run, finite

# one colour per group: tab10 without its grey (a grey reads as "not a group"), then tab20's
# lighter shades; baselines are told apart by their dashed line and their label, not a grey
PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5"]
END_SHARE = 0.5  # the end panel shows x from this share of the largest x (FLOPs or seconds) on


def plot(comp: Comparison, out_dir: Path) -> list[Path]:
    """loss_vs_flops and loss_vs_wall, as PNG and SVG."""
    written = []
    for name, fig in draw(comp):
        for suffix in ("png", "svg"):
            path = out_dir / f"{name}.{suffix}"
            fig.savefig(path, dpi=150)
            written.append(path)
    return written


def draw(comp: Comparison) -> list[tuple[str, object]]:
    """(name, matplotlib Figure) of loss_vs_flops and loss_vs_wall; each Figure's axes are
    (the whole runs, the end of the runs)."""
    # Figure without pyplot: no global state and no GUI backend, just Agg, so this works in
    # tests, over ssh and inside other programs
    from matplotlib.figure import Figure

    styles = {}
    for i, g in enumerate(comp.groups):
        baseline = any(g is b for b in comp.baselines)
        styles[g.label] = {"color": PALETTE[i % len(PALETTE)], "linestyle": "--" if baseline else "-",
                           "linewidth": 2.0 if baseline else 1.8}

    figures, full_panels, full_ys = [], [], []
    for axis, name in (("flops", "loss_vs_flops"), ("wall", "loss_vs_wall")):
        fig = Figure(figsize=(13, 5.5), layout="constrained")
        full, end = fig.subplots(1, 2, width_ratios=(3, 2))
        drawn = []  # (x, y) of every validation curve and marker, for the axis ranges
        for ax in (full, end):
            drawn = []
            for g in comp.groups:
                baseline = any(g is b for b in comp.baselines)
                label = g.label + (" (baseline)" if baseline else "") + \
                    (f" (n={len(g.runs)})" if len(g.runs) > 1 else "")
                drawn += _plot_group(ax, g, comp.metric, axis, styles[g.label], label if ax is full else None)
            if comp.target is not None:
                ax.axhline(comp.target, color="0.4", linestyle=":", linewidth=1.3,
                           label=f"target {comp.metric} = {comp.target:.4f}" if ax is full else None)
        xs = np.concatenate([x for x, _ in drawn]) if drawn else np.array([])
        ys = np.concatenate([y for _, y in drawn]) if drawn else np.array([])
        full_panels.append(full)
        full_ys.append(ys)
        if len(xs):
            lo, hi = float(xs.min()), float(xs.max())
            start = END_SHARE * hi
            if axis == "flops":
                full.set_xlim(lo / 1.2, hi * 1.2)  # the validation curves' span (and every marker)
                end.set_xlim(start, hi * 1.05)
            else:
                full.set_xlim(min(0.0, lo), hi * 1.03)
                end.set_xlim(start, hi * 1.02)
            # what the end panel shows of each curve: its points past `start`, and where it enters
            end_ys = np.concatenate([np.append(y[x >= start], _on_line(start, x, y, axis == "flops"))
                                     if len(x) > 1 and x[0] < start < x[-1] else y[x >= start] for x, y in drawn])
            if len(end_ys):
                span = float(end_ys.max() - end_ys.min())
                near = comp.target is not None and end_ys.min() - span <= comp.target <= end_ys.max() + span
                end.set_ylim(*_padded(np.append(end_ys, comp.target) if near else end_ys))
        for ax in (full, end):
            if axis == "flops":
                ax.set_xscale("log")
                ax.set_xlabel("cumulative training FLOPs (log scale)")
            else:
                ax.set_xlabel("cumulative training wall-clock [s]")
            ax.set_ylabel(METRIC_NAMES[comp.metric])
            ax.grid(True, which="major", alpha=0.4)
            ax.grid(True, which="minor", alpha=0.12)
        what = "training compute" if axis == "flops" else "training wall-clock"
        full.set_title(f"{comp.metric} vs {what}")
        end.set_title(f"the end of the runs (from {END_SHARE:.0%} of the largest {'FLOPs' if axis == 'flops' else 'time'})")
        if any(len(g.runs) > 1 for g in comp.groups):
            full.plot([], [], color="0.5", linewidth=0.7, alpha=0.5, label="each run (thin); group mean (thick)")
        full.plot([], [], linestyle="none", marker="^", markerfacecolor="white", markeredgecolor="black",
                  label="growth event (before the first evaluation: on the train loss)")
        if comp.metric == "val_loss":
            full.plot([], [], color="0.5", alpha=0.3, linewidth=0.8, label="train loss (faint)")
        full.legend(fontsize="small", loc="upper right")
        figures.append((name, fig))
    ys = np.concatenate(full_ys)
    if len(ys):
        # both figures' full panels on one scale, set by the validation curves, markers and target
        ylim = _padded(ys if comp.target is None else np.append(ys, comp.target))
        for ax in full_panels:
            ax.set_ylim(*ylim)
    return figures


def _padded(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = 0.05 * (hi - lo) if hi > lo else 0.1
    return lo - pad, hi + pad


def _plot_group(ax, group: Group, metric: str, axis: str, style: dict, label: str | None):
    """Draw one group: each run's curve thin, the mean over the runs thick (over the full range,
    each point averaging the runs that reach it), faint train loss and growth markers; returns
    the (x, y) of the validation curves and markers drawn (for the axis ranges)."""
    log_x = axis == "flops"
    curves = []
    for run in group.runs:
        flops, wall, value = run.curve(metric)
        x = flops if axis == "flops" else wall
        keep = np.isfinite(x) & ((x > 0) if log_x else True)  # log axis: no zero
        if keep.any():
            curves.append((x[keep], value[keep]))
    if not curves:
        return []
    x, mean = _mean_curve(curves)
    ax.plot(x, mean, label=label, zorder=3, **style)
    if len(curves) > 1:
        for cx, cy in curves:
            ax.plot(cx, cy, color=style["color"], linestyle="-", linewidth=0.7, alpha=0.5, zorder=2)
    drawn = [(x, mean), *curves]

    train_curves = {}
    for run in group.runs:
        key = "flops" if axis == "flops" else "wall_time"
        rows = [r for r in run.train if finite(r.get("loss")) and finite(r.get(key))]
        tx = np.array([float(r[key]) for r in rows])
        ty = np.array([float(r["loss"]) for r in rows])
        keep = np.isfinite(tx) & ((tx > 0) if log_x else True)
        train_curves[id(run)] = (tx[keep], ty[keep])
        if metric == "val_loss":
            ax.plot(tx[keep], ty[keep], color=style["color"], alpha=0.2, linewidth=0.8, zorder=1)

    for run in group.runs:
        tx, ty = train_curves[id(run)]
        for event in run.growth:
            gx = _event_x(run, event, axis)
            if gx is None or (log_x and gx <= 0):
                continue
            if x[0] <= gx <= x[-1]:
                gy = _on_line(gx, x, mean, log_x)
            elif metric == "val_loss" and len(tx) and tx[0] <= gx <= tx[-1]:
                gy = _on_line(gx, tx, ty, log_x)  # before the first evaluation: on the train-loss curve
            else:
                continue  # outside every curve drawn: no point of a line to put it on
            ax.plot([gx], [gy], linestyle="none", marker="^", markersize=8, markerfacecolor=style["color"],
                    markeredgecolor="black", zorder=4)
            drawn.append((np.array([gx]), np.array([gy])))
    return drawn


def _on_line(gx: float, x: np.ndarray, y: np.ndarray, log_x: bool) -> float:
    """The y of the drawn polyline at gx. On a log axis a segment is straight in log x, so the
    interpolation is in log x too (linear in x would put the marker off the line)."""
    if log_x:
        return float(np.interp(np.log(gx), np.log(x), y))
    return float(np.interp(gx, x, y))


def _event_x(run: Run, event: dict, axis: str) -> float | None:
    if axis == "flops":
        return float(event["flops"]) if finite(event.get("flops")) else None
    if finite(event.get("wall_time")):
        return float(event["wall_time"])
    # growth.jsonl lines without wall_time: read it off the run's own FLOPs-to-time mapping
    return run.wall_at_flops(float(event["flops"])) if finite(event.get("flops")) else None


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]):
    """The mean of several curves on the union of their x points. Each point averages the curves
    whose range covers it (none is extrapolated), so the mean spans the full range and a seed
    that ran longer, or ran slower in wall-clock, is not cut away."""
    if len(curves) == 1:
        return curves[0]
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    values = np.full((len(curves), len(grid)), np.nan)
    for i, (cx, cy) in enumerate(curves):
        inside = (grid >= cx[0]) & (grid <= cx[-1])
        values[i, inside] = np.interp(grid[inside], cx, cy)
    return grid, np.nanmean(values, axis=0)
