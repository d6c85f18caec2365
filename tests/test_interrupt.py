"""Ctrl-C during a run is taken between MLflow writes (cohort.config.errors.deferred_interrupt): a
KeyboardInterrupt raised in the middle of a SQLite write left the store locked, and the driver
then failed to mark its run KILLED (exit 1 instead of 130)."""
from __future__ import annotations

import os
import signal
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
