"""The msgrun-report command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msgrun.report.compare import analyse
from msgrun.report.discover import load_runs
from msgrun.report.runs import METRICS, ReportError
from msgrun.report.tables import print_table, write_report


def _default_out_dir(first: Path) -> Path:
    # a sweep's report belongs next to its runs; anything else goes to the working directory
    if first.is_dir() and not (first / "metrics.jsonl").exists():
        if (first / "multirun.yaml").exists() or any(
            (child / "metrics.jsonl").is_file() for child in first.iterdir() if child.name.isdigit()
        ):
            return first / "report"
    return Path("report")


def build_parser() -> argparse.ArgumentParser:
    # argparse %-formats the help of arguments but prints description and epilog as written: "95%", not "95%%"
    parser = argparse.ArgumentParser(
        prog="msgrun-report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare msgrun runs: loss-vs-FLOPs and loss-vs-wall-clock curves; per seed pair, speed-ups to a\n"
        "target loss and loss gaps at equal FLOPs against each group's (matched) from-scratch baseline, with\n"
        "95% confidence intervals. The terminal shows one line per group; the full table goes to table.md and\n"
        "table.csv, the curves to a PNG, all in the output directory. Definitions: the report's footnotes and\n"
        "docs/sweeps.md.",
        epilog="examples:\n"
        "  msgrun -m schedule=none,depth_first operator=msg train.seed=0,1,2   a sweep to compare\n"
        "  msgrun-report multirun/2026-11-23/10-00-00            its report, written to that sweep's report/\n"
        "  msgrun-report outputs/a outputs/b --out cmp            two single runs\n"
        "  msgrun-report multirun/... --metric val_bpb --target 1.7\n"
        "  msgrun-report multirun/... --baseline none/none        one baseline group (its label) for every group",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run directories, multirun directories (searched recursively) or wandb offline run folders")
    parser.add_argument("--target", type=float, default=None,
                        help="one target value of the metric for every run (default: per seed pair, the worse of "
                        "the two runs' final values)")
    parser.add_argument("--metric", choices=METRICS, default="val_loss", help="validation metric (default: val_loss)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: report/ in the first PATH if it is a multirun directory, else ./report)")
    parser.add_argument("--baseline", default=None, metavar="LABEL",
                        help="label (or unique part of one) of the baseline group for every other group (default: "
                        "per group, its matched schedule=none group, trained with train.max_flops at the group's "
                        "FLOPs, else the schedule=none group with the largest budget)")
    parser.add_argument("--allow-mixed-data", action="store_true",
                        help="compare runs even if their data, tokenizer, evaluation settings or data order differ")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = load_runs(args.paths)
        comp = analyse(runs, target=args.target, metric=args.metric, baseline=args.baseline,
                       allow_mixed_data=args.allow_mixed_data)
    except ReportError as e:
        print(f"msgrun-report: error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out or _default_out_dir(Path(args.paths[0]))
    print_table(comp, out_dir)
    written = write_report(comp, out_dir)
    print(f"report written to {out_dir}/: " + ", ".join(p.name for p in written))
    return 0

