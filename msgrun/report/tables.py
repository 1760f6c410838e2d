"""Rendering the comparison as text: a one-line headline per group on the terminal, the full
table with its footnotes in table.csv and table.md; write_report() also draws the figures."""

from __future__ import annotations

import csv
import math
import shutil
import sys
import textwrap
from pathlib import Path

from msgrun.report import frontier
from msgrun.report.compare import Comparison, Row
from msgrun.report.figures import plot
from msgrun.report.runs import DASH, NOT_REACHED
from msgrun.report.stats import Interval
from msgrun.report.wallclock import WALL_SPREAD

NOT_DISTINGUISHABLE = "not distinguishable from"

COLUMNS = [
    ("label", "group"),
    ("baseline", "compared with"),
    ("n", "n"),
    ("status", "status"),
    ("final", "final {metric}"),
    ("flops", "FLOPs"),
    ("wall_time", "wall-clock"),
    ("flops_to_target", "FLOPs to target ¹"),
    ("speedup_flops", "speedup (FLOPs) ²"),
    ("speedup_wall", "speedup (wall) ³"),
    ("speedup_wall_normalised", "speedup (wall, normalised) ³"),
    ("gap", "Δ{metric} at equal FLOPs ⁴"),
    ("cost_ratio", "cost ratio ⁵"),
    ("growth_events", "growth events"),
]


def format_row(row: Row) -> dict[str, str]:
    """Display strings for a row (the rich table and table.md)."""
    counted = len(row.pairs) or row.n
    not_reached = NOT_REACHED if counted == 1 else f"{NOT_REACHED} ({row.reached}/{counted})"
    reached = row.flops_to_target is not None
    final = DASH if row.final_mean is None else f"{row.final_mean:.4f}"
    if row.final_std is not None:
        final += f" ± {row.final_std:.4f}"
    lo, hi = row.growth_events
    tried = bool(row.pairs) or row.flops_to_target is not None or row.reached
    if row.baseline is None:
        baseline = "(baseline)" if row.is_baseline else DASH
    else:
        baseline = f"{row.baseline} ({row.baseline_kind})"
    cells = {
        "label": row.label,
        "baseline": baseline,
        "n": str(row.n) if not row.pairs or len(row.pairs) == row.n else f"{row.n} ({len(row.pairs)} paired)",
        "status": row.status,
        "final": final,
        "flops": _fmt_flops(row.flops),
        "wall_time": _fmt_seconds(row.wall_time),
        "flops_to_target": _fmt_flops(row.flops_to_target) if reached else (not_reached if tried else DASH),
        "speedup_flops": _fmt_interval(row.speedup_flops, "{:.2f}×"),
        "speedup_wall": _fmt_interval(row.speedup_wall, "{:.2f}×") if not row.wall_problems else "unreliable ³",
        "speedup_wall_normalised": _fmt_interval(row.speedup_wall_normalised, "{:.2f}×"),
        "gap": _fmt_interval(row.gap, "{:+.4f}") + ("" if row.gap_flops is None else f" @ {_fmt_flops(row.gap_flops)}"),
        "cost_ratio": DASH if row.cost_ratio is None else f"{row.cost_ratio:.2f}×",
        "growth_events": str(lo) if lo == hi else f"{lo}–{hi}",
    }
    cells.update({key: f"{value:.4g}" for key, value in row.downstream.items()})
    return cells


def _fmt_interval(iv: Interval | None, fmt: str) -> str:
    """'1.52× [1.31, 1.76]', with n, and the verdict where the interval covers no effect."""
    if iv is None:
        return DASH
    text = fmt.format(iv.estimate)
    if iv.lo is None:
        return text + " (n=1, no interval)"
    text += f" [{fmt.format(iv.lo)}, {fmt.format(iv.hi)}] n={iv.n}"
    if not iv.distinguishable:
        text += f", {NOT_DISTINGUISHABLE} {'1×' if iv.null == 1 else '0'}"
    return text


def _csv_record(row: Row, downstream_keys: list[str] = ()) -> dict:
    # Full precision for numbers; the same words as the table where there is no number, so a
    # run that missed the target can never be read as having a to-target cost
    shown = format_row(row)
    reached = row.flops_to_target is not None
    record = {
        "label": row.label,
        "baseline": row.is_baseline,
        "compared_with": row.baseline or "",
        "baseline_kind": row.baseline_kind or "",
        "n": row.n,
        "pairs": len(row.pairs),
        "status": row.status,
        "final_mean": _num(row.final_mean),
        "final_std": _num(row.final_std),
        "flops": _num(row.flops),
        "wall_time_s": _num(row.wall_time),
        "reached_target": f"{row.reached}/{len(row.pairs) or row.n}",
        "flops_to_target": _num(row.flops_to_target) if reached else shown["flops_to_target"],
        "wall_to_target_s": _num(row.wall_to_target) if reached else shown["flops_to_target"],
    }
    for name in ("speedup_flops", "speedup_wall", "speedup_wall_normalised", "gap"):
        iv = getattr(row, name)
        record[name] = _num(iv.estimate) if iv else DASH
        record[f"{name}_ci_low"] = _num(iv.lo) if iv else ""
        record[f"{name}_ci_high"] = _num(iv.hi) if iv else ""
        record[f"{name}_distinguishable"] = "" if iv is None or iv.distinguishable is None else iv.distinguishable
    record.update({
        "gap_flops": _num(row.gap_flops),
        "cost_ratio": _num(row.cost_ratio),
        "wall_problems": "; ".join(row.wall_problems),
        "growth_events_min": row.growth_events[0],
        "growth_events_max": row.growth_events[1],
        "runs": ";".join(row.runs),
    })
    record.update({key: _num(row.downstream.get(key)) for key in downstream_keys})
    return record


def _pair_records(comp: Comparison) -> list[dict]:
    """pairs.csv: every per-seed comparison with the evaluations that bracket each crossing."""
    records = []
    for row in comp.rows:
        for p in row.pairs:
            record = {"group": row.label, "compared_with": row.baseline, "seed": p.seed, "run": p.run,
                      "baseline_run": p.baseline_run, "target": _num(p.target)}
            for side, hit in (("arm", p.arm), ("baseline", p.base)):
                record[f"{side}_flops_to_target"] = _num(hit.flops) if hit else NOT_REACHED
                record[f"{side}_wall_to_target_s"] = _num(hit.wall) if hit else ""
                record[f"{side}_bracket_before"] = "" if not hit or not hit.before else f"{hit.before[0]!r}:{hit.before[1]!r}"
                record[f"{side}_bracket_after"] = f"{hit.after[0]!r}:{hit.after[1]!r}" if hit else ""
            record.update({name: _num(getattr(p, name)) for name in (
                "speedup_flops", "speedup_wall", "speedup_wall_normalised", "gap", "gap_flops", "cost_ratio")})
            records.append(record)
    return records


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
    target = (f"{comp.target:.4f} (--target) for every run" if comp.target is not None else
              "per seed pair, the worse (higher) of the two runs' final values, which both reach")
    return [
        "Groups: runs that differ only in train.seed. Each group is compared with a from-scratch baseline "
        "(compared with): 'matched' = trained with train.max_flops at the group's FLOPs (both annealed at the "
        "point compared) and equal to the group in every saved setting outside the growth choices and the "
        "budget (a from-scratch group that differs elsewhere is never used, and a note names the keys); 'largest budget' = the longest from-scratch run, mid-schedule where it is compared; "
        "'--baseline' = chosen by hand. Runs of one seed (same data, same order) form a pair; n counts runs.",
        f"¹ Target {m}: {target}. A run reaches it where its curve crosses it and stays at or below it at every "
        "later evaluation, linearly interpolated between the two evaluations that bracket that crossing "
        "(pairs.csv lists them). FLOPs to target: the mean, given only when every run reached it.",
        "² Speedup: the baseline's cost to the target divided by the group's, per pair, then the geometric mean "
        "and a 95% Student-t interval of the log ratios [low, high]; 'not distinguishable from 1×' where the "
        "interval covers 1. Where the group ends better this is FLOPs to the baseline's final loss (G_stack's "
        "construction); where it ends worse, the baseline's FLOPs to the group's final loss.",
        "³ Raw wall-clock speedup is shown as 'unreliable' (and the reason listed below) when the runs ran on "
        f"different devices or world sizes, or a group's wall time per FLOP varies more than "
        f"{WALL_SPREAD}× across seeds. Normalised: the FLOPs spent at each shape divided by the median "
        "steady-state FLOP/s at that shape over the group's and its baseline's runs, plus growth events' seconds: "
        "a wall-clock estimate without the machine's load.",
        f"⁴ Δ{m} at equal FLOPs: per pair the group's {m} minus the baseline's, both linearly interpolated at the "
        "smaller of the two runs' final evaluated FLOPs (mean after @); mean and 95% t interval; negative is "
        "better. It needs no target, so it stays meaningful where flat curves make FLOPs-to-target "
        "ill-conditioned.",
        "⁵ Cost ratio: the baseline's total training FLOPs / the group's (MSG's fixed-step construction): a "
        "saving only where the final values match.",
        "± is the sample standard deviation over seeds." + (
            f" Downstream results ({', '.join(comp.downstream_keys)}): mean over the runs that have them."
            if comp.downstream_keys else ""),
    ] + comp.definitions


def write_report(comp: Comparison, out_dir: Path) -> list[Path]:
    """Write figures (PNG, SVG), the table (CSV, Markdown) and the per-seed pairs (CSV) to
    out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = plot(comp, out_dir)
    written.append(_write_csv([_csv_record(r, comp.downstream_keys) for r in comp.rows], out_dir / "table.csv"))
    pairs = _pair_records(comp)
    if pairs:
        written.append(_write_csv(pairs, out_dir / "pairs.csv"))
    written += frontier.write(comp.frontier, out_dir)  # frontier.csv, frontier.png (frontier.py)
    written.append(_write_markdown(comp, out_dir / "table.md", figures=[p.name for p in written if p.suffix == ".png"]))
    return written


def columns(comp: Comparison) -> list[tuple[str, str]]:
    """(key, header) of the table's columns: the fixed ones and any downstream results."""
    fixed = [(key, title.format(metric=comp.metric)) for key, title in COLUMNS]
    return fixed + [(key, key) for key in comp.downstream_keys]


def _write_csv(records: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def _write_markdown(comp: Comparison, path: Path, figures: list[str]) -> Path:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    cols = columns(comp)
    out = [f"# msgrun report: {comp.metric}", ""]
    out += [line(title for _, title in cols), line(["---"] * len(cols))]
    out += [line(format_row(r).get(key, DASH) for key, _ in cols) for r in comp.rows]
    out += [""] + [f"- {n}" for n in footnotes(comp)]
    if comp.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in comp.notes]
    out += [""] + [f"![{name}]({name})" for name in figures]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def headline(row: Row, metric: str) -> str:
    """One line for a group: what it is compared with, the FLOPs speed-up and the loss gap at
    equal FLOPs, each with its interval (the full table, with every other column, is table.md)."""
    cells = format_row(row)
    state = "" if row.status == "completed" else f" [{row.status}]"
    runs = f"n={cells['n']}, final {metric} {cells['final']}"
    if row.baseline is None:
        what = "baseline" if row.is_baseline else "no baseline to compare with"
        return f"{row.label}{state}: {what}; {runs}"
    speedup = cells["speedup_flops"]
    if row.speedup_flops is None:
        speedup += f" (FLOPs to target: {cells['flops_to_target']})"
    return (f"{row.label}{state} vs {row.baseline} ({row.baseline_kind}): speed-up (FLOPs) {speedup}; "
            f"Δ{metric} at equal FLOPs {cells['gap']}; {runs}")


def print_table(comp: Comparison, out_dir: Path | None = None, file=None) -> None:
    """The terminal report: one headline per group, wrapped at spaces only (a number is never
    cut in two), then the notes. The 14-column table does not fit a terminal: it is written to
    table.md and table.csv, with its footnotes."""
    file = file or sys.stdout
    width = max(shutil.get_terminal_size((120, 24)).columns, 60)

    def say(text: str, indent: str = "  ") -> None:
        print(textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent + "    ",
                            break_long_words=False, break_on_hyphens=False), file=file)

    where = f"{out_dir}/table.md" if out_dir is not None else "table.md"
    say(f"msgrun report: {comp.metric}, one line per group (every column and the definitions: {where})", "")
    for row in comp.rows:
        say(headline(row, comp.metric))
    for note in comp.notes:
        say("note: " + note, "")
