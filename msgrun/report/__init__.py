"""msgrun-report: loss-vs-FLOPs curves and speedup tables from finished (or running) runs.

    msgrun-report multirun/2026-11-23/10-00-00 [more runs ...] [--target 2.0] [--metric val_bpb]

The report reads run files only (metrics.jsonl, growth.jsonl, summary.json, .hydra/*.yaml, or a
wandb offline folder), never torch or the rest of msgrun, so it runs on a laptop that holds
nothing but copied run directories.

Where things are:

* runs.py          one run (`Run`) and reading it from a run directory;
* wandb_folder.py  reading a wandb offline run folder instead;
* discover.py      `load_runs(paths)`: finding runs under directories the user names;
* compare.py       the comparison: labels, seed groups, each group's baseline (matched or
                   not), seed pairs, targets and the stays-below crossing, loss gap at equal
                   FLOPs, checks of data, evaluation settings and data order (`analyse`);
* stats.py         means over pairs with 95% Student-t intervals;
* wallclock.py     when raw wall-clock can be compared, and a throughput-normalised estimate;
* tables.py        the console table, table.csv, pairs.csv, table.md and footnotes (`write_report`);
* figures.py       loss against FLOPs and against wall-clock;
* cli.py           the `msgrun-report` command.

What the comparison computes, and why: docs/architecture.md section 4 and the footnotes every
report prints.
"""

from msgrun.report.cli import main
from msgrun.report.compare import Comparison, Crossing, Group, Pair, Row, analyse, compare, crossing, to_target
from msgrun.report.discover import load_runs
from msgrun.report.runs import MixedDataError, ReportError, Run
from msgrun.report.tables import format_row, write_report

__all__ = ["Comparison", "Crossing", "Group", "Pair", "crossing", "MixedDataError", "ReportError", "Row", "Run", "analyse", "compare",
           "format_row", "load_runs", "main", "to_target", "write_report"]
