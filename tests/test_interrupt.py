"""Ctrl-C during a run is taken between MLflow writes (cohort.console.command.deferred_interrupt): a
KeyboardInterrupt raised in the middle of a SQLite write left the store locked, and the driver
then failed to mark its run KILLED (exit 1 instead of 130). And how a command's process ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from cohort.console.command import deferred_interrupt


def test_ctrl_c_sets_the_event_instead_of_raising_mid_write():
    before = signal.getsignal(signal.SIGINT)
    written = []
    with deferred_interrupt() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)  # arrives "during" the write below
        written.append("epoch 2")  # not cut short by a KeyboardInterrupt
        assert interrupted.wait(timeout=5)
    assert written == ["epoch 2"]
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C raises again afterwards


def test_outside_the_main_thread_it_changes_nothing():
    outcome = {}

    def body():
        with deferred_interrupt() as interrupted:
            outcome["set"] = interrupted.is_set()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert outcome == {"set": False}


def test_a_commands_process_ends_with_its_code_its_atexit_hooks_run_and_its_heap_frozen():
    """exit_process: the interpreter's closing garbage collection skips the frozen heap; what the
    atexit hooks do (Ray's shutdown, MLflow's) still happens, after the command's last output."""
    code = "\n".join([
        "import atexit, gc",
        "from cohort.console.command import exit_process",
        "atexit.register(lambda: print('atexit: frozen', gc.get_freeze_count() > 0, flush=True))",
        "print('done', flush=True)",
        "exit_process(2)",
    ])
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stdout, ended.stderr) == (2, "done\natexit: frozen True\n", "")


class FakeQueue:
    """What fit_in_background asks of its ``wake`` queue; ``refuses``: put_nowait raises it."""

    def __init__(self, refuses: type[Exception] | None = None):
        self.items, self.refuses = [], refuses

    def put_nowait(self, item):
        if self.refuses is not None:
            raise self.refuses("full")
        self.items.append(item)


class FakeTrainer:
    def __init__(self, fails: bool = False):
        self.fails = fails

    def fit(self):
        if self.fails:
            raise RuntimeError("a worker died")
        return "result"


def test_the_fits_end_wakes_the_reader_of_its_queue():
    """The driver and a trial read their fit's messages with a timeout of half a second: without the
    FIT_ENDED put when the fit ends, each fit's reader waited up to that long before it saw the end."""
    from cohort.driver.launch import FIT_ENDED, fit_in_background

    for trainer, key in ((FakeTrainer(), "result"), (FakeTrainer(fails=True), "error")):
        wake = FakeQueue()
        thread, outcome = fit_in_background(trainer, wake=wake)
        thread.join(timeout=10)
        assert list(outcome) == [key] and wake.items == [FIT_ENDED]
    # A full queue (the reader has a message to read anyway) or a gone one changes nothing.
    thread, outcome = fit_in_background(FakeTrainer(), wake=FakeQueue(refuses=RuntimeError))
    thread.join(timeout=10)
    assert outcome == {"result": "result"}
