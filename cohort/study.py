"""``python -m cohort.study STUDY.yaml``: compare methods over seeds, with the statistics papers report.

A study crosses arms (methods, each a topology) with seeds. Every (arm, seed) is one whole cohort
run, and all of them run as one Ray Tune experiment (a FIFO grid), so they fill a cluster; MLflow
holds a parent run for the study and one child per (arm, seed). At the end: one table per role
(mean ± std over seeds, and each arm's paired difference to the baseline with its 95% interval
and paired t-test), and figures.
"""
from __future__ import annotations

import argparse

from cohort.config.errors import CohortError
from cohort.console.command import exit_process, run_command
from cohort.console.display import Display, add_display_options, mode_of
from cohort.studies.tables import FORMATS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study YAML file (see studies/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a topology value in every arm, after the study's own sets (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    parser.add_argument("--report", action="store_true",
                        help="print the tables and draw the figures from MLflow, without training")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study of this name")
    parser.add_argument("--format", choices=FORMATS, default="table", help="how the tables print (default: table)")
    parser.add_argument("--out", help="folder for the figures (default: study-<name> in the working directory); "
                                      "one that holds files (an earlier report's) only with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="write the figures into an --out folder that holds "
                                                                 "files (default: refuse, before anything starts)")
    parser.add_argument("--register", action="append", default=[], metavar="ROLE=NAME",
                        help="at the end (or with --report), register the role's peer of the best arm's best run in "
                             "the MLflow Model Registry under NAME (repeatable)")
    parser.add_argument("--allow-single-seed", action="store_true",
                        help="run a study of one seed (no standard deviations, no intervals)")
    parser.add_argument("--address", help="join a running Ray cluster: 'auto' or HOST:PORT (default: start Ray here)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--storage", help="where Tune keeps the study (default: ~/ray_results/cohort-study)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    add_display_options(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import cohort
    from cohort.studies.session import plan_text

    if args.report and (args.dry_run or args.resume):
        raise CohortError("--report reads MLflow only: give it without --dry-run or --resume")
    if args.dry_run:
        print(plan_text(args.study, args.overrides, args.tracking_uri, args.allow_single_seed, args.register))
        return 0
    display = Display(mode_of(args))
    if args.report:
        cohort.read_study(args.study, overrides=args.overrides, tracking_uri=args.tracking_uri,
                          register=args.register, allow_single_seed=args.allow_single_seed, out=args.out,
                          overwrite=args.overwrite, format=args.format, display=display)
        return 0
    cohort.run_study(args.study, overrides=args.overrides, tracking_uri=args.tracking_uri, storage=args.storage,
                     address=args.address, resume=args.resume, register=args.register,
                     allow_single_seed=args.allow_single_seed, out=args.out, overwrite=args.overwrite,
                     format=args.format, display=display, verbose=args.verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
