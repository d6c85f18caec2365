"""``python -m cohort.run TOPOLOGY.yaml``: train a cohort, one Ray Train worker per peer.

The driver validates the topology and everything it points at before Ray starts, launches one
``TorchTrainer``, prints one line per epoch from the metrics rank 0 sends it, and is the single
MLflow writer of the run (``cohort.train`` in Python).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from cohort.config.errors import CohortError
from cohort.console.command import exit_process, run_command
from cohort.console.display import Display, add_display_options, mode_of
from cohort.topology import Topology


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.run", description=__doc__.splitlines()[0])
    parser.add_argument("topology", nargs="?", help="the topology YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value by its dotted path, e.g. edges.0.temperature=2 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start Ray here)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the topology's, else sqlite:///mlflow.db)")
    parser.add_argument("--storage", help="where Ray Train keeps the run's checkpoints (default: ~/ray_results/cohort)")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue a stopped run from its last checkpoint: an MLflow run id or its storage folder")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard (on 127.0.0.1 only) when Ray is started here")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    parser.add_argument("--register", action="append", default=[], metavar="PEER=NAME",
                        help="register the trained peer in the MLflow Model Registry under NAME (repeatable)")
    add_display_options(parser)
    return parser.parse_args(argv)


def in_file(error: CohortError, path: str) -> CohortError:
    """A key-located error found after loading (checkpoints, data, groups), named with its file."""
    if error.where and not error.where.startswith(Path(path).name) and error.where[0].islower():
        return CohortError(error.message, f"{Path(path).name}: {error.where}")
    return error


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CohortError as error:
        raise (in_file(error, args.topology) if args.topology else error) from None


def _run(args: argparse.Namespace) -> int:
    import cohort
    from cohort.driver.cluster import RayOptions
    from cohort.driver.training import resume_run

    ray = RayOptions(address=args.address, verbose=args.verbose, dashboard=args.dashboard)
    display = Display(mode_of(args))
    if args.resume:
        if args.topology or args.overrides or args.dry_run:
            raise CohortError("--resume takes the run's own topology: give no topology file, --set or --dry-run")
        resume_run(args.resume, args.tracking_uri, ray, args.register, display)
        return 0
    if not args.topology:
        raise CohortError("a topology file is needed (or --resume RUN)")
    topology = cohort.load_topology(args.topology, args.overrides)
    if args.dry_run:
        print(dry_run_text(topology, args.tracking_uri, args.register))
        return 0
    cohort.train(topology, tracking_uri=args.tracking_uri, storage=args.storage, register=args.register, ray=ray,
                 display=display)
    return 0


def dry_run_text(topology: Topology, tracking_uri: str | None, register: list[str]) -> str:
    """The plan and the resolved topology, with everything checked that can be without Ray."""
    from cohort.console.plan import describe_plan
    from cohort.driver.launch import fetch_checkpoints, make_plan
    from cohort.tracking.logged_models import parse_registrations
    from cohort.tracking.tracker import resolve_uri

    parse_registrations(register, topology)
    tracking_uri = resolve_uri(tracking_uri or topology.tracking.uri)
    topology = fetch_checkpoints(topology.with_absolute_paths(os.getcwd()), tracking_uri)
    plan = make_plan(topology, tracking_uri, os.cpu_count() or 1, download=False)
    return (describe_plan(plan) + "\n\nresolved topology:\n"
            + "\n".join("  " + line for line in topology.to_yaml().splitlines()))


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
