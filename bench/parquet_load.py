"""What loading a parquet image table into memory (``data.pipeline: peers``, the default) costs the
process that loads it: its peak memory above what the libraries take, against the decoded images'
own size, and the seconds. No Ray: ``cohort.datasets.parquet.load_parquet`` in a fresh child process
per run, which reports its resident memory once torch, torchvision's decoder and pyarrow are loaded
(the baseline) and its peak (``ru_maxrss``) once the table is loaded.

    python -m bench.parquet_load                       # CIFAR-10 beside the repo (../shared/datasets), 3 runs
    python -m bench.parquet_load --data T.parquet --runs 5 --out bench/results/parquet_load.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import DEFAULT_DATA
from bench.data_memory import machine
from cohort.config.errors import CohortError

CHILD = """
import json, resource, sys, time
import pyarrow.parquet, torch, torchvision.io
from cohort.datasets.parquet import load_parquet

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2 ** 20

baseline = resident_mib()
started = time.perf_counter()
data = load_parquet(sys.argv[1])
seconds = time.perf_counter() - started
held = sum(t.numel() * t.element_size() for t in (data.train_images, data.test_images)) / 2 ** 20
print(json.dumps({"baseline_mib": baseline, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images_mib": held, "seconds": seconds, "images": len(data.train_labels) + len(data.test_labels)}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.parquet_load", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the parquet table (default: {DEFAULT_DATA})")
    parser.add_argument("--runs", type=int, default=3, help="child processes, one load each (default: 3)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def load_once(table: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(table)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise CohortError(f"the load failed: {done.stderr.strip().splitlines()[-1]}", str(table))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.data.is_file():
            raise CohortError("no such file: give the table with --data PATH", str(args.data))
        runs = [load_once(args.data) for _ in range(max(args.runs, 1))]
    except CohortError as error:
        print(str(error), file=sys.stderr)
        return 2
    above = [run["peak_mib"] - run["baseline_mib"] for run in runs]
    images = runs[0]["images_mib"]
    summary = {"table": str(args.data), "images": runs[0]["images"], "images_mib": images,
               "peak_above_baseline_mib": statistics.median(above), "peak_over_images": statistics.median(above) / images,
               "seconds": statistics.median(run["seconds"] for run in runs), "runs": runs, "machine": machine()}
    print(f"{summary['images']:,} images, {images:.0f} MiB decoded (uint8): peak {summary['peak_above_baseline_mib']:.0f} "
          f"MiB above the libraries' {statistics.median(run['baseline_mib'] for run in runs):.0f} MiB "
          f"({summary['peak_over_images']:.1f}x the images), {summary['seconds']:.1f} s (median of {len(runs)})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
