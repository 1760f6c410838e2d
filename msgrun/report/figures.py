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
    others = [g for g in comp.groups if g is not comp.baseline]
    for i, g in enumerate(others):
        styles[g.label] = {"color": colours[i % len(colours)], "linestyle": "-", "linewidth": 1.8}
    if comp.baseline is not None:
        styles[comp.baseline.label] = {"color": "black", "linestyle": "--", "linewidth": 2.0}

    written = []
    ylim = None
    for axis, name in (("flops", "loss_vs_flops"), ("wall", "loss_vs_wall")):
        fig = Figure(figsize=(9, 5.5), layout="constrained")
        ax = fig.subplots()
        plotted, xs = [], []
        for g in comp.groups:
            label = g.label + (" (baseline)" if g is comp.baseline else "") + (f" (n={len(g.runs)})" if len(g.runs) > 1 else "")
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
    """Draw one group's mean curve, min-max band, faint train loss and growth markers; returns
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
    x, mean, lo, hi = _mean_band(curves)
    ax.plot(x, mean, label=label, zorder=3, **style)
    if len(curves) > 1:
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, linewidth=0, zorder=2)

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
    return x, [mean, lo, hi]


def _event_x(run: Run, event: dict, axis: str) -> float | None:
    if axis == "flops":
        return float(event["flops"]) if finite(event.get("flops")) else None
    if finite(event.get("wall_time")):
        return float(event["wall_time"])
    # growth.jsonl lines without wall_time: read it off the run's own FLOPs-to-time mapping
    return run.wall_at_flops(float(event["flops"])) if finite(event.get("flops")) else None


def _mean_band(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Mean, min and max of several curves on the union of their x points, restricted to the
    range that all of them cover (so the mean never mixes in extrapolated values)."""
    if len(curves) == 1:
        x, y = curves[0]
        return x, y, y, y
    start = max(c[0][0] for c in curves)
    end = min(c[0][-1] for c in curves)
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    grid = grid[(grid >= start) & (grid <= end)]
    if not len(grid):
        grid = np.array([start]) if start <= end else curves[0][0]
    ys = np.array([np.interp(grid, cx, cy) for cx, cy in curves])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)
