"""The `msgrun` command as a user runs it: errors are one clear paragraph and damage nothing."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST


def msgrun(tmp_path, cache_dir, *args, env=None):
    run_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    run_env.update({"MSGRUN_CACHE": cache_dir, **(env or {})})
    return subprocess.run([sys.executable, "-m", "msgrun", *FAST, *args], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=300)


def test_impossible_shape_is_one_paragraph_and_leaves_no_directory(tmp_path, cache_dir):
    r = msgrun(tmp_path, cache_dir, "model.heads=0", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2
    assert "model.heads" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_misspelled_key_names_it(tmp_path, cache_dir):
    r = msgrun(tmp_path, cache_dir, "train.max_stepz=3", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode != 0
    assert "max_stepz" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_path(tmp_path, cache_dir):
    r = msgrun(tmp_path, cache_dir, "data=files", "data.paths=[/no/such/dir/*.txt]", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2
    assert "data.paths" in r.stderr and "/no/such/dir" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_full_error_shows_the_traceback(tmp_path, cache_dir):
    r = msgrun(tmp_path, cache_dir, "model.heads=0", f"hydra.run.dir={tmp_path}/run", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def tree(d):
    """Every file below d with its bytes (.hydra/ and checkpoints/ included)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_finished_and_different_runs_are_never_overwritten(tmp_path, cache_dir):
    run = tmp_path / "run"
    r = msgrun(tmp_path, cache_dir, "train.max_steps=4", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    before = tree(run)
    assert json.loads(before["summary.json"])["status"] == "completed"
    assert ".hydra/config.yaml" in before and ".hydra/overrides.yaml" in before

    again = msgrun(tmp_path, cache_dir, "train.max_steps=4", f"hydra.run.dir={run}")
    assert again.returncode == 2 and "finished run" in again.stderr
    other = msgrun(tmp_path, cache_dir, "train.max_steps=8", f"hydra.run.dir={run}")
    assert other.returncode == 2 and "finished run" in other.stderr
    assert tree(run) == before

    (run / "summary.json").unlink()  # an interrupted run with a different config
    before.pop("summary.json")
    other = msgrun(tmp_path, cache_dir, "train.max_steps=4", "train.lr=1e-2", f"hydra.run.dir={run}")
    assert other.returncode == 2 and "different run" in other.stderr
    # refused before Hydra's records were written (.hydra/ byte-identical) and before any data
    # preparation or pre-flight (neither printed a line)
    assert tree(run) == before
    assert "data:" not in other.stdout and "pre-flight" not in other.stdout

    # evaluation settings are not the run's identity: a resume may change them
    resumed = msgrun(tmp_path, cache_dir, "train.max_steps=4", "eval.at_end=false", f"hydra.run.dir={run}")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr


def test_refusal_never_removes_a_directory_it_did_not_create(tmp_path, cache_dir):
    """`mkdir d && msgrun model.heads=0 hydra.run.dir=d > d/train.log 2>&1` used to delete d
    and the log that held the error; so did hydra.run.dir=. with the current directory."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.log").write_text("the user's own log\n")
    r = msgrun(tmp_path, cache_dir, "model.heads=0", f"hydra.run.dir={d}")
    assert r.returncode == 2 and "model.heads" in r.stderr
    assert tree(d) == {"train.log": b"the user's own log\n"}  # kept, and nothing of msgrun's left in it

    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.log").write_text("x")
    r = msgrun(work, cache_dir, "model.heads=0", "hydra.run.dir=.")
    assert r.returncode == 2
    assert tree(work) == {"notes.log": b"x"}

    # a refusal after .hydra/ was written (the data is missing): .hydra/ goes, the directory stays
    r = msgrun(tmp_path, cache_dir, "data=files", "data.paths=[/no/such/dir]", f"hydra.run.dir={d}")
    assert r.returncode == 2 and "data.paths" in r.stderr
    assert tree(d) == {"train.log": b"the user's own log\n"}


def test_refusal_removes_the_directories_it_created(tmp_path, cache_dir):
    r = msgrun(tmp_path, cache_dir, "data=files", "data.paths=[/no/such/dir]", f"hydra.run.dir={tmp_path}/a/b/run")
    assert r.returncode == 2 and "data.paths" in r.stderr
    assert not (tmp_path / "a").exists()


def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "a.txt").write_text("some text\n" * 50)
    (tmp_path / "linked" / "b.txt").symlink_to(tmp_path / "moved_away.txt")
    (tmp_path / "broken.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "a_file").write_text("x")
    return {
        "empty directory": (["data=files", f"data.paths=[{tmp_path}/nothing]"], ["data.paths", "holds no files"]),
        "dangling symlink": (["data=files", f"data.paths=[{tmp_path}/linked]"],
                             ["b.txt", "symbolic link", "moved_away.txt", "does not exist"]),
        "one beta": (["optim.betas=[0.9]"], ["optim.betas", "two decay rates"]),
        "wandb online without a key": (["logger=wandb", "logger.wandb.mode=online"],
                                       ["API key", "wandb login", "logger.wandb.mode=offline"]),
        "negative time budget": (["train.max_minutes=-1"], ["train.max_minutes", "(0, inf)"]),
        "negative checkpoint interval": (["train.checkpoint_every=-1"], ["train.checkpoint_every", "[0, inf)"]),
        "key added with +": (["+model.layer=3"], ["model.layer", "Valid keys of model", "layers"]),
        "unknown key": (["train.max_stepz=3"], ["max_stepz", "Valid keys of train", "max_steps"]),
        "unknown group option": (["model=gpt_huge"], ["gpt_huge", "gpt_tiny"]),
        "wrong type": (["train.max_steps=many"], ["max_steps", "many"]),
        "impossible shape": (["model.hidden=0"], ["model.hidden"]),
        "shrinking stage": (["schedule=layers_only", "operator=msg", "schedule.stages.0.grow.layers=1"], ["shrinks"]),
        "stage overlapping a ramp": (["schedule=depth_first", "operator=msg", "schedule.stages.1.at_fraction=0.25"],
                                     ["inside the mask ramp", "operator.ramp_steps"]),
        "unsupported dimension": (["schedule=width_first", "operator=gstack"], ["cannot grow hidden", "layers"]),
        "stage after the end": (["schedule=layers_only", "operator=msg", "schedule.stages.0.at_fraction=null",
                                 "schedule.stages.0.at_step=99999"], ["after the run ends"]),
        "empty corpus": (["data=files", f"data.paths=[{tmp_path}/empty]"], ["data.name"]),
        "broken tokenizer": ([f"data.tokenizer_path={tmp_path}/broken.json"], ["data.tokenizer_path"]),
        "unwritable output directory": ([f"hydra.run.dir={tmp_path}/a_file/run"], ["a_file", "hydra.run.dir"]),
    }


@pytest.mark.parametrize("case", ["unknown group option", "wrong type", "impossible shape", "shrinking stage",
                                  "stage overlapping a ramp", "unsupported dimension", "stage after the end",
                                  "empty corpus", "broken tokenizer", "unwritable output directory",
                                  "empty directory", "dangling symlink", "one beta", "wandb online without a key",
                                  "negative time budget", "negative checkpoint interval", "key added with +",
                                  "unknown key"])
def test_bad_input_catalogue(tmp_path, cache_dir, case):
    """Each bad input: exit code 2, a paragraph that starts "msgrun: error:" and names the key, no
    traceback, no run directory. (Hydra's composition errors used to exit 1 with Hydra's wording.)"""
    args, words = bad_inputs(tmp_path)[case]
    if not any(a.startswith("hydra.run.dir") for a in args):
        args = [*args, f"hydra.run.dir={tmp_path}/run"]
    no_key = {"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no_netrc")}  # nobody is logged in to wandb
    r = msgrun(tmp_path, cache_dir, "train.max_steps=100", *args, env=no_key)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("msgrun: error: "), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert not (tmp_path / "run").exists()


def test_binary_corpus_and_small_tokenizer_are_warned_about(tmp_path, cache_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 8)  # NUL bytes, invalid UTF-8
    r = msgrun(tmp_path, cache_dir, "data=files", f"data.paths=[{corpus}]", "data.vocab_size=4096",
               "train.max_steps=2", "train.log_every=1", "train.eval_every=2", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr
    assert "binary or not valid UTF-8" in r.stdout and "blob.bin" in r.stdout
    assert "fewer than data.vocab_size=4096" in r.stdout


def test_a_running_run_directory_is_refused_and_left_untouched(tmp_path, cache_dir):
    """Issue 28, case 1: a second command in a directory another process trains in used to resume
    from an older checkpoint and rewind metrics.jsonl under it. Now it is refused before it writes
    anything, naming the process that holds the directory."""
    import socket

    from msgrun.rundir import LOCK_FILE, RunDirLock

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # as if the holder were training
    with RunDirLock(run):
        before = tree(run)
        r = msgrun(tmp_path, cache_dir, "train.max_steps=2", f"hydra.run.dir={run}")
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("msgrun: error: ") and "Traceback" not in r.stderr
        assert f"process {os.getpid()} on {socket.gethostname()}" in r.stderr and "hydra.run.dir" in r.stderr
        assert tree(run) == before  # no .hydra/, no config.json, the holder's lock record kept
    assert not (run / LOCK_FILE).exists()


def test_a_dead_holders_lock_file_does_not_block_and_a_run_leaves_none(tmp_path, cache_dir):
    """flock dies with its process (SIGKILL): a lock file left behind is no lock."""
    from msgrun.rundir import LOCK_FILE

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text('{"pid": 999999, "host": "gone", "command": "msgrun", "since": "then"}')
    r = msgrun(tmp_path, cache_dir, "train.max_steps=2", "train.eval_every=2", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    assert not (run / LOCK_FILE).exists() and (run / ".hydra" / "config.yaml").exists()


def test_a_crash_before_training_leaves_no_record_for_a_later_command(tmp_path, cache_dir):
    """Issue 28, case 1: a command that crashed before training left .hydra/, and a later, different
    command then trained under that record."""
    (tmp_path / "a_file").write_text("x")
    r = msgrun(tmp_path, cache_dir, "train.max_steps=2", f"data.cache_dir={tmp_path}/a_file",
               f"hydra.run.dir={tmp_path}/run")
    assert r.returncode != 0
    assert not (tmp_path / "run").exists()


def test_ctrl_c_twice_during_training_is_one_paragraph(tmp_path, cache_dir):
    """Issue 28: a second Ctrl-C (it stops at once) ended in a KeyboardInterrupt traceback."""
    import signal
    import time

    run = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "MSGRUN_CACHE": cache_dir}
    proc = subprocess.Popen([sys.executable, "-m", "msgrun", *FAST, "train.max_steps=400", "train.log_every=1",
                             "train.threads=1", f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "msgrun: error: stopped at once by Ctrl-C" in err or "interrupted by SIGINT" in err, err[-3000:]


def test_a_sweep_job_whose_directory_is_in_use_is_refused_and_counted_as_failed(tmp_path, cache_dir):
    """The lock is per job: the job whose directory another process holds writes nothing there,
    the other job trains, and the sweep lists the refused one as failed (exit 1)."""
    from msgrun.rundir import RunDirLock

    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    with RunDirLock(sweep / "0"):
        env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, "MSGRUN_CACHE": cache_dir}
        r = subprocess.run([sys.executable, "-m", "msgrun", "-m", *FAST, "train.max_steps=2", "train.eval_every=2",
                            "train.seed=0,1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert sorted(p.name for p in (sweep / "0").iterdir()) == [".msgrun.lock"]
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"is in use by process {os.getpid()}" in r.stderr
    assert "1 of 2 jobs completed" in r.stdout and "FAILED job 0" in r.stdout and "refused" in r.stdout
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "completed"
