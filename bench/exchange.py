"""``python -m bench.exchange``: what the exchange costs, and how a cohort scales with devices.

One run measures, side by side and on the same models, batches and losses:

- the cohort: ``python -m cohort.run`` itself (a fresh process, so its time to the first step is
  the user's), then further cohorts through ``cohort.driver.launch.make_trainer`` in this process: Ray Train
  workers running ``cohort.worker.loop``, which reports each epoch's median step and exchange time;
- the one-process baselines: one process training all the networks in turn (the DML / KD_Lib way)
  with one thread and with all the machine's threads, and the slowest peer alone on one thread
  (just before and just after the cohort: the machine's speed drifts);
- the slowest peer alone in two plain processes at once, on an idle machine and beside an idle
  Ray Train run: what the machine, and then Ray's own processes, allow two busy cores;
- the ``all_gather`` of ``cohort.worker.exchange.LogitExchange`` alone, for several logit sizes;
- the live display's cost: the same cohort with rank 0's step counter on (what ``cohort.run``
  sends on a terminal) between two runs with it off, whose ratio is the noise
  (``--display-only``: just this, with ``--rounds`` such triples).

Every figure is the median of ``--repeats`` epochs of ``--steps`` steps, after one warm-up epoch;
each epoch's value is the median of its steps. The results go to ``bench/results/exchange.json``
and a markdown table to stdout.

``--device cuda`` runs the GPU benchmark instead (``bench.exchange_cuda``, its own options).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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
from cohort.worker.report import cohort_key, metric_key

DEFAULT_OUT = REPO / "bench" / "results" / "exchange.json"
DISPLAY_OUT = REPO / "bench" / "results" / "display.json"
REPRESENTATIONS_OUT = REPO / "bench" / "results" / "representations.json"
CODISTILLATION_OUT = REPO / "bench" / "results" / "codistillation.json"
EXCHANGE_SHAPES = ((64, 10), (128, 100), (256, 1000))

# Two equal peers (DML), and a big teacher with a small student (BD-KD), as in the KD literature.
EQUAL = {"peers": {"net_a": {"model": "resnet20"}, "net_b": {"model": "resnet20"}},
         "edges": [{"from": "net_a", "to": "net_b", "loss": "kd", "temperature": 1.0},
                   {"from": "net_b", "to": "net_a", "loss": "kd", "temperature": 1.0}]}
# The same pair exchanging logits (DML), embeddings (MCL) or attention maps (AT): docs/representations.md.
EMBEDDED = {"model": "resnet20", "embedding": {"dim": 128}}
BY_PAYLOAD = {
    "logits": {"peers": {"net_a": {"model": "resnet20"}, "net_b": {"model": "resnet20"}},
               "edges": EQUAL["edges"]},
    "mcl": {"peers": {"net_a": EMBEDDED, "net_b": EMBEDDED},
            "edges": [{"from": "net_a", "to": "net_b", "loss": "mcl", "reduce": "sum"},
                      {"from": "net_b", "to": "net_a", "loss": "mcl", "reduce": "sum"}]},
    "attention": {"peers": {"net_a": {"model": "resnet20"}, "net_b": {"model": "resnet20"}},
                  "edges": [{"from": "net_a", "to": "net_b", "loss": "attention", "reduce": "sum"},
                            {"from": "net_b", "to": "net_a", "loss": "attention", "reduce": "sum"}]},
}
# A teacher several times costlier per step than its student, in lockstep and as codistillation:
# docs/codistillation.md.
SLOW_TEACHER = {"peers": {"teacher": {"model": "resnet32"}, "student": {"model": "resnet8"}},
                "edges": [{"from": "teacher", "to": "student", "loss": "kd", "temperature": 4.0},
                          {"from": "student", "to": "teacher", "loss": "kd", "temperature": 4.0}]}
SNAPSHOT_EVERY = 50
UNEQUAL = {"peers": {"teacher": {"model": "resnet20"}, "student": {"model": "resnet8"}},
           "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
                     {"from": "student", "to": "teacher", "loss": "reverse_kd"}]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.exchange", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU benchmark, see `python -m bench.exchange --device cuda --help`")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 parquet table (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per epoch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="measured epochs, after one warm-up epoch "
                                                                "(default: %(default)s)")
    parser.add_argument("--exchange-calls", type=int, default=50,
                        help="all_gather calls per logit size (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a short run for development: 4 steps, 1 repeat")
    parser.add_argument("--out", help=f"the JSON results file (default: {DEFAULT_OUT.relative_to(REPO)}, "
                                      f"with --display-only {DISPLAY_OUT.relative_to(REPO)})")
    parser.add_argument("--display-only", action="store_true",
                        help="measure only the live display's cost: the cohort with rank 0's step counter off, "
                             "on, off, --rounds times")
    parser.add_argument("--representations", action="store_true",
                        help="measure only the step of a resnet20 pair exchanging embeddings (MCL) and attention "
                             "maps (AT) against the same pair exchanging logits")
    parser.add_argument("--codistillation", action="store_true",
                        help="measure only the student's pace beside a slower teacher: lockstep against "
                             f"snapshots every {SNAPSHOT_EVERY} steps (exchange.mode: snapshot)")
    parser.add_argument("--rounds", type=int, default=1, help="off/on/off triples of the live display's "
                                                              "measurement (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.display_only + args.representations + args.codistillation > 1:
        parser.error("--display-only, --representations and --codistillation are separate measurements: give one")
    args.out = args.out or str(DISPLAY_OUT if args.display_only else REPRESENTATIONS_OUT if args.representations
                               else CODISTILLATION_OUT if args.codistillation else DEFAULT_OUT)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.quick:
        args.steps, args.repeats, args.exchange_calls = 4, 1, 10
    if args.steps < 2 or args.repeats < 1 or args.exchange_calls < 2:
        parser.error("--steps and --exchange-calls must be at least 2, --repeats at least 1")
    return args


# --------------------------------------------------------------------------- data and topologies




def bench_topology(name: str, peers_and_edges: dict, data: Path, epochs: int, sampler: dict | None = None):
    from cohort.topology import topology_from_dict

    return topology_from_dict({
        "name": name, "seed": 0,
        "data": {"dataset": "parquet", "root": str(data), "batch_size": 64, "eval_batch_size": TEST_IMAGES,
                 "sampler": sampler},
        # A constant schedule keeps every epoch's work the same; one checkpoint, at the end.
        "train": {"epochs": epochs, "schedule": "constant", "checkpoint_every": epochs},
        **peers_and_edges,
    }, name)


# --------------------------------------------------------------------------- statistics




def bracketed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A baseline measured just before and just after what it is compared with: repeat by repeat,
    the mean of the two (what it was, drift being linear, while the other ran)."""
    values = [(b + a) / 2 for b, a in zip(before["values"], after["values"])]
    cpu = [(b + a) / 2 for b, a in zip(before["cpu_seconds"]["values"], after["cpu_seconds"]["values"])]
    return {**summarize(values), "cpu_seconds": summarize(cpu)}




def load_seconds(topology, table: Path) -> float:
    """Seconds to load (decode) a parquet table through the product's loader, on one thread as a
    worker with one thread does."""
    import torch

    from cohort.datasets import load_dataset

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        load_dataset(topology.data.model_copy(update={"root": str(table)}))
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- one-process baselines


def one_process_steps(topology, peers: list[str], threads: int, repeats: int) -> dict[str, Any]:
    """Step time of one process training ``peers`` in turn on the cohort's batches, with the
    cohort's models, optimizers and objectives (``peer_objective``), on ``threads`` threads.

    Each step: every network's forward pass, then each one's objective from the others' detached
    logits, backward and optimizer step. A peer trained alone distills from its own detached
    logits, so that its loss does the same work on the same shapes.
    """
    import torch

    from cohort.datasets import load_dataset
    from cohort.losses.combine import peer_objective
    from cohort.worker.peer import build_optimizer, build_peer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = load_dataset(topology.data)
        models = {peer: build_peer(topology, peer, data.info) for peer in peers}
        optimizers = {peer: build_optimizer(models[peer], topology.optimizer_for(peer), topology)[0] for peer in peers}
        epochs, cpu_epochs = [], []
        for epoch in range(1, repeats + 2):
            step_seconds, cpu_seconds = [], []
            started, cpu_started = time.perf_counter(), time.process_time()
            for inputs, labels in data.train_batches(topology.data.batch_size, topology.seed, epoch):
                logits = {peer: models[peer](inputs) for peer in peers}
                detached = {peer: value.detach() for peer, value in logits.items()}
                for peer in peers:
                    senders = detached if len(peers) > 1 else {name: detached[peer] for name in topology.peer_names}
                    loss, _ = peer_objective(logits[peer], labels, topology.incoming_edges(peer), senders,
                                             topology.train.ce_weight, epoch)
                    optimizers[peer].zero_grad(set_to_none=True)
                    loss.backward()
                    optimizers[peer].step()
                now, cpu_now = time.perf_counter(), time.process_time()
                step_seconds.append(now - started)
                cpu_seconds.append(cpu_now - cpu_started)
                started, cpu_started = now, cpu_now
            epochs.append(statistics.median(step_seconds))
            cpu_epochs.append(statistics.median(cpu_seconds))
    finally:
        torch.set_num_threads(previous)
    # The first epoch warms up.
    return {**summarize(epochs[1:]), "cpu_seconds": summarize(cpu_epochs[1:])}


def side_by_side_alone(topology, peer: str, repeats: int) -> dict[str, Any]:
    """The slowest peer alone on 1 thread, in two plain processes at once (no Ray, no exchange):
    the most a machine gives two busy cores. A cohort of two such peers cannot step faster."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [pool.submit(one_process_steps, topology, [peer], 1, repeats) for _ in range(2)]
        results = [run.result() for run in runs]
    return max(results, key=lambda result: result["median"])


def plain_trainer(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], workers: int, name: str,
                  folder: Path):
    """A ``TorchTrainer`` of ``workers`` CPU workers (1 CPU each, gloo) running one of this module's loops."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if __name__ != "__main__":
        # Imported (by a test): send this module's code to the workers, which may not find bench/.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return TorchTrainer(loop, train_loop_config=config,
                        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1.0}),
                        torch_config=TorchConfig(backend="gloo"),
                        run_config=RunConfig(name=f"{name}-{time.time_ns()}", storage_path=str(folder / "ray")))


def idle_cohort_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker that does nothing until told to stop: the cohort's processes without its work."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        config["started"].put(True)
        config["stop"].get()
    ray.train.report({})


def beside_idle_ray_train(topology, peer: str, repeats: int, folder: Path) -> dict[str, Any]:
    """``side_by_side_alone`` while an idle Ray Train run of the cohort's shape is up (its controller,
    helper actors, progress queue and one idle worker per peer): what Ray's own processes take
    from two busy cores, with no exchange and no lock-step between the two."""
    import threading

    from ray.util.queue import Queue

    started, stop = Queue(), Queue()
    trainer = plain_trainer(idle_cohort_loop, {"started": started, "stop": stop}, len(topology.peers), "idle", folder)
    thread = threading.Thread(target=trainer.fit, daemon=True)
    thread.start()
    try:
        started.get(timeout=180)
        time.sleep(5)  # the helper actors' own start-up is over, as it is after a cohort's warm-up epoch
        return side_by_side_alone(topology, peer, repeats)
    finally:
        stop.put(True)
        thread.join(timeout=120)


# --------------------------------------------------------------------------- the cohort, through cohort.run




# --------------------------------------------------------------------------- the cohort, in this process


def cohort_in_process(topology, threads: dict[str, int], folder: Path, live_steps: bool = False,
                      step_messages: list | None = None) -> list[dict[str, Any]]:
    """Fit the cohort through ``cohort.driver.launch.make_trainer`` on the running Ray; rank 0's epoch reports.
    ``live_steps``: rank 0 also sends its step counter, as ``cohort.run`` does on a terminal (the
    messages go to ``step_messages``)."""
    from ray.util.queue import Queue

    from cohort.driver.launch import make_trainer
    from cohort.worker.ticker import is_step

    progress = Queue()
    trainer = make_trainer(topology, 1.0, threads, str(folder / "ray"), f"{topology.name}-{time.time_ns()}",
                           progress=progress, live_steps=live_steps)
    try:
        trainer.fit()
    except Exception as error:  # noqa: BLE001 - the failure's reason, in one line
        from cohort.driver.launch import failure_reason

        raise CohortError(f"the {topology.name} cohort failed: {failure_reason(error)}") from None
    reports = []
    while not progress.empty():
        message = progress.get()
        if is_step(message):
            if step_messages is not None:
                step_messages.append(message)
        else:
            reports.append(message)
    return sorted(reports, key=lambda report: report["epoch"])


def live_display(topology, threads: dict[str, int], folder: Path, rounds: int,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """The step with rank 0's step counter on against the same cohort with it off, run just before
    and just after (bracketed, as the baselines are); the two runs with it off against each other
    say how large the noise is. ``rounds`` such off/on/off triples, pooled."""
    on, off_before, off_after, messages, epochs = [], [], [], [], 0
    for round_ in range(rounds):
        log(f"live display, round {round_ + 1} of {rounds}: the cohort with rank 0's step counter off, on, off")
        before = cohort_steps(topology, cohort_in_process(topology, threads, folder))
        sent: list[dict[str, Any]] = []
        with_counter = cohort_steps(topology, cohort_in_process(topology, threads, folder, True, sent))
        after = cohort_steps(topology, cohort_in_process(topology, threads, folder))
        off_before.append(before)
        on.append(with_counter)
        off_after.append(after)
        messages.append(len(sent))
        epochs += topology.train.epochs
    pooled = lambda runs: summarize([value for run in runs for value in run["values"]])  # noqa: E731
    pooled_cpu = lambda runs: summarize([v for run in runs for entry in run["cpu_seconds"].values()  # noqa: E731
                                         for v in entry["values"]])
    before, after = ({**pooled(runs), "cpu_seconds": pooled_cpu(runs)} for runs in (off_before, off_after))
    with_counter = {**pooled(on), "cpu_seconds": pooled_cpu(on)}
    return {"step_counter_on": with_counter, "step_counter_off_before": before, "step_counter_off_after": after,
            "overhead": ratio(with_counter, bracketed(before, after)), "noise": ratio(after, before),
            "step_messages_per_epoch": sum(messages) / epochs, "rounds": rounds}




def exchange_latency_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker timing ``LogitExchange`` alone, for each logit size; rank 0 sends the
    slowest peer's median per size."""
    import ray.train
    import torch

    from cohort.worker.exchange import LogitExchange

    torch.set_num_threads(1)
    exchange = LogitExchange(config["peers"])
    medians = {}
    for batch, classes in config["shapes"]:
        logits = torch.randn(batch, classes)
        for _ in range(5):  # the first calls set up gloo's buffers
            exchange(logits)
        seconds = []
        for _ in range(config["calls"]):
            started = time.perf_counter()
            exchange(logits)
            seconds.append(time.perf_counter() - started)
        medians[f"{batch}x{classes}"] = statistics.median(seconds)
    everyone = exchange.gather_objects(medians)
    if ray.train.get_context().get_world_rank() == 0:
        config["results"].put({shape: max(peer[shape] for peer in everyone) for shape in medians})
    ray.train.report({})


def exchange_latency(peers: list[str], calls: int, folder: Path) -> dict[str, float]:
    from ray.util.queue import Queue

    results = Queue()
    plain_trainer(exchange_latency_loop, {"peers": peers, "shapes": EXCHANGE_SHAPES, "calls": calls,
                                          "results": results}, len(peers), "exchange", folder).fit()
    return results.get(timeout=60)


# --------------------------------------------------------------------------- the benchmark


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from cohort.driver.cluster import start_ray
    from cohort.driver.launch import make_plan
    from cohort.driver.placement import peer_threads

    cores = os.cpu_count() or 1
    epochs = args.repeats + 1
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as scratch:
        folder = Path(scratch)
        data = write_slice(Path(args.data).expanduser(), folder, args.steps * 64)
        equal = bench_topology("bench-equal", EQUAL, data, epochs)
        unequal = bench_topology("bench-unequal", UNEQUAL, data, epochs)
        equal_plan, unequal_plan = (make_plan(t, f"sqlite:///{folder}/plan.db", cores) for t in (equal, unequal))
        slowest = max(equal_plan.compute, key=equal_plan.compute.get)
        teacher = max(unequal_plan.compute, key=unequal_plan.compute.get)

        # The machine's speed drifts by several per cent over minutes (a shared host): the slowest
        # peer alone runs just before and just after the cohort, and their mean is its baseline.
        log("the slowest peer alone on 1 thread, before the cohort")
        alone_before = one_process_steps(equal, [slowest], 1, args.repeats)
        log(f"cohort of 2 x resnet20 through python -m cohort.run ({epochs} epochs of {args.steps} steps)")
        command = cohort_command(equal, folder / "command")
        log("the slowest peer alone on 1 thread, after the cohort")
        alone_after = one_process_steps(equal, [slowest], 1, args.repeats)
        alone_equal = bracketed(alone_before, alone_after)
        cohort_equal = cohort_steps(equal, command["reports"])
        startup = {key.split("/")[-1][:-2]: value for key, value in command["reports"][0].items()
                   if key.startswith(cohort_key("startup/"))}
        if not startup:
            raise CohortError("python -m cohort.run reported no start-up breakdown")

        log("loading the whole table as the driver's plan does (the slice above is smaller)")
        whole_table = load_seconds(equal, Path(args.data).expanduser())
        slice_table = load_seconds(equal, data)

        log("one process: both networks in turn on 1 thread, on all threads; the slowest peer alone")
        loop_equal_1 = one_process_steps(equal, equal.peer_names, 1, args.repeats)
        loop_equal_all = one_process_steps(equal, equal.peer_names, cores, args.repeats)
        log("the slowest peer alone in two processes at once, 1 thread each: the machine's parallel limit")
        alone_twice = side_by_side_alone(equal, slowest, args.repeats)
        log("one process, teacher and student: in turn on 1 thread and on all threads; the teacher alone")
        loop_unequal_1 = one_process_steps(unequal, unequal.peer_names, 1, args.repeats)
        loop_unequal_all = one_process_steps(unequal, unequal.peer_names, cores, args.repeats)
        alone_teacher = one_process_steps(unequal, [teacher], 1, args.repeats)

        start_ray(None, verbose=False)
        log("the slowest peer alone in two processes at once, beside an idle Ray Train run of two workers")
        alone_twice_beside_ray = beside_idle_ray_train(equal, slowest, args.repeats, folder)
        placement = peer_threads(unequal_plan.compute, 1.0)
        # The alternative the placement rejects: the teacher's share rounded up, one thread more.
        extra = {**placement, teacher: placement[teacher] + 1}
        log(f"cohort of resnet20 teacher and resnet8 student: threads {placement} (the default), then {extra}")
        unequal_reports = cohort_in_process(unequal, placement, folder)
        extra_reports = cohort_in_process(unequal, extra, folder)
        display = live_display(equal, peer_threads(equal_plan.compute, 1.0), folder, args.rounds, log)
        log(f"all_gather alone, {', '.join(f'{b}x{c}' for b, c in EXCHANGE_SHAPES)}")
        latency = exchange_latency(equal.peer_names, args.exchange_calls, folder)

    cohort_unequal, cohort_extra = cohort_steps(unequal, unequal_reports), cohort_steps(unequal, extra_reports)
    last = command["reports"][-1]
    in_step_exchange = summarize([min(report[metric_key(peer, "exchange_seconds")] for peer in equal.peer_names)
                                  for report in command["reports"][1:]])
    exchange = {}
    for batch, classes in EXCHANGE_SHAPES:
        seconds = latency[f"{batch}x{classes}"]
        # A step's compute grows with the batch: the cohort's measured step at 64, scaled.
        step = cohort_equal["median"] * batch / 64
        exchange[f"{batch}x{classes}"] = {"all_gather_s": seconds, "step_s": step, "share": seconds / step,
                                          "step_is_estimated": batch != 64}
    return {
        "overhead": ratio(cohort_equal, alone_equal),
        # What two busy cores cost each other here (shared cache and memory bandwidth), and the
        # cohort's overhead and scaling measured against that limit instead of an idle machine.
        "parallel_slowdown": ratio(alone_twice, alone_equal),
        "overhead_vs_parallel_limit": ratio(cohort_equal, alone_twice),
        "device_scaling_limit": ratio(loop_equal_1, alone_twice, scale=len(equal.peers)),
        # What Ray's own processes (an idle Ray Train run's controller, helpers and workers) take
        # from two busy cores; and the cohort against that: the exchange and the lock-step.
        "ray_train_floor": ratio(alone_twice_beside_ray, alone_twice),
        "overhead_vs_ray_train_floor": ratio(cohort_equal, alone_twice_beside_ray),
        "device_scaling": ratio(loop_equal_1, cohort_equal, scale=len(equal.peers)),
        "equal_resources": ratio(loop_equal_all, cohort_equal),
        "unequal_equal_resources": ratio(loop_unequal_all, cohort_unequal),
        "unequal_equal_resources_teacher_extra_thread": ratio(loop_unequal_all, cohort_extra),
        "unequal_overhead": ratio(cohort_unequal, alone_teacher),
        "unequal_device_scaling": ratio(loop_unequal_1, cohort_unequal, scale=len(unequal.peers)),
        "time_to_first_step_s": startup["total"],
        "time_to_first_step_breakdown_s": {part: value for part, value in startup.items() if part != "total"},
        # The command ran on a slice. On the whole table the driver's plan decodes more (once: the
        # workers receive the decoded data through Ray's object store); counted here as if none
        # of it overlapped Ray's start, which it does in part.
        "time_to_first_step_whole_table_s": startup["total"] + (whole_table - slice_table),
        "load_whole_table_s": whole_table,
        "exchange": exchange,
        "exchange_in_step_s": in_step_exchange,
        "live_display": display,
        "peak_rss_mb": {peer: last[metric_key(peer, "peak_rss_mb")] for peer in equal.peer_names},
        "peak_rss_mb_unequal": {peer: unequal_reports[-1][metric_key(peer, "peak_rss_mb")] for peer in unequal.peer_names},
        "step_seconds": {
            "cohort_equal": cohort_equal, "one_process_1_thread": loop_equal_1,
            f"one_process_{cores}_threads": loop_equal_all, "slowest_peer_alone_1_thread": alone_equal,
            "slowest_peer_alone_in_two_processes_at_once": alone_twice,
            "slowest_peer_alone_in_two_processes_beside_idle_ray_train": alone_twice_beside_ray,
            "slowest_peer_alone_before_cohort": alone_before, "slowest_peer_alone_after_cohort": alone_after,
            "cohort_unequal_default_threads": cohort_unequal, "cohort_unequal_teacher_extra_thread": cohort_extra,
            "unequal_one_process_1_thread": loop_unequal_1, f"unequal_one_process_{cores}_threads": loop_unequal_all,
            "teacher_alone_1_thread": alone_teacher,
        },
        "setup": {
            "equal_peers": {peer: equal.peers[peer].model for peer in equal.peer_names},
            "unequal_peers": {peer: unequal.peers[peer].model for peer in unequal.peer_names},
            "unequal_threads": placement, "unequal_threads_extra": extra, "gflops_per_sample_step": {
                **{f"{peer} ({equal.peers[peer].model})": equal_plan.compute[peer] / 1e9 for peer in equal.peer_names},
                **{f"{peer} ({unequal.peers[peer].model})": unequal_plan.compute[peer] / 1e9
                   for peer in unequal.peer_names}},
            "batch": 64, "steps": args.steps, "repeats": args.repeats, "warmup_epochs": 1,
            "exchange_calls": args.exchange_calls, "data": "CIFAR-10 parquet: "
            f"{args.steps * 64} training and {TEST_IMAGES} test images drawn at random (seed 0)",
            "command_seconds": command["command_seconds"],
        },
        "machine": machine(),
    }


def measure_display(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """``--display-only``: the live display's cost alone (see :func:`live_display`)."""
    from cohort.driver.cluster import start_ray
    from cohort.driver.launch import make_plan
    from cohort.driver.placement import peer_threads

    with tempfile.TemporaryDirectory(prefix="bench-display-") as scratch:
        folder = Path(scratch)
        data = write_slice(Path(args.data).expanduser(), folder, args.steps * 64)
        equal = bench_topology("bench-equal", EQUAL, data, args.repeats + 1)
        plan = make_plan(equal, f"sqlite:///{folder}/plan.db", os.cpu_count() or 1)
        start_ray(None, verbose=False)
        display = live_display(equal, peer_threads(plan.compute, 1.0), folder, args.rounds, log)
    return {"live_display": display,
            "setup": {"equal_peers": {peer: equal.peers[peer].model for peer in equal.peer_names}, "batch": 64,
                      "steps": args.steps, "repeats": args.repeats, "warmup_epochs": 1, "rounds": args.rounds},
            "machine": machine()}


def measure_representations(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """``--representations``: the step of the same resnet20 pair exchanging logits, embeddings (MCL)
    and attention maps (AT), one after the other and then the logits pair again (bracketed); every
    batch drawn with 8 images of 8 classes, as MCL needs positives."""
    from cohort.driver.cluster import start_ray
    from cohort.driver.launch import make_plan
    from cohort.driver.placement import peer_threads

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-representations-") as scratch:
        folder = Path(scratch)
        data = write_slice(Path(args.data).expanduser(), folder, args.steps * 64)
        topologies = {name: bench_topology(f"bench-{name}", spec, data, args.repeats + 1, {"m_per_class": 8})
                      for name, spec in BY_PAYLOAD.items()}
        plan = make_plan(topologies["logits"], f"sqlite:///{folder}/plan.db", os.cpu_count() or 1)
        threads = peer_threads(plan.compute, 1.0)
        start_ray(None, verbose=False)
        for name in ("logits", "mcl", "attention", "logits_after"):
            topology = topologies[name.removesuffix("_after")]
            log(f"the resnet20 pair exchanging {name.removesuffix('_after')}")
            reports = cohort_in_process(topology, threads, folder)
            results[name] = {**cohort_steps(topology, reports),
                             "exchange_seconds": summarize([max(report[metric_key(peer, "exchange_seconds")]
                                                                for peer in topology.peer_names)
                                                            for report in reports[1:]]),
                             "exchange_bytes": max(reports[-1][metric_key(peer, "exchange_bytes")]
                                                   for peer in topology.peer_names)}
    before, after = results["logits"], results.pop("logits_after")
    # Bracketed: repeat by repeat, the mean of the runs just before and just after the others.
    logits = {**summarize([(b + a) / 2 for b, a in zip(before["values"], after["values"])]),
              "exchange_bytes": before["exchange_bytes"]}
    return {"step_seconds": {**results, "logits": logits},
            "step_ratio": {name: ratio(results[name], logits) for name in ("mcl", "attention")},
            "setup": {"peers": "2 x resnet20", "batch": 64, "sampler": "8 images of 8 classes", "steps": args.steps,
                      "repeats": args.repeats, "warmup_epochs": 1},
            "machine": machine()}


def measure_codistillation(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """``--codistillation``: a resnet32 teacher and a resnet8 student (one thread each), in lockstep and
    with snapshots every ``SNAPSHOT_EVERY`` steps (shared batches), then in lockstep again (bracketed):
    each peer's median step, the student's steps per second, and what its copy of the teacher costs."""
    from cohort.driver.cluster import start_ray
    from cohort.topology import topology_from_dict

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-codistillation-") as scratch:
        folder = Path(scratch)
        data = write_slice(Path(args.data).expanduser(), folder, args.steps * 64)
        lockstep = bench_topology("bench-lockstep", SLOW_TEACHER, data, args.repeats + 1)
        snapshot = topology_from_dict({**lockstep.to_dict(), "name": "bench-snapshot",
                                       "exchange": {"mode": "snapshot", "every": SNAPSHOT_EVERY}})
        threads = {"teacher": 1, "student": 1}
        start_ray(None, verbose=False)
        for name, topology in (("lockstep", lockstep), ("snapshot", snapshot), ("lockstep_after", lockstep)):
            log(f"resnet32 teacher and resnet8 student, {name.removesuffix('_after')}")
            every_epoch = cohort_in_process(topology, threads, folder)
            reports = every_epoch[1:]
            results[name] = {peer: summarize([report[metric_key(peer, "step_seconds")] for report in reports])
                             for peer in topology.peer_names}
            # The wall time each peer took to train all its epochs, warm-up included (docs/codistillation.md).
            results[name]["train_wall_seconds"] = {peer: train_wall_seconds(every_epoch, peer)
                                                   for peer in topology.peer_names}
            if name == "snapshot":
                steps = args.steps
                results[name]["teacher_copy_seconds_per_step"] = summarize(
                    [report[metric_key("student", "teacher_seconds")] / steps for report in reports])
                results[name]["staleness"] = summarize([report[metric_key("student", "staleness_teacher")]
                                                        for report in reports])
                # The student's evaluation of an epoch, beside its training of the next ones.
                for metric in ("eval_seconds", "eval_cpu_seconds"):
                    results[name][f"student_{metric}"] = summarize([report[metric_key("student", metric)]
                                                                    for report in reports])
    before, after = results["lockstep"], results.pop("lockstep_after")
    results["lockstep"] = {**{peer: summarize([(b + a) / 2 for b, a in zip(before[peer]["values"],
                                                                            after[peer]["values"])])
                              for peer in ("teacher", "student")},
                           "train_wall_seconds": {peer: (before["train_wall_seconds"][peer]
                                                         + after["train_wall_seconds"][peer]) / 2
                                                  for peer in ("teacher", "student")}}
    student = {name: results[name]["student"] for name in ("lockstep", "snapshot")}
    return {"step_seconds": results,
            # Steps per second: the inverse of the step's time; the snapshot student's against lockstep's.
            "student_speedup": ratio(student["lockstep"], student["snapshot"]),
            "setup": {"peers": "resnet32 teacher, resnet8 student, 1 thread each", "batch": 64,
                      "every": SNAPSHOT_EVERY, "data": "shared", "steps": args.steps, "repeats": args.repeats,
                      "warmup_epochs": 1},
            "machine": machine()}


def train_wall_seconds(reports: list[dict[str, Any]], peer: str) -> float:
    """How long ``peer`` took to train every epoch of the run: from its first epoch's start to its
    last epoch's end. With snapshots, from each epoch's ``train_ended_at``; in lockstep (which does
    not report it) the sum of its epochs' training seconds, evaluations left out."""
    ended = metric_key(peer, "train_ended_at")
    if ended not in reports[0]:
        return sum(report[metric_key(peer, "epoch_seconds")] for report in reports)
    return reports[-1][ended] - (reports[0][ended] - reports[0][metric_key(peer, "epoch_seconds")])


def codistillation_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    steps = results["step_seconds"]
    ms = lambda entry: f"{1000 * entry['median']:.0f} ms ({1000 * entry['min']:.0f}–{1000 * entry['max']:.0f})"  # noqa: E731
    speedup = results["student_speedup"]
    walls = {name: steps[name]["train_wall_seconds"] for name in ("lockstep", "snapshot")}
    epochs = results["setup"]["repeats"] + results["setup"]["warmup_epochs"]
    return [
        ("teacher's step (resnet32), snapshots: its own pace", ms(steps["snapshot"]["teacher"]), ""),
        ("student's step (resnet8), lockstep: at the teacher's pace (before and after)", ms(steps["lockstep"]["student"]),
         ""),
        (f"student's step, snapshots every {results['setup']['every']} steps", ms(steps["snapshot"]["student"]), ""),
        ("of which its copy of the teacher's forward, per step", ms(steps["snapshot"]["teacher_copy_seconds_per_step"]),
         ""),
        ("student's steps per second, snapshots ÷ lockstep",
         f"{speedup['value']:.2f} ({speedup['min']:.2f}–{speedup['max']:.2f})",
         f">= 1.5: {'met' if speedup['value'] >= 1.5 else 'missed'}"),
        (f"student's wall time to train its {epochs} epochs, lockstep (its epochs' training time, evaluations out)",
         f"{walls['lockstep']['student']:.1f} s", ""),
        ("student's wall time to train its epochs, snapshots (no barrier at an epoch's end)",
         f"{walls['snapshot']['student']:.1f} s", ""),
        ("teacher's wall time to train its epochs, snapshots", f"{walls['snapshot']['teacher']:.1f} s", ""),
        (f"student's evaluation of an epoch ({TEST_IMAGES} images) beside its training, snapshots: wall "
         "(waiting for the teacher's included); CPU", f"{steps['snapshot']['student_eval_seconds']['median']:.2f} s; "
         f"{steps['snapshot']['student_eval_cpu_seconds']['median']:.2f} s", ""),
        ("student's wall time, snapshots ÷ teacher's", f"{walls['snapshot']['student'] / walls['snapshot']['teacher']:.2f}",
         "< 1: the student ended first"),
    ]


def representation_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    steps = results["step_seconds"]
    ms = lambda entry: f"{1000 * entry['median']:.0f} ms ({1000 * entry['min']:.0f}–{1000 * entry['max']:.0f})"  # noqa: E731
    rows = [(f"step, 2 x resnet20 exchanging logits: {steps['logits']['exchange_bytes']:,.0f} bytes a step "
             "(before and after the others)", ms(steps["logits"]), "")]
    for name, title in (("mcl", "embeddings (MCL)"), ("attention", "attention maps (AT)")):
        entry, share = steps[name], results["step_ratio"][name]
        rows.append((f"step, the same pair exchanging {title}: {entry['exchange_bytes']:,.0f} bytes a step; "
                     f"÷ logits", f"{ms(entry)}; {share['value']:.2f} ({share['min']:.2f}–{share['max']:.2f})",
                     "(the method's cost)"))
    return rows


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {"cpus": os.cpu_count() or 1, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "load_average_at_end": os.getloadavg(),
            "sched_autogroup": _autogroup()}


def _autogroup() -> bool | None:
    """Whether Linux shares the CPUs among sessions first (then a Ray cluster, one session, gets one
    session's share on a busy machine, whatever its number of workers)."""
    flag = Path("/proc/sys/kernel/sched_autogroup_enabled")
    return flag.read_text().strip() == "1" if flag.exists() else None


TARGETS = {"overhead": ("<=", 1.05), "device_scaling": (">=", 0.90), "equal_resources": (">=", 0.95),
           "time_to_first_step_s": ("<=", 20.0)}


def markdown(results: dict[str, Any]) -> str:
    def figure(key: str) -> str:
        entry = results[key]
        return f"{entry['value']:.2f} ({entry['min']:.2f}–{entry['max']:.2f})"

    def target(key: str) -> str:
        sense, bound = TARGETS[key]
        value = results[key]["value"] if isinstance(results[key], dict) else results[key]
        held = value <= bound if sense == "<=" else value >= bound
        return f"{sense} {bound:g}: {'met' if held else 'missed'}"

    steps = results["step_seconds"]
    cores = results["machine"]["cpus"]
    ms = lambda entry: f"{1000 * entry['median']:.0f} ms ({1000 * entry['min']:.0f}–{1000 * entry['max']:.0f})"  # noqa: E731
    startup = results["time_to_first_step_breakdown_s"]
    rows = [
        ("overhead: cohort step ÷ slowest peer alone (2 × resnet20, 1 thread each)", figure("overhead"),
         target("overhead")),
        ("device scaling: one process on 1 thread ÷ cohort on 1 core per peer, ÷ 2", figure("device_scaling"),
         target("device_scaling")),
        ("parallel limit: slowest peer alone, two plain processes at once ÷ one alone", figure("parallel_slowdown"),
         "(the machine)"),
        ("overhead against that limit: cohort step ÷ two plain processes' step", figure("overhead_vs_parallel_limit"),
         "(the cohort)"),
        ("Ray Train's floor: two plain processes beside an idle Ray Train run ÷ the same alone",
         figure("ray_train_floor"), "(Ray)"),
        ("overhead against Ray's floor: cohort step ÷ two plain processes beside idle Ray Train",
         figure("overhead_vs_ray_train_floor"), "(exchange + lock-step)"),
        ("device scaling of those two plain processes: the most this machine allows", figure("device_scaling_limit"),
         "(the machine)"),
        (f"equal resources: one process on {cores} threads ÷ cohort", figure("equal_resources"),
         target("equal_resources")),
        (f"equal resources, resnet20 teacher + resnet8 student, threads {results['setup']['unequal_threads']}",
         figure("unequal_equal_resources"), "(default placement)"),
        (f"the same with threads {results['setup']['unequal_threads_extra']}",
         figure("unequal_equal_resources_teacher_extra_thread"), "(for comparison)"),
        ("time to first step, `python -m cohort.run`", f"{results['time_to_first_step_s']:.1f} s",
         target("time_to_first_step_s")),
        ("  of which: " + ", ".join(f"{part.replace('_', ' ')} {value:.1f} s" for part, value in startup.items()), "",
         ""),
        (f"  estimated on the whole CIFAR-10 table (the driver decodes 60,000 images once, in "
         f"{results['load_whole_table_s']:.1f} s; the workers get them through the object store)",
         f"{results['time_to_first_step_whole_table_s']:.1f} s", ""),
        ("step time: cohort / one process 1 thread / slowest alone",
         f"{ms(steps['cohort_equal'])} / {ms(steps['one_process_1_thread'])} / "
         f"{ms(steps['slowest_peer_alone_1_thread'])}", ""),
    ]
    for shape, entry in results["exchange"].items():
        estimated = " (step estimated from batch 64)" if entry["step_is_estimated"] else ""
        rows.append((f"all_gather {shape} (batch × classes), share of the step{estimated}",
                     f"{1000 * entry['all_gather_s']:.2f} ms, {100 * entry['share']:.2f}%", ""))
    cpu = steps["cohort_equal"]["cpu_seconds"]
    rows.append(("CPU seconds per step: each cohort peer / slowest alone",
                 " / ".join(f"{1000 * entry['median']:.0f} ms" for entry in cpu.values())
                 + f" / {1000 * steps['slowest_peer_alone_1_thread']['cpu_seconds']['median']:.0f} ms", ""))
    rss = results["peak_rss_mb"]
    rows.append(("peak RSS per worker", ", ".join(f"{peer} {value:.0f} MB" for peer, value in rss.items()), ""))
    return table(rows + display_rows(results["live_display"]))


def display_rows(display: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The live display's cost: met when the step counter changes the step by no more than two
    runs without it differ (the largest such difference over the measured epochs)."""
    overhead, noise = display["overhead"], display["noise"]
    spread = max(abs(noise[key] - 1) for key in ("value", "min", "max"))
    held = abs(overhead["value"] - 1) <= spread
    figure = lambda entry: f"{entry['value']:.3f} ({entry['min']:.3f}–{entry['max']:.3f})"  # noqa: E731
    return [
        (f"live display: cohort step with rank 0's step counter ÷ without (2 × resnet20; "
         f"{display['step_messages_per_epoch']:.1f} messages an epoch)", figure(overhead),
         f"1 within noise (±{spread:.3f}): {'met' if held else 'missed'}"),
        ("  the noise: the run without it after ÷ the run without it before", figure(noise), "(the machine)"),
    ]


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| figure | median (min–max) | target |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {goal} |" for name, value, goal in rows]
    return "\n".join(lines)


def main_command(args: argparse.Namespace) -> int:
    loads: list[dict[str, Any]] = []

    def log(message: str) -> None:
        # The load average says how far other processes shared the machine during each phase.
        loads.append({"phase": message, "load_average": os.getloadavg()})
        print(f"[{time.strftime('%H:%M:%S')}] {message} (load average {os.getloadavg()[0]:.1f})", file=sys.stderr,
              flush=True)

    started = time.perf_counter()
    results = (measure_display if args.display_only else measure_representations if args.representations
               else measure_codistillation if args.codistillation else measure)(args, log)
    results["setup"]["bench_seconds"] = time.perf_counter() - started
    results["machine"]["load_average_by_phase"] = loads
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(display_rows(results["live_display"])) if args.display_only
          else table(representation_rows(results)) if args.representations
          else table(codistillation_rows(results)) if args.codistillation else markdown(results))
    log(f"done in {results['setup']['bench_seconds']:.0f} s; results in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    if device.parse_known_args(argv)[0].device == "cuda":
        from bench.exchange_cuda import main as cuda_main

        return cuda_main(argv)
    return run_command(main_command, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
