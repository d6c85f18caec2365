"""Peers as MLflow models and ``--register``, without Ray: a finished run is
made here the way the driver makes one (a Tracker, the weights, the final report, the models).
The models logged by a real ``cohort.run`` are checked in tests/test_cohort_ray.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cohort import metrics
from cohort.datasets import load_dataset
from cohort.errors import CohortError
from cohort.peer import build_peer
from cohort.peer_models import incoming_methods, log_peer_models, model_uri, parse_registrations
from cohort.topology import DataConfig, topology_from_dict
from cohort.tracking import Tracker

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
    """The peer's network with its weights, built here from the zoo (not through cohort.peer_models)."""
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
    uri = f"sqlite:///{folder}/mlflow.db"
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


def test_incoming_methods_name_every_edge_and_ensemble(finished):
    topology = finished["topology"]
    assert incoming_methods(topology, "student_b") == "kd from ensemble(teacher+student_a)"
    assert incoming_methods(topology, "teacher") == "labels only"


# --------------------------------------------------------------------------- --register PEER=NAME


@pytest.mark.parametrize("value,message", [
    ("student_a", "expected PEER=NAME"),
    ("=name", "expected PEER=NAME"),
    ("ghost=name", "unknown peer 'ghost' (peers: teacher, student_a, student_b)"),
    ("teacher=name", "peer 'teacher' is frozen"),
    ("student_a=a/b", "is not a registered model name"),
    ("student_a=", "is not a registered model name"),
])
def test_bad_registrations_are_refused(finished, value, message):
    with pytest.raises(CohortError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        parse_registrations([value], finished["topology"])
    assert str(error.value).startswith("--register: ")


def test_a_peer_registered_twice_is_refused(finished):
    with pytest.raises(CohortError, match="registered twice"):
        parse_registrations(["student_a=x", "student_a=y"], finished["topology"])
    assert parse_registrations(["student_a=x", "student_b=y"], finished["topology"]) == {"student_a": "x",
                                                                                           "student_b": "y"}
