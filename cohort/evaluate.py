"""``python -m cohort.evaluate RUN_ID``: evaluate a finished run's peers without training.

On the run's own test split by default (it reproduces the run's final metrics), on another dataset
with the same classes (``--data FILE`` or ``--set data.root=...``), or on corrupted test data
(``--shift``, CIFAR-10-C style: ``cohort.evaluation.shift``). Every peer and the ensemble, before and after
the temperatures the run fitted (``data.val_fraction``). Shifted results are logged into the same
MLflow run under ``shift/...``, those on other data under ``shift/data/<its name>/...`` (evaluating
a setting again replaces its values).
"""
from __future__ import annotations

import argparse

from cohort.console.command import exit_process, run_command
from cohort.console.display import Display, add_display_options, mode_of
from cohort.console.outputs import OVERWRITE_HELP


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="the MLflow run to evaluate (a finished cohort run)")
    parser.add_argument("--shift", help="corruptions to evaluate on: all, or names separated by commas "
                                        "(gaussian_noise,defocus_blur,...)")
    parser.add_argument("--severity", help="with --shift: corruption severities: 3, 1-5 or 1,3,5 (default 1-5)")
    parser.add_argument("--data", metavar="FILE", help="a topology file whose data section replaces the run's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run's data section, e.g. data.root=other/ (repeatable)")
    parser.add_argument("--peer", help="show only this peer (or ensemble)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    parser.add_argument("--out", help="folder for the --shift figure (default: evaluate-<run id prefix>); a figure "
                                      "there from an earlier evaluation is replaced only with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_display_options(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import cohort

    cohort.evaluate_run(args.run_id, tracking_uri=args.tracking_uri, data=args.data, overrides=args.overrides,
                    shift=args.shift, severity=args.severity, peer=args.peer, out=args.out, overwrite=args.overwrite,
                    format=args.format, display=Display(mode_of(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
