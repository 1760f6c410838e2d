"""`msgrun`: compose model x schedule x operator with Hydra, validate, train.

Bad input ends in one paragraph on stderr and exit code 2, before compute is spent
(HYDRA_FULL_ERROR=1 shows the traceback). That holds for Hydra's own composition errors too
(unknown key, unknown group option, wrong type): their first line starts with "msgrun: error:".
A refused command removes only what it created (msgrun.rundir): never a directory that existed
before it, and never anything in a directory holding another run, whose records (.hydra/ included)
stay byte-identical. A run stopped by SIGTERM/SIGUSR1/SIGUSR2/SIGINT writes a checkpoint and exits
with 128 + the signal number (msgrun.preemption). In a multirun a failing job never stops the
others: it is recorded, and the sweep ends with a list of failed jobs (msgrun.callbacks.SweepSummary)
and a non-zero exit code.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from msgrun import protocol
from msgrun.config import check_config, register_configs
from msgrun.errors import MsgrunError
from msgrun.preemption import Interrupted, resume_command
from msgrun.rundir import CREATED_ROOT, RunDirBusy, RunDirLock, check_run_dir, config_json, finished_run_message, \
    first_missing, launching_rank, remove_own_setup, write_hydra_record


def run_job(cfg: DictConfig) -> float | None:
    """Train one job (once per objective seed) under the run directory's lock (rank 0 holds it for
    all ranks of a torchrun launch); return the sweep objective."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    lock = RunDirLock(run_dir)
    try:
        if launching_rank() == 0:
            lock.acquire()  # before anything is written there
    except RunDirBusy as e:  # the directory is another process's: write nothing, remove nothing
        print(f"msgrun: error: {e}", file=sys.stderr)
        if multirun:
            from msgrun.callbacks import REFUSED

            REFUSED[str(run_dir)] = str(e)  # the sweep's summary lists it as failed
            return math.inf
        sys.exit(2)
    try:
        return locked_job(cfg, hc, run_dir, multirun, lock)
    finally:
        lock.release()


def locked_job(cfg: DictConfig, hc, run_dir: Path, multirun: bool, lock: RunDirLock) -> float | None:
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    overrides = list(hc.overrides.task)
    seeds = list(cfg.objective.seeds)
    job_dirs = [run_dir / f"seed{s}" for s in seeds] or [run_dir]
    # what existed before this command, and which directories it creates: a refusal removes only
    # what it created
    existed = {d: {p.name for p in d.iterdir()} if d.is_dir() else set() for d in job_dirs + [run_dir]}
    created = {d: first_missing(d) for d in job_dirs if d != run_dir}
    created[run_dir] = CREATED_ROOT.get(str(run_dir)) if not multirun else None
    try:
        check_config(cfg)
        jobs = []
        for seed, d in zip(seeds or [None], job_dirs):
            job_cfg, job_overrides = cfg, overrides
            if seed is not None:
                job_cfg = cfg.copy()
                job_cfg.train.seed = seed
                job_overrides = [*overrides, f"train.seed={seed}"]
            # refused here, before .hydra/ is written, the data prepared or the pre-flight run
            if check_run_dir(d, config_json(job_cfg)) == "finished":
                if not (multirun or seeds):
                    raise MsgrunError(finished_run_message(d))
                print(f"msgrun: {d} holds this configuration's finished run; not trained again", file=sys.stderr)
                if protocol.wants_baseline(job_cfg):  # its matched baseline may not have finished
                    jobs.append((job_cfg, d, job_overrides, True))
                continue
            jobs.append((job_cfg, d, job_overrides, False))
        if launching_rank() == 0:
            write_hydra_record(run_dir, cfg)
        from msgrun.callbacks import objective_value
        from msgrun.train import Trainer  # torch is imported only once the config is known good

        for job_cfg, d, job_overrides, finished in jobs:
            trainer = Trainer(job_cfg, d, choices, job_overrides)
            # protocol=matched: the arm's FLOPs are planned before it trains, its baseline trains after it
            planned = trainer.planned_flops() if protocol.wants_baseline(job_cfg) else None
            if not finished:
                trainer.run()
            if planned is not None:
                protocol.train_matched_baseline(job_cfg, d, choices, job_overrides, planned)
        return objective_value(cfg, job_dirs)
    except Interrupted as e:
        where = Path(hc.sweep.dir if multirun else run_dir).absolute()
        print(f"msgrun: {e} To continue exactly where it stopped, run:\n  {resume_command(sys.argv, where, multirun)}",
              file=sys.stderr, flush=True)
        e.chain()  # a launcher's own handler (submitit requeues the job from the checkpoint)
        sys.exit(e.exit_code)
    except MsgrunError as e:
        if not multirun:  # a sweep keeps its job directories: the summary points at their logs
            remove_own_setup(list(dict.fromkeys([*job_dirs, run_dir])), existed, created, lock)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"msgrun: error: {e}", file=sys.stderr)
        if multirun:
            if "config.json" not in existed[run_dir]:  # never write into another run's directory
                write_hydra_record(run_dir, cfg)  # the sweep summary lists the job by its record
                (run_dir / "error.log").write_text(f"{e}\n")
            return math.inf
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training, or a second one during it: stop now, no traceback
        if not multirun:
            remove_own_setup(list(dict.fromkeys([*job_dirs, run_dir])), existed, created, lock)
        print("msgrun: error: stopped at once by Ctrl-C, without writing a checkpoint (while training, a first "
              f"Ctrl-C checkpoints at the next step and a second one stops at once). {resume_hint(job_dirs)}",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception:
        if not multirun:  # a crash before training leaves no record a later command would train under
            remove_own_setup(list(dict.fromkeys([*job_dirs, run_dir])), existed, created, lock)
            raise
        (run_dir / "error.log").write_text(traceback.format_exc())
        print(f"msgrun: job in {run_dir} failed; traceback in {run_dir / 'error.log'}", file=sys.stderr)
        return math.inf


def resume_hint(job_dirs: list[Path]) -> str:
    from msgrun.rundir import holds_run

    if any(holds_run(d) for d in job_dirs):
        return ("Rerun the same command (same hydra.run.dir) to resume from the last checkpoint; the steps after it "
                "are trained again.")
    return "Training had not started: nothing was kept, and the same command starts the run afresh."


@hydra.main(version_base="1.3", config_path="pkg://msgrun.conf", config_name="config")
def hydra_entry(cfg: DictConfig) -> float | None:
    return run_job(cfg)


def report_composition_errors(prog: str = "msgrun") -> None:
    """Make Hydra's composition errors (unknown key, unknown group option, wrong type, override
    syntax) read like msgrun's: first line "msgrun: error: ...", Hydra's message kept below it,
    the valid keys listed for an unknown key, exit code 2. Hydra prints and exits with code 1
    from hydra._internal.utils.run_and_report, which wraps every command; msgrun wraps it once."""
    import hydra._internal.utils as hydra_utils
    import yaml
    from hydra.errors import ConfigCompositionException, OverrideParseException

    original = hydra_utils.run_and_report
    if getattr(original, "msgrun", False):
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as e:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"{prog}: error: {composition_message(e)}", file=sys.stderr)
                sys.exit(2)
            except yaml.YAMLError as e:  # a config file of the user's (--config-dir, hydra.searchpath)
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"{prog}: error: a config file is not valid YAML, so the configuration cannot be composed:\n"
                      f"{e}\nFix the file named above (HYDRA_FULL_ERROR=1 shows the traceback).", file=sys.stderr)
                sys.exit(2)

        return original(guarded)

    run_and_report.msgrun = True
    hydra_utils.run_and_report = run_and_report


def composition_message(e: Exception) -> str:
    from msgrun.config import valid_keys_message
    from msgrun.extras import missing_plugin_message

    lines = [line for line in str(e).splitlines() if line.strip()]
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        lines += [line for line in str(cause).splitlines() if line.strip() and line.strip() not in lines]
    # Hydra's hint "To append to your config use +key=value" would add a key nothing reads
    lines = [line for line in lines if "HYDRA_FULL_ERROR" not in line and not line.startswith("To append to your")]
    keys = valid_keys_message(getattr(cause, "full_key", None), getattr(cause, "object_type", None))
    if keys and isinstance(cause, (KeyError, AttributeError)):
        lines.append(keys)
    full_key = getattr(cause, "full_key", None)
    if full_key and getattr(cause, "object_type", None) is dict and "not in struct" in str(cause):
        # a mapping of the user's own names (eval.perplexity): Hydra adds a new entry only with +
        lines.append(f"{full_key.rpartition('.')[0]} is a mapping whose entries you name yourself: add one with a "
                     f"leading +, as +{full_key}=...")
    missing = re.search(r"Could not find '([^']+)'", str(e))
    hint = missing and missing_plugin_message(missing.group(1))
    if hint:
        lines.insert(1, hint)
    lines.append("(HYDRA_FULL_ERROR=1 shows the traceback.)")
    return "\n".join(lines)


def main() -> None:
    from msgrun.help import msgrun_help, print_help_if_asked

    print_help_if_asked(msgrun_help)
    register_configs()
    report_composition_errors()
    hydra_entry()


if __name__ == "__main__":
    main()
