"""What one Ray Train fit costs on this machine before cohort does anything, against a cohort's
one-epoch training: the floor under every training of the test suite (docs/testing.md).

On one Ray started as ``cohort.run`` starts it, in one process: ``--fits`` bare fits (cohort's
``TorchTrainer`` with two workers of one CPU whose function returns at once), then ``--fits``
one-epoch ``cohort.train`` runs of ``topologies/dml_pair.yaml`` (two workers as well), each timed
from its call to its return. The first of each kind pays its process's first imports; the summary
is the median of the others.

    python -m bench.fit_floor              # about 2 minutes on 2 cores
    python -m bench.fit_floor --fits 5 --out bench/results/fit_floor.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO
from bench.data_memory import machine

TOPOLOGY = REPO / "topologies" / "dml_pair.yaml"


def returns_at_once(config: dict) -> None:
    """A fit's worker function that does nothing: what remains is Ray Train's own start and end."""


def bare_fit(storage: str, index: int) -> float:
    import ray.train

    from cohort.driver.cluster import started_here
    from cohort.driver.trainer import cohort_trainer_class

    trainer_class = cohort_trainer_class(resource_requests=not started_here())
    trainer = trainer_class(returns_at_once, scaling_config=ray.train.ScalingConfig(
        num_workers=2, resources_per_worker={"CPU": 1}), run_config=ray.train.RunConfig(
        storage_path=storage, name=f"bare-{index}"))
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def cohort_fit(storage: str, uri: str) -> float:
    import cohort

    topology = cohort.load_topology(TOPOLOGY, overrides={"train.epochs": 1})
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's summary: not what is measured
        cohort.train(topology, tracking_uri=uri, storage=storage, display="quiet")
    return time.perf_counter() - started


def summary(seconds: list[float]) -> dict[str, float | list[float]]:
    """Every fit's seconds, and the median of all but the first (which pays the process's imports)."""
    rest = seconds[1:] or seconds
    return {"seconds": [round(s, 2) for s in seconds], "median_after_first": round(statistics.median(rest), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fit_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=3, help="fits of each kind (default 3; at least 2)")
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.fits < 2:
        print("--fits: at least 2 (the first of each kind pays the process's imports)", file=sys.stderr)
        return 2

    from cohort.driver.cluster import HEALTH_CHECK_INTERVAL, start_ray

    with tempfile.TemporaryDirectory(prefix="cohort-fit-floor-") as folder:
        started = time.perf_counter()
        resources = start_ray(None, verbose=False)
        ray_start = time.perf_counter() - started
        bare = [bare_fit(folder, index) for index in range(args.fits)]
        uri = f"sqlite:///{folder}/mlflow.db"
        trained = [cohort_fit(folder, uri) for _ in range(args.fits)]
    results = {
        "machine": {**machine(), "cluster_cpus": resources.get("CPU"),
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        # Ray Train's poll interval: every fit's end waits for polls (cohort.driver.cluster).
        "health_check_interval_s": float(os.environ[HEALTH_CHECK_INTERVAL]),
        "ray_start_seconds": round(ray_start, 2),
        "bare_fit": summary(bare),
        "cohort_one_epoch_dml_pair": summary(trained),
    }
    print(f"Ray started in {ray_start:.1f} s ({os.cpu_count()} CPUs); Ray Train polls its workers every "
          f"{results['health_check_interval_s']:g} s")
    for name, key in (("bare Ray Train fit, 2 workers", "bare_fit"),
                      ("cohort.train, dml_pair, 1 epoch", "cohort_one_epoch_dml_pair")):
        each = ", ".join(f"{s:.1f}" for s in results[key]["seconds"])
        print(f"{name:34s} median {results[key]['median_after_first']:5.1f} s  (each: {each})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
