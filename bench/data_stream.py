"""``python -m bench.data_stream``: one epoch on a parquet folder three times larger than a memory bound,
streamed (``data.pipeline: stream``, ``data.memory_bound``), and the run's memory against the bound.

The benchmark writes a folder of synthetic 32×32 PNG rows (``bench.common.write_image_table``) whose
decoded images (uint8, what the in-memory pipeline holds) are ``--factor`` times ``--bound``, then
trains two ``cnn_small`` peers (a kd edge each way) on it for one whole epoch with the stream
pipeline; then streams a small table of the same rows (two row groups of training rows: the pipeline's
runtime with little data), and, with ``--compare``, trains on the large table held in memory
(``data.pipeline: peers``, no bound).
Each run is ``cohort.train`` (what ``python -m cohort.run`` runs) in a fresh child process; this
process samples the proportional set size (PSS) of the child and every process descended from it
every ``--interval`` seconds (``bench.data_memory.sample``'s way), by role: the driver, the Ray
Train workers, the node's batch producer, Ray's other processes. What the bound governs is the
producer's data: its peak on the large table less its peak on the small one (the same runtime, the
same batches held). In the driver the benchmark counts the images the parquet code decodes there.

The results go to ``bench/results/data_stream.json`` and a markdown table to stdout.

``--run-bound SIZE`` bounds the whole run instead (every process of it: Ray, torch, the workers, the
producer, the data): the small table's streamed run first measures what the run takes with almost no
data; ``data.memory_bound`` is then the run bound less that and a margin; then one epoch on a table
of ``--factor`` times the run bound, on disk and decoded (224×224 PNGs stored without compression,
resized to 32×32 as they decode: ``data.image_size``), and the verdict: the run's peak PSS under the
run bound or not (``bench/results/data_stream_run_bound.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_image_table
from bench.data_memory import WORKER_TITLE, descendants, machine, pss_kb, sampled_run
from cohort.config.errors import CohortError, byte_size
from cohort.console.command import run_command

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "data_stream.json"
PRODUCER_TITLE = "RemoteProducer"  # in the batch producer's process title (ray::RemoteProducer...)
SIZE, TEST_ROWS, GROUP_ROWS = 32, 2000, 1000  # the images' side, the test split's rows, rows per row group
# --run-bound: 224x224 PNGs stored (about 150 KB each, a few ms of work to decode and resize to 32x32),
# 100 rows (15 MB) a row group, in files of about 500 MB; each row one of POOL images made per class.
RUN_BOUND_OUT = REPO / "bench" / "results" / "data_stream_run_bound.json"
BIG_SIDE, BIG_GROUP_ROWS, BIG_FILES, POOL, TRAINED_SIZE = 224, 100, 32, 16, 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data_stream", description=__doc__.splitlines()[0])
    parser.add_argument("--bound", default="100MB", help="data.memory_bound of the streamed run (default: %(default)s)")
    parser.add_argument("--factor", type=float, default=3.0,
                        help="the table's decoded images, in bounds (default: %(default)s)")
    parser.add_argument("--compare", action="store_true", help="also train on the table held in memory (data.pipeline: peers)")
    parser.add_argument("--run-bound", help="bound the whole run's memory instead (e.g. 5GB): the table is --factor "
                                            "times it; data.memory_bound follows from the runtime measured first")
    parser.add_argument("--margin", default="500MB", help="--run-bound: what is kept free below it (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds one run may take (default: %(default)s)")
    parser.add_argument("--out", help=f"results file (default: {DEFAULT_OUT.relative_to(REPO)}; with --run-bound "
                                      f"{RUN_BOUND_OUT.relative_to(REPO)})")
    parser.add_argument("--work", help="where the tables are written (default: the system's temporary folder)")
    parser.add_argument("--child", choices=["stream", "peers"], help=argparse.SUPPRESS)  # one run, in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, help=argparse.SUPPRESS)  # the child's data.image_size
    args = parser.parse_args(argv)
    from pydantic import ByteSize, TypeAdapter, ValidationError

    for name in ("bound", "run_bound", "margin"):
        value = getattr(args, name)
        try:
            setattr(args, f"{name}_bytes", None if value is None else int(TypeAdapter(ByteSize).validate_python(value)))
        except ValidationError:
            parser.error(f"--{name.replace('_', '-')}: a size such as 100MB, not {value!r}")
    args.out = args.out or str(DEFAULT_OUT if args.run_bound is None else RUN_BOUND_OUT)
    if args.factor <= 0:
        parser.error("--factor must be positive")
    return args


def stream_topology(table: Path, pipeline: str, bound: int, image_size: int | None = None) -> dict[str, Any]:
    """Two cnn_small peers, a kd edge each way, one epoch of batches of 128 on ``table``."""
    data = {"dataset": "parquet", "root": str(table), "batch_size": 128, "eval_batch_size": 256, "pipeline": pipeline}
    if image_size is not None:
        data["image_size"] = image_size
    if pipeline == "stream":
        data["memory_bound"] = bound
    return {"name": f"data-stream-{pipeline}", "seed": 0, "data": data,
            "train": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
            "peers": {"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}},
            "edges": [{"from": "a", "to": "b", "loss": "kd"}, {"from": "b", "to": "a", "loss": "kd"}]}


# --------------------------------------------------------------------------- the run (child process)


def run_child(pipeline: str, folder: Path, table: Path, bound: int, image_size: int | None = None) -> int:
    """Train on ``table`` as ``python -m cohort.run`` does; write how many images the driver decoded."""
    import cohort
    import cohort.datasets.parquet as parquet
    import cohort.datasets.streaming as streaming
    from cohort.topology import topology_from_dict

    decoded = []
    for module in (parquet, streaming):  # both decode through this name
        real = module.decode_images

        def counting(blobs, *args, real=real, **kwargs):
            images, good = real(blobs, *args, **kwargs)
            decoded.append(len(good))
            return images, good

        module.decode_images = counting
    result = cohort.train(topology_from_dict(stream_topology(table, pipeline, bound, image_size)),
                          tracking_uri=f"sqlite:///{folder}/mlflow.db", storage=str(folder / "ray"), display="log")
    metrics = result.metrics
    (folder / "child.json").write_text(json.dumps({
        "driver_decoded_images": sum(decoded),
        "accuracy": {peer: metrics.get(f"{peer}/acc") for peer in ("a", "b")},
        "data_wait_seconds": {peer: metrics.get(f"{peer}/data_wait_seconds") for peer in ("a", "b")},
        "epoch_seconds": {peer: metrics.get(f"{peer}/epoch_seconds") for peer in ("a", "b")},
        "batches_identical": metrics.get("cohort/batches_identical")}))
    return 0


# --------------------------------------------------------------------------- measuring it (this process)


def role(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray"
    return "workers" if WORKER_TITLE in title else "producer" if PRODUCER_TITLE in title else "ray"


ROLES = ("driver", "workers", "producer", "ray")


def sample(driver: int) -> dict[str, float]:
    """The PSS of the run's processes now, in MiB: in all and per role."""
    totals = dict.fromkeys(ROLES, 0.0)
    for pid in descendants(driver):
        sizes = pss_kb(pid)
        if sizes is not None:
            totals[role(pid, driver)] += sizes["pss"] / 1024
    return {"total": sum(totals.values()), **totals}


def measure_run(args: argparse.Namespace, pipeline: str, folder: Path, table: Path, bound: int | None = None,
                image_size: int | None = None) -> dict[str, Any]:
    """One child run on ``table``: its peak PSS (and that moment's roles), each role's own peak."""
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "bench.data_stream", "--child", pipeline, "--folder", str(folder),
               "--table", str(table), "--bound", str(args.bound_bytes if bound is None else bound)]
    if image_size is not None:
        command += ["--image-size", str(image_size)]
    results = sampled_run(command, folder, sample, ROLES, args, f"the {pipeline} run")
    return {**results, **json.loads((folder / "child.json").read_text())}


def markdown(results: dict[str, Any]) -> str:
    table = results["table"]
    lines = [f"table: {table['rows']:,} rows of {SIZE}x{SIZE} PNGs in {table['files']} files, {byte_size(table['file_bytes'])} "
             f"on disk, {byte_size(table['decoded_bytes'])} decoded; bound {byte_size(results['bound_bytes'])}", "",
             "| run | peak PSS of the run (MiB) | driver | Ray Train workers | producer | Ray's other "
             "processes | images decoded by the driver | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, run in results["runs"].items():
        peak, own = run["peak_mb"], run["own_peak_mb"]
        lines.append(f"| {label} | {peak['total']:,.0f} | {own['driver']:,.0f} | {own['workers']:,.0f} "
                     f"| {own['producer']:,.0f} | {own['ray']:,.0f} | {run['driver_decoded_images']:,} "
                     f"| {run['seconds']:.0f} |")
    lines.append(f"\non the large table, against the bound's {results['bound_bytes'] / 2**20:,.0f} MiB: the run's peak "
                 f"{results['run_data_mb']:,.0f} MiB above the small table's, the producer's "
                 f"{results['producer_data_mb']:,.0f} MiB above its own there")
    return "\n".join(lines)


def run_bound(args: argparse.Namespace) -> int:
    """``--run-bound``: the whole run under the bound, on a table ``--factor`` times it."""
    bound, margin = args.run_bound_bytes, args.margin_bytes
    side, group_rows, files = BIG_SIDE, BIG_GROUP_ROWS, BIG_FILES
    row_bytes = 3 * side * side  # a stored PNG's bytes are its pixels' (and a few hundred of headers)
    with tempfile.TemporaryDirectory(prefix="bench-data-stream-", dir=args.work) as name:
        folder = Path(name)
        write_image_table(folder / "small", 2 * group_rows, TEST_ROWS, size=side, files=2, group_rows=group_rows,
                          pool=POOL, compress_level=0)
        log(f"the small table's run: the runtime with almost no data (data.memory_bound {byte_size(args.bound_bytes)})")
        small = measure_run(args, "stream", folder / "run-small", folder / "small", image_size=TRAINED_SIZE)
        runtime = small["peak_mb"]["total"] * 2**20
        data_bound = int(bound - runtime - margin)
        if data_bound < args.bound_bytes:
            raise CohortError(f"--run-bound {byte_size(bound)}: the run takes {byte_size(int(runtime))} with almost no data; "
                              f"set more than {byte_size(int(runtime + margin + args.bound_bytes))}")
        train = int(args.factor * bound / row_bytes) - TEST_ROWS
        log(f"writing {train + TEST_ROWS:,} rows of {side}x{side} stored PNGs ({byte_size(int((train + TEST_ROWS) * row_bytes))})")
        write_image_table(folder / "table", train, TEST_ROWS, size=side, files=files, group_rows=group_rows, pool=POOL,
                          compress_level=0)
        on_disk = sum(file.stat().st_size for file in (folder / "table").glob("*.parquet"))
        log(f"the large table streamed, data.memory_bound {byte_size(data_bound)}")
        large = measure_run(args, "stream", folder / "run-large", folder / "table", bound=data_bound,
                            image_size=TRAINED_SIZE)
    peak = large["peak_mb"]["total"] * 2**20
    results = {"run_bound_bytes": bound, "margin_bytes": margin, "data_bound_bytes": data_bound,
               "table": {"rows": train + TEST_ROWS, "train_rows": train, "files": files, "group_rows": group_rows,
                         "side": side, "trained_size": TRAINED_SIZE, "file_bytes": on_disk,
                         "decoded_bytes": (train + TEST_ROWS) * row_bytes},
               "runs": {"small table": small, "large table": large}, "under_the_bound": peak < bound}
    save(args, results)
    lines = [f"run bound {byte_size(bound)}; table {byte_size(on_disk)} on disk ({on_disk / bound:.2f}x the bound), "
             f"{train + TEST_ROWS:,} rows of {side}x{side} PNGs; data.memory_bound {byte_size(data_bound)}", "",
             "| run | peak PSS of the run (MiB) | driver | Ray Train workers | producer | Ray's other processes | "
             "images decoded by the driver | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, run in results["runs"].items():
        own = run["own_peak_mb"]
        lines.append(f"| {label} | {run['peak_mb']['total']:,.0f} | {own['driver']:,.0f} | {own['workers']:,.0f} | "
                     f"{own['producer']:,.0f} | {own['ray']:,.0f} | {run['driver_decoded_images']:,} | {run['seconds']:.0f} |")
    verdict = "under" if results["under_the_bound"] else "OVER"
    lines.append(f"\nthe run's peak {peak / 2**20:,.0f} MiB: {verdict} the run bound's {bound / 2**20:,.0f} MiB")
    print("\n".join(lines))
    return 0 if results["under_the_bound"] else 1


def save(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``results`` with the runs' setup and the machine, written to ``--out``."""
    results.update({"setup": {"peers": "2 x cnn_small", "batch": 128, "epochs": 1, "interval_s": args.interval,
                              "code": str(REPO)},
                    "machine": machine()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main_command(args: argparse.Namespace) -> int:
    if args.child is not None:
        return run_child(args.child, Path(args.folder), Path(args.table), args.bound_bytes, args.image_size)
    if args.run_bound is not None:
        return run_bound(args)
    with tempfile.TemporaryDirectory(prefix="bench-data-stream-") as name:
        folder = Path(name)
        train = int(args.factor * args.bound_bytes / (3 * SIZE * SIZE))
        log(f"writing {train + TEST_ROWS:,} rows")
        write_image_table(folder / "table", train, TEST_ROWS, size=SIZE, files=8, group_rows=GROUP_ROWS)
        write_image_table(folder / "small", 2 * GROUP_ROWS, TEST_ROWS, size=SIZE, files=2, group_rows=GROUP_ROWS)
        table = {"rows": train + TEST_ROWS, "train_rows": train, "files": 8, "group_rows": GROUP_ROWS,
                 "file_bytes": sum(file.stat().st_size for file in (folder / "table").glob("*.parquet")),
                 "decoded_bytes": (train + TEST_ROWS) * 3 * SIZE * SIZE}
        runs = {}
        plan = [("stream", "stream", "table"), ("stream, small table", "stream", "small")]
        for label, pipeline, name in plan + ([("in memory (peers)", "peers", "table")] if args.compare else []):
            log(label)
            runs[label] = measure_run(args, pipeline, folder / f"run-{len(runs)}", folder / name)
    producer_data = runs["stream"]["own_peak_mb"]["producer"] - runs["stream, small table"]["own_peak_mb"]["producer"]
    run_data = runs["stream"]["peak_mb"]["total"] - runs["stream, small table"]["peak_mb"]["total"]
    results = {"bound_bytes": args.bound_bytes, "table": table, "runs": runs, "producer_data_mb": producer_data,
               "run_data_mb": run_data}
    save(args, results)
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(main_command, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
