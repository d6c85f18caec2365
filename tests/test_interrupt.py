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
