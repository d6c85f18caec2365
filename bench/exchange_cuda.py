"""``python -m bench.exchange --device cuda``: what a cohort costs and gains on GPUs.

For each teacher/student pair of the KD literature (resnet32x4 → resnet8x4, wrn_40_2 → wrn_16_2)
and each batch size (64, 128), on real CIFAR-10 images, side by side:

- one process training both networks in turn on one GPU (how the public online-KD code trains);
- the cohort with both peers sharing that GPU (half a GPU each: gloo on host copies);
- the same cohort under CUDA MPS, where the machine lets this user start its control daemon;
- with two GPUs or more, the cohort with one GPU per peer over NCCL: device scaling, as the CPU
  benchmark defines it (one process on one device ÷ the cohort on one device per peer, ÷ peers);

and of every cohort: images per second, the exchange's share of a step, each peer's peak GPU
memory; then the time to the first step of ``python -m cohort.run`` itself on a shared GPU.

Every figure is the median of ``--repeats`` epochs of ``--steps`` steps after one warm-up epoch.
Results go to ``bench/results/exchange_cuda.json`` with the GPUs' name, driver and CUDA versions,
and a markdown table to stdout. Without a GPU the command says so in one line and exits 2;
``--dry-run`` prints the plan (what it would measure, with which backend, on which devices) and
needs no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_DATA,
    REPO,
    TEST_IMAGES,
    cohort_command,
    cohort_steps,
    ratio,
    summarize,
    write_slice,
)
from cohort.config.errors import CohortError
from cohort.console.command import run_command
from cohort.worker.grid import exchange_backend
from cohort.worker.report import cohort_key, metric_key

DEFAULT_OUT = REPO / "bench" / "results" / "exchange_cuda.json"
# Teacher -> student pairs of the KD literature (CRD's CIFAR benchmarks), trained online both ways.
PAIRS = {"resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"), "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2")}
BATCHES = (64, 128)
PEERS = ("teacher", "student")
MPS_CONTROL = "nvidia-cuda-mps-control"

ONE_PROCESS, SHARED, SHARED_MPS, PER_GPU = "one_process", "shared_gpu", "shared_gpu_mps", "gpu_per_peer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.exchange --device cuda",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help=argparse.SUPPRESS)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 parquet table (default: %(default)s)")
    source.add_argument("--cifar-root", help="a torchvision CIFAR-10 folder (cifar-10-batches-py inside) instead")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per epoch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="measured epochs, after one warm-up epoch "
                                                                "(default: %(default)s)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the forward pass's autocast type, for every measurement (default: %(default)s)")
    parser.add_argument("--gpus", type=int, help="GPUs the plan may use (default: all torch sees; 1 leaves out "
                                                 "one GPU per peer); with --dry-run, the plan for that many")
    parser.add_argument("--no-mps", action="store_true", help="do not try CUDA MPS")
    parser.add_argument("--quick", action="store_true", help="a short run for development: 8 steps, 1 repeat, "
                                                             "the first pair at batch 64 only")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; measure nothing (needs no GPU)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON results file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 8, 1
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be at least 2, --repeats at least 1")
    if args.gpus is not None and args.gpus < 1:
        parser.error("--gpus must be at least 1")
    return args


# --------------------------------------------------------------------------- the plan (pure)


@dataclass(frozen=True)
class Measurement:
    kind: str  # ONE_PROCESS, SHARED, SHARED_MPS or PER_GPU
    pair: str
    batch: int
    gpus: int  # the GPUs it runs on: cuda:0 for one process; for a cohort, Ray picks them
    workers: int  # Ray Train workers (0: one plain process)
    gpus_per_peer: float | None  # the topology's resources.gpus_per_peer (None: not a cohort)
    backend: str  # how the peers' logits travel

    @property
    def name(self) -> str:
        return f"{self.pair}/b{self.batch}/{self.kind}"


@dataclass(frozen=True)
class Plan:
    gpus: int
    measurements: tuple[Measurement, ...]
    first_step: Measurement  # python -m cohort.run, timed to its first step
    not_measured: tuple[str, ...]  # what this machine cannot measure, and why


def backend_text(use_gpu: bool, gpus_per_peer: float) -> str:
    """The exchange the product chooses for these resources (``cohort.worker.grid.exchange_backend``)."""
    backend = exchange_backend(use_gpu, gpus_per_peer)
    return f"{backend.name}{' on host copies' if backend.host_copies else ''}"


def make_plan(gpus: int, mps_unavailable: str | None, pairs: tuple[str, ...] = tuple(PAIRS),
              batches: tuple[int, ...] = BATCHES) -> Plan:
    """What a run on ``gpus`` GPUs measures. ``mps_unavailable``: why MPS is not tried (None: it is)."""
    if gpus < 1:
        raise CohortError("the GPU benchmark needs at least one GPU")
    peers = len(PEERS)
    shared = 1.0 / peers  # every peer's worker takes an equal part of GPU 0
    measurements = []
    for pair in pairs:
        for batch in batches:
            measurements.append(Measurement(ONE_PROCESS, pair, batch, 1, 0, None, "none (one process)"))
            measurements.append(Measurement(SHARED, pair, batch, 1, peers, shared, backend_text(True, shared)))
            if mps_unavailable is None:
                measurements.append(Measurement(SHARED_MPS, pair, batch, 1, peers, shared,
                                                backend_text(True, shared)))
            if gpus >= peers:
                measurements.append(Measurement(PER_GPU, pair, batch, peers, peers, 1.0, backend_text(True, 1.0)))
    not_measured = []
    if mps_unavailable is not None:
        not_measured.append(f"{SHARED_MPS}: {mps_unavailable}")
    if gpus < peers:
        not_measured.append(f"{PER_GPU} (NCCL, device scaling): needs {peers} GPUs, {gpus} here")
    first = Measurement(SHARED, pairs[0], batches[0], 1, peers, shared, backend_text(True, shared))
    return Plan(gpus, tuple(measurements), first, tuple(not_measured))


def mps_unavailable(no_mps: bool, control: str | None) -> str | None:
    """Why MPS will not be tried (None: it will; starting its daemon may still be refused)."""
    if no_mps:
        return "not tried (--no-mps)"
    if control is None:
        return f"{MPS_CONTROL} is not on PATH (it ships with the NVIDIA driver's utilities)"
    return None


def device_text(item: Measurement) -> str:
    if item.workers == 0:
        return "cuda:0"
    return "1 GPU, shared" if item.gpus == 1 else f"{item.gpus} GPUs, 1 each"


def describe_plan(plan: Plan, data: str, precision: str, steps: int, repeats: int, assumed: bool) -> str:
    lines = [f"GPU benchmark plan: {plan.gpus} GPU{'s' if plan.gpus > 1 else ''}"
             + (" (assumed: torch sees no GPU here; --gpus N plans for N)" if assumed else ""),
             f"  data: {data}",
             f"  every figure: the median of {repeats} epochs of {steps} steps after 1 warm-up epoch; "
             f"precision {precision}; teacher <- student: reverse_kd, student <- teacher: bdkd",
             f"  {'measurement':<42}{'devices':<17}{'workers':<9}{'GPU per peer':<14}exchange"]
    for item in plan.measurements:
        devices = device_text(item)
        share = "-" if item.gpus_per_peer is None else f"{item.gpus_per_peer:g}"
        workers = str(item.workers) if item.workers else "-"
        lines.append(f"  {item.name:<42}{devices:<17}{workers:<9}{share:<14}{item.backend}")
    first = plan.first_step
    lines.append(f"  time to first step: python -m cohort.run, {first.pair} at batch {first.batch}, "
                 f"{first.workers} workers on {device_text(first)} ({first.backend})")
    lines += [f"  not measured: {reason}" for reason in plan.not_measured]
    return "\n".join(lines)


# --------------------------------------------------------------------------- data and topologies


def torchvision_slice(root: Path, folder: Path, train_images: int) -> Path:
    """``write_slice``'s table drawn from torchvision's CIFAR-10 files instead."""
    from cohort.datasets.cifar import load_cifar

    data = load_cifar("cifar10", str(root))
    return encode_slice((data.train_images, data.train_labels), (data.test_images, data.test_labels),
                        data.info.class_names, folder, train_images)


def encode_slice(train, test, class_names, folder: Path, train_images: int) -> Path:
    """A parquet table of ``train_images`` training and ``TEST_IMAGES`` test rows drawn at random
    (seed 0) from uint8 ``[N, 3, H, W]`` images and their labels, PNG-encoded (lossless)."""
    import warnings

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torchvision.io

    rng = np.random.default_rng(0)
    images, labels, splits = [], [], []
    for split, (pixels, targets), count in (("train", train, train_images), ("test", test, TEST_IMAGES)):
        if len(targets) < count:
            raise CohortError(f"needs {count} {split} images, the set has {len(targets)}", "--cifar-root")
        for index in rng.choice(len(targets), count, replace=False):
            with warnings.catch_warnings():
                # torchvision 0.29 announces a move of its codecs to torchcodec; they still work.
                warnings.simplefilter("ignore", DeprecationWarning)
                images.append(bytes(torchvision.io.encode_png(pixels[int(index)]).numpy()))
            labels.append(int(targets[int(index)]))
            splits.append(split)
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64()),
                      "split": splits}).replace_schema_metadata({"classes": ",".join(class_names)})
    path = folder / "cifar10_slice.parquet"
    pq.write_table(table, path)
    return path


def cuda_topology(item: Measurement, data: Path, epochs: int, precision: str, cpus_per_peer: float):
    from cohort.topology import topology_from_dict

    teacher, student = PAIRS[item.pair]
    resources: dict[str, Any] = {"cpus_per_peer": cpus_per_peer}
    if item.gpus_per_peer is not None:
        resources.update(use_gpu=True, gpus_per_peer=item.gpus_per_peer)
    return topology_from_dict({
        "name": f"bench-cuda-{item.pair}-b{item.batch}-{item.kind}".replace("_", "-"), "seed": 0,
        "data": {"dataset": "parquet", "root": str(data), "batch_size": item.batch, "eval_batch_size": TEST_IMAGES},
        "train": {"epochs": epochs, "schedule": "constant", "checkpoint_every": epochs, "precision": precision},
        "peers": {"teacher": {"model": teacher}, "student": {"model": student}},
        "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
                  {"from": "student", "to": "teacher", "loss": "reverse_kd"}],
        "resources": resources,
    }, item.name)


# --------------------------------------------------------------------------- measurements (need a GPU)


def one_process_on_gpu(topology, threads: int, repeats: int, device: str = "cuda:0") -> dict[str, Any]:
    """One process training the peers in turn on ``device``, with the cohort's models, optimizers,
    objectives and autocast: step seconds (each step ends with a synchronize) and peak GPU memory."""
    import torch

    from cohort.datasets import load_dataset
    from cohort.losses.combine import peer_objective
    from cohort.worker.peer import build_optimizer, build_peer
    from cohort.worker.precision import autocast

    device = torch.device(device)
    cuda = device.type == "cuda"
    torch.set_num_threads(threads)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    data = load_dataset(topology.data)
    peers = topology.peer_names
    models = {peer: build_peer(topology, peer, data.info).to(device) for peer in peers}
    optimizers = {peer: build_optimizer(models[peer], topology.optimizer_for(peer), topology)[0] for peer in peers}
    epochs = []
    for epoch in range(1, repeats + 2):
        seconds = []
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for inputs, labels in data.train_batches(topology.data.batch_size, topology.seed, epoch):
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = {}
            for peer in peers:
                with autocast(topology.train.precision, device):
                    logits[peer] = models[peer](inputs)
                logits[peer] = logits[peer].float()
            detached = {peer: value.detach() for peer, value in logits.items()}
            for peer in peers:
                loss, _ = peer_objective(logits[peer], labels, topology.incoming_edges(peer), detached,
                                         topology.train.ce_weight, epoch)
                optimizers[peer].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[peer].step()
            if cuda:
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            seconds.append(now - started)
            started = now
        epochs.append(statistics.median(seconds))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return {**summarize(epochs[1:]), "peak_gpu_mb": peak}


def in_a_child_process(function, *args):
    """``function(*args)`` in a fresh process: this one never holds a CUDA context (its memory
    would count against the cohorts' GPU, and a GPU with a process outside MPS may refuse MPS)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def gpu_memory_loop(memory):
    """The cohort's worker loop, then this worker's peak GPU memory into the queue ``memory``."""
    def loop(config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch
        import torch

        from cohort.worker.loop import train_cohort

        train_cohort(config)
        device = ray.train.torch.get_device()
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        memory.put({"rank": ray.train.get_context().get_world_rank(), "device": str(device), "peak_gpu_mb": peak})
    return loop


def cohort_on_gpu(topology, threads: int, folder: Path) -> dict[str, Any]:
    """Fit the cohort on the running Ray: its step, images per second, exchange share and peak memory."""
    from ray.util.queue import Queue

    from cohort.driver.launch import failure_reason, make_trainer
    from cohort.worker.grid import slot_of

    progress, memory = Queue(), Queue()
    trainer = make_trainer(topology, topology.resources.cpus_per_peer, threads, str(folder / "ray"),
                           f"{topology.name}-{time.time_ns()}", progress=progress,
                           train_loop=gpu_memory_loop(memory))
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 - the failure's reason, in one line
        raise CohortError(f"the {topology.name} cohort failed: {failure_reason(error)}") from None
    reports = []
    while not progress.empty():
        reports.append(progress.get())
    reports.sort(key=lambda report: report["epoch"])
    peaks = [memory.get(timeout=60) for _ in range(topology.num_workers)]
    steps = cohort_steps(topology, reports)
    measured = reports[1:]
    share = {peer: summarize([report[metric_key(peer, "exchange_seconds")] / report[metric_key(peer, "step_seconds")]
                              for report in measured]) for peer in topology.peer_names}
    return {**steps, "images_per_second": topology.data.batch_size / steps["median"], "exchange_share": share,
            "peak_gpu_mb": {slot_of(peak["rank"], topology.peer_names).peer: peak["peak_gpu_mb"] for peak in peaks},
            "devices": {slot_of(peak["rank"], topology.peer_names).peer: peak["device"] for peak in peaks}}


class MpsDaemon:
    """CUDA MPS's control daemon, started for this benchmark in a folder of its own (its pipe and
    log directories); every CUDA process started with its environment becomes an MPS client."""

    def __init__(self, folder: Path):
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        for path in self.env.values():
            Path(path).mkdir(parents=True, exist_ok=True)

    def start(self) -> str | None:
        """None when the daemon runs; else why it does not (in one line)."""
        started = subprocess.run([MPS_CONTROL, "-d"], env={**os.environ, **self.env}, capture_output=True, text=True)
        if started.returncode != 0:
            return f"{MPS_CONTROL} -d failed: {(started.stderr or started.stdout).strip() or started.returncode}"
        return None

    def stop(self) -> None:
        subprocess.run([MPS_CONTROL], input="quit\n", env={**os.environ, **self.env}, capture_output=True, text=True)


def gpu_machine() -> dict[str, Any]:
    """The GPUs, driver and CUDA versions, and the software."""
    import ray
    import torch

    driver = None
    if shutil.which("nvidia-smi"):
        queried = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True)
        driver = queried.stdout.strip().splitlines()[0] if queried.returncode == 0 and queried.stdout.strip() else None
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": properties.name, "memory_gb": properties.total_memory / 2**30,
                     "compute_capability": f"{properties.major}.{properties.minor}"})
    return {"gpus": gpus, "driver": driver, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def no_gpu_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    build = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
             else "a CPU-only build: install a CUDA wheel, see docs/performance.md")
    return (f"no CUDA GPU: torch {torch.__version__} ({build}) sees none on this machine "
            "(--dry-run prints the plan without one)")


def measure(args: argparse.Namespace, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    import ray

    from cohort.driver.cluster import start_ray

    cores = os.cpu_count() or 1
    cpus_per_peer = float(max(1, min(4, cores // len(PEERS))))  # the cohort's CPUs: batches are made on them
    threads = int(cpus_per_peer)
    epochs = args.repeats + 1
    results: dict[str, Any] = {"measurements": {}, "not_measured": list(plan.not_measured)}
    with tempfile.TemporaryDirectory(prefix="bench-exchange-cuda-") as scratch:
        folder = Path(scratch)
        slices = {}
        for batch in sorted({item.batch for item in plan.measurements}):
            (folder / f"b{batch}").mkdir()
            images = args.steps * batch
            slices[batch] = (torchvision_slice(Path(args.cifar_root).expanduser(), folder / f"b{batch}", images)
                             if args.cifar_root else write_slice(Path(args.data).expanduser(), folder / f"b{batch}",
                                                                 images))

        first = cuda_topology(plan.first_step, slices[plan.first_step.batch], epochs, args.precision, cpus_per_peer)
        log(f"time to first step: python -m cohort.run on {plan.first_step.name}")
        command = cohort_command(first, folder / "command")
        startup = {key.split("/")[-1][:-2]: value for key, value in command["reports"][0].items()
                   if key.startswith(cohort_key("startup/"))}
        results["time_to_first_step_s"] = startup.pop("total", None)
        results["time_to_first_step_breakdown_s"] = startup

        by_kind = {kind: [item for item in plan.measurements if item.kind == kind]
                   for kind in (ONE_PROCESS, SHARED, PER_GPU, SHARED_MPS)}
        for item in by_kind[ONE_PROCESS]:
            log(f"{item.name}: both networks in turn, one process on cuda:0")
            topology = cuda_topology(item, slices[item.batch], epochs, args.precision, cpus_per_peer)
            steps = in_a_child_process(one_process_on_gpu, topology, threads * len(PEERS), args.repeats)
            results["measurements"][item.name] = {**asdict(item), **steps,
                                                  "images_per_second": item.batch / steps["median"]}
        start_ray(None, verbose=False)
        for item in by_kind[SHARED] + by_kind[PER_GPU]:
            log(f"{item.name}: the cohort, {item.workers} workers on {device_text(item)} ({item.backend})")
            topology = cuda_topology(item, slices[item.batch], epochs, args.precision, cpus_per_peer)
            results["measurements"][item.name] = {**asdict(item), **cohort_on_gpu(topology, threads, folder)}
        ray.shutdown()
        if by_kind[SHARED_MPS]:
            daemon = MpsDaemon(folder / "mps")
            refused = daemon.start()
            if refused is not None:
                log(f"MPS not measured: {refused}")
                results["not_measured"].append(f"{SHARED_MPS}: {refused}")
            else:
                saved = {key: os.environ.get(key) for key in daemon.env}
                os.environ.update(daemon.env)  # Ray's processes, started now, inherit it: MPS clients
                try:
                    start_ray(None, verbose=False)
                    for item in by_kind[SHARED_MPS]:
                        log(f"{item.name}: the cohort under MPS")
                        topology = cuda_topology(item, slices[item.batch], epochs, args.precision, cpus_per_peer)
                        results["measurements"][item.name] = {**asdict(item),
                                                              **cohort_on_gpu(topology, threads, folder)}
                finally:
                    ray.shutdown()
                    daemon.stop()
                    for key, value in saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
    results["ratios"] = ratios(results["measurements"])
    results["setup"] = {"pairs": {pair: dict(zip(PEERS, PAIRS[pair])) for pair in {m.pair for m in plan.measurements}},
                        "batches": sorted({m.batch for m in plan.measurements}), "steps": args.steps,
                        "repeats": args.repeats, "warmup_epochs": 1, "precision": args.precision,
                        "cpus_per_peer": cpus_per_peer, "threads_per_peer": threads,
                        "one_process_threads": threads * len(PEERS),
                        "data": (f"CIFAR-10 ({'torchvision at ' + args.cifar_root if args.cifar_root else args.data}): "
                                 f"steps x batch training and {TEST_IMAGES} test images drawn at random (seed 0)")}
    return results


def ratios(measurements: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per pair and batch: the cohort's speed against one process on one GPU (> 1: the cohort is
    faster), under MPS too; and device scaling on one GPU per peer (one process's step ÷ the
    cohort's, ÷ the peers, as in the CPU benchmark: 1 is perfect)."""
    found: dict[str, dict[str, Any]] = {}
    for name, entry in measurements.items():
        if entry["kind"] != ONE_PROCESS:
            continue
        prefix = name.rsplit("/", 1)[0]
        row: dict[str, Any] = {}
        for kind, key in ((SHARED, "shared_gpu_speedup"), (SHARED_MPS, "shared_gpu_mps_speedup")):
            other = measurements.get(f"{prefix}/{kind}")
            if other is not None:
                row[key] = ratio(entry, other)
        other = measurements.get(f"{prefix}/{PER_GPU}")
        if other is not None:
            row["device_scaling"] = ratio(entry, other, scale=len(PEERS))
        found[prefix] = row
    return found


def markdown(results: dict[str, Any]) -> str:
    measurements = results["measurements"]
    lines = ["| pair / batch | one process, 1 GPU | cohort, shared GPU | shared GPU + MPS | one GPU per peer (NCCL) "
             "| exchange share (teacher, student) | peak GPU MB (teacher, student) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for prefix, row in results["ratios"].items():
        speeds = []
        for kind, key in ((ONE_PROCESS, None), (SHARED, "shared_gpu_speedup"), (SHARED_MPS, "shared_gpu_mps_speedup"),
                          (PER_GPU, "device_scaling")):
            entry = measurements.get(f"{prefix}/{kind}")
            if entry is None:
                speeds.append("not measured")
                continue
            text = f"{entry['images_per_second']:.0f} img/s"
            if key is not None:
                text += f" ({'scaling' if kind == PER_GPU else '×'} {row[key]['value']:.2f})"
            speeds.append(text)
        shared = measurements.get(f"{prefix}/{SHARED}", {})
        share = ", ".join(f"{100 * shared['exchange_share'][peer]['median']:.1f}%" for peer in PEERS) if shared else "-"
        memory = ", ".join(f"{shared['peak_gpu_mb'][peer]:.0f}" if shared["peak_gpu_mb"][peer] is not None else "-"
                           for peer in PEERS) if shared else "-"
        lines.append(f"| {prefix} | {' | '.join(speeds)} | {share} | {memory} |")
    if results.get("time_to_first_step_s") is not None:
        lines.append(f"\ntime to first step (`python -m cohort.run`, shared GPU): {results['time_to_first_step_s']:.1f} s")
    lines += [f"not measured: {reason}" for reason in results["not_measured"]]
    return "\n".join(lines)


def main_command(args: argparse.Namespace) -> int:
    import torch

    reason = no_gpu_reason()
    seen = torch.cuda.device_count() if reason is None else 0
    if args.gpus is not None and seen and args.gpus > seen:
        raise CohortError(f"--gpus {args.gpus}: torch sees {seen} GPU{'s' if seen > 1 else ''}")
    gpus = args.gpus or seen or 1
    pairs, batches = (tuple(PAIRS)[:1], BATCHES[:1]) if args.quick else (tuple(PAIRS), BATCHES)
    plan = make_plan(gpus, mps_unavailable(args.no_mps, shutil.which(MPS_CONTROL)), pairs, batches)
    source = Path(args.cifar_root or args.data).expanduser()
    data = (f"CIFAR-10 from torchvision at {source}" if args.cifar_root else f"CIFAR-10 parquet {source}") + \
        ("" if source.exists() else " (absent: give --data PATH or --cifar-root PATH)")
    if args.dry_run:
        print(describe_plan(plan, data, args.precision, args.steps, args.repeats, assumed=not seen and not args.gpus))
        return 0
    if reason is not None:
        raise CohortError(reason)
    if not source.exists():
        raise CohortError("no such file or folder: the benchmark needs CIFAR-10 (--data PATH or --cifar-root PATH)",
                          str(source))

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    print(describe_plan(plan, data, args.precision, args.steps, args.repeats, assumed=False), file=sys.stderr)
    started = time.perf_counter()
    results = measure(args, plan, log)
    results["setup"]["bench_seconds"] = time.perf_counter() - started
    results["machine"] = gpu_machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    log(f"done in {results['setup']['bench_seconds']:.0f} s; results in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(main_command, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
