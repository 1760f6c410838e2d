"""Stopping on a scheduler's signal: finish the step, checkpoint, exit with the conventional code.

SLURM and most schedulers send SIGTERM (often SIGUSR1, or submitit's SIGUSR2, some time before)
and kill the job a little later. While a run trains, `StopSignals` turns SIGTERM, SIGUSR1,
SIGUSR2 and SIGINT (Ctrl-C) into a request that the loop honours at the next step boundary: it
writes a checkpoint, the summary says "interrupted", and the command exits with 128 + the signal
number (143 for SIGTERM, 130 for Ctrl-C), as a shell reports a process killed by that signal. A
second signal of the same kind stops at once (Ctrl-C twice). A handler that was installed before
msgrun's (submitit's requeue handler) is called after the checkpoint is written, so a requeued
job resumes from it.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT") if hasattr(signal, name))


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; rerunning the command resumes it."""

    def __init__(self, signum: int, message: str, previous_handler=None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.previous_handler = previous_handler

    def chain(self) -> None:
        """Call the handler installed before msgrun's (submitit: requeue the job), if any."""
        handler = self.previous_handler
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)


class StopSignals:
    """A context manager: while inside, the signals set `signum` instead of killing the process.
    Only the main thread can install handlers; elsewhere (a launcher's worker thread) it does
    nothing and the signals keep their previous meaning."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # a second signal: stop now, as if msgrun had no handler
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signum = signum
        # a handler should not do I/O that may interleave with the main thread's; stderr is unbuffered
        print(f"msgrun: received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def interrupted(self, signum: int, step: int, checkpoint_path) -> Interrupted:
        """The exception that ends the run (signum: this rank's signal, or another rank's)."""
        name = signal.Signals(signum).name
        return Interrupted(signum,
                           f"interrupted by {name} after step {step}; checkpoint {checkpoint_path} written.",
                           self.previous.get(signum))


def resume_command(argv: list[str], run_dir, multirun: bool) -> str:
    """The command that continues a stopped run: the user's own arguments, with the run
    directory made explicit. The default directory is a timestamp (outputs/<date>/<time>), so
    rerunning the command as typed would start a new run elsewhere instead of resuming."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = [a for a in argv[1:] if not a.lstrip("+~").startswith(f"{key}=")]
    return shlex.join(["msgrun", *args, f"{key}={run_dir}"])
