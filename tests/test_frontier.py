"""The from-scratch frontier and the effective-compute multiplier, on synthetic runs drawn from a
known saturating power law: the fit must recover it, a true 1.5x arm must get an interval that
contains 1.5x and excludes 1x, and an arm on the frontier one that covers 1x."""

import numpy as np
import pytest

from msgrun.report import analyse, frontier, load_runs
from test_report import base_run, write_run

E, A, ALPHA = 2.0, 100.0, 0.15
BUDGETS = [1e12, 2e12, 4e12, 8e12, 16e12]
ARM_FLOPS = 4e12


def law(c):
    return E + A * np.power(c, -ALPHA)


def test_fit_recovers_a_known_power_law_and_reports_its_residuals():
    c = np.geomspace(1e11, 1e14, 8)
    noise = np.array([0.002, -0.001, 0.0, 0.001, -0.002, 0.001, 0.0, -0.001])
    f = frontier.fit(c, law(c) + noise)
    assert f.alpha == pytest.approx(ALPHA, rel=0.1) and f.E == pytest.approx(E, abs=0.1)
    assert np.allclose(f.residuals, law(c) + noise - f(c))
    assert max(abs(r) for r in f.residuals) < 0.004
    # the inverse is the frontier's own: the FLOPs it returns give back the value
    assert float(f(f.flops_for(3.2))) == pytest.approx(3.2)
    assert f.flops_for(f.E - 0.01) is None  # below the asymptote: out of reach


def test_a_rising_or_too_short_frontier_is_refused():
    with pytest.raises(frontier.FitError, match="3 or more budgets"):
        frontier.fit([1e12, 2e12], [3.0, 2.9])
    with pytest.raises(frontier.FitError, match="do not fall"):
        frontier.fit([1e12, 2e12, 4e12], [3.0, 3.1, 3.2])


def frontier_runs(tmp_path, rng, seed) -> float:
    """From-scratch runs of one seed at five budgets, every loss shifted by the seed's offset (its
    data order), which is returned."""
    offset = rng.normal(0, 0.03)
    for budget in BUDGETS:
        points = [(c, float(law(c) + offset + rng.normal(0, 0.004))) for c in (budget / 4, budget / 2, budget)]
        base_run(tmp_path / f"b{budget:.0e}-s{seed}", points, seed=seed, overrides=[f"train.max_flops={budget}"])
    return offset


def synthetic_sweep(tmp_path, speed: float, rng_seed: int, seeds=range(5), small_share=0.25):
    """From-scratch runs at five budgets and one arm per seed whose final loss is the frontier's
    at `speed` times its FLOPs; each seed shifts all its losses by one offset (its data order)."""
    rng = np.random.default_rng(rng_seed)
    for seed in seeds:
        offset = frontier_runs(tmp_path, rng, seed)
        fl = [ARM_FLOPS * x for x in (0.25, 0.5, 0.75, 1.0)]
        points = [(c, float(law(speed * c) + offset + rng.normal(0, 0.004))) for c in fl]
        write_run(tmp_path / f"arm-s{seed}", points, seed=seed, growth=[small_share * ARM_FLOPS])
    return analyse(load_runs([tmp_path]))


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_a_true_one_and_a_half_times_arm(tmp_path, rng_seed):
    comp = synthetic_sweep(tmp_path, 1.5, rng_seed)
    result = comp.frontier
    assert result is not None and len(result.frontier.flops) == 25
    (arm,) = result.arms
    iv = arm.multiplier
    assert arm.paired and iv.n == 5
    assert iv.lo < 1.5 < iv.hi and iv.lo > 1.0, iv
    # the sunk accounting leaves out the quarter of the FLOPs spent before the first growth event
    assert arm.multiplier_sunk.estimate == pytest.approx(iv.estimate / 0.75, rel=1e-6)
    # the last target is the worst final value, which every run reaches: about 1.5x there too
    target, at_end = arm.at_targets[-1]
    assert at_end.lo < 1.5 < at_end.hi
    assert any("effective-compute multiplier" in n for n in comp.notes)
    assert any(d.startswith("⁶") for d in comp.definitions)


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_an_arm_on_the_frontier_covers_one(tmp_path, rng_seed):
    (arm,) = synthetic_sweep(tmp_path, 1.0, rng_seed).frontier.arms
    assert arm.multiplier.lo < 1.0 < arm.multiplier.hi, arm.multiplier


def test_seed_offsets_pair_the_arm_with_its_own_seed(tmp_path):
    """A large per-seed offset: read against the pooled frontier without offsets the interval
    would be wide; the paired reading keeps it narrow."""
    comp = synthetic_sweep(tmp_path, 1.5, 0)
    f = comp.frontier.frontier
    paired = comp.frontier.arms[0].multiplier
    runs = [r for g in comp.groups if not g.from_scratch for r in g.runs]
    unpaired = [f.flops_for(float(r.curve("val_loss")[2][-1])) / r.final_flops for r in runs]
    spread = np.std(np.log(unpaired))
    assert np.std(np.log(paired.values)) < spread / 2


def test_frontier_files_are_written(tmp_path):
    comp = synthetic_sweep(tmp_path / "runs", 1.5, 0)
    written = frontier.write(comp.frontier, tmp_path / "out")
    assert [p.name for p in written] == ["frontier.csv", "frontier.png"]
    text = (tmp_path / "out" / "frontier.csv").read_text()
    assert "residual" in text and "multiplier_total" in text


def budget_sweep(tmp_path, speeds: dict[float, float], rng_seed: int = 0, seeds=range(4), operators=None):
    """The frontier as above, and one arm trained at each budget in `speeds` with its final loss
    the frontier's at speed x its FLOPs (`operators`: each budget's operator, default msg)."""
    rng = np.random.default_rng(rng_seed)
    for seed in seeds:
        offset = frontier_runs(tmp_path, rng, seed)
        for budget, speed in speeds.items():
            fl = [budget * x for x in (0.25, 0.5, 0.75, 1.0)]
            points = [(c, float(law(speed * c) + offset + rng.normal(0, 0.004))) for c in fl]
            operator = (operators or {}).get(budget, "msg")
            write_run(tmp_path / f"arm{budget:.0e}-s{seed}", points, seed=seed, growth=[0.25 * budget],
                      operator=operator, overrides=[f"train.max_flops={budget}"],
                      config={"operator": {"name": operator}, "train": {"max_flops": budget, "seed": seed}})
    return analyse(load_runs([tmp_path])).frontier


def test_a_speed_up_that_shrinks_with_budget_is_seen_paired_by_seed(tmp_path):
    """G_stack's claim 4: the same arm at F/2 (a true 2x) and at F (a true 1.5x): the larger budget's
    multiplier over the smaller's, paired by seed, is about 0.75 and its interval excludes 1."""
    result = budget_sweep(tmp_path, {ARM_FLOPS / 2: 2.0, ARM_FLOPS: 1.5})
    (trend,) = result.budget_trends
    assert "2e+12" in trend.smaller and "4e+12" in trend.larger, trend
    iv = trend.multiplier
    assert iv.n == 4 and iv.lo < 0.75 < iv.hi and iv.hi < 1.0, iv
    # each budget also has its matched baseline: the speed-ups against them shrink alike
    assert trend.speedup.n == 4 and trend.speedup.estimate == pytest.approx(0.75, rel=0.1), trend.speedup
    notes = frontier.summary_lines(result)
    assert any(line.startswith("change with budget") and "shrinks" in line for line in notes)


def test_two_different_arms_at_two_budgets_are_not_a_change_with_budget(tmp_path):
    """G_zero at F and G_stack at F/2 differ in their operator: not one arm at two budgets."""
    result = budget_sweep(tmp_path, {ARM_FLOPS / 2: 2.0, ARM_FLOPS: 1.5}, operators={ARM_FLOPS / 2: "gstack"})
    assert result.budget_trends == []


def test_an_unchanged_speed_up_covers_one_across_budgets(tmp_path):
    (trend,) = budget_sweep(tmp_path / "same", {ARM_FLOPS / 2: 1.5, ARM_FLOPS: 1.5}).budget_trends
    assert trend.multiplier.lo < 1.0 < trend.multiplier.hi, trend


# from-scratch end points of a real CPU sweep (docs/protocol.md's example: 2L x 64, three budgets, three
# seeds): the loss falls faster at the larger budgets, still in its early, steep phase
REAL_FLOPS = [5.55661e11] * 3 + [2.77831e11] * 3 + [1.40123e11] * 3
REAL_VALUES = [5.67843, 5.69461, 5.79561, 6.20564, 6.03195, 6.27284, 6.49072, 6.46299, 6.56587]


def test_points_without_saturation_fit_with_e_at_zero_not_below(tmp_path):
    """Unconstrained, the real sweep's points drove alpha to its bound and E to -563 (a loss of
    -563 nats at infinite compute), and every multiplier read beyond them followed that line. A
    loss cannot go below 0: the fit keeps E >= 0 and says the points show no saturation; an arm
    read beyond the largest budget is flagged as extrapolated."""
    f = frontier.fit(REAL_FLOPS, REAL_VALUES)
    assert 0.0 <= f.E < 1e-3 and f.A > 0 and f.alpha > 0.001
    assert max(abs(r) for r in f.residuals) < 0.2
    for seed in range(3):
        for budget in (1e11, 2e11, 4e11):
            base_run(tmp_path / f"b{budget:.0e}-s{seed}", [(budget / 2, 12.0 * (budget / 2) ** -0.03 + 0.2),
                                                            (budget, 12.0 * budget ** -0.03)],
                     seed=seed, overrides=[f"train.max_flops={budget}"])
        # a true 2x arm at the largest budget: reading it needs the frontier at 8e11
        write_run(tmp_path / f"arm-s{seed}", [(2e11, 12.0 * 4e11 ** -0.03), (4e11, 12.0 * 8e11 ** -0.03)], seed=seed,
                  growth=[1e11], overrides=["train.max_flops=4e11"])
    comp = analyse(load_runs([tmp_path]))
    (arm,) = comp.frontier.arms
    assert arm.multiplier.estimate == pytest.approx(2.0, rel=0.02)
    assert any(n.startswith("extrapolated") and "4e+11" in n for n in arm.notes), arm.notes
    assert "no saturation" in frontier.summary_lines(comp.frontier)[0]
