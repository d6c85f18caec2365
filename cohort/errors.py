"""The one exception type the command line turns into a one-line message."""

import contextlib
import reprlib
import signal
import threading

_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = _QUOTE.maxlong = 60
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = _QUOTE.maxfrozenset = 6
_QUOTE.maxlevel = 3


class CohortError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    ``where`` names the file (and, for topology errors, the key) the problem is in.
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def quoted(value: object) -> str:
    """``repr(value)`` cut short, for quoting a user's value in an error (a 1 MB string or a long
    list must not make a 1 MB message); at most 100 characters, however the value nests."""
    return named(_QUOTE.repr(value), 100)


def named(text: object, limit: int = 60) -> str:
    """A key or path as an error names it (unquoted): as is, or its ends around ``...`` when long."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:(limit - 3) // 2]}...{text[len(text) - (limit - 3) // 2:]}"


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (its type's name if it has none)."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def run_command(command, args) -> int:
    """Run a command-line entry point: a ``CohortError`` becomes one line on stderr and exit 2."""
    import sys

    from cohort.display import command_stdout, mode_of

    try:
        with command_stdout(mode_of(args)):
            return command(args)
    except CohortError as error:
        print(str(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output was piped into a command that stopped reading
        return 0


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
