"""``python -m bench.data_memory``: the memory of a whole cohort run on the CIFAR-10 table, for
N = 1, 2, 4 ResNet-8 peers; what each extra peer adds.

Each N runs ``cohort.train`` (what ``python -m cohort.run`` runs: the driver's plan, Ray, the MLflow
run, Ray Train's workers) in a fresh child process on the whole table: the driver decodes its
50,000 training and 10,000 test images and hands them to the workers through Ray's object store.
The run is one epoch cut to ``--steps`` training batches (``FewSteps``; the test split is evaluated
whole, the peers logged as MLflow models as usual). Meanwhile this process samples, every
``--interval`` seconds, the proportional set size (PSS, ``/proc/<pid>/smaps_rollup``) of the child and
of every process descended from it (Ray's GCS, raylet with the object store, its agents and idle
workers, the Ray Train controller and workers), and keeps the peak of their sum with its breakdown:
the driver, the Ray Train workers, Ray's other processes. PSS shares each page among the processes
that map it, so the sum counts the object store's pages once however many peers read them.

``--dataset digits`` runs the same cohorts on scikit-learn's digits (0.5 MB of data): what a peer
costs without data, its runtime (torch, Ray's worker, the network).

The results go to ``bench/results/data_memory.json`` (``--baseline FILE``: another checkout's results
file, e.g. the code before a change, kept in it as ``before``) and a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError
from cohort.console.command import run_command
from cohort.datasets import CohortDataset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10.parquet"
DEFAULT_OUT = REPO / "bench" / "results" / "data_memory.json"
WORKER_TITLE = "RayTrainWorker"  # in a Ray Train worker's process title (ray::RayTrainWorker...)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 parquet table (default: %(default)s)")
    parser.add_argument("--dataset", choices=["parquet", "digits"], default="parquet",
                        help="parquet: the table (--data); digits: 0.5 MB of data, what a peer costs without data "
                             "(default: %(default)s)")
    parser.add_argument("--peers", default="1,2,4", help="cohort sizes to run, comma-separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="training steps of the one epoch (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take (default: %(default)s)")
    parser.add_argument("--baseline", help="results of another checkout (this file's format), kept as 'before'")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results file (default: %(default)s)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one run of N peers, in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size) for size in args.peers.split(",")]
    except ValueError:
        parser.error(f"--peers: comma-separated numbers, not {args.peers!r}")
    if args.steps < 1 or any(size < 1 for size in args.sizes):
        parser.error("--steps and every --peers size must be at least 1")
    return args


# --------------------------------------------------------------------------- the run (child process)


class FewSteps(CohortDataset):
    """``inner`` with every epoch cut to its first ``steps`` training batches: the benchmark's short
    run; its test split, information and everything else are ``inner``'s."""

    def __init__(self, inner: CohortDataset, steps: int):
        self.inner, self.steps, self.info = inner, steps, inner.info

    @property
    def train_targets(self):
        return self.inner.train_targets

    def preprocessing(self) -> dict:
        return self.inner.preprocessing()

    def make_batch(self, indices, train: bool, seed: int):
        return self.inner.make_batch(indices, train, seed)

    def plain_train_batch(self, indices):
        return self.inner.plain_train_batch(indices)

    def val_batches(self, batch_size: int):
        return self.inner.val_batches(batch_size)

    def train_batches(self, *args, **kwargs):
        return itertools.islice(self.inner.train_batches(*args, **kwargs), self.steps)


def cohort_topology(peers: int, dataset: str, data: Path) -> dict[str, Any]:
    """``peers`` ResNet-8 peers on ``dataset`` (parquet: the table at ``data``), 1 epoch, batch 128;
    with two or more, a ring of kd edges."""
    names = [f"r8_{index}" for index in range(1, peers + 1)]
    edges = [{"from": names[index - 1], "to": name, "loss": "kd"} for index, name in enumerate(names)] if peers > 1 else []
    return {"name": f"data-memory-{peers}", "seed": 0,
            "data": {"dataset": dataset, **({"root": str(data)} if dataset == "parquet" else {}), "batch_size": 128},
            "train": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
            "peers": {name: {"model": "resnet8"} for name in names}, "edges": edges}


def run_child(peers: int, dataset: str, data: Path, steps: int, folder: Path) -> int:
    """Train the cohort of ``peers`` as ``python -m cohort.run`` does, its epochs cut to ``steps`` batches."""
    import cohort
    import cohort.datasets
    from bench.data_memory import FewSteps  # by this name (not __main__'s): the workers import it
    from cohort.topology import topology_from_dict

    load = cohort.datasets.load_dataset
    # The plan loads the dataset through this name (cohort.driver.launch.make_plan).
    cohort.datasets.load_dataset = lambda config, seed=0: FewSteps(load(config, seed), steps)
    cohort.train(topology_from_dict(cohort_topology(peers, dataset, data)), tracking_uri=f"sqlite:///{folder}/mlflow.db",
                 storage=str(folder / "ray"), display="log")
    return 0


# --------------------------------------------------------------------------- measuring it (this process)


def descendants(root: int) -> list[int]:
    """``root`` and every living process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The parent's id is the 4th field after the command name, which may hold spaces.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


PSS_FIELDS = {"Pss:": "pss", "Pss_Anon:": "anon", "Pss_File:": "file", "Pss_Shmem:": "shmem"}


def pss_kb(pid: int) -> dict[str, int] | None:
    """The process's proportional set size in kB, in all (``pss``) and by kind: ``anon`` (its heap:
    where a copy of the data would be), ``file`` (libraries), ``shmem`` (shared memory: Ray's object
    store); None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    sizes = {PSS_FIELDS[line.split()[0]]: int(line.split()[1]) for line in lines if line.split()[:1] and
             line.split()[0] in PSS_FIELDS}
    return sizes if "pss" in sizes else None


def role(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray"
    return "workers" if WORKER_TITLE in title else "ray"


def sample(driver: int) -> dict[str, Any]:
    """The PSS of the run's processes now, in MB: in all, per role, and each role's by kind."""
    totals = {"driver": 0.0, "workers": 0.0, "ray": 0.0}
    kinds = {name: {"anon": 0.0, "file": 0.0, "shmem": 0.0} for name in totals}
    processes = 0
    for pid in descendants(driver):
        sizes = pss_kb(pid)
        if sizes is None:
            continue
        name = role(pid, driver)
        totals[name] += sizes["pss"] / 1024
        for kind in kinds[name]:
            kinds[name][kind] += sizes.get(kind, 0) / 1024
        processes += 1
    return {"total": sum(totals.values()), **totals, "kinds": kinds, "processes": processes}


def measure_run(args: argparse.Namespace, peers: int, folder: Path) -> dict[str, Any]:
    """One child run of ``peers``: its peak PSS and that moment's breakdown, and each role's own peak."""
    command = [sys.executable, "-m", "bench.data_memory", "--child", str(peers), "--dataset", args.dataset,
               "--data", str(args.data),
               "--steps", str(args.steps), "--folder", str(folder)]
    folder.mkdir(parents=True)
    return sampled_run(command, folder, sample, ("driver", "workers", "ray"), args, f"the run of {peers} peers")


def sampled_run(command: list[str], folder: Path, sample: Callable[[int], dict[str, Any]], roles: tuple[str, ...],
                args: argparse.Namespace, what: str) -> dict[str, Any]:
    """Run ``command`` (a child run writing its log in ``folder``) in a session of its own, sampling
    the PSS of its processes every ``args.interval`` s: the peak (and that moment's breakdown), each
    of ``roles``' own peak, the seconds; one line naming ``what`` past ``args.timeout`` or on failure."""
    log = folder / "run.log"
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peak: dict[str, Any] = {"total": 0.0}
    own_peaks = dict.fromkeys(roles, 0.0)
    try:
        while child.poll() is None:
            if time.perf_counter() - started > args.timeout:
                raise CohortError(f"{what} took over {args.timeout:g} s (--timeout)")
            now = sample(child.pid)
            peak = max(peak, now, key=lambda entry: entry["total"])
            own_peaks = {name: max(value, now[name]) for name, value in own_peaks.items()}
            time.sleep(args.interval)
    finally:
        if child.poll() is None:  # our own child's session only: its Ray went with it
            os.killpg(child.pid, signal.SIGKILL)
    if child.wait() != 0:
        lines = log.read_text().strip().splitlines() or ["?"]
        raise CohortError(f"{what} failed: {lines[-1]}")
    return {"peak_mb": peak, "own_peak_mb": own_peaks, "seconds": time.perf_counter() - started}


def per_extra_peer(runs: dict[str, Any]) -> float | None:
    """The peak PSS each peer beyond the first adds, in MB: from the smallest to the largest cohort."""
    sizes = sorted(int(size) for size in runs)
    if len(sizes) < 2:
        return None
    low, high = runs[str(sizes[0])]["peak_mb"]["total"], runs[str(sizes[-1])]["peak_mb"]["total"]
    return (high - low) / (sizes[-1] - sizes[0])


def machine() -> dict[str, Any]:
    import platform

    import ray
    import torch

    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"cpus": os.cpu_count() or 1, "memory_gib": round(int(memory.split()[1]) / 1024 ** 2, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "load_average_at_end": os.getloadavg()}


def markdown(results: dict[str, Any]) -> str:
    rows = ["| peers | peak PSS of the run | driver | Ray Train workers (heap / shared memory) | Ray's other processes "
            "| seconds |", "| --- | --- | --- | --- | --- | --- |"]
    for label, entry in (("before", results.get("before")), ("", results)):
        if not entry:
            continue
        for size, run in sorted(entry["runs"].items(), key=lambda item: int(item[0])):
            peak = run["peak_mb"]
            workers = peak["kinds"]["workers"]
            rows.append(f"| {size}{f' ({label})' if label else ''} | {peak['total']:,.0f} MB | {peak['driver']:,.0f} MB "
                        f"| {peak['workers']:,.0f} MB ({workers['anon']:,.0f} / {workers['shmem']:,.0f}) "
                        f"| {peak['ray']:,.0f} MB | {run['seconds']:.0f} |")
        if entry.get("per_extra_peer_mb") is not None:
            rows.append(f"\neach extra peer{f' ({label})' if label else ''}: {entry['per_extra_peer_mb']:,.0f} MB\n")
    return "\n".join(rows)


def main_command(args: argparse.Namespace) -> int:
    if args.child is not None:
        return run_child(args.child, args.dataset, Path(args.data), args.steps, Path(args.folder))
    data = Path(args.data).expanduser().resolve()
    if args.dataset == "parquet" and not data.is_file():
        raise CohortError("no such file: the benchmark needs the CIFAR-10 parquet table (give it with --data PATH)",
                          str(data))
    args.data = data
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-memory-") as folder:
        for size in args.sizes:
            print(f"[{time.strftime('%H:%M:%S')}] {size} peer(s)", file=sys.stderr, flush=True)
            runs[str(size)] = measure_run(args, size, Path(folder) / f"peers-{size}")
    results = {"runs": runs, "per_extra_peer_mb": per_extra_peer(runs),
               "setup": {"dataset": args.dataset, "data": str(data) if args.dataset == "parquet" else None,
                         "peers": "resnet8", "batch": 128, "epochs": 1, "steps": args.steps,
                         "interval_s": args.interval, "code": str(REPO)},
               "machine": machine()}
    if args.baseline:
        results["before"] = json.loads(Path(args.baseline).read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(main_command, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
