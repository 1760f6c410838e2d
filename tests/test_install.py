"""A non-editable install works: the wheel carries the config tree (conf/ as msgrun.conf) and the
ready sweeps (sweeps/ as msgrun.conf.sweep), and a job, a sweep and the report run from it in a
directory that has nothing to do with the repository.

No network: the wheel is built without build isolation (setuptools and wheel come from the test
extra) and installed without dependencies into a fresh venv that borrows this interpreter's
installed packages (torch, hydra, ...) through a .pth path line. A path line puts that
site-packages on sys.path without running its .pth files, so the editable install of this
checkout (an import hook started by a .pth file) stays invisible: the test checks that `msgrun`
is imported from the new venv."""

import csv
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from conftest import FAST

REPO = Path(__file__).resolve().parent.parent
TINY = [*FAST, "model.layers=2", "model.hidden=64", "model.heads=2", "model.ffn=128", "train.max_steps=2",
        "train.eval_every=2", "train.log_every=1"]


def run(cmd, cwd, env, timeout=300):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_installs_and_runs_a_job_a_sweep_and_the_report_outside_the_repository(tmp_path, cache_dir):
    # build from a copy holding only what the wheel is made of: the build writes build/ and
    # *.egg-info next to its sources, which must not land in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("msgrun", "conf", "sweeps"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=skip)  # conf/sweep is a link
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HYDRA_FULL_ERROR")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("msgrun-*.whl")

    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       tmp_path, env).stdout.strip())
    borrowed = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "borrowed-packages.pth").write_text("".join(f"{p}\n" for p in borrowed))
    run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-build-isolation", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**env, "MSGRUN_CACHE": cache_dir, "PATH": f"{target / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    where = run([python, "-c", "import msgrun, msgrun.conf, msgrun.report; print(msgrun.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout

    # a 2-step job, with the console script the wheel installed
    run([target / "bin" / "msgrun", *TINY, f"hydra.run.dir={work / 'job'}"], work, env)
    summary = json.loads((work / "job" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2

    # a 2-job sweep from a sweep file shipped in the wheel (its schedule list cut to the baseline)
    run([target / "bin" / "msgrun", "-m", "sweep=schedule_ablation", *TINY, "hydra.sweeper.params.schedule=none",
         "train.seed=0,1", f"hydra.sweep.dir={work / 'sweep'}"], work, env, timeout=600)
    jobs = json.loads((work / "sweep" / "sweep_summary.json").read_text())
    assert [j["status"] for j in jobs] == ["completed", "completed"]
    assert json.loads((work / "sweep" / "0" / "summary.json").read_text())["choices"]["operator"] == "msg"

    run([target / "bin" / "msgrun-report", work / "sweep"], work, env)
    (row,) = csv.DictReader(open(work / "sweep" / "report" / "table.csv"))
    assert row["n"] == "2" and row["baseline"] == "True"


def test_a_user_config_folder_joins_the_tree_through_hydra_searchpath(tmp_path, cache_dir):
    """The README's example: a model of one's own in a folder outside the package."""
    model_dir = tmp_path / "my_conf" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "gpt_narrow.yaml").write_text("defaults:\n  - gpt_tiny\n  - _self_\nhidden: 96\nheads: 3\n")
    env = {**os.environ, "MSGRUN_CACHE": cache_dir}
    run([sys.executable, "-m", "msgrun", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "model=gpt_narrow",
         *FAST, "train.max_steps=2", "train.eval_every=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["choices"]["model"] == "gpt_narrow"
    assert summary["final_shape"]["hidden"] == 96 and summary["final_shape"]["layers"] == 4  # the rest from gpt_tiny
