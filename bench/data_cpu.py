"""``python -m bench.data_cpu``: the CPU seconds spent making training batches per cohort step, for
N = 1, 2, 4 peers on an image folder, each worker making its own batches (``data.pipeline: peers``)
against one producer for the node (``data.pipeline: producer``).

The image folder is written from the CIFAR-10 table: ``--train`` training and ``--val`` validation
images drawn at random, decoded from their JPEG bytes and saved as PNGs in ``train/<class>/`` and
``val/<class>/`` (``cohort.datasets.folder``'s layout), served at ``data.image_size`` 32.

Each N runs, in Ray actors on this machine, N consumers that take every training batch of one epoch
as a cohort's workers do, and nothing else (no training: only the data's cost is measured):

- ``peers``: each consumer makes its batches itself (``CohortDataset.train_batches``, what
  ``train_epoch`` runs without a producer);
- ``producer``: one ``cohort.datasets.producer.RemoteProducer`` makes them and every consumer takes
  them from it (``ProducerClient``, what ``train_epoch`` runs with one).

Before the measured epoch every consumer takes the first batches of another epoch, unmeasured: the
processes' first batches import what making and taking them needs (a run's start-up, not its steps).

The CPU seconds of producing batches: the consumers' process CPU time while they make, or fetch and
read, their batches (not while they checksum them) plus, with a producer, the producer process's CPU time over
the same span (``/proc/<pid>/stat``). Divided by the epoch's batches: per cohort step. Every
consumer's batches are checksummed: the two pipelines must give the same bytes.

With ``--decoders N`` a third pipeline, ``decoders``: the producer with N ``BatchDecoder`` actors
making its batches (``data.decoders``); their processes' CPU time counts with the producer's.

The results go to ``bench/results/data_cpu.json`` and a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.data_memory import machine
from cohort.config.errors import CohortError
from cohort.console.command import run_command

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10.parquet"
DEFAULT_OUT = REPO / "bench" / "results" / "data_cpu.json"
PIPELINES = ("peers", "producer")
WARM_UP, WARM_UP_BATCHES = 1000, 3  # the measured epoch's number after the warm-up's, and the warm-up's batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 parquet table (default: %(default)s)")
    parser.add_argument("--train", type=int, default=2000, help="training images of the folder (default: %(default)s)")
    parser.add_argument("--val", type=int, default=200, help="validation images of the folder (default: %(default)s)")
    parser.add_argument("--peers", default="1,2,4", help="cohort sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs measured per setting (default: %(default)s)")
    parser.add_argument("--decoders", type=int, default=0,
                        help="also a producer whose batches N decoder actors make (data.decoders; default: none)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size) for size in args.peers.split(",")]
    except ValueError:
        parser.error(f"--peers: comma-separated numbers, not {args.peers!r}")
    if min(args.sizes) < 1 or args.train < 10 or args.val < 10 or args.repeats < 1:
        parser.error("--peers sizes must be at least 1, --train and --val at least 10, --repeats at least 1")
    return args


def write_folder(source: Path, folder: Path, train: int, val: int) -> Path:
    """``train`` and ``val`` images of the table drawn at random (the table is sorted by class), as PNGs
    in ``folder/train/<class>/`` and ``folder/val/<class>/``."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from PIL import Image

    if not source.is_file():
        raise CohortError("no such file: the benchmark needs the CIFAR-10 parquet table (give it with --data PATH)",
                          str(source))
    table = pq.read_table(source, columns=["image", "label", "split"])
    metadata = table.schema.metadata or {}
    classes = metadata[b"classes"].decode().split(",") if b"classes" in metadata else None  # comma-separated
    rng = np.random.default_rng(0)
    for split, source_split, count in (("train", "train", train), ("val", "test", val)):
        candidates = np.flatnonzero(pc.equal(table.column("split"), source_split).to_numpy(zero_copy_only=False))
        rows = table.take(rng.choice(candidates, count, replace=False)).to_pylist()
        for number, row in enumerate(rows):
            name = classes[row["label"]] if classes else f"class{row['label']}"
            target = folder / split / name
            target.mkdir(parents=True, exist_ok=True)
            Image.open(io.BytesIO(row["image"])).convert("RGB").save(target / f"{number:05d}.png")
    return folder


def cpu_seconds(pid: int) -> float:
    """A process's user and system CPU time so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Consumer:
    """A cohort worker's data side: one epoch's training batches, made here or taken from a producer."""

    def ready(self) -> bool:
        """Started (and torch and the dataset module imported): what a worker is before its first step."""
        import cohort.datasets.producer  # noqa: F401

        return True

    def epoch(self, data, batch_size: int, seed: int, epoch: int, producer=None, worker: str = "",
              limit: int | None = None) -> dict[str, Any]:
        """The epoch's batches (its first ``limit`` only, if given: a warm-up)."""
        import zlib

        from cohort.datasets.producer import ProducerClient

        if producer is None:
            batches = data.train_batches(batch_size, seed, epoch)
        else:
            batches = ProducerClient(lambda: producer, worker).train_batches(data, batch_size, seed, epoch)
        # The CPU of making or taking each batch, not of the checksum that proves them alike.
        checksum, count, cpu = 0, 0, 0.0
        while True:
            started = time.process_time()
            made = next(batches, None)
            cpu += time.process_time() - started
            if made is None or count == limit:
                break
            inputs, labels = made
            checksum = zlib.crc32(labels.numpy().tobytes(), zlib.crc32(inputs.numpy().tobytes(), checksum))
            count += 1
        return {"cpu_seconds": cpu, "batches": count, "checksum": checksum}


def settled(producer) -> int:
    """The batches a producer (None: none) has made, once it makes no more (its warm-up's window)."""
    import ray

    if producer is None:
        return 0
    made = -1
    while made != (made := ray.get(producer.made.remote())):
        time.sleep(0.5)
    return made


def measure(data, pipeline: str, peers: int, batch_size: int, epoch: int, decoders: int = 0) -> dict[str, Any]:
    """One epoch of ``peers`` consumers on ``pipeline``: the CPU seconds of producing its batches."""
    import ray

    from cohort.datasets.producer import WINDOW, RemoteProducer

    consumers = [ray.remote(num_cpus=0)(Consumer).remote() for _ in range(peers)]
    ray.get([consumer.ready.remote() for consumer in consumers])  # all started: they begin the epoch together
    producer, pids = None, []
    if pipeline in ("producer", "decoders"):
        count = decoders if pipeline == "decoders" else 0
        producer = ray.remote(RemoteProducer).options(num_cpus=0, max_concurrency=64,
                                                      name=f"bench-{uuid.uuid4().hex}").remote(
            data, batch_size, 0, 1, None, max(WINDOW, count), peers, count)
        pids = [ray.get(producer.pid.remote()), *ray.get(producer.decoder_pids.remote())]
    # Warmed up, unmeasured: the first batches of an earlier epoch, where every process imports what
    # making and taking batches needs (what a run does once, before its first step).
    ray.get([consumer.epoch.remote(data, batch_size, 0, epoch, producer, str(rank), limit=WARM_UP_BATCHES)
             for rank, consumer in enumerate(consumers)])
    epoch += WARM_UP  # the measured epoch comes after: a producer forgets the batches of earlier epochs
    made_before = settled(producer)
    started, producer_before = time.perf_counter(), sum(map(cpu_seconds, pids))
    epochs = ray.get([consumer.epoch.remote(data, batch_size, 0, epoch, producer, str(rank))
                      for rank, consumer in enumerate(consumers)])
    seconds = time.perf_counter() - started
    producer_cpu = sum(map(cpu_seconds, pids)) - producer_before
    made = ray.get(producer.made.remote()) - made_before if producer is not None else sum(e["batches"] for e in epochs)
    if len({e["checksum"] for e in epochs}) != 1:
        raise CohortError(f"{pipeline}, {peers} peers: the consumers took different batches")
    for actor in consumers + ([producer] if producer is not None else []):
        ray.kill(actor)
    steps = epochs[0]["batches"]
    total = producer_cpu + sum(e["cpu_seconds"] for e in epochs)
    return {"cpu_seconds": total, "cpu_seconds_per_step": total / steps, "producer_cpu_seconds": producer_cpu,
            "consumers_cpu_seconds": [e["cpu_seconds"] for e in epochs], "steps": steps, "batches_made": made,
            "wall_seconds": seconds, "checksum": epochs[0]["checksum"]}


def markdown(results: dict[str, Any]) -> str:
    rows = ["| peers | pipeline | CPU s per cohort step (median) | vs 1 peer | batches made per epoch | wall s per epoch |",
            "| --- | --- | --- | --- | --- | --- |"]
    for pipeline, runs in results["runs"].items():
        one = runs["1"]["cpu_seconds_per_step"]
        for size, run in sorted(runs.items(), key=lambda item: int(item[0])):
            rows.append(f"| {size} | {pipeline} | {run['cpu_seconds_per_step']:.4f} | "
                        f"{run['cpu_seconds_per_step'] / one:.2f}x | {run['batches_made']} | {run['wall_seconds']:.2f} |")
    return "\n".join(rows)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median CPU seconds, with every repeat's figure."""
    ordered = sorted(runs, key=lambda run: run["cpu_seconds"])
    return {**ordered[len(ordered) // 2], "repeats_cpu_seconds_per_step": [r["cpu_seconds_per_step"] for r in runs]}


def main_command(args: argparse.Namespace) -> int:
    import ray

    from cohort.datasets import load_dataset
    from cohort.topology import DataConfig

    source = Path(args.data).expanduser().resolve()
    pipelines = PIPELINES + (("decoders",) if args.decoders else ())
    runs: dict[str, dict[str, Any]] = {pipeline: {} for pipeline in pipelines}
    with tempfile.TemporaryDirectory(prefix="bench-data-cpu-") as folder:
        root = write_folder(source, Path(folder), args.train, args.val)
        data = load_dataset(DataConfig(dataset="imagefolder", root=str(root), image_size=32))
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            # Sizes interleaved within each repeat: a drift of the machine's speed over the run
            # spreads over every size alike instead of weighing on one.
            repeats: dict[tuple[str, int], list] = {(p, size): [] for p in pipelines for size in args.sizes}
            for epoch in range(1, args.repeats + 1):
                for size in args.sizes:
                    for pipeline in pipelines:
                        print(f"[{time.strftime('%H:%M:%S')}] {size} peer(s), epoch {epoch}, {pipeline}",
                              file=sys.stderr, flush=True)
                        repeats[pipeline, size].append(measure(data, pipeline, size, args.batch_size, epoch,
                                                               args.decoders))
                    if len({repeats[pipeline, size][-1]["checksum"] for pipeline in pipelines}) != 1:
                        raise CohortError(f"{size} peers, epoch {epoch}: the pipelines made different batches")
            for (pipeline, size), measured in repeats.items():
                runs[pipeline][str(size)] = median_run(measured)
        finally:
            ray.shutdown()
    results = {"runs": runs,
               "ratio_largest_to_one": {pipeline: runs[pipeline][str(max(args.sizes))]["cpu_seconds_per_step"]
                                        / runs[pipeline][str(min(args.sizes))]["cpu_seconds_per_step"]
                                        for pipeline in pipelines},
               "setup": {"data": str(source), "train_images": args.train, "val_images": args.val, "image_size": 32,
                         "decoders": args.decoders,
                         "format": "png", "batch": args.batch_size, "repeats": args.repeats,
                         "measured": "consumers' process CPU over their epoch + the producer's over the same span, "
                                     "per training batch of the epoch; no training"},
               "machine": machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(main_command, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
