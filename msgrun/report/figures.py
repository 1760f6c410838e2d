"""Rendering the comparison as figures: loss against FLOPs and against wall-clock (PNG, SVG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from msgrun.report.compare import Comparison, Group
from msgrun.report.runs import METRIC_NAMES, Run, finite


def plot(comp: Comparison, out_dir: Path) -> list[Path]:
    """loss_vs_flops and loss_vs_wall, as PNG and SVG."""
    # Figure without pyplot: no global state and no GUI backend, just Agg, so this works in
    # tests, over ssh and inside other programs
    from matplotlib.figure import Figure

    # tab10 without its grey, which reads as the baseline's black
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
               "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    styles = {}
    others = [g for g in comp.groups if not any(g is b for b in comp.baselines)]
    for i, g in enumerate(others):
        styles[g.label] = {"color": colours[i % len(colours)], "linestyle": "-", "linewidth": 1.8}
    # baselines in black and greys, dashed: several exist when arms have matched baselines
    for i, g in enumerate(comp.baselines):
        styles[g.label] = {"color": str(min(0.6, 0.2 * i)), "linestyle": ("--", "-.", ":")[i % 3], "linewidth": 2.0}

    written = []
    ylim = None
    for axis, name in (("flops", "loss_vs_flops"), ("wall", "loss_vs_wall")):
        fig = Figure(figsize=(9, 5.5), layout="constrained")
        ax = fig.subplots()
        plotted, xs = [], []
        for g in comp.groups:
            baseline = any(g is b for b in comp.baselines)
            label = g.label + (" (baseline)" if baseline else "") + (f" (n={len(g.runs)})" if len(g.runs) > 1 else "")
            x, values = _plot_group(ax, g, comp.metric, axis, styles[g.label], label)
            xs.append(x)
            plotted += values
        if comp.target is not None:
            ax.axhline(comp.target, color="0.4", linestyle=":", linewidth=1.3, label=f"target {comp.metric} = {comp.target:.4f}")
            plotted.append(np.array([comp.target]))
        if ylim is None and plotted:
            values = np.concatenate(plotted)
            lo, hi = float(np.min(values)), float(np.max(values))
            pad = 0.05 * (hi - lo) if hi > lo else 0.1
            ylim = (lo - pad, hi + pad)
        if ylim:
            ax.set_ylim(*ylim)  # both figures on one scale, set by the validation curves
        if axis == "flops":
            ax.set_xscale("log")
            x = np.concatenate(xs)
            if len(x):
                # the validation curves' span: faint train loss logged earlier would widen it
                ax.set_xlim(x.min() / 1.2, x.max() * 1.2)
            ax.set_xlabel("cumulative training FLOPs (log scale)")
            ax.set_title(f"{comp.metric} vs training compute")
        else:
            ax.set_xlabel("cumulative training wall-clock [s]")
            ax.set_title(f"{comp.metric} vs training wall-clock")
        ax.set_ylabel(METRIC_NAMES[comp.metric])
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.12)
        if any(len(g.runs) > 1 for g in comp.groups):
            ax.plot([], [], color="0.5", linewidth=0.7, alpha=0.5, label="each run (thin); group mean (thick)")
        ax.plot([], [], linestyle="none", marker="^", markerfacecolor="white", markeredgecolor="black", label="growth event")
        if comp.metric == "val_loss":
            ax.plot([], [], color="0.5", alpha=0.3, linewidth=0.8, label="train loss (faint)")
        ax.legend(fontsize="small", loc="upper right")
        for suffix in ("png", "svg"):
            path = out_dir / f"{name}.{suffix}"
            fig.savefig(path, dpi=150)
            written.append(path)
    return written


def _plot_group(ax, group: Group, metric: str, axis: str, style: dict, label: str):
    """Draw one group: each run's curve thin, the mean over the runs thick (over the full range,
    each point averaging the runs that reach it), faint train loss and growth markers; returns
    the x and the validation values drawn (for the axis ranges)."""
    curves = []
    for run in group.runs:
        flops, wall, value = run.curve(metric)
        x = flops if axis == "flops" else wall
        keep = np.isfinite(x) & ((x > 0) if axis == "flops" else True)  # log axis: no zero
        if keep.any():
            curves.append((x[keep], value[keep]))
    if not curves:
        return np.array([]), []
    x, mean = _mean_curve(curves)
    ax.plot(x, mean, label=label, zorder=3, **style)
    if len(curves) > 1:
        for cx, cy in curves:
            ax.plot(cx, cy, color=style["color"], linestyle="-", linewidth=0.7, alpha=0.5, zorder=2)

    if metric == "val_loss":
        for run in group.runs:
            key = "flops" if axis == "flops" else "wall_time"
            rows = [r for r in run.train if finite(r.get("loss")) and finite(r.get(key))]
            tx = np.array([float(r[key]) for r in rows])
            ty = np.array([float(r["loss"]) for r in rows])
            keep = np.isfinite(tx) & ((tx > 0) if axis == "flops" else True)
            ax.plot(tx[keep], ty[keep], color=style["color"], alpha=0.2, linewidth=0.8, zorder=1)

    for run in group.runs:
        for event in run.growth:
            gx = _event_x(run, event, axis)
            if gx is not None and x[0] <= gx <= x[-1]:
                ax.plot([gx], [np.interp(gx, x, mean)], linestyle="none", marker="^", markersize=8,
                        markerfacecolor=style["color"], markeredgecolor="black", zorder=4)
    return x, [mean, *(c[1] for c in curves)]


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
