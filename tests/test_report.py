"""msgrun-report on hand-made run directories whose answers are known in advance.

Every run below logs wall_time = flops * 1e-10, so a wall-clock result is its FLOPs result / 1e10.
"""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from msgrun import report
from msgrun.report import tables, wandb_folder
from msgrun.report import MixedDataError, ReportError, analyse, compare, load_runs, main

FIXTURES = Path(__file__).parent / "fixtures" / "report"
WALL_PER_FLOP = 1e-10


def write_run(
    d: Path,
    evals,
    *,
    schedule="depth_first",
    operator="msg",
    model="gpt_tiny",
    seed=0,
    overrides=(),
    growth=(),
    fingerprints=("data-1", "tok-1"),
    summary=True,
    status="completed",
):
    """A run directory whose evaluation points are `evals` = [(flops, val_loss), ...]."""
    d.mkdir(parents=True)
    lines = []
    for step, (flops, val) in enumerate(evals, start=1):
        counters = {"step": step * 100, "tokens": step * 1000, "flops": flops,
                    "wall_time": flops * WALL_PER_FLOP, "lr": 1e-3, "layers": 2, "hidden": 64,
                    "heads": 2, "ffn": 256, "seq_len": 64, "params": 1000}
        lines.append({**counters, "loss": val + 0.05})
        lines.append({**counters, "val_loss": val, "val_bpb": val / 2})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if growth:
        events = [{"step": 1, "tokens": 1, "flops": f, "wall_time": f * WALL_PER_FLOP, "operator": operator,
                   "dims": ["layers"], "before": {"layers": 1}, "after": {"layers": 2},
                   "probe_loss_before": 3.0, "probe_loss_after": 3.0, "max_abs_logit_diff": 0.0,
                   "seconds": 0.1} for f in growth]
        (d / "growth.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    choices = {"model": model, "schedule": schedule, "operator": operator, "data": "pystdlib"}
    task = [f"schedule={schedule}", f"operator={operator}", f"train.seed={seed}", *overrides]
    if summary:
        final_flops, final_val = evals[-1]
        (d / "summary.json").write_text(json.dumps({
            "status": status, "final_loss": final_val + 0.05, "final_val_loss": final_val,
            "final_val_bpb": final_val / 2, "flops": final_flops, "tokens": 1000 * len(evals),
            "wall_time": final_flops * WALL_PER_FLOP, "params": 1000, "steps": 100 * len(evals),
            "choices": choices, "overrides": task, "seed": seed,
            "data_fingerprint": fingerprints[0], "tokenizer_fingerprint": fingerprints[1],
        }))
    else:
        # what Hydra leaves behind for a run that crashed before writing its summary
        (d / ".hydra").mkdir()
        hydra = {"hydra": {"runtime": {"choices": {**choices, "hydra/launcher": "basic"}},
                           "overrides": {"task": task}}}
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}}))
    return d


# baseline reaches 2.0 exactly at its last evaluation, 1e12 FLOPs
BASELINE = [(2e11, 3.0), (5e11, 2.4), (1e12, 2.0)]
# crosses 2.0 halfway between (4e11, 2.2) and (6e11, 1.8): 5e11 FLOPs, a 2x speedup
GROWN = [(2e11, 2.6), (4e11, 2.2), (6e11, 1.8), (8e11, 1.7)]
NEVER = [(2e11, 2.9), (1e12, 2.5)]


def by_label(rows):
    return {r.label: r for r in rows}


def test_flops_to_target_is_interpolated_and_gives_speedup(tmp_path):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "grown", GROWN, growth=[3e11])
    comp = analyse(load_runs([tmp_path / "base", tmp_path / "grown"]))

    assert comp.target == pytest.approx(2.0)  # the baseline's final val_loss
    rows = by_label(comp.rows)
    base, grown = rows["none/none"], rows["depth_first/msg"]
    assert base.is_baseline and not grown.is_baseline
    assert base.flops_to_target == pytest.approx(1e12)
    assert grown.flops_to_target == pytest.approx(5e11)
    assert grown.wall_to_target == pytest.approx(5e11 * WALL_PER_FLOP)
    assert grown.speedup_flops == pytest.approx(2.0)
    assert grown.speedup_wall == pytest.approx(2.0)
    assert base.speedup_flops == pytest.approx(1.0)
    assert grown.growth_events == (1, 1) and base.growth_events == (0, 0)


def test_first_eval_already_below_target_counts_at_that_point(tmp_path):
    write_run(tmp_path / "r", [(3e11, 1.5), (6e11, 1.2)])
    (run,) = load_runs([tmp_path / "r"])
    assert report.to_target(run, "val_loss", 2.0) == pytest.approx((3e11, 3e11 * WALL_PER_FLOP))
    assert report.to_target(run, "val_loss", 1.0) is None


def test_run_that_never_reaches_target_says_not_reached(tmp_path):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "never", NEVER, schedule="width_first")
    comp = analyse(load_runs([tmp_path]))
    never = by_label(comp.rows)["width_first/msg"]
    assert never.flops_to_target is None and never.speedup_flops is None and never.speedup_wall is None
    cells = report.format_row(never)
    assert cells["flops_to_target"] == "not reached"
    assert cells["wall_to_target"] == "not reached"
    assert cells["speedup_flops"] == "—"
    record = tables._csv_record(never)
    assert record["flops_to_target"] == "not reached" and record["speedup_flops"] == "—"


def test_seeds_form_one_group_with_mean_and_spread(tmp_path):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "s1", GROWN, seed=1)  # reaches 2.0 at 5e11
    write_run(tmp_path / "s2", [(2e11, 2.6), (6e11, 2.2), (8e11, 1.8)], seed=2)  # at 7e11
    rows = compare(load_runs([tmp_path]))
    assert len(rows) == 2
    grown = by_label(rows)["depth_first/msg"]
    assert grown.n == 2 and [Path(r).name for r in grown.runs] == ["s1", "s2"]
    assert grown.final_mean == pytest.approx((1.7 + 1.8) / 2)
    assert grown.final_std == pytest.approx(0.0707107, rel=1e-5)  # sample std of 1.7, 1.8
    assert grown.flops_to_target == pytest.approx(6e11)
    assert grown.speedup_flops == pytest.approx(1e12 / 6e11)
    assert "±" in report.format_row(grown)["final"]


def test_group_where_one_seed_misses_target_reports_k_of_n(tmp_path):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "s1", GROWN, seed=1)
    write_run(tmp_path / "s2", NEVER, seed=2)
    grown = by_label(compare(load_runs([tmp_path])))["depth_first/msg"]
    assert grown.reached == 1 and grown.flops_to_target is None and grown.speedup_flops is None
    assert report.format_row(grown)["flops_to_target"] == "not reached (1/2)"


def test_loss_gap_at_equal_flops(tmp_path):
    write_run(tmp_path / "base", [(2e11, 3.0), (1e12, 2.0)], schedule="none", operator="none")
    write_run(tmp_path / "grown", [(2e11, 2.6), (6e11, 1.8)])
    grown = by_label(compare(load_runs([tmp_path])))["depth_first/msg"]
    # at 6e11 (the shorter run's end) the baseline is halfway from 3.0 to 2.0: 2.5
    assert grown.gap_flops == pytest.approx(6e11)
    assert grown.gap == pytest.approx(1.8 - 2.5)
    assert report.format_row(grown)["gap"] == "-0.7000 @ 6.00e11"


def test_target_override(tmp_path):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "grown", GROWN)
    rows = by_label(compare(load_runs([tmp_path]), target=2.2))
    # baseline crosses 2.2 halfway between (5e11, 2.4) and (1e12, 2.0); grown hits it at 4e11
    assert rows["none/none"].flops_to_target == pytest.approx(7.5e11)
    assert rows["depth_first/msg"].flops_to_target == pytest.approx(4e11)
    assert rows["depth_first/msg"].speedup_flops == pytest.approx(7.5e11 / 4e11)


def test_val_bpb_metric(tmp_path):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "grown", GROWN)
    comp = analyse(load_runs([tmp_path]), metric="val_bpb")
    assert comp.target == pytest.approx(1.0)
    assert by_label(comp.rows)["depth_first/msg"].flops_to_target == pytest.approx(5e11)


def test_different_fingerprints_are_refused(tmp_path, capsys):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "other", GROWN, fingerprints=("data-2", "tok-1"))
    with pytest.raises(MixedDataError) as info:
        analyse(load_runs([tmp_path]))
    message = str(info.value)
    assert "other" in message and "data-2" in message and "data-1" in message
    assert "different data" in message and "--allow-mixed-data" in message

    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "data-2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    comp = analyse(load_runs([tmp_path]), allow_mixed_data=True)
    assert any("allow-mixed-data" in n for n in comp.notes)


def test_labels_name_differing_overrides_but_not_seeds(tmp_path):
    write_run(tmp_path / "a", GROWN, seed=1, overrides=["schedule.stages.0.at_fraction=0.25"])
    write_run(tmp_path / "b", GROWN, seed=2, overrides=["schedule.stages.0.at_fraction=0.25"])
    write_run(tmp_path / "c", GROWN, seed=1, overrides=["schedule.stages.0.at_fraction=0.5"])
    write_run(tmp_path / "d", GROWN, model="gpt_small", overrides=["schedule.stages.0.at_fraction=0.5"])
    labels = [r.label for r in compare(load_runs([tmp_path]), target=2.0)]
    assert labels == [
        "gpt_tiny depth_first/msg schedule.stages.0.at_fraction=0.25",
        "gpt_tiny depth_first/msg schedule.stages.0.at_fraction=0.5",
        "gpt_small depth_first/msg schedule.stages.0.at_fraction=0.5",
    ]


def test_without_baseline_the_table_has_no_speedups_and_says_why(tmp_path):
    write_run(tmp_path / "a", GROWN)
    write_run(tmp_path / "b", NEVER, schedule="width_first")
    comp = analyse(load_runs([tmp_path]), target=2.0)
    assert comp.baseline is None
    assert all(r.speedup_flops is None and r.gap is None for r in comp.rows)
    assert by_label(comp.rows)["depth_first/msg"].flops_to_target == pytest.approx(5e11)
    assert any("no baseline" in n and "schedule=none" in n for n in comp.notes)
    # an explicit --baseline (a unique part of a label is enough) gives speedups back
    comp = analyse(load_runs([tmp_path]), target=2.2, baseline="width")
    assert comp.baseline.label == "width_first/msg"
    with pytest.raises(ReportError, match="matches 0 groups"):
        analyse(load_runs([tmp_path]), baseline="nope")


def test_incomplete_run_without_summary_uses_hydra_files(tmp_path):
    write_run(tmp_path / "base", BASELINE, schedule="none", operator="none")
    write_run(tmp_path / "crashed", GROWN[:2], seed=7, summary=False)
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 300, "flo')  # killed while writing
    runs = load_runs([tmp_path])
    crashed = next(r for r in runs if r.path.name == "crashed")
    assert crashed.status == "incomplete" and crashed.seed == 7
    assert crashed.choices == {"model": "gpt_tiny", "schedule": "depth_first", "operator": "msg", "data": "pystdlib"}
    comp = analyse(runs)
    row = by_label(comp.rows)["depth_first/msg"]
    assert row.status == "incomplete" and row.final_mean == pytest.approx(2.2)
    assert row.flops_to_target is None  # 2.2 at its last point: not yet at 2.0
    assert any("crashed" in n and "not completed" in n for n in comp.notes)
    assert any("fingerprints unknown" in n for n in comp.notes)
    assert any("unreadable line" in n for n in comp.notes)


def test_resumed_run_keeps_the_lines_logged_after_the_resume(tmp_path):
    d = write_run(tmp_path / "r", GROWN)
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    # the run crashed after step 300 and resumed from its step-200 checkpoint: 300 and 400 again
    replay = [dict(x, val_loss=x["val_loss"] - 0.5) if "val_loss" in x else x for x in lines[4:]]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:6] + replay))
    (run,) = load_runs([d])
    flops, _, value = run.curve("val_loss")
    assert list(flops) == [2e11, 4e11, 6e11, 8e11]
    assert list(value) == pytest.approx([2.6, 2.2, 1.3, 1.2])


def test_cli_end_to_end_on_a_multirun_directory(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "multirun" / "10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    write_run(sweep / "0", BASELINE, schedule="none", operator="none", seed=1)
    write_run(sweep / "1", [(f, v + 0.02) for f, v in BASELINE], schedule="none", operator="none", seed=2)
    write_run(sweep / "2", GROWN, growth=[3e11, 5e11], seed=1)
    write_run(sweep / "3", NEVER, schedule="width_first", growth=[4e11], seed=1)
    # msgrun's wandb folder inside a run directory must not count as another run
    (sweep / "2" / "wandb" / "offline-run-x").mkdir(parents=True)
    (sweep / "2" / "wandb" / "offline-run-x" / "run-x.wandb").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    assert main([str(sweep)]) == 0
    out = sweep / "report"
    for name in ("loss_vs_flops.png", "loss_vs_flops.svg", "loss_vs_wall.png", "loss_vs_wall.svg",
                 "table.csv", "table.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "loss_vs_wall.svg").read_bytes()[:2000]

    with open(out / "table.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none/none", "depth_first/msg", "width_first/msg"}
    assert rows["none/none"]["n"] == "2" and rows["none/none"]["baseline"] == "True"
    # default target: the highest final val_loss of the baseline's seeds, 2.02, so that both
    # seeds reach it: seed 1 between (5e11, 2.4) and (1e12, 2.0), seed 2 at its end
    base_cost = (5e11 + (2.4 - 2.02) / 0.4 * 5e11 + 1e12) / 2
    grown_cost = 4e11 + (2.2 - 2.02) / 0.4 * 2e11
    assert float(rows["none/none"]["flops_to_target"]) == pytest.approx(base_cost)
    assert float(rows["depth_first/msg"]["flops_to_target"]) == pytest.approx(grown_cost)
    assert float(rows["depth_first/msg"]["speedup_flops"]) == pytest.approx(base_cost / grown_cost)
    assert float(rows["depth_first/msg"]["speedup_wall"]) == pytest.approx(base_cost / grown_cost)
    assert rows["depth_first/msg"]["growth_events_max"] == "2"
    assert rows["width_first/msg"]["flops_to_target"] == "not reached"
    assert rows["width_first/msg"]["speedup_flops"] == "—"

    md = (out / "table.md").read_text()
    assert "not reached" in md and "smaller of the two" in md and "![loss_vs_flops.png]" in md
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "depth_first/msg" in stdout

    # --out and --target
    assert main([str(sweep), "--out", str(tmp_path / "elsewhere"), "--target", "2.2"]) == 0
    with open(tmp_path / "elsewhere" / "table.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert float(rows["depth_first/msg"]["flops_to_target"]) == pytest.approx(4e11)


def test_default_out_dir_for_a_single_run_is_the_working_directory(tmp_path, monkeypatch):
    write_run(tmp_path / "run", GROWN)
    monkeypatch.chdir(tmp_path)
    assert main([str(tmp_path / "run"), "--target", "2.0"]) == 0
    assert (tmp_path / "report" / "table.md").exists()


def test_cli_errors_exit_with_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no run found" in capsys.readouterr().err


wandb_installed = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")


@wandb_installed
def test_reads_a_wandb_offline_run_folder():
    # made by tests/fixtures/report/make_wandb_fixture.py: grows 2 -> 4 layers at step 40
    (run,) = load_runs([FIXTURES / "wandb-offline" / "offline-run-fixture"])
    assert run.source == "wandb" and run.status == "completed" and run.seed == 3
    assert run.choices == {"model": "gpt_tiny", "schedule": "depth_first", "operator": "msg", "data": "pystdlib"}
    assert run.data_fingerprint == "data-abc" and run.tokenizer_fingerprint == "tok-abc"
    assert len(run.train) == 11 and len(run.evals) == 6
    flops, wall, value = run.curve("val_loss")
    assert list(value) == pytest.approx([4.2, 3.8, 3.4, 3.0, 2.6, 2.2])
    assert flops[-1] == 160e9 and wall[-1] == pytest.approx(10.0)
    (event,) = run.growth
    assert event["flops"] == 40e9 and event["probe_loss_after"] == 3.5
    # 3.2 is halfway between the evaluations at steps 40 (3.4, 40e9 FLOPs) and 60 (3.0, 80e9)
    assert report.to_target(run, "val_loss", 3.2)[0] == pytest.approx(60e9)


def test_growth_inferred_from_shape_changes_when_the_history_has_no_growth_rows():
    rows = [{"step": s, "flops": s * 1e9, "layers": 2 if s < 20 else 4, "hidden": 64} for s in (0, 10, 20, 30)]
    (event,) = wandb_folder._growth_from_shapes(rows)
    assert event["dims"] == ["layers"] and event["before"]["layers"] == 2 and event["after"]["layers"] == 4
    assert event["flops"] == 10e9  # the last line before the change


def test_unreadable_wandb_folder_falls_back_to_the_run_directory(tmp_path, monkeypatch):
    def unreadable(_path):
        raise wandb_folder._WandbUnreadable("no reader")

    monkeypatch.setattr(wandb_folder, "_wandb_records", unreadable)
    run_dir = write_run(tmp_path / "run", GROWN)
    folder = run_dir / "wandb" / "offline-run-x"
    folder.mkdir(parents=True)
    (folder / "run-x.wandb").write_bytes(b"")
    (run,) = load_runs([folder])
    assert run.source == "metrics.jsonl" and run.path == run_dir
    assert any("used" in n and "metrics.jsonl" in n for n in run.notes)

    lonely = tmp_path / "lonely" / "offline-run-y"
    lonely.mkdir(parents=True)
    (lonely / "run-y.wandb").write_bytes(b"")
    with pytest.raises(ReportError, match="no reader.*metrics.jsonl"):
        load_runs([lonely])


@wandb_installed
def test_older_wandb_python_datastore_records_are_converted(tmp_path, monkeypatch):
    # wandb before the Go core read .wandb logs with wandb.sdk.internal.datastore.DataStore; that
    # wandb is not installed here, so a stand-in serves real protobuf records built with the
    # installed wandb's schema
    import sys
    import types

    from wandb.proto import wandb_internal_pb2 as pb

    def record(**kwargs):
        return pb.Record(**kwargs).SerializeToString()

    def items(cls, values):
        return [cls(key=k, value_json=json.dumps(v)) for k, v in values.items()]

    rows = [{"step": 10, "flops": 1e9, "wall_time": 1.0, "loss": 3.0, "val_loss": 3.1, "layers": 2},
            {"step": 20, "flops": 3e9, "wall_time": 2.0, "loss": 2.5, "val_loss": 2.7, "layers": 4}]
    data = [
        record(run=pb.RunRecord(config=pb.ConfigRecord(update=items(pb.ConfigItem, {
            "schedule": {"name": "width_first"}, "operator": {"name": "bert2bert"}, "train": {"seed": 5}})),
            tags=["model=gpt_tiny"])),
        *[record(history=pb.HistoryRecord(item=items(pb.HistoryItem, r))) for r in rows],
        record(summary=pb.SummaryRecord(update=items(pb.SummaryItem, {"data_fingerprint": "d9"}))),
        record(exit=pb.RunExitRecord(exit_code=1)),
    ]

    class FakeDataStore:
        def open_for_scan(self, path):
            self.left = list(data)

        def scan_data(self):
            return self.left.pop(0) if self.left else None

    monkeypatch.setitem(sys.modules, "wandb.sdk.internal.datastore", types.SimpleNamespace(DataStore=FakeDataStore))
    run = wandb_folder._run_from_wandb(tmp_path, "old", wandb_folder._records_from_datastore(tmp_path / "run-x.wandb"))
    assert run.choices == {"schedule": "width_first", "operator": "bert2bert", "model": "gpt_tiny"}
    assert run.seed == 5 and run.status == "failed" and run.data_fingerprint == "d9"
    assert list(run.curve("val_loss")[2]) == [3.1, 2.7]
    (event,) = run.growth  # no growth rows: inferred from the layer count
    assert event["dims"] == ["layers"]
