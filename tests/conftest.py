"""The Ray the test modules share, the rule behind `python -m pytest -m "not ray"`, and the GPU tests'
skips (`python -m pytest -m gpu`).

Every test that starts Ray — in this process, in a subprocess, or as a cluster (`ray start`,
Ray's cluster utilities) — carries the `ray` marker (pyproject.toml), so that `-m "not ray"` runs
the rest without Ray. Two checks keep the rule from rotting: a test that uses a fixture starting
Ray without the marker stops the session at collection, and a test without the marker that leaves
Ray running in this process fails.

Tests that need CUDA carry the `gpu` marker (`gpu(devices=2)` for two GPUs or more). Where torch
sees no GPU they are skipped, all with one reason, before any fixture runs: the normal suite only
collects them.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cohort.driver.cluster import driver_environment

# Every Ray the tests start (the fixtures here and in the test modules, and the commands they run
# in subprocesses) runs as a command's own Ray does (cohort.driver.cluster.driver_environment): Ray
# Train's controller polling every 0.1 s instead of 2 s, workers at a plain priority, no preemption
# watcher. Ray Train's metrics stay as Ray has them (a dashboard's Ray uses them); the fixture below
# turns them off for its Ray, as a command does without a dashboard.
RAY_TRAIN_METRICS = "RAY_TRAIN_METRICS_ENABLED"
for _key, _value in driver_environment(None, dashboard=True, stdout_is_terminal=False).items():
    os.environ.setdefault(_key, _value)

# A log's lines are as wide as COLUMNS, else 120 (cohort.console.display.log_width). A shell that
# exports COLUMNS (a narrow window's 80) would change what the display tests and the commands they
# run print: the suite sees the default, and a test that wants a width sets COLUMNS itself.
os.environ.pop("COLUMNS", None)

# Fixtures that start Ray, here or in a test module (a module's own may differ, e.g. test_tune.py's
# Ray with a dashboard; it keeps the name).
RAY_FIXTURES = {"ray_cluster", "two_nodes", "token_cluster"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray of 2 CPUs on this machine, shared by the test modules that use this fixture as it is
    here: they run one after the other, after the tests without Ray (``pytest_collection_modifyitems``),
    and the Ray started for the first goes on to the next (a start and a shutdown cost about 7 s
    here). A module that leaves something of its own holding a CPU shuts it down, so that the next
    starts afresh; so does the first test that is not in such a module (``pytest_runtest_setup``)."""
    import ray

    if not ray.is_initialized():
        before = os.environ.get(RAY_TRAIN_METRICS)
        os.environ.setdefault(RAY_TRAIN_METRICS, "0")
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        finally:
            if before is None:
                os.environ.pop(RAY_TRAIN_METRICS, None)
        SHARED_RAY.add(ray.get_runtime_context().gcs_address)
    yield as_started_here(ray)
    if ray.is_initialized() and not all_cpus_free(ray):
        ray.shutdown()


def all_cpus_free(ray, wait: float = 10.0) -> bool:
    """Whether every CPU of the running Ray is free, waited for up to ``wait`` seconds (a run's
    actors end shortly after its fit returns)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        if ray.available_resources().get("CPU", 0.0) == ray.cluster_resources().get("CPU"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def uses_the_shared_ray(item) -> bool:
    """Whether ``item`` takes this file's ``ray_cluster`` (not a Ray of its module's own)."""
    return "ray_cluster" in getattr(item, "fixturenames", ()) and not hasattr(getattr(item, "module", None),
                                                                               "ray_cluster")


SHARED_RAY_MODULES: set[str] = set()  # the modules whose tests share ray_cluster's Ray (set at collection)
SHARED_RAY: set[str] = set()  # the GCS addresses of the Rays ray_cluster started


def as_started_here(ray):
    """The Ray just started counts as one a command started on this machine (no autoscaler: its fits
    ask Ray Data's autoscaling coordinator nothing, cohort.driver.trainer), as the commands' Rays do."""
    from cohort.driver.cluster import STARTED_HERE

    STARTED_HERE.add(ray.get_runtime_context().gcs_address)
    return ray


def ray_processes(title: str = "RayTrainWorker", ancestor: int | None = None) -> list[int]:
    """PIDs of the processes whose command line holds ``title`` (Ray's actor class: by default Ray
    Train's workers), below ``ancestor`` when given."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title in command and (ancestor is None or _descends_from(int(entry.name), ancestor)):
            found.append(int(entry.name))
    return sorted(found)


def actors_of(ray, class_name: str) -> dict[str, dict]:
    """Every actor of ``class_name`` the running Ray has had, by id: its GCS record (``State``, and
    for a dead one ``DeathCause``, which says whether ``ray.kill`` ended it)."""
    return {actor_id: actor for actor_id, actor in ray._private.state.actors().items()
            if actor.get("ActorClassName") == class_name}


def ended_actors(ray, class_name: str, wait: float = 5.0) -> dict[str, dict]:
    """``actors_of``, once every one of them is DEAD, waited for up to ``wait`` seconds (``ray.kill``
    returns before the actor has ended); as they are then."""
    import time

    deadline = time.monotonic() + wait
    while True:
        found = actors_of(ray, class_name)
        if all(actor["State"] == "DEAD" for actor in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def raylet_pids(cluster) -> set[int]:
    """The PIDs of the raylets of a ``ray.cluster_utils.Cluster``'s nodes."""
    return {info.process.pid for node in cluster.list_all_nodes()
            for info in node.all_processes.get("raylet", ())}


# Set for the whole test session: every process it starts inherits it, and so does every Ray process
# started from those (``end_leftover_workers``).
SESSION_TAG = "COHORT_TEST_SESSION"
# Processes of this session that a Ray left running after it stopped, killed at the session's end.
LEFTOVERS: list[str] = []


def process_environ(pid: int | str) -> dict[bytes, bytes]:
    """The environment a process started with ({} when it is gone or not ours to read)."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.split(b"=", 1) for item in items if b"=" in item)


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command's name (state, parent, ...); [] when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def is_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs (none, or a zombie waiting to be reaped)."""
    fields = stat_fields(pid)
    return not fields or fields[0] == "Z"


def orphaned_workers(raylets: set[int] | None = None, session: str | None = None) -> list[int]:
    """The Ray worker processes (their environment names the raylet that started them) whose raylet
    is one of ``raylets``; or, with ``session``, of that test session and whose raylet is gone."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid() or is_gone(int(entry.name)):
            continue
        environ = process_environ(entry.name)
        raylet = environ.get(b"RAY_RAYLET_PID", b"")
        if not raylet.isdigit():
            continue
        of_raylets = raylets is not None and int(raylet) in raylets
        left_by_session = (session is not None and environ.get(SESSION_TAG.encode()) == session.encode()
                           and is_gone(int(raylet)))
        if of_raylets or left_by_session:
            found.append(int(entry.name))
    return sorted(found)


def end_orphaned_workers(raylets: set[int] | None = None, session: str | None = None) -> list[int]:
    """Kill the Ray worker processes that outlived their raylet (``orphaned_workers``), and return
    their PIDs. A worker normally ends with its raylet; twice in the suite's runs a codistilling run's
    ``SnapshotBoard`` (on a cluster's second node, then on the shared Ray) was left running under init,
    holding 0.7 GB, until the machine stopped (docs/testing.md)."""
    return kill_all(orphaned_workers(raylets, session))


def kill_all(pids: list[int]) -> list[int]:
    """SIGKILL each of ``pids``; those that were still there to kill."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:  # ended meanwhile
            pass
    return killed


def end_leftover_workers(session: str, wait: float = 3.0) -> list[str]:
    """At the session's end, once its Rays have stopped: the workers of this session still running
    after ``wait`` seconds, though their raylet is gone, are killed; each as ``pid (title, RSS)``."""
    import time

    deadline = time.monotonic() + wait
    while orphaned_workers(session=session) and time.monotonic() < deadline:
        time.sleep(0.1)
    described = {}
    for pid in orphaned_workers(session=session):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            rss = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            described[pid] = f"{pid} ({title}, {int(rss) // 1024} MB)"
        except (OSError, StopIteration):
            described[pid] = str(pid)
    return [described[pid] for pid in kill_all(list(described))]


class WorkersWatch:
    """While in use, looks at Ray Train's workers every ``every`` seconds: ``workers`` holds every
    one seen, ``loaded`` those that had a library whose path holds ``library`` in their memory (they
    imported it)."""

    def __init__(self, library: str, every: float = 0.1):
        self.library, self.every = library, every
        self.workers: set[int] = set()
        self.loaded: set[int] = set()

    def __enter__(self) -> WorkersWatch:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            for pid in ray_processes():
                self.workers.add(pid)
                if pid not in self.loaded and has_mapped(pid, self.library):
                    self.loaded.add(pid)


def has_mapped(pid: int, library: str) -> bool:
    """Whether the process has a file whose path holds ``library`` in its memory (it imported that
    library; False once it is gone)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        fields = stat_fields(pid)
        if not fields:
            return False
        pid = int(fields[1])
    return False


@functools.cache
def _store_template() -> Path:
    """An empty MLflow store, made once per test process (removed when it ends)."""
    import atexit
    import logging
    import tempfile

    from mlflow.tracking import MlflowClient

    folder = tempfile.mkdtemp(prefix="cohort-mlflow-template-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    template = Path(folder) / "mlflow.db"
    # The first use creates the tables; MLflow's and alembic's lines about it would land in the
    # output of whichever test asked first.
    logging.disable(logging.INFO)
    try:
        MlflowClient(f"sqlite:///{template}").search_experiments()
    finally:
        logging.disable(logging.NOTSET)
    return template


def empty_store(path: Path) -> str:
    """The URI of an empty MLflow store (sqlite) at ``path``, copied from ``_store_template``.
    Creating a store runs MLflow's migrations (about a second each here, three in a fresh process);
    a test whose store is only its setting, not what it checks, takes a copy, and so does a command
    it starts. Experiments get their artifact locations from cohort's Tracker (or the test), not from
    where the template was made."""
    shutil.copyfile(_store_template(), path)
    return f"sqlite:///{path}"


# Steps run in order in one fresh interpreter (the `fresh_interpreter` fixture): what each has
# imported, and the value it leaves in RESULT, are what the tests that ask for it check. OUT is a
# folder of the step's own.
FRESH_STEPS = {
    "import cohort": "import cohort; cohort.run_study, cohort.sweep, cohort.evaluate_run, cohort.read_study",
    # Second, before any step imports torch: what the process of a codistilling run's board loads.
    "the snapshot board": "import cohort.worker.board",
    "model names": """
        from cohort.models import model_exists, known_models
        assert model_exists('resnet8') and model_exists('torchvision:resnet18')
        assert 'timm:<name>' in known_models()
    """,
    "reliability diagram": """
        import torch
        from cohort.metrics import reliability as R
        R.reliability_diagram(R.reliability_bins(torch.randn(50, 4), torch.randint(0, 4, (50,))), OUT / 'x.png', 't')
    """,
    # Last: it puts a copy of cohort in the place of this checkout's.
    "a new loss file and a new gate file": """
        import shutil
        import cohort
        shutil.copytree(pathlib.Path(cohort.__file__).parent, OUT / 'cohort', ignore=shutil.ignore_patterns('__pycache__'))
        (OUT / 'cohort' / 'losses' / 'my_loss.py').write_text(
            "from .registry import register_loss\\n"
            "@register_loss('my_loss')\\n"
            "def my_loss(receiver, sender, scale: float = 2.0):\\n"
            "    return scale * (receiver - sender).pow(2).mean(dim=-1)\\n")
        (OUT / 'cohort' / 'gates' / 'always.py').write_text(
            "from .registry import register_gate\\n"
            "@register_gate('always')\\n"
            "def always(teacher_logits, student_logits):\\n"
            "    return True\\n")
        for name in [m for m in sys.modules if m == 'cohort' or m.startswith('cohort.')]:
            del sys.modules[name]
        sys.path.insert(0, str(OUT))
        import cohort.gates, cohort.losses
        assert cohort.losses.__file__.startswith(str(OUT)), cohort.losses.__file__
        found = cohort.losses.LOSSES.get('my_loss')
        RESULT = {'my_loss': found.params if found else None, 'gates': sorted(cohort.gates.GATES)}
    """,
}


@dataclass(frozen=True)
class FreshStep:
    modules: frozenset[str]  # what the interpreter held after the step
    result: object  # the step's RESULT (JSON), None if it set none


class FreshInterpreter:
    """The steps of FRESH_STEPS, run in order in one subprocess (Python and torch start once, not
    once per test), with only this checkout's cohort on the path and no PATH. It starts as soon as
    the collection shows a test that asks for it (``pytest_collection_finish``), so that it runs on
    the second core beside the first tests (about 7 s here), and is waited for by the first test
    that asks."""

    def __init__(self):
        import subprocess
        import tempfile
        import textwrap

        repo = Path(__file__).resolve().parents[1]
        self.folder = Path(tempfile.mkdtemp(prefix="cohort-fresh-"))
        code = ["import json, pathlib, sys, traceback", "seen = {}"]
        for index, (step, body) in enumerate(FRESH_STEPS.items()):
            out = self.folder / f"step{index}"
            out.mkdir()
            code += [f"OUT, RESULT = pathlib.Path({str(out)!r}), None", "try:",
                     textwrap.indent(textwrap.dedent(body).strip(), "    "),
                     f"    seen[{step!r}] = {{'modules': sorted(sys.modules), 'result': RESULT}}",
                     "except Exception:",
                     f"    seen[{step!r}] = traceback.format_exc()"]
        code.append("print(json.dumps(seen))")
        # Files, not pipes: the modules' lists outgrow a pipe's buffer before anyone reads them.
        self.stdout, self.stderr = (open(self.folder / name, "w+") for name in ("stdout", "stderr"))
        self.process = subprocess.Popen([sys.executable, "-c", "\n".join(code)], cwd=repo, stdout=self.stdout,
                                        stderr=self.stderr, text=True, env={"PYTHONPATH": str(repo), "PATH": ""})
        self._seen = None

    def seen(self) -> dict:
        import json

        if self._seen is None:
            code = self.process.wait(timeout=300)
            self.stdout.seek(0)
            self.stderr.seek(0)
            assert code == 0, self.stderr.read()
            self._seen = json.loads(self.stdout.read().splitlines()[-1])
        return self._seen

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.folder, ignore_errors=True)


FRESH: list[FreshInterpreter] = []  # the one started for this session, if a test asks for it


def fresh_started() -> FreshInterpreter:
    """This session's fresh interpreter, started now if it has not been."""
    if not FRESH:
        FRESH.append(FreshInterpreter())
    return FRESH[0]


@pytest.fixture(scope="session")
def fresh_interpreter():
    """``after(step) -> FreshStep`` for the steps of FRESH_STEPS (``FreshInterpreter``); a step that
    raised fails the test that asks for it, with the step's traceback."""
    seen = fresh_started().seen()

    def after(step: str) -> FreshStep:
        if isinstance(seen[step], str):
            pytest.fail(f"{step}, in a fresh interpreter, raised:\n{seen[step]}")
        return FreshStep(frozenset(seen[step]["modules"]), seen[step]["result"])

    return after


@pytest.fixture
def clean_registry():
    """The loss registry as it was before the test (tests that register losses of their own)."""
    from cohort.losses import LOSSES

    saved = dict(LOSSES)
    yield
    LOSSES.clear()
    LOSSES.update(saved)


NO_CUDA = "needs CUDA: torch sees no GPU here (run `python -m pytest -m gpu` on a machine with one)"


def gpu_skip_reason(cuda_available: bool, gpus: int, needed: int) -> str | None:
    """Why a `gpu` test cannot run here (None: it can)."""
    if not cuda_available:
        return NO_CUDA
    if gpus < needed:
        return f"needs {needed} GPUs, torch sees {gpus}"
    return None


def cuda_devices() -> tuple[bool, int]:
    import torch

    available = torch.cuda.is_available()
    return available, torch.cuda.device_count() if available else 0


def skip_gpu_tests(items) -> None:
    marked = [(item, item.get_closest_marker("gpu")) for item in items]
    marked = [(item, marker) for item, marker in marked if marker is not None]
    if not marked:
        return
    available, gpus = cuda_devices()
    for item, marker in marked:
        reason = gpu_skip_reason(available, gpus, int(marker.kwargs.get("devices", 1)))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (every zoo model's "
                                                            "ONNX export, ...); -m slow runs only them")


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items)
    # The slow tests stay out of the suite's time budget unless asked for (--runslow, or -m naming slow).
    if not config.getoption("--runslow") and "slow" not in (config.option.markexpr or ""):
        skip = pytest.mark.skip(reason="slow: run with --runslow (or -m slow)")
        for item in items:
            if item.get_closest_marker("slow") is not None:
                item.add_marker(skip)
    # The tests without Ray first, then the modules that share ray_cluster's Ray, then the other Ray
    # tests (their own Rays, clusters, commands): each module's tests stay in their order.
    SHARED_RAY_MODULES.update(item.module.__name__ for item in items if uses_the_shared_ray(item))
    items.sort(key=lambda item: 0 if item.get_closest_marker("ray") is None else
               1 if getattr(item, "module", None) is not None and item.module.__name__ in SHARED_RAY_MODULES else 2)
    unmarked = [item.nodeid for item in items
                if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) start Ray through a fixture ({', '.join(sorted(RAY_FIXTURES))}) without the "
            f"`ray` marker (add @pytest.mark.ray, or pytestmark = pytest.mark.ray for the module): "
            + ", ".join(unmarked))


def pytest_collection_finish(session):
    """The fresh interpreter starts now if a test that will run asks for it (``FreshInterpreter``)."""
    if any("fresh_interpreter" in getattr(item, "fixturenames", ()) for item in session.items
           if not item.get_closest_marker("skip")):
        fresh_started()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The shared Ray ends before the first test outside the modules that share it."""
    module = getattr(item, "module", None)
    if module is None or module.__name__ not in SHARED_RAY_MODULES:
        shut_down_the_shared_ray()


def pytest_configure(config):
    os.environ.setdefault(SESSION_TAG, f"{os.getpid()}-{os.urandom(4).hex()}")


def pytest_sessionfinish(session):
    shut_down_the_shared_ray()
    if Path("/proc").is_dir():
        LEFTOVERS.extend(end_leftover_workers(os.environ[SESSION_TAG]))
    for fresh in FRESH:
        fresh.close()
    # The results are in. What follows is pytest's end-of-session check for exceptions raised in
    # __del__ (five full garbage collections) and the interpreter's own collection at exit: over a
    # heap holding torch, Ray and MLflow, 8 s of the suite here. Frozen, the heap is not walked
    # again; the per-test check of such exceptions stays.
    import gc

    gc.freeze()


def pytest_terminal_summary(terminalreporter):
    if LEFTOVERS:
        terminalreporter.write_line(f"Ray workers left running after their Ray stopped, killed: {', '.join(LEFTOVERS)} "
                                    "(docs/testing.md, 'A leftover process')", yellow=True)


def shut_down_the_shared_ray() -> None:
    if ray_running():
        ray = sys.modules["ray"]
        if ray.get_runtime_context().gcs_address in SHARED_RAY:
            ray.shutdown()


def ray_running() -> bool:
    ray = sys.modules.get("ray")  # not imported: not running (and no import of Ray for the check)
    is_initialized = getattr(ray, "is_initialized", None)
    return bool(is_initialized and is_initialized())


@pytest.fixture(autouse=True)
def ray_only_with_the_marker(request):
    """A test without the `ray` marker must not start Ray (it may run while a module's Ray runs)."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    running_before = ray_running()
    yield
    if not running_before and ray_running():
        pytest.fail(f"{request.node.nodeid} started Ray without the `ray` marker: mark it @pytest.mark.ray",
                    pytrace=False)
