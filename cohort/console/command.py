"""Running a command: a ``CohortError`` as one line on stderr and exit status 2, Ctrl-C as 130, and
Ctrl-C deferred between two writes where a write must not be cut in half."""
from __future__ import annotations

import contextlib
import gc
import signal
import sys
import threading
from typing import NoReturn

from cohort.config.errors import CohortError


def run_command(command, args) -> int:
    """Run a command-line entry point: a ``CohortError`` becomes one line on stderr and exit 2."""
    from cohort.console.display import command_stdout, mode_of
    from cohort.driver.startup import COMMAND_STARTED, asked_at, process_started

    try:
        # The start-up breakdown counts from the process's start: its interpreter and imports count.
        with command_stdout(mode_of(args)), asked_at(process_started(), COMMAND_STARTED):
            return command(args)
    except CohortError as error:
        print(str(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output was piped into a command that stopped reading
        return 0


def exit_process(code: int) -> NoReturn:
    """End a command's process with ``code``. Its heap (torch, Ray, MLflow: millions of objects) is
    frozen first, so that the interpreter's closing garbage collection does not walk it: a command
    that trained returned 2 s sooner here, a ``--dry-run`` 1 s. A Ray the command started or joined
    quietly is stopped here, without the 0.5 s Ray's exit hook waits for worker logs
    (``cohort.driver.cluster.stop_quiet_ray``); the other atexit hooks (MLflow's) run as before.
    Only at a process's end: what is frozen is never collected."""
    from cohort.driver.cluster import stop_quiet_ray

    stop_quiet_ray()
    gc.freeze()
    sys.exit(code)


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) sets the yielded event instead of raising wherever the main thread is: a
    KeyboardInterrupt in the middle of an MLflow write left SQLite locked, and the run could then
    not be marked KILLED. The caller checks the event between writes. Outside the main thread
    (where no signal handler can be set) the event is never set and Ctrl-C behaves as usual."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
