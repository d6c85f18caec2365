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

import os
import shutil
import sys
from pathlib import Path

import pytest

from cohort.driver.cluster import driver_environment

# Every Ray the tests start (the fixtures here and in the test modules, and the commands they run
# in subprocesses) runs as a command's own Ray does (cohort.driver.cluster.driver_environment): Ray
# Train's controller polling every 0.5 s instead of 2 s, workers at a plain priority, no preemption
# watcher. Ray Train's metrics stay as Ray has them (a dashboard's Ray uses them); the fixture below
# turns them off for its Ray, as a command does without a dashboard.
RAY_TRAIN_METRICS = "RAY_TRAIN_METRICS_ENABLED"
for _key, _value in driver_environment(None, dashboard=True, stdout_is_terminal=False).items():
    os.environ.setdefault(_key, _value)

# Fixtures that start Ray, here or in a test module (a module's own may differ, e.g. test_tune.py's
# Ray with a dashboard; it keeps the name).
RAY_FIXTURES = {"ray_cluster", "two_nodes", "token_cluster"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray of 2 CPUs on this machine, started once per test module and shut down after it."""
    import ray

    before = os.environ.get(RAY_TRAIN_METRICS)
    os.environ.setdefault(RAY_TRAIN_METRICS, "0")
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    finally:
        if before is None:
            os.environ.pop(RAY_TRAIN_METRICS, None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory):
    """``copy(path) -> uri``: an empty MLflow store (sqlite) at ``path``, copied from one made once per
    session. Creating a store runs MLflow's migrations (about a second each here); a test whose store
    is only its setting, not what it checks, takes a copy. Experiments get their artifact locations
    from cohort's Tracker (or the test), not from where the template was made."""
    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # the first use creates the tables

    def copy(path: Path) -> str:
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return copy


# Steps run in order in one fresh interpreter (the `fresh_interpreter` fixture); each test that
# asks what a step imported reads its own entry.
FRESH_STEPS = {
    "import cohort": "import cohort; cohort.run_study, cohort.sweep, cohort.evaluate_run, cohort.read_study",
    "model names": ("from cohort.models import model_exists, known_models\n"
                    "assert model_exists('resnet8') and model_exists('torchvision:resnet18')\n"
                    "assert 'timm:<name>' in known_models()"),
    "reliability diagram": ("import torch\nfrom cohort.metrics import reliability as R\n"
                            "R.reliability_diagram(R.reliability_bins(torch.randn(50, 4), torch.randint(0, 4, (50,))),"
                            " OUT / 'x.png', 't')"),
}


@pytest.fixture(scope="session")
def fresh_interpreter(tmp_path_factory):
    """``modules_after(step) -> set``: the modules a fresh interpreter holds after a step of
    FRESH_STEPS. The steps run in order in one subprocess (Python and torch start once, not once per
    test), with only this checkout's cohort on the path and no PATH; a step that raised fails the
    test that asks for it, with the step's traceback."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("fresh")
    code = ["import json, pathlib, sys, traceback", f"OUT = pathlib.Path({str(out)!r})", "seen = {}"]
    for step, body in FRESH_STEPS.items():
        code += ["try:", *(f"    {line}" for line in body.splitlines()),
                 f"    seen[{step!r}] = sorted(sys.modules)",
                 "except Exception:",
                 f"    seen[{step!r}] = traceback.format_exc()"]
    code.append("print(json.dumps(seen))")
    done = subprocess.run([sys.executable, "-c", "\n".join(code)], cwd=repo, capture_output=True, text=True,
                          env={"PYTHONPATH": str(repo), "PATH": ""}, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])

    def modules_after(step: str) -> set[str]:
        if isinstance(seen[step], str):
            pytest.fail(f"{step}, in a fresh interpreter, raised:\n{seen[step]}")
        return set(seen[step])

    return modules_after


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
    unmarked = [item.nodeid for item in items
                if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) start Ray through a fixture ({', '.join(sorted(RAY_FIXTURES))}) without the "
            f"`ray` marker (add @pytest.mark.ray, or pytestmark = pytest.mark.ray for the module): "
            + ", ".join(unmarked))


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
