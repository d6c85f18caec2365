"""The Ray the test modules share, and the rule behind `python -m pytest -m "not ray"`.

Every test that starts Ray — in this process, in a subprocess, or as a cluster (`ray start`,
Ray's cluster utilities) — carries the `ray` marker (pyproject.toml), so that `-m "not ray"` runs
the rest without Ray. Two checks keep the rule from rotting: a test that uses a fixture starting
Ray without the marker stops the session at collection, and a test without the marker that leaves
Ray running in this process fails.
"""
from __future__ import annotations

import sys

import pytest

# Fixtures that start Ray, here or in a test module (a module's own may differ, e.g. test_tune.py's
# Ray with a dashboard; it keeps the name).
RAY_FIXTURES = {"ray_cluster", "two_nodes", "token_cluster"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray of 2 CPUs on this machine, started once per test module and shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
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
