"""msgrun-report on hand-made run directories whose answers are known in advance.

Unless a test says otherwise every run logs wall_time = flops * 1e-10, so a wall-clock result is
its FLOPs result / 1e10.
"""

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from msgrun import report
from msgrun.report import MixedDataError, ReportError, analyse, compare, load_runs, main
from msgrun.report import stats, tables, wandb_folder

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
    wall_per_flop=WALL_PER_FLOP,
    device_name="cpu",
    config=None,
    results=None,
):
    """A run directory whose evaluation points are `evals` = [(flops, val_loss), ...].
    config: written as .hydra/config.yaml; results: extra summary.json keys."""
    d.mkdir(parents=True)
    lines = []
    for step, (flops, val) in enumerate(evals, start=1):
        counters = {"step": step * 100, "tokens": step * 1000, "flops": flops,
                    "wall_time": flops * wall_per_flop, "lr": 1e-3, "layers": 2, "hidden": 64,
                    "heads": 2, "ffn": 256, "seq_len": 64, "params": 1000}
        lines.append({**counters, "loss": val + 0.05})
        lines.append({**counters, "val_loss": val, "val_bpb": val / 2})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if growth:
        events = [{"step": 1, "tokens": 1, "flops": f, "wall_time": f * wall_per_flop, "operator": operator,
                   "dims": ["layers"], "before": {"layers": 1}, "after": {"layers": 2},
                   "probe_loss_before": 3.0, "probe_loss_after": 3.0, "max_abs_logit_diff": 0.0,
                   "seconds": 0.0} for f in growth]
        (d / "growth.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    choices = {"model": model, "schedule": schedule, "operator": operator, "data": "pystdlib"}
    task = [f"schedule={schedule}", f"operator={operator}", f"train.seed={seed}", *overrides]
    if config is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if summary:
        final_flops, final_val = evals[-1]
        (d / "summary.json").write_text(json.dumps({
            "status": status, "final_loss": final_val + 0.05, "final_val_loss": final_val,
            "final_val_bpb": final_val / 2, "flops": final_flops, "tokens": 1000 * len(evals),
            "wall_time": final_flops * wall_per_flop, "params": 1000, "steps": 100 * len(evals),
            "choices": choices, "overrides": task, "seed": seed,
            "data_fingerprint": fingerprints[0], "tokenizer_fingerprint": fingerprints[1],
            "device": "cpu", "device_name": device_name, "world_size": 1, "host": "h1", **(results or {}),
        }))
    else:
        # what Hydra leaves behind for a run that crashed before writing its summary
        (d / ".hydra").mkdir(exist_ok=True)
        hydra = {"hydra": {"runtime": {"choices": {**choices, "hydra/launcher": "basic"}},
                           "overrides": {"task": task}}}
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        if config is None:
            (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}}))
    return d


def base_run(d, evals, **kwargs):
    return write_run(d, evals, schedule="none", operator="none", **kwargs)


# baseline reaches 2.0 exactly at its last evaluation, 1e12 FLOPs
BASELINE = [(2e11, 3.0), (5e11, 2.4), (1e12, 2.0)]
# crosses 2.0 halfway between (4e11, 2.2) and (6e11, 1.8): 5e11 FLOPs, a 2x speedup
GROWN = [(2e11, 2.6), (4e11, 2.2), (6e11, 1.8), (8e11, 1.7)]
NEVER = [(2e11, 2.9), (1e12, 2.5)]


def by_label(rows):
    return {r.label: r for r in rows}


def test_a_pair_gives_the_speedup_to_the_baselines_final_loss(tmp_path):
    base_run(tmp_path / "base", BASELINE)
    write_run(tmp_path / "grown", GROWN, growth=[3e11])
    comp = analyse(load_runs([tmp_path / "base", tmp_path / "grown"]))

    assert comp.target is None  # one target per pair
    rows = by_label(comp.rows)
    base, grown = rows["none/none"], rows["depth_first/msg"]
    assert base.is_baseline and not grown.is_baseline
    assert grown.baseline == "none/none" and grown.baseline_kind == "largest budget"
    (pair,) = grown.pairs
    assert pair.target == pytest.approx(2.0)  # the worse final value: the baseline's
    assert pair.base.flops == pytest.approx(1e12) and pair.arm.flops == pytest.approx(5e11)
    assert pair.arm.before == (4e11, 2.2) and pair.arm.after == (6e11, 1.8)  # the bracketing evaluations
    assert grown.flops_to_target == pytest.approx(5e11)
    assert grown.wall_to_target == pytest.approx(5e11 * WALL_PER_FLOP)
    assert grown.speedup_flops.estimate == pytest.approx(2.0) and grown.speedup_flops.lo is None
    assert grown.speedup_wall.estimate == pytest.approx(2.0)
    assert grown.speedup_wall_normalised.estimate == pytest.approx(2.0)  # same throughput on both
    assert grown.cost_ratio == pytest.approx(1e12 / 8e11)
    assert grown.growth_events == (1, 1) and base.growth_events == (0, 0)
    cells = report.format_row(grown)
    assert cells["speedup_flops"] == "2.00× (n=1, no interval)"
    assert cells["baseline"] == "none/none (largest budget)"


def test_an_arm_that_ends_worse_gets_a_speedup_below_one(tmp_path):
    # the target is then the arm's final value, which the baseline reaches earlier
    base_run(tmp_path / "base", BASELINE)
    write_run(tmp_path / "worse", NEVER)  # ends at 2.5 after 1e12
    (pair,) = by_label(compare(load_runs([tmp_path])))["depth_first/msg"].pairs
    assert pair.target == pytest.approx(2.5)
    # the baseline crosses 2.5 between (2e11, 3.0) and (5e11, 2.4): 2e11 + 5/6 * 3e11
    assert pair.base.flops == pytest.approx(4.5e11) and pair.arm.flops == pytest.approx(1e12)
    assert pair.speedup_flops == pytest.approx(0.45)


def test_a_crossing_counts_only_where_the_curve_stays_below(tmp_path):
    # dips under 2.0 at 3e11, comes back above (2.3 at 4e11), then stays below from 6e11 on
    write_run(tmp_path / "r", [(2e11, 2.6), (3e11, 1.9), (4e11, 2.3), (6e11, 1.8), (7e11, 1.95)])
    (run,) = load_runs([tmp_path / "r"])
    hit = report.crossing(run, "val_loss", 2.0)
    assert hit.flops == pytest.approx(4e11 + 0.6 * 2e11)  # 2.3 -> 1.8 crosses 2.0 at 60%
    assert hit.before == (4e11, 2.3) and hit.after == (6e11, 1.8)
    assert report.to_target(run, "val_loss", 2.0) == pytest.approx((5.2e11, 5.2e11 * WALL_PER_FLOP))
    assert report.crossing(run, "val_loss", 1.9) is None  # 1.95 at the end: not below for good
    assert report.to_target(run, "val_loss", 3.0) == pytest.approx((2e11, 2e11 * WALL_PER_FLOP))  # from the start


def test_run_that_never_reaches_a_given_target_says_not_reached(tmp_path):
    base_run(tmp_path / "base", BASELINE)
    write_run(tmp_path / "never", NEVER, schedule="width_first")
    comp = analyse(load_runs([tmp_path]), target=2.0)
    never = by_label(comp.rows)["width_first/msg"]
    assert never.flops_to_target is None and never.speedup_flops is None and never.speedup_wall is None
    cells = report.format_row(never)
    assert cells["flops_to_target"] == "not reached"
    assert cells["speedup_flops"] == "—"
    record = tables._csv_record(never)
    assert record["flops_to_target"] == "not reached" and record["speedup_flops"] == "—"


def test_runs_are_paired_by_seed_not_by_order(tmp_path):
    # baseline seed 1 is fast (reaches 2.0 at 5e11), seed 2 slow (at 1e12); the arm's seed 2 is
    # listed first. Paired by seed both speedups are 1.0; paired by order they would be 0.5 and 2.
    fast, slow = [(2e11, 3.0), (5e11, 2.0)], BASELINE
    base_run(tmp_path / "b1", fast, seed=1)
    base_run(tmp_path / "b2", slow, seed=2)
    write_run(tmp_path / "a0", slow, seed=2)
    write_run(tmp_path / "a1", fast, seed=1)
    write_run(tmp_path / "a2", GROWN, seed=3)  # no baseline run of seed 3
    comp = analyse(load_runs([tmp_path]))
    arm = by_label(comp.rows)["depth_first/msg"]
    assert sorted((p.seed, Path(p.baseline_run).name) for p in arm.pairs) == [(1, "b1"), (2, "b2")]
    assert [p.speedup_flops for p in arm.pairs] == pytest.approx([1.0, 1.0])
    assert arm.speedup_flops.estimate == pytest.approx(1.0) and arm.speedup_flops.lo == pytest.approx(1.0)
    assert arm.n == 3 and report.format_row(arm)["n"] == "3 (2 paired)"
    assert any("a2" in n and "seed" in n for n in comp.notes)


def test_paired_gap_interval_is_student_t(tmp_path):
    # the review's example: per-seed gaps +0.111, +0.144, +0.504 -> 95% interval -0.29 .. +0.79
    for seed, gap in enumerate([0.111, 0.144, 0.504]):
        base_run(tmp_path / f"b{seed}", [(1e11, 3.0), (1e12, 2.0)], seed=seed)
        write_run(tmp_path / f"a{seed}", [(1e11, 3.0), (1e12, 2.0 + gap)], seed=seed)
    arm = by_label(compare(load_runs([tmp_path])))["depth_first/msg"]
    assert arm.gap.values == pytest.approx([0.111, 0.144, 0.504])
    assert arm.gap.estimate == pytest.approx(0.253)
    assert (arm.gap.lo, arm.gap.hi) == pytest.approx((-0.2887, 0.7947), abs=2e-4)
    assert arm.gap.distinguishable is False
    assert "not distinguishable from 0" in report.format_row(arm)["gap"]


def test_t_quantiles():
    assert stats.t975(1) == 12.706 and stats.t975(2) == 4.303
    assert stats.t975(40) == pytest.approx(2.0211, abs=1e-4) and stats.t975(120) == pytest.approx(1.9799, abs=1e-4)
    iv = stats.ratio_interval([2.0, 0.5])
    assert iv.estimate == pytest.approx(1.0)  # geometric: a 2x and a 0.5x cancel


def noisy_runs(tmp_path, name, speed, seeds, rng, schedule):
    """Runs of the curve 2 + 1.5 * sqrt(1e11 / (speed * flops)), 20 evaluations with noise sd 0.02:
    `speed` times fewer FLOPs to any loss than speed 1."""
    flops = np.geomspace(1e11, 1e12, 20)
    for seed in seeds:
        values = 2.0 + 1.5 * np.sqrt(1e11 / (speed * flops)) + rng.normal(0, 0.02, len(flops))
        write_run(tmp_path / f"{name}{seed}", list(zip(flops.tolist(), values.tolist())), seed=seed,
                  schedule=schedule, operator="none" if schedule == "none" else "msg")


@pytest.mark.parametrize("speed, verdict", [(1.0, False), (1.5, True)])
def test_identical_curves_are_not_distinguishable_and_a_true_speedup_is(tmp_path, speed, verdict):
    rng = np.random.default_rng(0)
    seeds = range(5)
    noisy_runs(tmp_path, "base", 1.0, seeds, rng, "none")
    noisy_runs(tmp_path, "arm", speed, seeds, rng, "depth_first")
    arm = by_label(compare(load_runs([tmp_path])))["depth_first/msg"]
    assert len(arm.pairs) == 5 and arm.reached == 5  # a per-pair target is always reached
    iv = arm.speedup_flops
    assert iv.distinguishable is verdict
    if verdict:
        assert iv.lo > 1.0 and iv.lo < 1.5 < iv.hi
        assert "not distinguishable" not in report.format_row(arm)["speedup_flops"]
    else:
        assert iv.lo < 1.0 < iv.hi
        assert "not distinguishable from 1×" in report.format_row(arm)["speedup_flops"]


def test_matched_baselines_are_chosen_per_arm(tmp_path):
    for seed in (0, 1):
        base_run(tmp_path / f"full{seed}", BASELINE, seed=seed)  # 1e12 FLOPs: the largest budget
        # annealed at the arm's 8e11 budget (its last step 5% over it), and a shorter one matching nothing
        base_run(tmp_path / f"matched{seed}", [(2e11, 2.9), (4e11, 2.3), (8.4e11, 1.85)], seed=seed,
                 overrides=["train.max_flops=8e11"])
        base_run(tmp_path / f"short{seed}", [(2e11, 2.9), (3e11, 2.5)], seed=seed, overrides=["train.max_flops=3e11"])
        write_run(tmp_path / f"arm{seed}", GROWN, seed=seed)  # ends at 8e11
        write_run(tmp_path / f"wide{seed}", [(2e11, 2.6), (9e11, 1.9)], seed=seed, schedule="width_first")
    comp = analyse(load_runs([tmp_path]))
    rows = by_label(comp.rows)
    arm, wide = rows["depth_first/msg"], rows["width_first/msg"]
    assert (arm.baseline, arm.baseline_kind) == ("none/none train.max_flops=8e+11", "matched")
    assert [p.target for p in arm.pairs] == pytest.approx([1.85, 1.85])  # annealed end against annealed end
    assert (wide.baseline, wide.baseline_kind) == ("none/none", "largest budget")
    assert rows["none/none"].is_baseline and rows["none/none train.max_flops=8e+11"].is_baseline
    hint = next(n for n in comp.notes if "sweep=matched_baselines" in n)
    assert "train.max_flops=9e+11" in hint and "train.seed=0,1" in hint and "width_first" in hint


def test_several_from_scratch_groups_never_drop_the_comparison(tmp_path):
    base_run(tmp_path / "long", BASELINE, overrides=["train.max_steps=300"])
    base_run(tmp_path / "short", [(2e11, 3.0), (5e11, 2.4)], overrides=["train.max_steps=150"])
    write_run(tmp_path / "grown", GROWN)
    rows = by_label(compare(load_runs([tmp_path])))
    grown = rows["depth_first/msg"]
    assert grown.baseline == "none/none train.max_steps=300" and grown.speedup_flops.estimate == pytest.approx(2.0)


def test_labels_ignore_settings_of_an_unused_config_group(tmp_path):
    base_run(tmp_path / "b0", BASELINE, seed=0, overrides=["operator.ramp_steps=10", "schedule.stages.0.at_fraction=0.5"])
    base_run(tmp_path / "b1", BASELINE, seed=1)
    # a from-scratch run with an operator chosen (a sweep's default): nothing grows, it is a baseline seed
    write_run(tmp_path / "b2", BASELINE, seed=2, schedule="none", operator="msg", overrides=["operator.ramp_steps=10"])
    write_run(tmp_path / "a0", GROWN, seed=0, overrides=["operator.ramp_steps=10"])
    write_run(tmp_path / "a1", GROWN, seed=1, overrides=["operator.ramp_steps=20"])
    write_run(tmp_path / "m0", BASELINE, seed=0, schedule="none", operator="none",
              overrides=["train.max_flops=184700000000.0", "operator.ramp_steps=10"])
    rows = by_label(compare(load_runs([tmp_path])))
    assert sorted(rows) == ["depth_first/msg operator.ramp_steps=10", "depth_first/msg operator.ramp_steps=20",
                            "none/none", "none/none train.max_flops=1.847e+11"]
    assert rows["none/none"].n == 3


def test_evaluation_settings_and_data_order_must_agree(tmp_path):
    cfg = {"train": {"eval_tokens": 65536, "seed": 0}, "model": {"seq_len": 128, "family": "gpt"},
           "data": {"shuffle_chunk": None}}
    base_run(tmp_path / "base", BASELINE, config=cfg)
    other = {**cfg, "train": {"eval_tokens": 4096, "seed": 0}}
    write_run(tmp_path / "grown", GROWN, config=other)
    with pytest.raises(MixedDataError, match=r"train.eval_tokens .*65536.*4096"):
        analyse(load_runs([tmp_path]))
    comp = analyse(load_runs([tmp_path]), allow_mixed_data=True)
    assert any("WARNING" in n and "eval_tokens" in n for n in comp.notes)
    write_run(tmp_path / "reordered", GROWN, seed=1, config={**cfg, "data": {"shuffle_chunk": 64}})
    with pytest.raises(MixedDataError, match="data order"):
        analyse(load_runs([tmp_path / "base", tmp_path / "reordered"]))


def test_raw_wall_clock_is_dropped_when_it_measures_the_machine(tmp_path):
    for seed in range(3):
        base_run(tmp_path / f"b{seed}", BASELINE, seed=seed)
        # one seed ran on a loaded machine: 5x the wall time for the same FLOPs
        write_run(tmp_path / f"a{seed}", GROWN, seed=seed, wall_per_flop=WALL_PER_FLOP * (5 if seed == 2 else 1))
    comp = analyse(load_runs([tmp_path]))
    arm = by_label(comp.rows)["depth_first/msg"]
    assert arm.speedup_wall is None and "varies 5.00x" in arm.wall_problems[0]
    assert report.format_row(arm)["speedup_wall"] == "unreliable ³"
    # the normalised estimate uses the median throughput of arm and baseline: the loaded seed does not count
    assert arm.speedup_wall_normalised.estimate == pytest.approx(2.0)
    assert arm.speedup_flops.estimate == pytest.approx(2.0)

    (tmp_path / "gpu").mkdir()
    base_run(tmp_path / "gpu" / "b", BASELINE, device_name="NVIDIA H200")
    write_run(tmp_path / "gpu" / "a", GROWN, device_name="cpu", results={"host": "h2", "cpus": 2, "loadavg": [9, 8, 7.5]})
    comp = analyse(load_runs([tmp_path / "gpu"]))
    arm = by_label(comp.rows)["depth_first/msg"]
    assert arm.speedup_wall is None and "device_name" in arm.wall_problems[0]
    assert any("several hosts" in n for n in comp.notes)
    assert any("busier" in n and "7.5 on 2 CPUs" in n for n in comp.notes)


def test_normalised_wall_clock_prices_a_shape_the_same_for_arm_and_baseline(tmp_path):
    # the arm's sweep ran while the machine was 3x busier: raw wall-clock turns its 2x into 0.67x
    for seed in range(2):
        base_run(tmp_path / f"b{seed}", BASELINE, seed=seed)
        write_run(tmp_path / f"a{seed}", GROWN, seed=seed, wall_per_flop=3 * WALL_PER_FLOP)
    arm = by_label(compare(load_runs([tmp_path])))["depth_first/msg"]
    assert arm.speedup_wall.estimate == pytest.approx(2 / 3)
    assert arm.speedup_wall_normalised.estimate == pytest.approx(2.0)


def test_downstream_results_become_columns(tmp_path):
    base_run(tmp_path / "base", BASELINE, results={"eval/hellaswag/acc": 0.25})
    write_run(tmp_path / "g0", GROWN, results={"eval/hellaswag/acc": 0.30, "eval/lambada/ppl": 40.0})
    write_run(tmp_path / "g1", GROWN, seed=1, results={"eval/hellaswag/acc": 0.32})
    comp = analyse(load_runs([tmp_path]))
    assert comp.downstream_keys == ["eval/hellaswag/acc", "eval/lambada/ppl"]
    grown = by_label(comp.rows)["depth_first/msg"]
    assert grown.downstream == pytest.approx({"eval/hellaswag/acc": 0.31, "eval/lambada/ppl": 40.0})
    report.write_report(comp, tmp_path / "out")
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| eval/hellaswag/acc | eval/lambada/ppl |" in md and "| 0.31 | 40 |" in md
    rows = {r["label"]: r for r in csv.DictReader(open(tmp_path / "out" / "table.csv"))}
    assert float(rows["none/none"]["eval/hellaswag/acc"]) == 0.25 and rows["none/none"]["eval/lambada/ppl"] == ""


def test_downstream_results_from_metrics_lines(tmp_path):
    d = write_run(tmp_path / "r", GROWN, summary=False)
    with open(d / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 400, "flops": 8e11, "eval/arc_easy/acc": 0.4}) + "\n")
    (run,) = load_runs([d])
    assert run.downstream == {"eval/arc_easy/acc": 0.4}


def test_seeds_form_one_group_with_mean_and_spread(tmp_path):
    base_run(tmp_path / "b1", BASELINE, seed=1)
    base_run(tmp_path / "b2", BASELINE, seed=2)
    write_run(tmp_path / "s1", GROWN, seed=1)  # reaches 2.0 at 5e11
    write_run(tmp_path / "s2", [(2e11, 2.6), (6e11, 2.2), (8e11, 1.8)], seed=2)  # at 7e11
    rows = compare(load_runs([tmp_path]))
    assert len(rows) == 2
    grown = by_label(rows)["depth_first/msg"]
    assert grown.n == 2 and [Path(r).name for r in grown.runs] == ["s1", "s2"]
    assert grown.final_mean == pytest.approx((1.7 + 1.8) / 2)
    assert grown.final_std == pytest.approx(0.0707107, rel=1e-5)  # sample std of 1.7, 1.8
    assert grown.flops_to_target == pytest.approx(6e11)
    assert grown.speedup_flops.values == pytest.approx([2.0, 1e12 / 7e11])
    assert grown.speedup_flops.estimate == pytest.approx(math.sqrt(2.0 * 1e12 / 7e11))
    assert "±" in report.format_row(grown)["final"]


def test_group_where_one_seed_misses_target_reports_k_of_n(tmp_path):
    base_run(tmp_path / "b1", BASELINE, seed=1)
    base_run(tmp_path / "b2", BASELINE, seed=2)
    write_run(tmp_path / "s1", GROWN, seed=1)
    write_run(tmp_path / "s2", NEVER, seed=2)
    grown = by_label(compare(load_runs([tmp_path]), target=2.0))["depth_first/msg"]
    assert grown.reached == 1 and grown.flops_to_target is None
    assert grown.speedup_flops is None  # not from the one pair that reached it: that would drop the other
    assert grown.gap.n == 2  # the gap needs no target
    assert report.format_row(grown)["flops_to_target"] == "not reached (1/2)"


def test_loss_gap_at_equal_flops(tmp_path):
    base_run(tmp_path / "base", [(2e11, 3.0), (1e12, 2.0)])
    write_run(tmp_path / "grown", [(2e11, 2.6), (6e11, 1.8)])
    grown = by_label(compare(load_runs([tmp_path])))["depth_first/msg"]
    # at 6e11 (the shorter run's end) the baseline is halfway from 3.0 to 2.0: 2.5
    assert grown.gap_flops == pytest.approx(6e11)
    assert grown.gap.estimate == pytest.approx(1.8 - 2.5)
    assert report.format_row(grown)["gap"] == "-0.7000 (n=1, no interval) @ 6.00e11"


def test_target_override(tmp_path):
    base_run(tmp_path / "base", BASELINE)
    write_run(tmp_path / "grown", GROWN)
    comp = analyse(load_runs([tmp_path]), target=2.2)
    rows = by_label(comp.rows)
    assert comp.target == 2.2
    # baseline crosses 2.2 halfway between (5e11, 2.4) and (1e12, 2.0); grown reaches it at 4e11
    assert rows["none/none"].flops_to_target == pytest.approx(7.5e11)
    assert rows["depth_first/msg"].flops_to_target == pytest.approx(4e11)
    assert rows["depth_first/msg"].speedup_flops.estimate == pytest.approx(7.5e11 / 4e11)


def test_val_bpb_metric(tmp_path):
    base_run(tmp_path / "base", BASELINE)
    write_run(tmp_path / "grown", GROWN)
    comp = analyse(load_runs([tmp_path]), metric="val_bpb")
    (pair,) = by_label(comp.rows)["depth_first/msg"].pairs
    assert pair.target == pytest.approx(1.0) and pair.arm.flops == pytest.approx(5e11)


def test_different_fingerprints_are_refused(tmp_path, capsys):
    base_run(tmp_path / "base", BASELINE)
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


def test_a_lone_from_scratch_group_is_the_baseline(tmp_path):
    base_run(tmp_path / "b0", BASELINE, seed=0)
    base_run(tmp_path / "b1", BASELINE, seed=1)
    (row,) = compare(load_runs([tmp_path]))
    assert row.is_baseline and row.baseline is None and report.format_row(row)["baseline"] == "(baseline)"


def test_without_baseline_the_table_has_no_speedups_and_says_why(tmp_path):
    write_run(tmp_path / "a", GROWN)
    write_run(tmp_path / "b", NEVER, schedule="width_first")
    comp = analyse(load_runs([tmp_path]), target=2.0)
    assert comp.baselines == []
    assert all(r.speedup_flops is None and r.gap is None for r in comp.rows)
    assert by_label(comp.rows)["depth_first/msg"].flops_to_target == pytest.approx(5e11)
    assert any("no baseline" in n and "schedule=none" in n for n in comp.notes)
    # an explicit --baseline (a unique part of a label is enough) gives speedups back
    comp = analyse(load_runs([tmp_path]), target=2.6, baseline="width")
    assert [b.label for b in comp.baselines] == ["width_first/msg"]
    assert by_label(comp.rows)["depth_first/msg"].baseline_kind == "--baseline"
    with pytest.raises(ReportError, match="matches 0 groups"):
        analyse(load_runs([tmp_path]), baseline="nope")


def test_incomplete_run_without_summary_uses_hydra_files(tmp_path):
    base_run(tmp_path / "base", BASELINE)
    write_run(tmp_path / "crashed", GROWN[:2], seed=7, summary=False)
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 300, "flo')  # killed while writing
    runs = load_runs([tmp_path])
    crashed = next(r for r in runs if r.path.name == "crashed")
    assert crashed.status == "incomplete" and crashed.seed == 7
    assert crashed.choices == {"model": "gpt_tiny", "schedule": "depth_first", "operator": "msg", "data": "pystdlib"}
    comp = analyse(runs, target=2.0)
    row = by_label(comp.rows)["depth_first/msg"]
    assert row.status == "incomplete" and row.final_mean == pytest.approx(2.2)
    assert row.flops_to_target is None  # 2.2 at its last point: not yet at 2.0
    assert any("crashed" in n and "not completed" in n for n in comp.notes)
    assert any("crashed" in n and "seed" in n for n in comp.notes)  # seed 7 has no baseline run to pair with
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
    base_run(sweep / "0", BASELINE, seed=1)
    base_run(sweep / "1", [(f, v + 0.02) for f, v in BASELINE], seed=2)
    write_run(sweep / "2", GROWN, growth=[3e11, 5e11], seed=1)
    write_run(sweep / "3", [(2e11, 2.6), (4e11, 2.2), (6e11, 1.8), (8e11, 1.75)], growth=[3e11], seed=2)
    write_run(sweep / "4", NEVER, schedule="width_first", growth=[4e11], seed=1)
    # msgrun's wandb folder inside a run directory must not count as another run
    (sweep / "2" / "wandb" / "offline-run-x").mkdir(parents=True)
    (sweep / "2" / "wandb" / "offline-run-x" / "run-x.wandb").write_bytes(b"")
    monkeypatch.chdir(tmp_path)

    assert main([str(sweep)]) == 0
    out = sweep / "report"
    for name in ("loss_vs_flops.png", "loss_vs_flops.svg", "loss_vs_wall.png", "loss_vs_wall.svg",
                 "table.csv", "table.md", "pairs.csv"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "loss_vs_wall.svg").read_bytes()[:2000]

    with open(out / "table.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none/none", "depth_first/msg", "width_first/msg"}
    assert rows["none/none"]["n"] == "2" and rows["none/none"]["baseline"] == "True"
    # seed 1: baseline reaches 2.0 at 1e12, the arm at 5e11; seed 2: target 2.02 (the baseline's
    # end), the arm crosses it between (4e11, 2.22) ... (6e11, 1.8)
    seed2 = 1e12 / (4e11 + (2.2 - 2.02) / 0.4 * 2e11)
    grown = rows["depth_first/msg"]
    assert float(grown["speedup_flops"]) == pytest.approx(math.sqrt(2.0 * seed2))
    assert float(grown["speedup_flops_ci_low"]) < float(grown["speedup_flops"]) < float(grown["speedup_flops_ci_high"])
    assert grown["compared_with"] == "none/none" and grown["baseline_kind"] == "largest budget" and grown["pairs"] == "2"
    assert grown["growth_events_max"] == "2"
    assert rows["width_first/msg"]["pairs"] == "1" and rows["width_first/msg"]["baseline_kind"] == "same budget"
    with open(out / "pairs.csv") as f:
        pairs = list(csv.DictReader(f))
    seed1 = next(p for p in pairs if p["group"] == "depth_first/msg" and p["seed"] == "1")
    assert seed1["arm_bracket_before"] == "400000000000.0:2.2" and seed1["arm_bracket_after"] == "600000000000.0:1.8"
    assert float(seed1["arm_flops_to_target"]) == pytest.approx(5e11)

    md = (out / "table.md").read_text()
    assert "stays at or below" in md and "Student-t" in md and "![loss_vs_flops.png]" in md
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "depth_first/msg" in stdout

    # --out and --target
    assert main([str(sweep), "--out", str(tmp_path / "elsewhere"), "--target", "2.2"]) == 0
    with open(tmp_path / "elsewhere" / "table.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert float(rows["depth_first/msg"]["flops_to_target"]) == pytest.approx(4e11)
    assert rows["width_first/msg"]["flops_to_target"] == "not reached"


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


def test_the_terminal_shows_one_headline_per_group_never_cut_inside_a_value(tmp_path, capsys, monkeypatch):
    """A 14-column table folded into 120 columns cut values in two (1.45e1 / 1); the terminal gets
    one line per group (comparison, speed-up with interval, Δ loss), wrapped at spaces only."""
    sweep = tmp_path / "sweep"
    base_run(sweep / "0", BASELINE, seed=1)
    base_run(sweep / "1", [(f, v + 0.02) for f, v in BASELINE], seed=2)
    write_run(sweep / "2", GROWN, growth=[3e11, 5e11], seed=1)
    write_run(sweep / "3", [(2e11, 2.6), (4e11, 2.2), (6e11, 1.8), (8e11, 1.75)], growth=[3e11], seed=2)
    monkeypatch.setenv("COLUMNS", "120")
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines() if not line.startswith("report written to")) <= 120
    flat = " ".join(out.split())
    with open(tmp_path / "out" / "table.csv") as f:
        grown = next(r for r in csv.DictReader(f) if r["label"] == "depth_first/msg")
    speedup = f"{float(grown['speedup_flops']):.2f}× [{float(grown['speedup_flops_ci_low']):.2f}×, " \
              f"{float(grown['speedup_flops_ci_high']):.2f}×] n=2"
    gap = f"{float(grown['gap']):+.4f} [{float(grown['gap_ci_low']):+.4f}, {float(grown['gap_ci_high']):+.4f}] n=2"
    assert f"depth_first/msg vs none/none (largest budget): speed-up (FLOPs) {speedup}; " \
           f"Δval_loss at equal FLOPs {gap} @ 8.00e11" in flat, out
    assert "none/none: baseline; n=2" in flat
    assert "│" not in out and "cost ratio" not in out  # the full table is in table.md, not on the terminal
    assert "cost ratio" in (tmp_path / "out" / "table.md").read_text()
