"""``python -m cohort.export RUN_ID --peer NAME``: take a trained peer out of a finished run.

``--peer ensemble`` takes the cohort's ensemble instead: one model of every peer, the mean of
their probabilities (its output is their log), as the run's ``ensemble/*`` metrics.

``--register NAME`` registers the peer's MLflow model in the Model Registry (logging it first if
the run is older than models/<peer>); ``--format onnx --out FILE`` writes it as ONNX, checked
against ONNX Runtime on the run's test images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cohort.config.errors import CohortError
from cohort.console.command import exit_process, run_command
from cohort.console.display import Display, add_display_options, mode_of
from cohort.console.outputs import OVERWRITE_HELP

CHECK_IMAGES = 64  # test images of the ONNX check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", metavar="RUN_ID", help="the MLflow run id of a finished cohort run")
    parser.add_argument("--peer", required=True,
                        help="the trained peer to take out, or 'ensemble' (the mean of every peer's probabilities)")
    parser.add_argument("--register", metavar="NAME", help="register the peer in the MLflow Model Registry under NAME")
    parser.add_argument("--calibrated", action="store_true",
                        help="with --register: register the peer with its logits divided by the temperature its run "
                             "fitted (data.val_fraction), so served probabilities are the calibrated ones")
    parser.add_argument("--format", choices=["onnx"], help="write the peer to --out in this format")
    parser.add_argument("--out", metavar="FILE", help="the file --format writes (an existing one only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    add_display_options(parser)
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    from cohort.console.outputs import check_output_file
    from cohort.tracking.logged_models import check_registered_name
    from cohort.tracking.onnx import require_onnx
    from cohort.tracking.tracker import existing_store_client, resolve_uri

    if not args.register and not args.format:
        raise CohortError("nothing to do: give --register NAME and/or --format onnx --out FILE")
    if bool(args.format) != bool(args.out):
        raise CohortError("--format and --out go together (--format onnx --out FILE)", "--out" if args.format else "--format")
    if args.calibrated and not args.register:
        raise CohortError("--calibrated applies to --register NAME")
    if args.register:
        check_registered_name(args.register, "--register")
    out = None
    if args.format:
        require_onnx()
        out = check_output_file(args.out, "--out", args.overwrite)
    uri = resolve_uri(args.tracking_uri)
    client = existing_store_client(uri, f"run {args.run_id}")
    return take_out(client, uri, args.run_id, args.peer, args.register, out, args.calibrated, Display(mode_of(args)))


def take_out(client, uri: str, run_id: str, peer: str, register: str | None, out: Path | None,
             calibrated: bool = False, display: Display | None = None) -> int:
    """The ONNX file and/or the registration; what was made is the command's summary (also with
    ``--quiet``), and with ``--log-format json`` one object each (``onnx``, ``registered``)."""
    from cohort.datasets import load_dataset
    from cohort.tracking.logged_models import (
        finished_run,
        fitted_temperature,
        model_of,
        model_weights,
        register_finished_peer,
    )

    display = display or Display("log")
    run, topology = finished_run(client, run_id, uri)
    weights = model_weights(client, run_id, topology, peer)
    dataset = load_dataset(topology.data, topology.seed)
    info = dataset.info
    model = model_of(topology, peer, info, weights)
    if calibrated:
        fitted_temperature(dict(run.data.metrics), peer, run_id)  # refused before anything is written
    if out is not None:
        from cohort.tracking.onnx import OPSET, export_checked

        images = next(iter(dataset.test_batches(CHECK_IMAGES)))[0].float()
        check = export_checked(model, images, out)
        display.summary(f"wrote {out} (ONNX opset {OPSET}, input 'images' [batch, {', '.join(map(str, info.input_size))}], "
                        f"output 'logits' [batch, {info.num_classes}], dynamic batch size)")
        display.summary(check.line())
        display.json("onnx", run_id=run_id, peer=peer, path=str(out), opset=OPSET,
                     input_shape=["batch", *info.input_size], classes=info.num_classes, check_images=check.images,
                     max_difference=check.max_difference, largest_logit=check.largest_logit, passed=check.passed)
    if register:
        registration = register_finished_peer(client, uri, run_id, peer, register, calibrated)
        for line in registration.notes:
            display.info(line)
        display.summary(registration.lines[-1])
        display.json("registered", **registration.fields())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(export, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
