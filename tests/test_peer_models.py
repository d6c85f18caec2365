"""Peers as MLflow models, the Model Registry and ``cohort.export``, without Ray: a finished run is
made here the way the driver makes one (a Tracker, the weights, the final report, the models).
The models logged by a real ``cohort.run`` are checked in tests/test_cohort_ray.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import empty_store

from cohort.config.errors import CohortError
from cohort.datasets import load_dataset
from cohort.export import main as export_main
from cohort.metrics import scores as metrics
from cohort.topology import DataConfig, topology_from_dict
from cohort.tracking.logged_models import (
    incoming_methods,
    log_peer_models,
    model_uri,
    parse_registrations,
)
from cohort.tracking.tracker import Tracker
from cohort.worker.peer import build_peer

mlflow = pytest.importorskip("mlflow")


def spec(teacher_checkpoint: str) -> dict:
    return {
        "name": "export-run", "seed": 5, "data": {"dataset": "digits", "batch_size": 128}, "train": {"epochs": 1},
        "peers": {"teacher": {"model": "mlp_tiny", "frozen": True, "checkpoint": teacher_checkpoint},
                  "student_a": {"model": "cnn_small"}, "student_b": {"model": "mlp"}},
        "edges": [{"from": "teacher", "to": "student_a", "loss": "bdkd"},
                  {"from": {"ensemble": ["teacher", "student_a"]}, "to": "student_b", "loss": "kd"}],
    }


def briefly_trained(model: torch.nn.Module, data) -> dict[str, torch.Tensor]:
    """One epoch of plain SGD: weights a test split tells apart from random ones."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for inputs, labels in data.train_batches(64, 0, 1):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def reference_model(topology, peer: str, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The peer's network with its weights, built here from the zoo (not through cohort.tracking.logged_models)."""
    from cohort.models import build_model

    model = build_model(topology.peers[peer].model, num_classes=10, in_channels=1)
    model.load_state_dict(weights)
    return model.eval()


def test_logits(model: torch.nn.Module, data) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, torch.fx.GraphModule):  # a loaded pt2 model is in inference mode and refuses eval()
        model.eval()
    with torch.no_grad():
        batches = list(data.test_batches(1000))
        return torch.cat([model(x) for x, _ in batches]), torch.cat([y for _, y in batches])


test_logits.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished cohort run as the driver leaves it: topology, weights/<peer>.pt, the final
    epoch's metrics, models/<peer> for the trained peers."""
    folder = tmp_path_factory.mktemp("export")
    uri = empty_store(folder / "mlflow.db")
    data = load_dataset(DataConfig())
    torch.save(build_peer(topology_from_dict({"name": "t", "peers": {"teacher": {"model": "mlp_tiny"}}}), "teacher",
                          data.info).state_dict(), folder / "teacher.pt")
    topology = topology_from_dict(spec(str(folder / "teacher.pt")))
    weights, report = {}, {"epoch": 1}
    for peer in topology.peer_names:
        model = build_peer(topology, peer, data.info)
        weights[peer] = model.state_dict() if topology.peers[peer].frozen else briefly_trained(model, data)
        model.load_state_dict(weights[peer])
        logits, labels = test_logits(model, data)
        report.update({f"{peer}/{key}": value for key, value in metrics.evaluate(logits, labels).items()})
        report[f"{peer}/train_loss"] = 0.5
    tracker = Tracker(uri, topology.experiment)
    run_id = tracker.start(topology)
    (folder / "weights").mkdir()
    for peer, state in weights.items():
        torch.save(state, folder / "weights" / f"{peer}.pt")
        tracker.log_file(folder / "weights" / f"{peer}.pt", "weights")
    tracker.log_epoch(report)
    logged = log_peer_models(tracker, topology, data.info, data, None, weights, report)
    tracker.finish("FINISHED")
    return {"uri": uri, "run_id": run_id, "topology": topology, "data": data, "weights": weights, "report": report,
            "logged": logged, "folder": folder}


# --------------------------------------------------------------------------- models/<peer>


def test_the_logged_model_gives_the_runs_logits_on_the_test_split(finished):
    data, topology = finished["data"], finished["topology"]
    for peer in ("student_a", "student_b"):
        loaded = mlflow.pytorch.load_model(model_uri(finished["run_id"], peer))
        logits, labels = test_logits(loaded, data)
        reference = reference_model(topology, peer, finished["weights"][peer])
        expected, _ = test_logits(reference, data)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        assert accuracy == pytest.approx(finished["report"][f"{peer}/acc"]) and accuracy > 0.5, peer
        # A dynamic batch size: one image and an odd number of images go through.
        assert loaded(data.test_x[:1]).shape == (1, 10) and loaded(data.test_x[:7]).shape == (7, 10)


def test_the_logged_model_loads_with_pickle_deserialization_refused(finished, monkeypatch):
    """MLflow (>= 3.17.2, with torch >= 2.10) checks that every record of a pt2 archive is JSON, text or
    tensors when MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false: a peer cohort logged passes, so it carries
    no pickled object (docs/trained-peers.md)."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = mlflow.pytorch.load_model(model_uri(finished["run_id"], "student_a"))
    reference = reference_model(finished["topology"], "student_a", finished["weights"]["student_a"])
    torch.testing.assert_close(test_logits(loaded, finished["data"])[0], test_logits(reference, finished["data"])[0],
                               rtol=1e-5, atol=1e-5)


def test_frozen_peers_are_not_logged_as_models(finished):
    assert set(finished["logged"]) == {"student_a", "student_b"}
    client = mlflow.tracking.MlflowClient(finished["uri"])
    assert [item.path for item in client.list_artifacts(finished["run_id"], "models")] == ["models/student_a",
                                                                                           "models/student_b"]


def test_the_model_records_signature_preprocessing_and_test_metrics(finished, tmp_path):
    from mlflow.models import Model
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    path = mlflow.artifacts.download_artifacts(model_uri(finished["run_id"], "student_a"), dst_path=str(tmp_path))
    model = Model.load(path)
    inputs, outputs = model.signature.inputs.to_dict(), model.signature.outputs.to_dict()
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 1, 8, 8)}
    assert outputs[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 10)}
    assert (Path(path) / "input_example.json").is_file()
    cohort = model.metadata["cohort"]
    assert cohort["peer"] == "student_a" and cohort["model"] == "cnn_small" and cohort["topology"] == "export-run"
    assert cohort["method"] == "bdkd from teacher"
    assert cohort["test_metrics"] == pytest.approx({key.split("/", 1)[1]: value for key, value in
                                                    finished["report"].items() if key.startswith("student_a/")
                                                    and key != "student_a/train_loss"})
    # The recorded preprocessing turns scikit-learn's raw digits into exactly the inputs the run used.
    bunch = load_digits()
    _, test_idx = train_test_split(list(range(len(bunch.target))), test_size=0.2, random_state=0,
                                   stratify=bunch.target)
    raw = torch.tensor(bunch.images[test_idx], dtype=torch.float32).unsqueeze(1)
    preprocessing = cohort["preprocessing"]
    assert preprocessing["formula"] == "(pixels - mean) / std"
    prepared = (raw - preprocessing["mean"][0]) / preprocessing["std"][0]
    torch.testing.assert_close(prepared, finished["data"].test_x)


def test_wrapped_datasets_keep_their_preprocessing():
    """A long-tailed set and a validation split serve the same images, prepared the same way."""
    plain = load_dataset(DataConfig()).preprocessing()
    wrapped = load_dataset(DataConfig(long_tail={"imbalance": 10}, val_fraction=0.1), seed=3)
    assert plain and wrapped.preprocessing() == plain


def test_incoming_methods_name_every_edge_and_ensemble(finished):
    topology = finished["topology"]
    assert incoming_methods(topology, "student_b") == "kd from ensemble(teacher+student_a)"
    assert incoming_methods(topology, "teacher") == "labels only"


# --------------------------------------------------------------------------- --register PEER=NAME


@pytest.mark.parametrize("value,message", [
    ("student_a", "expected PEER=NAME"),
    ("=name", "expected PEER=NAME"),
    ("ghost=name", "unknown peer 'ghost' (peers: teacher, student_a, student_b; or ensemble)"),
    ("teacher=name", "peer 'teacher' is frozen"),
    ("student_a=a/b", "is not a registered model name"),
    ("student_a=", "is not a registered model name"),
    ("student_a=a\nb", "is not a registered model name: it must be letters"),
    ("student_a=\x1b[31mred", "is not a registered model name"),
    ("student_a=..", "'..' is not a registered model name"),
    ("student_a= padded", "is not a registered model name"),
])
def test_bad_registrations_are_refused(finished, value, message):
    with pytest.raises(CohortError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        parse_registrations([value], finished["topology"])
    assert str(error.value).startswith("--register: ") and "\n" not in str(error.value)


def test_a_peer_registered_twice_is_refused(finished):
    with pytest.raises(CohortError, match="registered twice"):
        parse_registrations(["student_a=x", "student_a=y"], finished["topology"])
    assert parse_registrations(["student_a=x", "student_b=y"], finished["topology"]) == {"student_a": "x",
                                                                                           "student_b": "y"}
    assert parse_registrations(["ensemble=z"], finished["topology"]) == {"ensemble": "z"}


def test_cohort_run_refuses_a_bad_registration_before_anything_starts(finished, tmp_path, capsys):
    import yaml

    from cohort.run import main as run_main

    path = tmp_path / "export-run.yaml"
    path.write_text(yaml.safe_dump(finished["topology"].to_dict(), sort_keys=False))
    code = run_main([str(path), "--register", "teacher=digits-teacher", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["--register: 'teacher=digits-teacher': peer 'teacher' is frozen: a run logs only "
                                 "the peers it trains"], err
    assert not (tmp_path / "m.db").exists()


def test_export_registers_the_peer_and_a_second_time_a_new_version(finished, capsys):
    run_id, uri = finished["run_id"], finished["uri"]
    assert export_main([run_id, "--peer", "student_a", "--register", "digits-student", "--tracking-uri", uri]) == 0
    first = capsys.readouterr().out
    assert "registered student_a as 'digits-student' version 1;" in first
    assert export_main([run_id, "--peer", "student_a", "--register", "digits-student", "--tracking-uri", uri]) == 0
    assert "version 2 (the name existed: a new version)" in capsys.readouterr().out
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("digits-student", "1")
    report = finished["report"]
    assert version.run_id == run_id
    assert version.tags == {"cohort.topology": "export-run", "cohort.peer": "student_a", "cohort.model": "cnn_small",
                            "cohort.method": "bdkd from teacher", "cohort.run_id": run_id,
                            "cohort.top1": f"{report['student_a/acc']:.4f}", "cohort.ece": f"{report['student_a/ece']:.4f}"}
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/digits-student/1")
    logits, labels = test_logits(loaded, finished["data"])
    assert (logits.argmax(dim=1) == labels).float().mean().item() == pytest.approx(report["student_a/acc"])


def test_export_logs_the_model_of_a_run_older_than_models_folder(finished, tmp_path, capsys):
    """A run with weights but no models/<peer> (logged before cohort.run logged models): the
    command logs the model from the weights, then registers it; an ``ece_ts`` (temperature
    scaling, where a run has it) becomes a tag too."""
    topology = finished["topology"]
    tracker = Tracker(finished["uri"], topology.experiment)
    run_id = tracker.start(topology)
    tracker.log_file(finished["folder"] / "weights" / "student_b.pt", "weights")
    tracker.log_epoch({**finished["report"], "student_b/ece_ts": 0.0123})
    tracker.finish("FINISHED")
    assert export_main([run_id, "--peer", "student_b", "--register", "older-run", "--tracking-uri",
                        finished["uri"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"logged student_b as runs:/{run_id}/models/student_b (the run had no models/student_b)"
    client = mlflow.tracking.MlflowClient(finished["uri"], registry_uri=finished["uri"])
    tags = client.get_model_version("older-run", "1").tags
    assert tags["cohort.ece_ts"] == "0.0123" and tags["cohort.method"] == "kd from ensemble(teacher+student_a)"
    loaded = mlflow.pytorch.load_model(model_uri(run_id, "student_b"))
    logits, labels = test_logits(loaded, finished["data"])
    assert (logits.argmax(dim=1) == labels).float().mean().item() == pytest.approx(finished["report"]["student_b/acc"])



def test_export_quiet_and_json_show_what_was_made_and_nothing_else(finished, tmp_path, capsys):
    """--quiet: the registration only (the note that a model was logged first is not the summary);
    --log-format json: one object per thing made on stdout (the text on stderr)."""
    topology = finished["topology"]
    tracker = Tracker(finished["uri"], topology.experiment)
    run_id = tracker.start(topology)  # a run without models/<peer>: the command logs one first
    tracker.log_file(finished["folder"] / "weights" / "student_b.pt", "weights")
    tracker.log_epoch(finished["report"])
    tracker.finish("FINISHED")
    argv = [run_id, "--peer", "student_b", "--register", "quiet-student", "--tracking-uri", finished["uri"]]
    assert export_main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["registered student_b as 'quiet-student' version 1; load it with "
                   "mlflow.pytorch.load_model('models:/quiet-student/1')"], out
    assert export_main([*argv, "--log-format", "json"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert events == [{"event": "registered", "run_id": run_id, "peer": "student_b", "name": "quiet-student",
                       "version": 2, "model_uri": "models:/quiet-student/2", "new_name": False,
                       "calibrated": False}], events
    assert "version 2 (the name existed: a new version)" in captured.err


# --------------------------------------------------------------------------- ONNX


def test_export_writes_an_onnx_file_that_onnx_runtime_runs(finished, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "s.onnx"
    assert export_main([finished["run_id"], "--peer", "student_a", "--format", "onnx", "--out", str(out),
                        "--tracking-uri", finished["uri"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"wrote {out} (ONNX opset 18, input 'images' [batch, 1, 8, 8], output 'logits' [batch, 10], "
                        "dynamic batch size)")
    assert lines[1].startswith("ONNX Runtime vs torch on 64 test images: largest logit difference ")
    assert "(within 0.0001;" in lines[1]
    written = out.read_bytes()
    again = [finished["run_id"], "--peer", "student_a", "--format", "onnx", "--out", str(out),
             "--tracking-uri", finished["uri"], "--log-format", "json"]
    assert export_main(again) == 2  # an existing file is replaced only with --overwrite
    assert capsys.readouterr().err.strip() == f"--out: {str(out)!r} exists: give --overwrite to replace it, or another --out"
    assert out.read_bytes() == written
    assert export_main(again + ["--overwrite"]) == 0
    (event,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {key: event[key] for key in ("event", "peer", "path", "opset", "input_shape", "classes", "passed")} == {
        "event": "onnx", "peer": "student_a", "path": str(out), "opset": 18, "input_shape": ["batch", 1, 8, 8],
        "classes": 10, "passed": True}
    assert 0 <= event["max_difference"] <= 1e-4 and event["check_images"] == 64
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    data = finished["data"]
    (logits,) = session.run(["logits"], {"images": data.test_x[:101].numpy()})  # another batch size than the check's
    reference = reference_model(finished["topology"], "student_a", finished["weights"]["student_a"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), reference(data.test_x[:101]), rtol=0, atol=1e-4)
    assert not list(tmp_path.glob("*.partial"))


def test_a_missing_extra_is_one_line(finished, tmp_path, capsys, monkeypatch):
    from cohort.tracking import onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTRA_MODULES", ("onnx", "cohort_test_absent_module"))
    code = export_main([finished["run_id"], "--peer", "student_a", "--format", "onnx", "--out",
                        str(tmp_path / "s.onnx"), "--tracking-uri", finished["uri"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ['--format onnx: the ONNX export needs the optional extra "export": '
                                 'pip install -e ".[export]" (cohort_test_absent_module not installed)']
    assert not (tmp_path / "s.onnx").exists()



# --------------------------------------------------------------------------- the ensemble


def test_the_ensemble_is_a_model_of_the_mean_of_every_peers_probabilities(finished, tmp_path, capsys):
    """--peer ensemble: every peer (the frozen teacher too, as the run's ensemble metrics) in one
    graph whose softmax is the mean of their probabilities; registered with its tags, and loaded
    without cohort's code."""
    run_id, uri, data = finished["run_id"], finished["uri"], finished["data"]
    assert export_main([run_id, "--peer", "ensemble", "--register", "digits-ensemble", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"logged ensemble as runs:/{run_id}/models/ensemble (the run had no models/ensemble)" in out
    assert "registered ensemble as 'digits-ensemble' version 1;" in out
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    tags = client.get_model_version("digits-ensemble", "1").tags
    assert tags["cohort.model"] == "ensemble(teacher+student_a+student_b)"
    assert tags["cohort.method"] == "mean of the peers' probabilities" and tags["cohort.peer"] == "ensemble"
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/digits-ensemble/1")
    with torch.no_grad():
        ensemble = loaded(data.test_x)
        mean = torch.stack([reference_model(finished["topology"], peer, finished["weights"][peer])(data.test_x).softmax(dim=1)
                            for peer in ("teacher", "student_a", "student_b")]).mean(dim=0)
    torch.testing.assert_close(ensemble.softmax(dim=1), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble.exp().sum(dim=1), torch.ones(len(data.test_x)), rtol=1e-5, atol=1e-5)


def test_the_ensemble_exports_to_onnx(finished, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "ensemble.onnx"
    assert export_main([finished["run_id"], "--peer", "ensemble", "--format", "onnx", "--out", str(out),
                        "--tracking-uri", finished["uri"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {out} (ONNX opset 18") and "(within 0.0001;" in lines[1]


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def run_without_weights(finished):
    tracker = Tracker(finished["uri"], "export-run")
    run_id = tracker.start(finished["topology"])
    tracker.finish("FINISHED")
    return run_id


@pytest.fixture(scope="module")
def unfinished_run(finished):
    tracker = Tracker(finished["uri"], "export-run")
    return tracker.start(finished["topology"])


@pytest.mark.parametrize("argv,expected", [
    ("{run} --peer ghost --register x", "--peer: run {run} has no peer 'ghost' (peers: teacher, student_a, student_b; "
                                        "or ensemble, the mean of their probabilities)"),
    ("{no_weights} --peer ensemble --register x",
     "--peer: run {no_weights} has no weights for 'teacher' (weights/teacher.pt)"),
    ("{run} --peer teacher --register x", "--peer: peer 'teacher' of run {run} is frozen: the run did not train it"),
    ("00000000000000000000000000000000 --peer student_a --register x",
     "no MLflow run 00000000000000000000000000000000 in {uri} (give --tracking-uri where the run is)"),
    ("not-a-run --peer student_a --register x", "'not-a-run' is not an MLflow run id (32 hex characters)"),
    ("{no_weights} --peer student_a --register x",
     "--peer: run {no_weights} has no weights for 'student_a' (weights/student_a.pt)"),
    ("{unfinished} --peer student_a --register x", "run {unfinished} is RUNNING, not FINISHED: it has no final weights"),
    ("{run} --peer student_a", "nothing to do: give --register NAME and/or --format onnx --out FILE"),
    ("{run} --peer student_a --format onnx", "--out: --format and --out go together (--format onnx --out FILE)"),
    ("{run} --peer student_a --register a:b",
     "--register: 'a:b' is not a registered model name: it must be letters, digits, '_', '.' or '-' (at most 100, "
     "no leading punctuation, no '..')"),
    ("{run} --peer student_a --format onnx --out /nonexistent-folder/s.onnx",
     "--out: folder '/nonexistent-folder' does not exist"),
    ("{run} --peer student_a --format onnx --out {folder}/teacher.pt",
     "--out: '{folder}/teacher.pt' exists: give --overwrite to replace it, or another --out"),
    ("{run} --peer student_a --format onnx --out {folder}/weights", "--out: '{folder}/weights' is a folder, not a file"),
    ("{run} --peer student_a --format onnx --out {folder}/teacher.pt/s.onnx --overwrite",
     "--out: '{folder}/teacher.pt' is a file, not a folder"),
    # Control characters come back escaped, on one line: never written to the terminal as they are.
    ("{run} --peer gh\x1b[2Jost\x07 --register x", "--peer: run {run} has no peer 'gh\\x1b[2Jost\\x07' (peers: teacher, "
                                                 "student_a, student_b; or ensemble, the mean of their probabilities)"),
    ("{run} --peer student_a --format onnx --out /nonexistent\x07\x1b[2J/s.onnx",
     "--out: folder '/nonexistent\\x07\\x1b[2J' does not exist"),
])
def test_bad_input_is_one_line(finished, run_without_weights, unfinished_run, capsys, argv, expected):
    if "--out" in argv:
        pytest.importorskip("onnxruntime")  # without the extra, the missing extra is the first complaint
    names = {"run": finished["run_id"], "uri": finished["uri"], "no_weights": run_without_weights,
             "unfinished": unfinished_run, "folder": finished["folder"]}
    before = {path: path.read_bytes() for path in finished["folder"].rglob("*")
              if path.is_file() and path.suffix != ".db"}
    code = export_main(argv.format(**names).split() + ["--tracking-uri", finished["uri"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [expected.format(**names)], err
    assert {path: path.read_bytes() for path in finished["folder"].rglob("*")
              if path.is_file() and path.suffix != ".db"} == before


def test_a_missing_store_is_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/absent.db"
    assert export_main(["0" * 32, "--peer", "a", "--register", "x", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip() == f"run {'0' * 32}: no MLflow store at {uri}"
    assert not (tmp_path / "absent.db").exists()


# --------------------------------------------------------------------------- every model of the zoo to ONNX


def zoo_cases():
    from cohort.models import MODELS

    # In the default run, the families the command's exports above do not cover (a residual network
    # with batch norm, a VGG: the run's peers are mlp_tiny, cnn_small and mlp); the rest of the zoo
    # with --runslow.
    quick = {"resnet8", "vgg8"}
    for name in sorted(MODELS):
        marks = () if name in quick else (pytest.mark.slow,)
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(zoo_cases()))
def test_every_zoo_model_exports_to_onnx(name, tmp_path):
    """On random inputs, after a forward pass in training mode has given batch norm running
    statistics of the data (a fresh deep network's logits are otherwise huge): ONNX Runtime agrees
    with torch for another batch size than the export's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from cohort.models import build_model
    from cohort.tracking.onnx import check_onnx, export_onnx

    torch.manual_seed(0)
    channels, size = (1, 8) if name in ("mlp", "mlp_tiny") else (3, 32)
    model = build_model(name, num_classes=10, in_channels=channels)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration pass
    with torch.no_grad():
        model.train()(torch.randn(32, channels, size, size))
    export_onnx(model, torch.randn(2, channels, size, size), tmp_path / "m.onnx")
    check = check_onnx(tmp_path / "m.onnx", model, torch.randn(5, channels, size, size))
    assert check.images == 5 and check.max_difference <= 1e-4 * max(1.0, check.largest_logit), check


def test_a_calibrated_registration_serves_logits_divided_by_the_fitted_temperature(finished, capsys):
    run_id, uri = finished["run_id"], finished["uri"]
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    client.log_metric(run_id, "student_b/ts_temperature", 2.5, step=1)
    assert export_main([run_id, "--peer", "student_b", "--register", "calibrated-student", "--calibrated",
                        "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"runs:/{run_id}/models/student_b_calibrated" in out and "temperature 2.5" in out
    assert client.get_model_version("calibrated-student", "1").tags["cohort.temperature"] == "2.5"
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    logits, _ = test_logits(mlflow.pytorch.load_model("models:/calibrated-student/1"), finished["data"])
    expected, _ = test_logits(reference_model(finished["topology"], "student_b", finished["weights"]["student_b"]),
                              finished["data"])
    torch.testing.assert_close(logits, expected / 2.5, rtol=1e-5, atol=1e-5)
    # A peer its run fitted no temperature for: one line, exit 2.
    assert export_main([run_id, "--peer", "student_a", "--register", "x", "--calibrated", "--tracking-uri", uri]) == 2
    assert "fitted no temperature for 'student_a'" in capsys.readouterr().err


def test_a_calibrated_ensemble_serves_the_log_mean_probabilities_divided_by_its_temperature(finished, capsys):
    run_id, uri, data = finished["run_id"], finished["uri"], finished["data"]
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    client.log_metric(run_id, "ensemble/ts_temperature", 1.5, step=1)
    assert export_main([run_id, "--peer", "ensemble", "--register", "calibrated-ensemble", "--calibrated",
                        "--tracking-uri", uri]) == 0
    assert f"runs:/{run_id}/models/ensemble_calibrated" in capsys.readouterr().out
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    with torch.no_grad():
        served = mlflow.pytorch.load_model("models:/calibrated-ensemble/1")(data.test_x)
        mean = torch.stack([reference_model(finished["topology"], peer, finished["weights"][peer])(data.test_x).softmax(dim=1)
                            for peer in ("teacher", "student_a", "student_b")]).mean(dim=0)
    torch.testing.assert_close(served, mean.log() / 1.5, rtol=1e-5, atol=1e-5)
