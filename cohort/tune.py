"""``python -m cohort.tune TOPOLOGY.yaml SPACE.yaml``: search a cohort's settings with Ray Tune.

Any value of the topology can be searched: loss weights, temperatures, learning rates.

Every trial is a whole cohort: the trial's function builds the sampled topology and runs its
``TorchTrainer`` (one worker per peer), whose rank 0 reports each epoch's metrics, and the
space's metric as ``objective``, to Tune through ``TuneReportCallback``. The driver is the one
MLflow writer: a parent run for the sweep, a child run per trial.
"""
from __future__ import annotations

import argparse

from cohort.console.command import exit_process, run_command
from cohort.console.display import Display, add_display_options, mode_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.tune", description=__doc__.splitlines()[0])
    parser.add_argument("topology", help="the topology YAML file to start from")
    parser.add_argument("space", help="the search-space YAML file (see tune_spaces/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a topology value for every trial, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--num-samples", type=int, help="trials to run (default: the space file's num_samples)")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start Ray here)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the topology's, else sqlite:///mlflow.db)")
    parser.add_argument("--storage", help="where Tune keeps the sweep (default: ~/ray_results/cohort-tune)")
    parser.add_argument("--name", help="the sweep's name (default: <topology name>-<space file name>)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name")
    parser.add_argument("--out", default=".", help="folder for best_<sweep name>.yaml (default: the working "
                                                   "directory); checked before the sweep starts")
    parser.add_argument("--overwrite", action="store_true", help="replace a best_<sweep name>.yaml that exists "
                                                                 "(default: refuse, before the sweep starts)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    add_display_options(parser)
    return parser.parse_args(argv)



def run(args: argparse.Namespace) -> int:
    import cohort

    topology = cohort.load_topology(args.topology, args.overrides)
    cohort.sweep(topology, args.space, num_samples=args.num_samples, name=args.name, resume=args.resume,
                tracking_uri=args.tracking_uri, storage=args.storage, address=args.address, out=args.out,
                overwrite=args.overwrite, display=Display(mode_of(args)), verbose=args.verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
