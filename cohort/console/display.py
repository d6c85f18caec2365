"""What the commands show while they work: per-epoch lines or tables, a live step counter inside
an epoch, the time left, and the overall progress of a sweep or a study.

Four modes, one rule for every command (``--quiet``, ``--log-format``):

- ``tty``: stdout is a terminal. A progress bar (tqdm) redrawn in place inside each epoch, and each
  epoch's line, or a compact table per peer when the line does not fit the terminal's width.
- ``log``: stdout is not a terminal (CI, ``nohup``, a file). Plain lines, no control characters:
  one line per epoch with the run's time left, or the same table as on a terminal when the line
  would be wider than ``COLUMNS`` (120 when unset).
- ``json``: one JSON object per line on stdout (an epoch, a trial's event, the end of a run);
  everything else goes to stderr.
- ``quiet``: errors and the final summary only.

The rendering functions are pure (reports in, text out); :class:`EpochDisplay` and
:class:`RunsDisplay` hold the little state a command needs (clocks, the bar). The step counter
reaches the driver as a small message (:func:`step_message`: a ``step`` key, no ``epoch`` key)
that rank 0 sends a few times a second at most (:class:`StepTicker`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from cohort.worker.ticker import STEP

MODES = ("tty", "log", "json", "quiet")
# Anything a terminal would interpret: escape sequences, carriage returns, other C0 controls but newline.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_stdout: TextIO | None = None  # the real stdout while command_stdout() redirects stdout


# --------------------------------------------------------------------------- modes


def add_display_options(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--log-format``: the same two options on every command."""
    parser.add_argument("--quiet", action="store_true", help="print errors and the final summary only")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per line on stdout (each epoch, each run's event), for "
                             "scripts; the rest on stderr (default: text)")


def choose_mode(quiet: bool = False, log_format: str = "text", stream: TextIO | None = None) -> str:
    """The display mode of a command's options and of where its stdout goes."""
    if log_format == "json":
        return "json"
    if quiet:
        return "quiet"
    stream = stream if stream is not None else sys.stdout
    return "tty" if is_terminal(stream) else "log"


def mode_of(args: argparse.Namespace) -> str:
    return choose_mode(getattr(args, "quiet", False), getattr(args, "log_format", "text"))


def saved_mode(args: argparse.Namespace) -> str:
    """The mode for an object Tune saves with a sweep (a callback): ``json`` or ``quiet`` when asked,
    else ``auto``, told from stdout when it shows something (:func:`runtime_mode`)."""
    return lasting_mode(mode_of(args))


def lasting_mode(mode: str) -> str:
    """``saved_mode`` of a display mode: ``json`` and ``quiet`` kept, a terminal's or a log's ``auto``."""
    return mode if mode in ("json", "quiet") else "auto"


DISPLAYS = ("auto", *MODES)


def make_display(display: str | Display) -> Display:
    """A display from the Python API's ``display`` argument: a :class:`Display`, or one of
    ``DISPLAYS`` (``auto``: a terminal's bar, else log lines)."""
    if not isinstance(display, str):
        return display
    if display not in DISPLAYS:
        from cohort.config.errors import CohortError

        raise CohortError(f"display {display!r}: one of {', '.join(DISPLAYS)}")
    return Display(choose_mode() if display == "auto" else display)


def runtime_mode(mode: str) -> str:
    return choose_mode() if mode == "auto" else mode


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def command_stdout(mode: str):
    """Where everything else printed to stdout goes while a command shows its display in ``mode``.
    Ray prints what the cluster pushes to the driver (the raylet's warnings) with ``print``: with
    JSON it goes to stderr, so that stdout carries the JSON objects only; on a terminal it goes
    above the bars (through tqdm, which clears and redraws them) instead of onto a bar's line.
    The display itself writes to the real stdout."""
    global _stdout
    if mode not in ("json", "tty"):
        yield
        return
    previous, _stdout = _stdout, sys.stdout
    if mode == "json":
        target = sys.stderr
    else:
        from tqdm.contrib import DummyTqdmFile

        target = DummyTqdmFile(sys.stdout)
    try:
        with contextlib.redirect_stdout(target):
            yield
    finally:
        _stdout = previous


def terminal_width(default: int = 120) -> int:
    return shutil.get_terminal_size((default, 24)).columns


def log_width(environ: Mapping[str, str] | None = None, default: int = 120) -> int:
    """The width of a log's lines: COLUMNS when it is a positive number, else ``default``."""
    value = (os.environ if environ is None else environ).get("COLUMNS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


def terminal_rows() -> int:
    # Given to tqdm: it hides every bar on a terminal that reports 0 rows (a bare pseudo-terminal).
    return shutil.get_terminal_size((120, 24)).lines


# --------------------------------------------------------------------------- time


def clock(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"``, ``"42s"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def estimate_left(elapsed: float, done: int, total: int) -> float:
    """Seconds left if the runs still to go take as long, on average, as the finished ones (NaN
    before the first finishes). With runs in parallel this is the throughput so far, so it counts
    the parallelism too."""
    if done <= 0:
        return math.nan
    return elapsed / done * max(total - done, 0)


def mean_epoch_seconds(durations: list[float]) -> float:
    """The mean time of an epoch; the first is left out once there are others (it holds the
    workers' start-up). NaN with none."""
    usable = durations[1:] if len(durations) > 1 else durations
    return sum(usable) / len(usable) if usable else math.nan


def first_epoch_pace(peers: list[str], report: dict[str, Any]) -> float | None:
    """The first epoch's length without the start-up: the shortest of the peers' ``epoch_seconds``
    (each peer's training time; a peer whose worker started early also waited in its first step
    for the others), None where the report has none."""
    times = [value for value in (_metric(report, peer, "epoch_seconds") for peer in peers) if value is not None]
    return min(times) if times else None


def run_left(epochs: int, done: int, durations: list[float], in_epoch: float = 0.0, fraction: float = 0.0) -> float:
    """Seconds until the run's last epoch ends: ``epochs - done`` epochs of the mean time, less what
    the current epoch has run (``in_epoch`` seconds, ``fraction`` of its steps). Before any epoch
    ends, and while the only one that ended is the first (it holds the workers' start-up), the
    current one's pace stands in for the mean (NaN before it has one)."""
    mean = mean_epoch_seconds(durations)
    if len(durations) < 2 and fraction > 0:
        mean = in_epoch / fraction
    if not math.isfinite(mean):
        return math.nan
    return max(mean * max(epochs - done, 0) - in_epoch, 0.0)


# --------------------------------------------------------------------------- an epoch, rendered


def _metric(report: dict[str, Any], peer: str, name: str) -> float | None:
    value = report.get(f"{peer}/{name}")
    return value if isinstance(value, (int, float)) and value == value else None


def peer_cells(peers: list[str], report: dict[str, Any]) -> list[tuple[str, float, float | None, float | None]]:
    """(peer, top-1, ECE, tail top-1) of every peer (and the ensemble) the report has."""
    rows = []
    for peer in peers:
        acc = _metric(report, peer, "acc")
        if acc is None:
            continue
        tail = _metric(report, peer, "acc_tail")
        rows.append((peer, acc, _metric(report, peer, "ece"),
                     tail if tail is not None else _metric(report, peer, "acc_few")))
    return rows


DATA_WAIT_SHOWN = 0.1  # the share of a peer's training time spent waiting for batches that an epoch's line shows


def data_wait_text(peers: list[str], report: dict[str, Any]) -> str:
    """The peer that waited longest for its batches, as a share of its training time, where the
    share is ``DATA_WAIT_SHOWN`` or more (the data, not the networks or the exchange, set the pace); else ''."""
    shares = []
    for peer in peers:
        wait, seconds = _metric(report, peer, "data_wait_seconds"), _metric(report, peer, "epoch_seconds")
        if wait is not None and seconds:
            shares.append((wait / seconds, peer))
    share, peer = max(shares, default=(0.0, ""))
    return f"{peer} waited for data {100 * share:.0f}%" if share >= DATA_WAIT_SHOWN else ""


def epoch_head(epoch: int, epochs: int) -> str:
    return f"epoch {epoch:>{len(str(epochs))}}/{epochs}"


def left_text(left: float | None) -> str:
    return "" if left is None else f"about {clock(left)} left"


def epoch_line(peers: list[str], epochs: int, report: dict[str, Any], seconds: float,
               left: float | None = None) -> str:
    """One epoch on one line: every peer's top-1, ECE and tail, the epoch's time and the run's time left."""
    parts = [epoch_head(report["epoch"], epochs)]
    for peer, acc, ece, tail in peer_cells(peers, report):
        parts.append(f"{peer} {100 * acc:5.1f}%" + (f" ece {ece:.3f}" if ece is not None else "")
                     + (f" tail {100 * tail:.1f}%" if tail is not None else ""))
    for peer in peers:  # cohort.gates: the share of steps a peer was paused, where it was
        paused = _metric(report, peer, "paused")
        if paused:
            parts.append(f"{peer} paused {100 * paused:.0f}%")
    waited = data_wait_text(peers, report)
    if waited:
        parts.append(waited)
    parts.append(f"{seconds:.1f}s")
    if left is not None and report["epoch"] < epochs:
        parts.append(left_text(left))
    return "  |  ".join(parts)


def epoch_table(peers: list[str], epochs: int, report: dict[str, Any], seconds: float,
                left: float | None = None) -> str:
    """One epoch as a heading line and one row per peer: for cohorts whose line is too wide."""
    rows = peer_cells(peers, report)
    tails = any(tail is not None for *_, tail in rows)
    name = max([len("peer"), *(len(row[0]) for row in rows)])
    waited = data_wait_text(peers, report)
    head = f"{epoch_head(report['epoch'], epochs)}  |  " + (f"{waited}  |  " if waited else "") + f"{seconds:.1f}s"
    if left is not None and report["epoch"] < epochs:
        head += f"  |  {left_text(left)}"
    lines = [head, f"  {'peer':<{name}}  {'top-1':>6}  {'ECE':>6}" + (f"  {'tail':>6}" if tails else "")]
    for peer, acc, ece, tail in rows:
        line = f"  {peer:<{name}}  {100 * acc:>5.1f}%  " + (f"{ece:>6.3f}" if ece is not None else f"{'-':>6}")
        if tails:
            line += f"  {100 * tail:>5.1f}%" if tail is not None else f"  {'-':>6}"
        lines.append(line)
    return "\n".join(lines)


def render_epoch(peers: list[str], epochs: int, report: dict[str, Any], seconds: float, left: float | None,
                 width: int | None) -> str:
    """The epoch's line when it fits ``width`` columns (None: no limit), else its table."""
    line = epoch_line(peers, epochs, report, seconds, left)
    if width is None or len(line) <= width:
        return line
    return epoch_table(peers, epochs, report, seconds, left)


def json_value(value: Any) -> Any:
    """A value JSON can carry: NaN and infinities become null, nested data stays."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    return value


def epoch_json(report: dict[str, Any], epochs: int, seconds: float, left: float | None) -> str:
    """One epoch as one JSON line: its numbers (not the placement and fingerprints), its time, the time left."""
    metrics = {key: json_value(value) for key, value in report.items()
               if isinstance(value, (int, float)) and key != "epoch"}
    return json.dumps({"event": "epoch", "epoch": report["epoch"], "epochs": epochs, "seconds": round(seconds, 3),
                       "left_seconds": None if left is None or not math.isfinite(left) else round(left, 1),
                       "metrics": metrics}, sort_keys=False)


# --------------------------------------------------------------------------- steps inside an epoch

def step_status(message: dict[str, Any], left: float | None) -> str:
    """The bar's text beside it: the epoch's elapsed and remaining time, images per second, the run's time left."""
    step, steps, seconds = message[STEP], message["steps"], message["seconds"]
    remaining = seconds / step * (steps - step) if step else math.nan
    rate = message["images"] / seconds if seconds > 0 else math.nan
    text = f"{clock(seconds)}<{clock(remaining)}, {rate:.0f} img/s" if rate == rate else f"{clock(seconds)}<?"
    return text + (f" | run: {left_text(left)}" if left is not None and math.isfinite(left) else "")


# --------------------------------------------------------------------------- the displays


class Display:
    """Where a command's text goes in its mode."""

    def __init__(self, mode: str, out: TextIO | None = None, err: TextIO | None = None, width: int | None = None):
        if mode not in MODES:
            raise ValueError(f"display mode {mode!r}: one of {', '.join(MODES)}")
        self.mode = mode
        self.out, self.err = out or _stdout or sys.stdout, err or sys.stderr
        self._width = width

    @property
    def width(self) -> int | None:
        """The columns an epoch's line may take before it becomes a table: the terminal's in tty mode
        (asked again at every epoch: a resized window counts; COLUMNS, else 120, where the terminal
        does not say); in a log COLUMNS, else 120 (a 7-peer line is 300 characters); no limit for
        JSON and quiet."""
        if self.mode == "tty":
            return self._width or terminal_width()
        if self.mode == "log":
            return self._width or log_width()
        return None

    def info(self, text: str, stderr: bool = False) -> None:
        """The plan and other notes along the way: not in quiet mode, on stderr with JSON (or when asked)."""
        if self.mode in ("tty", "log"):
            print(text, file=self.err if stderr else self.out, flush=True)
        elif self.mode == "json":
            print(text, file=self.err, flush=True)

    def summary(self, text: str) -> None:
        """The final summary: in every mode (on stderr with JSON)."""
        print(text, file=self.err if self.mode == "json" else self.out, flush=True)

    def json(self, event: str, **fields: Any) -> None:
        if self.mode == "json":
            print(json.dumps({"event": event, **json_value(fields)}), file=self.out, flush=True)


class EpochDisplay:
    """``cohort.run``'s epochs: a bar inside each (tty), a line or table per epoch, the time left."""

    def __init__(self, display: Display, peers: list[str], epochs: int, done: int = 0,
                 now: Callable[[], float] = time.perf_counter):
        self.display, self.peers, self.epochs, self.done, self.now = display, peers, epochs, done, now
        self.durations: list[float] = []
        self.last = now()
        self.bar = None
        self.bar_epoch = 0

    def left(self, in_epoch: float = 0.0, fraction: float = 0.0) -> float:
        return run_left(self.epochs, self.done, self.durations, in_epoch, fraction)

    def step(self, message: dict[str, Any]) -> None:
        """A step counter from rank 0: redraw the bar (tty only; stale epochs ignored)."""
        if self.display.mode != "tty" or message["in_epoch"] <= self.done:
            return
        if self.bar is None or self.bar_epoch != message["in_epoch"]:
            self._close_bar()
            from tqdm import tqdm

            self.bar = tqdm(total=message["steps"], desc=epoch_head(message["in_epoch"], self.epochs),
                            file=self.display.out, leave=False, ncols=self.display.width, mininterval=0,
                            nrows=terminal_rows(), bar_format="{desc} {bar} {n_fmt}/{total_fmt}{postfix}")
            self.bar_epoch = message["in_epoch"]
        self.bar.n = message[STEP]
        fraction = message[STEP] / message["steps"] if message["steps"] else 0.0
        self.bar.set_postfix_str(step_status(message, self.left(message["seconds"], fraction)), refresh=False)
        self.bar.refresh()

    def epoch(self, report: dict[str, Any]) -> None:
        """An epoch's report: its line (or table, or JSON object) with the time left."""
        now = self.now()
        seconds, self.last = now - self.last, now
        self.durations.append(seconds)
        if len(self.durations) == 1:
            # The first epoch this display saw also holds the workers' start-up (seconds on a
            # short epoch): until another ends, its pace is the peers' own training time.
            trained = first_epoch_pace(self.peers, report)
            if trained is not None:
                self.durations[0] = min(seconds, trained)
        self.done = report["epoch"]
        self._close_bar()
        left = self.left()
        mode = self.display.mode
        if mode == "json":
            print(epoch_json(report, self.epochs, seconds, left), file=self.display.out, flush=True)
        elif mode in ("tty", "log"):
            print(render_epoch(self.peers, self.epochs, report, seconds, left, self.display.width),
                  file=self.display.out, flush=True)

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StatusLine:
    """A terminal's status line: redrawn in place below the lines written above it (tqdm, created
    at its first use, so that a command that never shows it draws nothing)."""

    def __init__(self, display: Display):
        self.display, self.bar = display, None

    def show(self, status: str) -> None:
        self._bar().set_description_str(status)

    def write_above(self, text: str, status: str) -> None:
        self._bar().write(text, file=self.display.out)
        self.show(status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _bar(self):
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(file=self.display.out, leave=False, ncols=self.display.width, nrows=terminal_rows(),
                            mininterval=0, bar_format="{desc}")
        return self.bar


def runs_status(finished: int, running: int, total: int, elapsed: float, left: float) -> str:
    """A sweep's or study's overall progress: ``[3/12 runs done, 2 running, 7 pending | 5m10s so far, about 12m left]``."""
    pending = max(total - finished - running, 0)
    return (f"[{finished}/{total} runs done, {running} running, {pending} pending | {clock(elapsed)} so far, "
            f"about {clock(left)} left]")


def count_trials(trials) -> tuple[int, int]:
    """(finished, running) of Tune's trials (finished: terminated or errored)."""
    statuses = [str(getattr(trial, "status", "")) for trial in trials]
    return sum(s in ("TERMINATED", "ERROR") for s in statuses), sum(s == "RUNNING" for s in statuses)


class RunsDisplay:
    """``cohort.tune`` and ``cohort.study``: per-run events under one overall progress line (tty:
    a bar redrawn below the events; log: the status in front of each finished run's line)."""

    def __init__(self, display: Display, total: int, already_done: int = 0, now: Callable[[], float] = time.perf_counter):
        self.display, self.total, self.already_done, self.now = display, total, already_done, now
        self.started = now()
        self.finished_here, self.running = 0, 0
        self.line = StatusLine(display)

    def status(self) -> str:
        elapsed = self.now() - self.started
        left = estimate_left(elapsed, self.finished_here, self.total - self.already_done)
        return runs_status(self.already_done + self.finished_here, self.running, self.total, elapsed, left)

    def progress(self) -> dict[str, Any]:
        """The overall progress as a JSON object's fields (the status line's numbers)."""
        elapsed = self.now() - self.started
        left = estimate_left(elapsed, self.finished_here, self.total - self.already_done)
        done = self.already_done + self.finished_here
        return {"done": done, "running": self.running, "pending": max(self.total - done - self.running, 0),
                "total": self.total, "elapsed_seconds": round(elapsed, 1),
                "left_seconds": round(left, 1) if math.isfinite(left) else None}

    def update(self, finished_here: int | None = None, running: int | None = None) -> None:
        if finished_here is not None:
            self.finished_here = finished_here
        if running is not None:
            self.running = running
        if self.display.mode == "tty":
            self.line.show(self.status())

    def event(self, text: str, finished: bool = False, **fields: Any) -> None:
        """A run's event: a line (above the bar on a terminal), or a JSON object."""
        mode = self.display.mode
        if mode == "json":
            self.display.json("run", text=text, finished=finished, **fields,
                              **({"progress": self.progress()} if finished else {}))
        elif mode == "tty":
            self.line.write_above(text, self.status())
        elif mode == "log":
            print(f"{self.status()} {text}" if finished else text, file=self.display.out, flush=True)

    def close(self) -> None:
        self.line.close()


class TaskProgress:
    """A command's progress through a known list of tasks (``cohort.evaluate``'s test sets): on a
    terminal a line redrawn below the finished tasks' lines; in a log, the count and the time left
    in front of each finished task's line (on stderr, as the command's other notes). A single task
    shows nothing: there is nothing to count."""

    def __init__(self, display: Display, total: int, what: str, now: Callable[[], float] = time.perf_counter):
        self.display, self.total, self.what, self.now = display, total, what, now
        self.started, self.finished = now(), 0
        self.line = StatusLine(display)

    def status(self) -> str:
        elapsed = self.now() - self.started
        left = estimate_left(elapsed, self.finished, self.total)
        return f"[{self.finished}/{self.total} {self.what} | {clock(elapsed)} so far, about {clock(left)} left]"

    def done(self, text: str) -> None:
        self.finished += 1
        if self.total < 2:
            return
        if self.display.mode == "tty":
            self.line.write_above(text, self.status())
        else:
            self.display.info(f"{self.status()} {text}", stderr=True)

    def close(self) -> None:
        self.line.close()
