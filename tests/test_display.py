"""The display (cohort.console.display) driven with fake reports: terminal and log renderings, the time left,
the JSON lines, the step counter's rate. Pure: no Ray."""
from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch
from conftest import empty_store

from cohort.console.display import (
    CONTROL,
    Display,
    EpochDisplay,
    RunsDisplay,
    choose_mode,
    clock,
    epoch_line,
    estimate_left,
    log_width,
    mean_epoch_seconds,
    render_epoch,
    run_left,
    runs_status,
    step_status,
)
from cohort.datasets.base import batch_indices
from cohort.worker.ticker import StepTicker, epoch_steps, is_step, step_message

SEVEN = ["resnet32x4", "wrn40_2", "resnet8x4", "vgg13", "mobilenetv2", "shufflev2", "resnet20"]


def fake_report(peers, epoch, tail=False):
    report = {"epoch": epoch, "cohort/fingerprints": {p: 1 for p in peers}, "cohort/batches_identical": 1.0}
    for index, peer in enumerate([*peers, "ensemble"]):
        report[f"{peer}/acc"] = 0.5 + index / 100
        report[f"{peer}/ece"] = 0.01 * (index + 1)
        report[f"{peer}/nll"] = math.nan  # NaN must not break the JSON line
        if tail:
            report[f"{peer}/acc_tail"] = 0.3 + index / 100
    return report


class Tty(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_modes_follow_the_options_and_the_stream():
    assert choose_mode(stream=Tty()) == "tty"
    assert choose_mode(stream=io.StringIO()) == "log"
    assert choose_mode(quiet=True, stream=Tty()) == "quiet"
    assert choose_mode(quiet=True, log_format="json", stream=Tty()) == "json"


def test_time_left_arithmetic():
    assert clock(42) == "42s" and clock(185) == "3m05s" and clock(3720) == "1h02m" and clock(math.nan) == "?"
    assert mean_epoch_seconds([100.0, 10.0, 20.0]) == pytest.approx(15.0)  # the first (start-up) left out
    assert mean_epoch_seconds([100.0]) == 100.0 and math.isnan(mean_epoch_seconds([]))
    assert run_left(10, 3, [100.0, 10.0, 20.0]) == pytest.approx(7 * 15.0)
    assert run_left(10, 3, [100.0, 10.0, 20.0], in_epoch=5.0, fraction=0.5) == pytest.approx(7 * 15.0 - 5.0)
    # Before the first epoch ends: the current epoch's pace (12 s for a quarter: 48 s an epoch).
    assert run_left(4, 0, [], in_epoch=12.0, fraction=0.25) == pytest.approx(4 * 48.0 - 12.0)
    assert math.isnan(run_left(4, 0, []))
    # After the first epoch (start-up in its 30 s), the second's pace: 2 s for half of it.
    assert run_left(10, 1, [30.0], in_epoch=2.0, fraction=0.5) == pytest.approx(9 * 4.0 - 2.0)
    assert run_left(10, 1, [30.0]) == pytest.approx(9 * 30.0)
    assert run_left(3, 3, [5.0, 5.0]) == 0.0
    assert estimate_left(60.0, 3, 15) == pytest.approx(240.0) and math.isnan(estimate_left(1.0, 0, 3))


def test_epoch_steps_match_the_batches():
    for size, batch, shards in [(1437, 128, 1), (1409, 128, 1), (1408, 128, 1), (1, 128, 1), (1410, 128, 3),
                                (50000, 64, 2), (257, 128, 2)]:
        assert epoch_steps(size, batch, shards) == len(batch_indices(torch.arange(size), batch, shards))


def test_seven_peers_fit_120_columns_on_a_terminal():
    report = fake_report(SEVEN, 3, tail=True)
    line = epoch_line([*SEVEN, "ensemble"], 240, report, 74.2, 5 * 3600.0)
    assert len(line) > 120  # the one-line form does not fit: the table must take over
    text = render_epoch([*SEVEN, "ensemble"], 240, report, 74.2, 5 * 3600.0, width=120)
    lines = text.splitlines()
    assert len(lines) == 2 + 8 and max(map(len, lines)) <= 120
    assert "about 5h00m left" in lines[0] and "epoch   3/240" in lines[0]
    row = next(line for line in lines if line.strip().startswith("mobilenetv2"))
    assert row.split() == ["mobilenetv2", "54.0%", "0.050", "34.0%"]
    # Even at 80 columns.
    assert max(map(len, render_epoch([*SEVEN, "ensemble"], 240, report, 74.2, 10.0, 80).splitlines())) <= 80


def test_three_peers_keep_their_line_when_it_fits():
    peers = ["a", "b", "c", "ensemble"]
    report = fake_report(peers[:3], 2)
    text = render_epoch(peers, 5, report, 0.5, 1.5, width=140)
    assert len(text) == 135 and render_epoch(peers, 5, report, 0.5, 1.5, width=134).count("\n") == 5
    assert render_epoch(peers, 5, report, 0.5, 1.5, width=None) == text  # a log: the line, whatever its length
    assert "\n" not in text and text.startswith("epoch 2/5  |  a  50.0% ece 0.010") and text.endswith("about 2s left")
    assert render_epoch(peers, 5, {**report, "epoch": 5}, 0.5, 0.0, 140).endswith("0.5s")  # no "left" at the end


def test_an_epoch_line_says_when_a_peer_waited_for_data():
    peers = ["a", "b", "ensemble"]
    report = fake_report(peers[:2], 1)
    report.update({"a/epoch_seconds": 10.0, "a/data_wait_seconds": 0.5, "b/epoch_seconds": 8.0,
                   "b/data_wait_seconds": 2.0})
    line = render_epoch(peers, 3, report, 12.0, None, width=None)
    assert "  |  b waited for data 25%  |  12.0s" in line and "a waited" not in line
    table = render_epoch(peers, 3, report, 12.0, None, width=40)
    assert table.splitlines()[0] == "epoch 1/3  |  b waited for data 25%  |  12.0s"
    report["b/data_wait_seconds"] = 0.7  # under a tenth of every peer's training time: not shown
    assert "waited" not in render_epoch(peers, 3, report, 12.0, None, width=None)
    assert "waited" not in render_epoch(peers, 3, fake_report(peers[:2], 1), 12.0, None, width=None)


def run_epochs(mode, peers, epochs=3, steps=True):
    out, err, now = (Tty() if mode == "tty" else io.StringIO()), io.StringIO(), Clock()
    display = EpochDisplay(Display(mode, out, err, width=120), [*peers, "ensemble"], epochs, now=now)
    for epoch in range(1, epochs + 1):
        for step in range(1, 5):
            now.t += 1.0
            if steps:
                display.step(step_message(epoch, step, 4, 128 * step, 1.0 * step))
        now.t += 1.0
        display.epoch(fake_report(peers, epoch))
    display.close()
    return out.getvalue(), err.getvalue()


def test_log_rendering_has_no_control_characters_and_the_time_left():
    out, _ = run_epochs("log", SEVEN[:1])
    lines = out.splitlines()
    assert len(lines) == 3 and not CONTROL.search(out)
    assert lines[0].startswith("epoch 1/3  |  resnet32x4  50.0%") and lines[0].endswith("5.0s  |  about 10s left")
    assert lines[1].endswith("about 5s left") and lines[2].endswith("5.0s")


def test_seven_peers_in_a_log_print_the_table_within_columns(monkeypatch):
    """In a log a 7-peer epoch was one line of 300 characters: wider than COLUMNS (else 120), the
    table, as on a terminal, without control characters."""
    for columns, limit in [(None, 120), ("100", 100), ("junk", 120)]:
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        out = io.StringIO()
        display = EpochDisplay(Display("log", out), [*SEVEN, "ensemble"], 3, now=Clock())
        display.epoch(fake_report(SEVEN, 1))
        lines = out.getvalue().splitlines()
        assert len(lines) == 2 + 8 and max(map(len, lines)) <= limit and not CONTROL.search(out.getvalue())
        assert lines[0].startswith("epoch 1/3") and lines[1].split()[:2] == ["peer", "top-1"]
    assert log_width({"COLUMNS": "0"}) == 120 and log_width({"COLUMNS": " 90 "}) == 90 and log_width({}) == 120


def test_terminal_rendering_draws_a_bar_and_fits_the_width():
    out, _ = run_epochs("tty", SEVEN)
    assert "\r" in out  # the bar, redrawn in place
    assert "4/4" in out and "img/s" in out
    # What stays on the screen once the bars are cleared: tables within 120 columns.
    final = [line.split("\r")[-1] for line in out.split("\n")]
    printed = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in final]
    assert max(map(len, printed)) <= 120
    assert sum(line.startswith("epoch ") for line in printed) == 3


def test_the_first_epochs_time_left_leaves_the_start_up_out():
    """A first epoch of 12.7 s of which the peers trained 1.0 s and 1.4 s (the rest: workers
    starting): 2 epochs left are about 2 s, not 25 s; later epochs use the mean as before."""
    out, now = io.StringIO(), Clock()
    display = EpochDisplay(Display("log", out), ["a", "b", "ensemble"], 3, now=now)
    now.t = 12.7
    display.epoch({**fake_report(["a", "b"], 1), "a/epoch_seconds": 1.4, "b/epoch_seconds": 1.0})
    now.t = 14.0
    display.epoch({**fake_report(["a", "b"], 2), "a/epoch_seconds": 1.2, "b/epoch_seconds": 1.2})
    first, second = out.getvalue().splitlines()
    assert first.endswith("12.7s  |  about 2s left") and second.endswith("1.3s  |  about 1s left")


def test_json_lines_parse_and_quiet_prints_nothing():
    out, err = run_epochs("json", ["a", "b"])
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["epoch"] for o in objects] == [1, 2, 3] and all(o["event"] == "epoch" for o in objects)
    assert objects[0]["metrics"]["a/acc"] == 0.5 and objects[0]["metrics"]["a/nll"] is None
    assert objects[0]["left_seconds"] == 10.0 and objects[0]["seconds"] == 5.0
    assert "cohort/fingerprints" not in objects[0]["metrics"]
    assert run_epochs("quiet", ["a", "b"]) == ("", "")


def test_step_status_and_messages():
    message = step_message(2, 10, 40, 1280, 5.0)
    assert is_step(message) and not is_step({"epoch": 1, "step": 3})
    assert step_status(message, 600.0) == "5s<15s, 256 img/s | run: about 10m00s left"


def test_step_ticker_sends_at_a_low_rate():
    sent, now = [], Clock()
    ticker = StepTicker(sent.append, steps=100, interval=0.25, now=now)
    ticker.begin(3)
    for step in range(1, 101):
        now.t += 0.01  # 100 steps a second
        ticker.tick(step, 64)
    # 1 s of steps: the first, one every 0.25 s, and the last.
    assert 4 <= len(sent) <= 6 and sent[-1] == step_message(3, 100, 100, 6400, pytest.approx(1.0))
    assert all(m["in_epoch"] == 3 for m in sent)


def test_runs_display_overall_progress():
    assert runs_status(3, 2, 12, 310.0, 720.0) == "[3/12 runs done, 2 running, 7 pending | 5m10s so far, about 12m00s left]"
    out, now = io.StringIO(), Clock()
    runs = RunsDisplay(Display("log", out), total=4, now=now)
    runs.event("trial a started")
    now.t = 60.0
    runs.update(finished_here=1, running=2)
    runs.event("trial a done", finished=True)
    lines = out.getvalue().splitlines()
    assert lines == ["trial a started", "[1/4 runs done, 2 running, 1 pending | 1m00s so far, about 3m00s left] trial a done"]
    tty = Tty()
    runs = RunsDisplay(Display("tty", tty), total=4, now=now)
    runs.update(finished_here=0, running=1)
    runs.event("trial b started")
    runs.close()
    assert "trial b started" in tty.getvalue() and "0/4 runs done, 1 running, 3 pending" in tty.getvalue()
    out = io.StringIO()
    now.t = 0.0
    runs = RunsDisplay(Display("json", out), total=4, now=now)
    runs.event("trial c started", trial="c")
    now.t = 90.0
    runs.update(finished_here=1, running=1)
    runs.event("trial c done", finished=True, trial="c")
    started, done = (json.loads(line) for line in out.getvalue().splitlines())
    assert started == {"event": "run", "text": "trial c started", "finished": False, "trial": "c"}
    assert done == {"event": "run", "text": "trial c done", "finished": True, "trial": "c",
                    "progress": {"done": 1, "running": 1, "pending": 2, "total": 4, "elapsed_seconds": 90.0,
                                 "left_seconds": 270.0}}


def test_a_sweeps_events_under_its_overall_progress(tmp_path, capsys):
    """The sweep's callback (driven with fake trials, MLflow in a file): per-trial lines, each finished
    trial's line led by the runs done / running / pending; JSON lines that parse; the callback still
    pickles (Tune saves it) without its display."""
    import pickle
    import types

    from cohort.topology import topology_from_dict
    from cohort.tracking.tracker import Tracker
    from cohort.tuning.sweep import SweepCallback

    spec = {"name": "s", "peers": {"a": {"model": "mlp_tiny"}, "b": {"model": "mlp_tiny"}},
            "edges": [{"from": "a", "to": "b", "loss": "kd"}]}
    uri = empty_store(tmp_path / "m.db")
    parent = Tracker(uri, "sweep").start(topology_from_dict(spec), "sweep")
    for mode in ("log", "json"):
        callback = SweepCallback(uri, "sweep", parent, 2, "b/acc", tmp_path / f"{mode}.json", total=3, display=mode)
        trials = [types.SimpleNamespace(trial_id=f"{mode}{i}", config={"lr": 0.1 * (i + 1)}, status="PENDING")
                  for i in range(3)]
        trials[0].status = "RUNNING"
        callback.on_trial_start(0, trials, trials[0])
        callback.on_trial_result(0, trials, trials[0], {"epoch": 1, "objective": 0.5})
        trials[1].status = "RUNNING"
        callback.on_trial_complete(0, trials, trials[0])
        pickle.loads(pickle.dumps(callback))
        callback.on_experiment_end(trials)
        out = capsys.readouterr().out
        lines = out.splitlines()
        if mode == "log":
            assert lines[0] == "trial log0 started: lr=0.1" and lines[1] == "trial log0 epoch 1/2: b/acc = 0.5000"
            # The times depend on how fast MLflow answers here: their form only.
            assert re.match(r"\[1/3 runs done, 1 running, 1 pending \| \d+s so far, about \S+ left\] trial log0",
                            lines[2]), lines[2]
            assert not CONTROL.search(out)
        else:
            events = [json.loads(line) for line in lines]
            assert [e["event"] for e in events] == ["run"] * 3 and events[1]["objective"] == 0.5
            assert events[2]["finished"] is True and events[2]["trial"] == "json0"


def test_with_json_stdout_carries_the_objects_only_and_anything_else_goes_to_stderr(capsys):
    """Ray prints what the cluster pushes to the driver (a raylet warning) with print(): under
    --log-format json that must not land between the JSON lines."""
    from cohort.console.display import command_stdout

    with command_stdout("json"):
        print("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started")
        display = Display("json")
        display.json("epoch", epoch=1)
        display.info("the plan")
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == [{"event": "epoch", "epoch": 1}]
    assert "(raylet)" in captured.err and "the plan" in captured.err
    print("after")  # stdout is stdout again
    assert capsys.readouterr().out == "after\n"


def test_on_a_terminal_anything_else_printed_goes_above_the_bar_not_onto_its_line(monkeypatch):
    """A bar is drawn without a newline: a line printed meanwhile (Ray's warning) used to land
    on the bar's line ("[0/4 runs done ...](raylet) WARNING ..."). Through command_stdout the
    bar is cleared first, the line printed whole, and the bar drawn again below it."""
    import sys

    from cohort.console.display import command_stdout

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    with command_stdout("tty"):
        runs = RunsDisplay(Display("tty"), total=4, now=Clock())
        runs.update(finished_here=0, running=1)
        print("(raylet) WARNING: many workers")
        runs.close()
    # What the terminal shows: each "\r" returns to the line's start; the bar's text is overwritten.
    lines = [line.split("\r")[-1].strip() for line in tty.getvalue().split("\n")]
    assert lines[0] == "(raylet) WARNING: many workers", lines  # whole, on a line of its own
    assert "[0/4 runs done" in tty.getvalue().split("(raylet)")[1]  # the bar drawn again below it


def test_the_driver_asks_ray_for_uncoloured_prefixes_when_stdout_is_not_a_terminal():
    from cohort.driver.cluster import driver_environment

    assert driver_environment(None, False, stdout_is_terminal=False)["RAY_COLOR_PREFIX"] == "0"
    assert "RAY_COLOR_PREFIX" not in driver_environment(None, False, stdout_is_terminal=True)
    joined = driver_environment("auto", False, stdout_is_terminal=False)
    assert "RAY_worker_niceness" not in joined and joined["RAY_COLOR_PREFIX"] == "0"  # a joined cluster's workers are its own


def test_a_commands_tasks_show_their_count_and_time_left():
    """cohort.evaluate's test sets: in a log, each finished one's line led by the count and the time
    left (on stderr, with the command's other notes); on a terminal, a line redrawn below them."""
    from cohort.console.display import TaskProgress

    out, err, now = io.StringIO(), io.StringIO(), Clock()
    progress = TaskProgress(Display("log", out, err), 3, "test sets", now=now)
    now.t = 10.0
    progress.done("clean: done")
    now.t = 30.0
    progress.done("gaussian_noise severity 1: done")
    progress.close()
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == ["[1/3 test sets | 10s so far, about 20s left] clean: done",
                                           "[2/3 test sets | 30s so far, about 15s left] gaussian_noise severity 1: done"]
    tty = Tty()
    progress = TaskProgress(Display("tty", tty, io.StringIO()), 3, "test sets", now=now)
    progress.done("clean: done")
    progress.close()
    shown = [line.split("\r")[-1].strip() for line in tty.getvalue().split("\n")]
    assert shown[0] == "clean: done" and "[1/3 test sets | 0s so far, about 0s left]" in tty.getvalue()
    quiet = io.StringIO()
    TaskProgress(Display("quiet", quiet, quiet), 3, "test sets").done("clean: done")
    TaskProgress(Display("log", quiet, quiet), 1, "test sets").done("clean: done")  # one task: nothing to count
    assert quiet.getvalue() == ""
