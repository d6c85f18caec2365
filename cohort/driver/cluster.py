"""Ray for a cohort driver: start Ray here or join a running cluster (HOST:PORT, ``auto``), with Ray's
token authentication handled as Ray handles it for ``auto``; the cluster's resources and node labels.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError, first_line
from cohort.console.display import is_terminal


def check_address(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself would wait and retry for a long time)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CohortError(f"--address {address!r}: expected 'auto' or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise CohortError(f"--address {address!r}: no Ray cluster reachable there ({error.strerror or error})") from None


# Ray's token authentication. A driver sends the cluster's token only in RAY_AUTH_MODE=token, which
# Ray turns on by itself for a new local cluster and for `--address auto` when a token is at hand,
# but never for an explicit HOST:PORT: cohort does the same for HOST:PORT as Ray does for auto.
AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"
COPY_TOKEN = ("copy the head node's ~/.ray/auth_token to ~/.ray/auth_token here, "
              "or set RAY_AUTH_TOKEN to its contents")


def token_source(env: dict[str, str], home: Path) -> str | None:
    """Where Ray's driver takes its auth token from, in Ray's order: $RAY_AUTH_TOKEN, else the
    file $RAY_AUTH_TOKEN_PATH (when set, the only file Ray reads), else ~/.ray/auth_token; None
    when there is no token."""
    if env.get(AUTH_TOKEN, "").strip():
        return "$RAY_AUTH_TOKEN"
    named = env.get(AUTH_TOKEN_PATH)
    path = Path(os.path.expanduser(named)) if named else home / DEFAULT_TOKEN_FILE
    try:
        found = path.is_file() and bool(path.read_text().strip())
    except OSError:
        found = False
    return (f"$RAY_AUTH_TOKEN_PATH ({named})" if named else "~/.ray/auth_token") if found else None


def joins_by_host_port(address: str | None) -> bool:
    return bool(address) and address != "auto" and not address.startswith("ray://")


def join_auth_env(address: str | None, env: dict[str, str], home: Path) -> dict[str, str]:
    """The environment the driver needs to join ``address``: RAY_AUTH_MODE=token when it joins a
    HOST:PORT, a token is at hand and the mode is not set (an explicit mode is respected)."""
    if not joins_by_host_port(address) or AUTH_MODE in env or token_source(env, home) is None:
        return {}
    return {AUTH_MODE: "token"}


def auth_refused_message(address: str, env: dict[str, str], home: Path) -> str:
    """One line for a cluster that refused this driver for its auth token (or its lack of one)."""
    source = token_source(env, home)
    if env.get(AUTH_MODE, "token").lower() != "token":
        return (f"the cluster at {address} requires a Ray auth token, and RAY_AUTH_MODE={env[AUTH_MODE]} here: "
                f"unset RAY_AUTH_MODE (or set it to token) and {COPY_TOKEN}")
    if source is None:
        named = env.get(AUTH_TOKEN_PATH)
        where = (f"$RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH ({named}: missing or empty)" if named
                 else "$RAY_AUTH_TOKEN or ~/.ray/auth_token")
        return f"the cluster at {address} requires a Ray auth token: none found in {where} ({COPY_TOKEN})"
    return (f"the cluster at {address} refused the Ray auth token from {source}: it is not the cluster's "
            f"({COPY_TOKEN})")


def token_accepted(address: str, send_token: bool, timeout: float = 5.0) -> bool | None:
    """Whether the cluster's GCS at ``address`` accepts what ray.init will send it: this machine's
    auth token, or none. One gRPC call, where ray.init retries for 20 s and then says only 'Failed
    to connect'. None when the answer is not about authentication."""
    import grpc
    from ray._raylet import AuthenticationTokenLoader
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = ()
    if send_token:
        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()
        try:
            metadata = tuple(loader.get_token_for_http_header(ignore_auth_mode=True).items())
        except Exception:  # noqa: BLE001 - e.g. RAY_AUTH_TOKEN_PATH names a missing file: no token
            pass
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            return False if error.code() == grpc.StatusCode.UNAUTHENTICATED else None
    return True


def prepare_join(address: str) -> None:
    """Set this driver up to join HOST:PORT as Ray sets it up for ``auto``; refuse, in one line, a
    token the cluster does not accept. A cluster that asks for no token is joined as it is: the
    driver's auth mode (and Ray's cached config) change only for one that does."""
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        if token_accepted(address, send_token=False) is not False:
            return  # no token asked for (or an answer not about auth, which ray.init reports)
        updates = join_auth_env(address, dict(os.environ), Path.home())
        if not updates:
            raise CohortError(auth_refused_message(address, dict(os.environ), Path.home()))
        os.environ.update(updates)
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config: let it see the mode, as Ray itself does
    if token_accepted(address, send_token=True) is False:
        raise CohortError(auth_refused_message(address, dict(os.environ), Path.home()))


HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def driver_environment(address: str | None, dashboard: bool, stdout_is_terminal: bool) -> dict[str, str]:
    """The environment the driver gives Ray before starting or joining it (each only where the user
    has not set it)."""
    # Ray Train's controller polls its workers this often, and a worker's report waits in a queue of
    # one until a poll takes it: the end of every fit waits for polls (bench.fit_floor: a one-epoch
    # dml_pair run 9.0 s at 0.5, 8.6 at 0.2, 7.7 at 0.1 on 2 cores; Ray's default is 2 s). A poll
    # costs each worker a little CPU (about 4% of a 2-core machine's in a long run: docs/testing.md).
    env = {HEALTH_CHECK_INTERVAL: "0.1"}
    if not stdout_is_terminal:
        # Ray prints what the cluster pushes to the driver (the raylet's warning that many worker
        # processes started, a task killed for memory) on stdout, its prefix in color: a log file
        # gets it without control characters.
        env["RAY_COLOR_PREFIX"] = "0"
    if not address:
        # Ray waits 30 s by default for its GCS's port; a loaded machine can take longer.
        env["RAY_gcs_server_port_wait_time_s"] = "120"
        # A Ray started here runs its workers at nice 15, below every other process: next to any
        # other load (even Ray's own agents and this driver) the peers then stepped at half speed
        # on 2 cores. The peers are the computation: they run at a plain training script's priority.
        env["RAY_worker_niceness"] = "0"
        # Two of Ray Train's helper processes serve nothing on a Ray of one machine: the watcher of
        # cloud nodes' preemption notices, and the per-worker metrics for a dashboard (off unless
        # asked for). Every Ray worker process wakes 100 times a second; on a small machine their
        # start-up and wake-ups come out of the peers' cores (docs/performance.md).
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        if not dashboard:
            env["RAY_TRAIN_METRICS_ENABLED"] = "0"
    return env


def start_ray(address: str | None, verbose: bool, dashboard: bool = False) -> dict[str, float]:
    """Start or join Ray quietly; return the cluster's resources.

    A Ray started here keeps its dashboard off unless asked for, and then binds it to 127.0.0.1;
    Ray's token authentication (on by default for a new local cluster) is left as it is. A cluster
    joined by HOST:PORT gets this machine's token as ``auto`` does (``prepare_join``).
    """
    import logging

    import ray

    address = ray_address(address, {} if ray.is_initialized() else os.environ)  # in-process: the Ray running
    joining = None if address == LOCAL else address
    for key, value in driver_environment(joining, dashboard, is_terminal(sys.stdout)).items():
        os.environ.setdefault(key, value)
    quiet = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address != LOCAL:
            check_address(address)
            if joins_by_host_port(address):
                prepare_join(address)
            ray.init(address=address, **quiet)
        elif not ray.is_initialized():
            start_local(lambda: ray.init(address=LOCAL, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                                         **quiet), ray.shutdown)
            STARTED_HERE.add(ray.get_runtime_context().gcs_address)
    except CohortError:
        raise
    except Exception as error:  # noqa: BLE001 - ray raises several kinds for the same problem
        where = "" if address == LOCAL else f" at {address!r}"
        raise CohortError(f"cannot start or join Ray{where}: {first_line(error)}") from None
    if not verbose:
        QUIET.add(ray.get_runtime_context().gcs_address)
    return ray.cluster_resources()


LOCAL = "local"
# The GCS addresses of the Rays this process started on this machine (``started_here``).
STARTED_HERE: set[str] = set()
# The GCS addresses of the Rays this process started or joined without passing worker logs on.
QUIET: set[str] = set()


def stop_quiet_ray() -> None:
    """Stop (or leave) the Ray this process runs, now, if ``start_ray`` started or joined it without
    passing the workers' logs on (no ``--verbose``). Ray's own hook at the interpreter's exit first
    sleeps 0.5 s so that those logs finish printing (Ray 2.60, ``ray.shutdown``): a command that
    prints none ends that much sooner. Nothing happens where Ray was never imported. A shutdown that
    fails here is left to that hook: the command still ends with its own exit code, in one line."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address in QUIET:
            ray.shutdown()
    except Exception:  # noqa: BLE001 - Ray's exit hook tries again, as it did before this shortcut
        pass


def started_here() -> bool:
    """Whether the running Ray is one this process started on this machine (``start_ray`` without an
    address): a Ray of one machine, with no autoscaler to ask for nodes (cohort.driver.trainer)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address in STARTED_HERE


STARTUP_TIMED_OUT = "timed out during startup"
START_ATTEMPTS = 2


def ray_address(address: str | None, env: Mapping[str, str]) -> str:
    """What ``ray.init`` is given: ``--address`` when there is one, else $RAY_ADDRESS (set by whoever
    submits the command as a Ray job), else ``"local"``: a new Ray on this machine, whatever Ray's
    temp folder names. A bare ``ray.init()`` joins the cluster of the last ``ray start`` on the
    machine (another user's, or a dead one whose address it then retries for many minutes);
    ``--address auto`` asks for that on purpose."""
    return address or env.get("RAY_ADDRESS", "").strip() or LOCAL


def start_local(init: Callable[[], Any], shutdown: Callable[[], Any], attempts: int = START_ATTEMPTS,
                load: Callable[[], float] = lambda: os.getloadavg()[0]) -> None:
    """Start a local Ray, again when its start-up timed out (Ray waits a fixed 30 s for its raylet,
    which a loaded machine can take); after the last try, one line that says what to do."""
    for attempt in range(1, attempts + 1):
        try:
            init()
            return
        except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception for it
            if STARTUP_TIMED_OUT not in str(error):
                raise
            shutdown()  # what the failed start left running
            if attempt == attempts:
                raise CohortError(
                    f"Ray did not start on this machine ({attempts} tries, its raylet slower than Ray waits for; "
                    f"load {load():.1f} on {os.cpu_count()} CPUs): run again when the machine is less busy, or "
                    "start Ray once with `ray start --head` and pass --address auto") from None



@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """How a command reaches Ray: ``address`` ('auto' or HOST:PORT; None: a new Ray on this machine),
    Ray's own logs (``verbose``), its dashboard when Ray is started here."""

    address: str | None = None
    verbose: bool = False
    dashboard: bool = False


def timed_start_ray(args: RayOptions | argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """``start_ray``, and the driver's start-up marks (cohort.driver.startup)."""
    from cohort.driver.startup import driver_marks, training_asked

    ray_start = time.time()
    cluster = start_ray(args.address, args.verbose, args.dashboard)
    return cluster, driver_marks(training_asked(ray_start), ray_start, time.time())



def cluster_node_labels() -> list[dict[str, str]]:
    """The labels of the Ray cluster's live nodes."""
    import ray

    return [dict(node.get("Labels") or {}) for node in ray.nodes() if node.get("Alive")]

