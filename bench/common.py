"""What both benchmarks use (``bench.exchange`` on CPUs, ``bench.exchange_cuda`` on GPUs): the data
slice, the summaries and ratios of repeated measurements, a cohort run as a command and its steps."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cohort.config.errors import CohortError
from cohort.worker.report import metric_key

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10.parquet"
TEST_IMAGES = 512  # evaluated every epoch: kept small, it is not what is measured


def write_slice(source: Path, folder: Path, train_images: int) -> Path:
    """A parquet table of ``train_images`` training and ``TEST_IMAGES`` test rows drawn at random
    (the source is sorted by class), read by the product's own parquet loader."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not source.is_file():
        raise CohortError("no such file: the benchmark needs the CIFAR-10 parquet table (give it with --data PATH)",
                          str(source))
    try:
        table = pq.read_table(source, columns=["image", "label", "split"])
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one line
        raise CohortError(f"not a readable parquet table ({error})", str(source)) from None
    rng = np.random.default_rng(0)
    rows = []
    for split, count in (("train", train_images), ("test", TEST_IMAGES)):
        candidates = np.flatnonzero(pc.equal(table.column("split"), split).to_numpy(zero_copy_only=False))
        if len(candidates) < count:
            raise CohortError(f"needs {count} {split} rows, the table has {len(candidates)}", str(source))
        rows.append(rng.choice(candidates, count, replace=False))
    path = folder / "cifar10_slice.parquet"
    pq.write_table(table.take(np.concatenate(rows)).replace_schema_metadata(table.schema.metadata), path)
    return path


def write_image_table(folder: Path, train: int, test: int, size: int = 32, files: int = 2, group_rows: int = 256,
                      classes: int = 10, seed: int = 0, pool: int | None = None, compress_level: int = 1) -> Path:
    """A folder of ``files`` parquet files of synthetic PNG images (``size``² RGB: a class's colour plus
    noise, so that a network can learn them), ``train`` training rows then ``test`` test rows spread
    over the files, in row groups of ``group_rows`` rows: a table to stream (``data.pipeline: stream``).
    ``pool``: each row one of ``pool`` images made per class (a large table written in seconds; the
    file still holds every row's bytes: no dictionary encoding, no compression of the column)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    folder.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * train + ["test"] * test
    labels = rng.integers(0, classes, len(splits))
    per_file = -(-len(splits) // files)
    def png(label: int) -> bytes:
        pixels = np.clip(colours[label] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
        return buffer.getvalue()

    made = {label: [png(label) for _ in range(pool)] for label in range(classes)} if pool else None
    for number, first in enumerate(range(0, len(splits), per_file)):
        rows = range(first, min(first + per_file, len(splits)))
        images = [made[labels[row]][row % pool] if made else png(labels[row]) for row in rows]
        table = pa.table({"image": images, "label": labels[first:first + per_file].astype("int64"),
                          "split": splits[first:first + per_file]})
        pq.write_table(table.replace_schema_metadata({"classes": ",".join(f"c{n}" for n in range(classes))}),
                       folder / f"part-{number:04d}.parquet", row_group_size=group_rows,
                       **({"use_dictionary": False, "compression": "none"} if made else {}))
        del images, table
    return folder


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratio(numerator: dict[str, Any], denominator: dict[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """The ratio of two medians, and its spread over the repeats (repeat i against repeat i)."""
    pairs = [a / b / scale for a, b in zip(numerator["values"], denominator["values"])]
    return {"value": numerator["median"] / denominator["median"] / scale, "min": min(pairs), "max": max(pairs)}


def cohort_command(topology, folder: Path) -> dict[str, Any]:
    """Run ``python -m cohort.run`` on the topology in a fresh process; read its epochs back from MLflow."""
    import mlflow
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{topology.name}.yaml"
    path.write_text(yaml.safe_dump(topology.to_dict(), sort_keys=False))
    uri = f"sqlite:///{folder}/mlflow.db"
    command = [sys.executable, "-m", "cohort.run", str(path), "--tracking-uri", uri, "--storage", str(folder / "ray")]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise CohortError(f"python -m cohort.run failed: {(finished.stderr.strip().splitlines() or ['?'])[-1]}")
    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(topology.experiment).experiment_id])[0]
    reports: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            reports.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    return {"reports": [reports[epoch] for epoch in sorted(reports)], "command_seconds": seconds,
            "stdout": finished.stdout}


def cohort_steps(topology, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The cohort's step time per measured epoch: its slowest peer's median step; and each peer's
    CPU seconds per step (all of its process's threads)."""
    measured = reports[1:]
    return {**summarize([max(report[metric_key(peer, "step_seconds")] for peer in topology.peer_names) for report in measured]),
            "cpu_seconds": {peer: summarize([report[metric_key(peer, "step_cpu_seconds")] for report in measured])
                            for peer in topology.peer_names}}
