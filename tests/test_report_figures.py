"""The report's figure: every growth event on its curve (on a log axis too, and before the first
evaluation), the end of the runs readable despite an early spike, one colour per group."""

import numpy as np
from matplotlib.colors import to_rgb

from msgrun.report.compare import analyse
from msgrun.report.discover import load_runs
from msgrun.report.figures import draw

from test_report import base_run, write_run

# an early spike (9.0) and a close finish: the end of the runs is where they differ
BASE = [(1e10, 9.0), (1e11, 3.0), (4e11, 2.3), (1e12, 2.05)]
ARM = [(1e10, 8.0), (1e11, 2.9), (4e11, 2.25), (1e12, 2.0)]
EVENTS = [5e9, 2e11]  # the first before the first evaluation (1e10 FLOPs)


def figures(tmp_path):
    base_run(tmp_path / "0", BASE)
    write_run(tmp_path / "1", ARM, growth=EVENTS)
    d = tmp_path / "1" / "metrics.jsonl"  # train loss logged before the first evaluation too
    lines = d.read_text()
    d.write_text('{"step": 1, "tokens": 10, "flops": 1e9, "wall_time": 0.1, "loss": 10.5, "lr": 1e-3, '
                 '"layers": 1, "hidden": 64, "heads": 2, "ffn": 256, "seq_len": 64, "params": 500}\n' + lines)
    comp = analyse(load_runs([str(tmp_path)]), target=None, metric="val_loss", baseline=None)
    return comp, dict(draw(comp))


def markers(ax):
    return [line for line in ax.get_lines() if line.get_marker() == "^" and len(line.get_xdata())]


def on_drawn_line(ax, point, lines) -> bool:
    """Is the point on one of the polylines as drawn (in pixels, whatever the axis scale)?"""
    px, py = ax.transData.transform(point)
    for line in lines:
        xy = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
        if xy[0, 0] <= px <= xy[-1, 0] and abs(np.interp(px, xy[:, 0], xy[:, 1]) - py) < 0.5:
            return True
    return False


def test_every_growth_event_is_marked_on_a_drawn_curve(tmp_path):
    comp, figs = figures(tmp_path)
    for name in ("loss_vs_flops", "loss_vs_wall"):
        full = figs[name].axes[0]
        marks = markers(full)
        assert len(marks) == len(EVENTS), name  # the event before the first evaluation too
        curves = [line for line in full.get_lines() if line.get_marker() in ("None", "") and len(line.get_xdata()) > 1]
        for m in marks:
            point = (m.get_xdata()[0], m.get_ydata()[0])
            assert on_drawn_line(full, point, curves), (name, point)
    assert figs["loss_vs_flops"].axes[0].get_xscale() == "log"


def test_the_end_of_the_runs_has_a_panel_on_its_own_scale(tmp_path):
    comp, figs = figures(tmp_path)
    full, end = figs["loss_vs_flops"].axes
    assert full.get_ylim()[1] > 9.0  # the whole runs, spike included
    lo, hi = end.get_ylim()
    assert lo < 2.0 and 2.05 < hi < 3.0  # the finish (2.0 against 2.05) fills the end panel


def test_each_group_has_its_own_colour_and_none_is_grey(tmp_path):
    comp, figs = figures(tmp_path)
    full = figs["loss_vs_flops"].axes[0]
    colours = {}
    for line in full.get_lines():
        label = line.get_label()
        if any(label.startswith(g.label) for g in comp.groups):
            colours[label] = to_rgb(line.get_color())
    assert len(colours) == len(comp.groups) == 2
    assert len(set(colours.values())) == 2
    assert all(len({round(c, 3) for c in rgb}) > 1 for rgb in colours.values())  # r == g == b is a grey
