"""Joining a token-protected Ray cluster by HOST:PORT (`ray start --head` on this machine), as
`--address auto` does: the decisions without Ray, then the real thing in subprocesses."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import SESSION_TAG, empty_store, end_leftover_workers, end_orphaned_workers

from cohort.config.errors import CohortError
from cohort.driver.cluster import (
    LOCAL,
    auth_refused_message,
    join_auth_env,
    ray_address,
    start_local,
    token_source,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the decisions


@pytest.fixture
def home(tmp_path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def with_default_token(home: Path, token: str = "ab" * 32) -> Path:
    (home / ".ray").mkdir(exist_ok=True)
    path = home / ".ray" / "auth_token"
    path.write_text(token)
    return path


def test_the_token_is_found_where_ray_looks_for_it(home, tmp_path):
    assert token_source({}, home) is None
    with_default_token(home)
    assert token_source({}, home) == "~/.ray/auth_token"
    assert token_source({"RAY_AUTH_TOKEN": "x"}, home) == "$RAY_AUTH_TOKEN"
    assert token_source({"RAY_AUTH_TOKEN": " "}, home) == "~/.ray/auth_token"  # empty: Ray reads on
    named = tmp_path / "token"
    # A RAY_AUTH_TOKEN_PATH is the only file Ray reads: a missing or empty one means no token.
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(named)}, home) is None
    named.write_text("")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(named)}, home) is None
    named.write_text("cd" * 32)
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(named)}, home) == f"$RAY_AUTH_TOKEN_PATH ({named})"


def test_joining_host_port_turns_token_auth_on_when_a_token_is_at_hand(home):
    assert join_auth_env("127.0.0.1:6390", {}, home) == {}  # no token: nothing to send
    with_default_token(home)
    assert join_auth_env("127.0.0.1:6390", {}, home) == {"RAY_AUTH_MODE": "token"}
    assert join_auth_env("10.0.0.5:6379", {"RAY_AUTH_TOKEN": "x"}, home) == {"RAY_AUTH_MODE": "token"}
    # An explicit mode is the user's; auto, ray:// and a Ray started here are Ray's business.
    assert join_auth_env("127.0.0.1:6390", {"RAY_AUTH_MODE": "disabled"}, home) == {}
    assert join_auth_env("127.0.0.1:6390", {"RAY_AUTH_MODE": "token"}, home) == {}
    for address in ("auto", None, "", "ray://10.0.0.5:10001"):
        assert join_auth_env(address, {}, home) == {}


def test_a_refused_token_says_what_to_set_and_where_the_token_lives(home, tmp_path):
    none = auth_refused_message("127.0.0.1:6390", {}, home)
    assert none.startswith("the cluster at 127.0.0.1:6390 requires a Ray auth token: none found in "
                           "$RAY_AUTH_TOKEN or ~/.ray/auth_token (copy the head node's ~/.ray/auth_token")
    missing = auth_refused_message("h:1", {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}, home)
    assert f"$RAY_AUTH_TOKEN_PATH ({tmp_path / 't'}: missing or empty)" in missing
    wrong = auth_refused_message("h:1", {"RAY_AUTH_TOKEN": "garbage", "RAY_AUTH_MODE": "token"}, home)
    assert wrong.startswith("the cluster at h:1 refused the Ray auth token from $RAY_AUTH_TOKEN: it is not the "
                            "cluster's (copy the head node's ~/.ray/auth_token")
    with_default_token(home)
    assert "refused the Ray auth token from ~/.ray/auth_token" in auth_refused_message("h:1", {}, home)
    disabled = auth_refused_message("h:1", {"RAY_AUTH_MODE": "disabled"}, home)
    assert "RAY_AUTH_MODE=disabled here: unset RAY_AUTH_MODE" in disabled
    for message in (none, missing, wrong, disabled):
        assert "\n" not in message


def test_without_an_address_ray_starts_here_whatever_its_temp_folder_names():
    assert ray_address(None, {}) == LOCAL == "local"  # never a bare ray.init(), which joins the last `ray start`
    assert ray_address("auto", {}) == "auto" and ray_address("10.0.0.1:6379", {"RAY_ADDRESS": "x:1"}) == "10.0.0.1:6379"
    assert ray_address(None, {"RAY_ADDRESS": "127.0.0.1:6379"}) == "127.0.0.1:6379"  # a Ray job's driver
    assert ray_address(None, {"RAY_ADDRESS": " "}) == LOCAL


def test_a_ray_start_that_timed_out_is_tried_again_then_one_line():
    calls, stopped = [], []

    def slow_then_fine():
        calls.append(1)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    start_local(slow_then_fine, lambda: stopped.append(1))
    assert len(calls) == 2 and len(stopped) == 1

    def always_slow():
        raise Exception("The current node timed out during startup.")

    with pytest.raises(CohortError) as caught:
        start_local(always_slow, lambda: None, load=lambda: 7.25)
    assert "\n" not in str(caught.value) and "load 7.2" in str(caught.value) and "--address auto" in str(caught.value)
    with pytest.raises(ValueError):  # anything else is not retried
        start_local(lambda: (_ for _ in ()).throw(ValueError("bad")), lambda: None)


# --------------------------------------------------------------------------- a real `ray start`


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This checkout's cohort, a HOME of the test's own, and no auth settings but ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **extra)
    return env


@pytest.fixture(scope="module")
def ray_tmpdir():
    """A Ray temp folder of the module's own (short: Ray's socket paths must stay under 108 bytes),
    so that the `ray start` below names itself there, not in the machine's /tmp/ray."""
    folder = tempfile.mkdtemp(prefix="cohort-rt", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory, ray_tmpdir):
    """`ray start --head` as a new user runs it, with a token in ~/.ray/auth_token (here a HOME of
    the test's own): Ray turns token authentication on for it. Always stopped."""
    home = tmp_path_factory.mktemp("head-home")
    with_default_token(home, os.urandom(32).hex())
    port = free_port()
    env = clean_env(home, RAY_TMPDIR=ray_tmpdir)
    try:
        subprocess.run(["ray", "start", "--head", "--port", str(port),
                        "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", home
    finally:
        stop_cluster(ray_tmpdir, port)


def stop_cluster(temp_dir: str, port: int) -> None:
    """`ray stop --force` for this one cluster: every process whose command line names its temp folder
    or its GCS port (the client server), and their children (the raylet's agents and workers), killed.
    `ray stop` kills every Ray process of the machine, a cluster of someone else's included, and then
    waits 2 s a round (7 s here)."""
    import re

    import psutil

    ours = re.compile(rf"{re.escape(temp_dir)}|--address=\S+:{port}\b")
    found = [process for process in psutil.process_iter(["cmdline"])
             if process.pid != os.getpid() and ours.search(" ".join(process.info["cmdline"] or []))]
    for process in list(found):
        try:
            found += process.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for process in found:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(process) for process in found):
        time.sleep(0.05)
    assert not [process.pid for process in found if alive(process)], "the token cluster outlived its SIGKILL"


def alive(process) -> bool:
    """Running: not gone, not a zombie waiting for a parent that may never reap it."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cohort_command(address: str | None, tmp_path: Path) -> list[str]:
    # The shipped pair, as small as it gets: what is tested is the join, not the training.
    return [sys.executable, "-m", "cohort.run", str(REPO / "topologies" / "dml_pair.yaml"),
            *(["--address", address] if address else []),
            "--set", "train.epochs=1", "--set", "peers.net_a.model=mlp_tiny", "--set", "peers.net_b.model=mlp_tiny",
            "--set", "data.batch_size=256", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--storage", str(tmp_path / "ray")]


def cohort_run(address: str | None, tmp_path: Path, env: dict[str, str], timeout: float = 180):
    return subprocess.run(cohort_command(address, tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def start_ray_here(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """The commands' own start (cohort.driver.cluster.start_ray, no --address) in a fresh process,
    which prints the GCS address of the Ray it started or joined (``ray_started_here``)."""
    code = ("import ray; from cohort.driver.cluster import start_ray; "
            "print(int(start_ray(None, False)['CPU']), ray.get_runtime_context().gcs_address); ray.shutdown()")
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def ray_started_here(process: subprocess.Popen) -> str:
    """The GCS address ``start_ray_here``'s process printed once it ended."""
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    cpus, gcs = out.split()
    assert int(cpus) >= 1
    return gcs


@pytest.mark.ray
def test_without_address_a_command_starts_its_own_ray_beside_a_live_one_and_past_a_dead_one(token_cluster, ray_tmpdir,
                                                                                            tmp_path):
    """Ray's temp folder names the last `ray start` of the machine: a bare ray.init() joined it (another
    user's cluster, here the token cluster, running), or retried it for many minutes when its head had
    died. Without --address a command starts a Ray of its own in both cases, up in its usual seconds.
    (That a whole cohort then trains there is what every other Ray test shows.) Both starts run at
    once, each with its own temp folder."""
    address, home = token_cluster
    current = Path(ray_tmpdir) / "ray" / "ray_current_cluster"
    assert current.read_text().strip().endswith(address.rsplit(":", 1)[1])  # what a bare ray.init() would join
    session = (Path(ray_tmpdir) / "ray" / "session_latest").resolve()
    # Past a dead one: before, the start retried the dead address for minutes.
    dead = tempfile.mkdtemp(prefix="cohort-rd", dir="/tmp")
    processes = []
    try:
        (Path(dead) / "ray").mkdir()
        stale = f"127.0.0.1:{free_port()}"  # nobody listens there
        (Path(dead) / "ray" / "ray_current_cluster").write_text(stale)
        started = time.perf_counter()
        beside_live = start_ray_here(tmp_path, clean_env(home, RAY_TMPDIR=ray_tmpdir))
        past_dead = start_ray_here(tmp_path, clean_env(home, RAY_TMPDIR=dead))
        processes = [beside_live, past_dead]
        assert ray_started_here(beside_live) != address
        # No driver of this process connected to the running cluster (each driver leaves a log named by its pid).
        assert not [log.name for log in (session / "logs").glob(f"*_{beside_live.pid}.*")]
        assert ray_started_here(past_dead) != stale
        print(f"beside a live cluster and past a dead one, at once: {time.perf_counter() - started:.1f}s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        shutil.rmtree(dead, ignore_errors=True)


@pytest.mark.ray
def test_a_cohort_joins_a_token_cluster_by_host_and_port(token_cluster, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    address, home = token_cluster
    empty_store(tmp_path / "mlflow.db")  # the command's store (cohort_command)
    started = time.perf_counter()
    done = cohort_run(address, tmp_path, clean_env(home))
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dml-pair").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["cohort/batches_identical"] == 1.0
    assert 0 < runs[0].data.metrics["net_a/acc"] <= 1
    print(f"joined and trained in {time.perf_counter() - started:.1f}s")


@pytest.mark.ray
def test_a_wrong_or_missing_token_is_one_line(token_cluster, tmp_path):
    """Both commands at once (each is mostly Python starting, on one core), each in a home without a token."""
    address, _ = token_cluster
    expected = {"wrong": "refused the Ray auth token from $RAY_AUTH_TOKEN",
                "missing": "requires a Ray auth token: none found in $RAY_AUTH_TOKEN or ~/.ray/auth_token"}
    started = time.perf_counter()
    commands = {}
    for case in expected:
        folder = tmp_path / case
        (folder / "home").mkdir(parents=True)
        env = clean_env(folder / "home", **({"RAY_AUTH_TOKEN": "garbage"} if case == "wrong" else {}))
        commands[case] = subprocess.Popen(cohort_command(address, folder), cwd=folder, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for case, command in commands.items():
        _, err = command.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert command.returncode == 2 and len(lines) == 1, (case, err[-3000:])
        assert lines[0].startswith(f"the cluster at {address} "), lines
        assert expected[case] in lines[0] and "~/.ray/auth_token" in lines[0], lines
    assert time.perf_counter() - started < 60  # refused at once, not after Ray's retries


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the processes through /proc")
def test_a_worker_left_by_its_raylet_is_ended_and_no_other_process():
    """The last step of tests/test_cluster.py's two-node fixture: a process that Ray started for a raylet now gone (its
    environment names that raylet) is killed; a process of another raylet is not. At the end of the test session,
    every process of the session whose raylet is gone is killed, and named in the summary: none of another
    session, none whose raylet runs."""

    def sleeper(raylet: int, session: str = "") -> subprocess.Popen:
        env = {**os.environ, "RAY_RAYLET_PID": str(raylet), SESSION_TAG: session}
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)

    gone, other = 2**22 + 1, 2**22 + 2  # above Linux's default pid_max: no live raylet has them
    orphan, kept = sleeper(gone), sleeper(other)
    ours, another, alive = "test-session-a", "test-session-b", os.getpid()  # this process stands for a live raylet
    leftover, of_another, running = sleeper(gone, ours), sleeper(gone, another), sleeper(alive, ours)
    processes = (orphan, kept, leftover, of_another, running)
    try:
        assert end_orphaned_workers({gone}) == sorted([orphan.pid, leftover.pid, of_another.pid])
        assert orphan.wait(timeout=10) == -signal.SIGKILL and kept.poll() is None
        leftover, of_another = sleeper(gone, ours), sleeper(gone, another)
        processes += (leftover, of_another)
        ended = end_leftover_workers(ours, wait=0.2)
        assert [text.split()[0] for text in ended] == [str(leftover.pid)] and "MB)" in ended[0], ended
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert of_another.poll() is None and running.poll() is None and kept.poll() is None
    finally:
        for process in processes:
            process.kill()
            process.wait()
