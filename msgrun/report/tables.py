"""Rendering the comparison as text: the rich console table, table.csv, table.md, and their
footnotes; write_report() also draws the figures."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from msgrun.report.compare import Comparison, Row
from msgrun.report.figures import plot
from msgrun.report.runs import DASH, NOT_REACHED

COLUMNS = [
    ("label", "group"),
    ("n", "n"),
    ("status", "status"),
    ("final", "final {metric}"),
    ("flops", "FLOPs"),
    ("wall_time", "wall-clock"),
    ("flops_to_target", "FLOPs to target"),
    ("wall_to_target", "wall-clock to target"),
    ("speedup_flops", "speedup (FLOPs)"),
    ("speedup_wall", "speedup (wall)"),
    ("gap", "Δ{metric} at equal FLOPs ¹"),
    ("growth_events", "growth events"),
]


def format_row(row: Row) -> dict[str, str]:
    """Display strings for a row (the rich table and table.md)."""
    not_reached = NOT_REACHED if row.n == 1 else f"{NOT_REACHED} ({row.reached}/{row.n})"
    reached = row.flops_to_target is not None
    final = DASH if row.final_mean is None else f"{row.final_mean:.4f}"
    if row.final_std is not None:
        final += f" ± {row.final_std:.4f}"
    lo, hi = row.growth_events
    return {
        "label": row.label + (" (baseline)" if row.is_baseline else ""),
        "n": str(row.n),
        "status": row.status,
        "final": final,
        "flops": _fmt_flops(row.flops),
        "wall_time": _fmt_seconds(row.wall_time),
        "flops_to_target": _fmt_flops(row.flops_to_target) if reached else not_reached,
        "wall_to_target": _fmt_seconds(row.wall_to_target) if reached else not_reached,
        "speedup_flops": DASH if row.speedup_flops is None else f"{row.speedup_flops:.2f}×",
        "speedup_wall": DASH if row.speedup_wall is None else f"{row.speedup_wall:.2f}×",
        "gap": DASH if row.gap is None else f"{row.gap:+.4f} @ {_fmt_flops(row.gap_flops)}",
        "growth_events": str(lo) if lo == hi else f"{lo}–{hi}",
    }


def _csv_record(row: Row) -> dict:
    # Full precision for numbers; the same words as the table where there is no number, so a
    # run that missed the target can never be read as having a to-target cost
    shown = format_row(row)
    reached = row.flops_to_target is not None
    return {
        "label": row.label,
        "baseline": row.is_baseline,
        "n": row.n,
        "status": row.status,
        "final_mean": _num(row.final_mean),
        "final_std": _num(row.final_std),
        "flops": _num(row.flops),
        "wall_time_s": _num(row.wall_time),
        "reached_target": f"{row.reached}/{row.n}",
        "flops_to_target": _num(row.flops_to_target) if reached else shown["flops_to_target"],
        "wall_to_target_s": _num(row.wall_to_target) if reached else shown["wall_to_target"],
        "speedup_flops": _num(row.speedup_flops) if row.speedup_flops is not None else DASH,
        "speedup_wall": _num(row.speedup_wall) if row.speedup_wall is not None else DASH,
        "gap_at_equal_flops": _num(row.gap) if row.gap is not None else DASH,
        "gap_flops": _num(row.gap_flops),
        "growth_events_min": row.growth_events[0],
        "growth_events_max": row.growth_events[1],
        "runs": ";".join(row.runs),
    }


def _num(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def _fmt_flops(x: float | None) -> str:
    if x is None:
        return DASH
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return DASH
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def footnotes(comp: Comparison) -> list[str]:
    m = comp.metric
    target = "none" if comp.target is None else f"{comp.target:.4f} ({comp.target_source})"
    return [
        f"Target {m}: {target}.",
        "To target: first evaluation at or below the target, linearly interpolated between the "
        "two evaluations that bracket the crossing (wall-clock at the same point); for several "
        "seeds the mean, given only when every seed reached it.",
        "Speedup: the baseline's to-target cost divided by the group's (above 1: cheaper).",
        f"¹ Δ{m} at equal FLOPs: the group's {m} minus the baseline's, both linearly interpolated "
        "between evaluations at the same FLOPs, the smaller of the two groups' final evaluated "
        "FLOPs (after @); negative is better. It needs no target, so it stays meaningful where "
        "flat curves make FLOPs-to-target ill-conditioned.",
        "± is the sample standard deviation over seeds; n counts runs.",
    ]


def write_report(comp: Comparison, out_dir: Path) -> list[Path]:
    """Write figures (PNG, SVG) and the table (CSV, Markdown) to out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = plot(comp, out_dir)
    written.append(_write_csv(comp, out_dir / "table.csv"))
    written.append(_write_markdown(comp, out_dir / "table.md", figures=[p.name for p in written if p.suffix == ".png"]))
    return written


def _headers(comp: Comparison) -> list[str]:
    return [title.format(metric=comp.metric) for _, title in COLUMNS]


def _write_csv(comp: Comparison, path: Path) -> Path:
    records = [_csv_record(r) for r in comp.rows]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def _write_markdown(comp: Comparison, path: Path, figures: list[str]) -> Path:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [f"# msgrun report: {comp.metric}", ""]
    out += [line(_headers(comp)), line(["---"] * len(COLUMNS))]
    out += [line(format_row(r)[key] for key, _ in COLUMNS) for r in comp.rows]
    out += [""] + [f"- {n}" for n in footnotes(comp)]
    if comp.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in comp.notes]
    out += [""] + [f"![{name}]({name})" for name in figures]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def print_table(comp: Comparison, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # rich wraps to 80 columns when output is not a terminal; the table is wider than that
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"msgrun report: {comp.metric}", header_style="bold")
    for header in _headers(comp):
        table.add_column(header, overflow="fold")
    for row in comp.rows:
        cells = format_row(row)
        style = "bold" if row.is_baseline else ("yellow" if row.status != "completed" else None)
        table.add_row(*(cells[key] for key, _ in COLUMNS), style=style)
    console.print(table)
    for note in footnotes(comp):
        console.print(note, style="dim", markup=False, highlight=False)
    for note in comp.notes:
        console.print("note: " + note, markup=False, highlight=False)
