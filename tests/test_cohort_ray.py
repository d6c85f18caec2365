"""The cohort through Ray, end to end: MLflow contents, identical batches, and equivalence with a
plain one-process loop (the proof that the exchange is right)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import actors_of, all_cpus_free, empty_store, ended_actors, ray_processes

from cohort import losses
from cohort.datasets import load_dataset
from cohort.run import main
from cohort.topology import DataConfig, topology_from_dict
from cohort.worker.peer import build_peer
from cohort.worker.ticker import epoch_steps, is_step

mlflow = pytest.importorskip("mlflow")


def write_topology(folder: Path, topology: dict) -> Path:
    path = folder / f"{topology['name']}.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def finished_run(uri: str, experiment: str):
    # The store's own registry, named: not whichever registry an earlier test of this process set.
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


THREE_PEERS = {
    "name": "e2e-three",
    "seed": 3,
    "data": {"dataset": "digits", "batch_size": 128},
    "train": {"epochs": 2, "optimizer": {"lr": 0.05}},
    "peers": {"teacher": {"model": "cnn_small"}, "student_a": {"model": "mlp"}, "student_b": {"model": "mlp_tiny"}},
    "edges": [
        {"from": "teacher", "to": "student_a", "loss": "bdkd"},
        {"from": {"ensemble": ["teacher", "student_a"]}, "to": "student_b", "loss": "kd", "temperature": 2.0},
        {"from": "student_a", "to": "teacher", "loss": "reverse_kd"},
        {"from": "student_b", "to": "teacher", "loss": "reverse_kd"},
    ],
}


CALIBRATED = {**THREE_PEERS, "data": {**THREE_PEERS["data"], "val_fraction": 0.1}}


def expected_fingerprint(topology) -> int:
    """The CRC of every training batch, computed here without Ray."""
    data = load_dataset(topology.data, topology.seed)
    running = 0
    for epoch in range(1, topology.train.epochs + 1):
        for inputs, labels in data.train_batches(topology.data.batch_size, topology.seed, epoch):
            running = zlib.crc32(inputs.contiguous().numpy().tobytes(), running)
            running = zlib.crc32(labels.numpy().tobytes(), running)
    return running


@pytest.mark.ray
def test_three_peer_cohort_end_to_end(ray_cluster, tmp_path, capsys):
    """Through the Python API, which ``python -m cohort.run`` calls (docs/python-api.md): what the
    run prints, what MLflow holds, and the result ``cohort.train`` gives back. With a validation
    split (data.val_fraction): val metrics each epoch, the fitted temperatures and the _ts metrics at
    the end; cohort.evaluate on the run's own test split gives back its final metrics, before and after.
    Its teacher then goes frozen into an offline LTKD run (``offline_ltkd_from``)."""
    import cohort
    from cohort.evaluate import main as evaluate

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = write_topology(tmp_path, CALIBRATED)
    with pytest.raises(cohort.CohortError, match="train.epochs"):
        cohort.load_topology(path, overrides={"train.epochs": 0})
    result = cohort.train(cohort.load_topology(path), tracking_uri=uri, storage=str(tmp_path / "ray"),
                          register={"student_a": "digits-student", "ensemble": "digits-ensemble"}, display="log")
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "top-1" in out
    assert "validation split: 142 training images held out" in out and "ECE(TS)" in out
    assert "registered student_a as 'digits-student' version 1;" in out
    assert "registered ensemble as 'digits-ensemble' version 1;" in out

    client, run = finished_run(uri, "e2e-three")
    assert run.info.status == "FINISHED"
    peers = ["teacher", "student_a", "student_b"]
    # The API's result: the run, its final metrics, each peer's trained module.
    assert result.run_id == run.info.run_id and result.peers == tuple(peers) and result.tracking_uri == uri
    assert result.metrics["epoch"] == 2
    for key in ("student_a/acc", "student_a/ece", "ensemble/nll"):
        assert result.metrics[key] == pytest.approx(run.data.metrics[key])
    model = result.model("student_a")
    assert isinstance(model, torch.nn.Module) and not model.training
    test_data = load_dataset(DataConfig())
    with torch.no_grad():
        accuracy = (model(test_data.test_x).argmax(dim=1) == test_data.test_y).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["student_a/acc"])
    with pytest.raises(cohort.CohortError, match="unknown peer"):
        result.model("nobody")
    for peer in peers + ["ensemble"]:
        for metric in ("acc", "ece", "nll", "brier", "entropy"):
            history = client.get_metric_history(run.info.run_id, f"{peer}/{metric}")
            assert [m.step for m in history] == [1, 2], (peer, metric)
    for peer in peers:
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"{peer}/train_loss")] == [1, 2]
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"{peer}/data_wait_seconds")] == [1, 2]
        assert run.data.metrics[f"{peer}/acc"] > 0.3  # two short epochs: well above chance (0.1)
    assert run.data.metrics["cohort/batches_identical"] == 1.0
    assert run.data.params["edges.0.delta_high"] == "1.0"
    assert run.data.params["peers.student_b.model"] == "mlp_tiny"

    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=uri,
                                                         dst_path=str(tmp_path / "artifacts")))
    resolved = yaml.safe_load((artifacts / "topology.yaml").read_text())
    assert resolved["edges"][1]["from"] == {"ensemble": ["teacher", "student_a"]}
    final = json.loads((artifacts / "final_metrics.json").read_text())
    assert final["epoch"] == 2
    assert final["teacher/acc"] == pytest.approx(run.data.metrics["teacher/acc"])
    for peer in peers + ["ensemble"]:
        png = artifacts / "reliability" / f"reliability_{peer}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for peer in peers:
        state = torch.load(artifacts / "weights" / f"{peer}.pt", weights_only=True)
        assert state and all(isinstance(t, torch.Tensor) for t in state.values())

    # The peers saw exactly the batches computed here without Ray, as the report's fingerprints show.
    topology = topology_from_dict(CALIBRATED)
    assert f"{expected_fingerprint(topology)}" in _fingerprints_seen(tmp_path / "ray")

    # Every trained peer as an MLflow model: its logits on the test split are the final weights',
    # its accuracy the run's; --register put student_a in the Model Registry.
    data = load_dataset(DataConfig())
    inputs, labels = data.test_x, data.test_y
    for peer in peers:
        loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/models/{peer}")
        network = build_peer(topology, peer, data.info)
        network.load_state_dict(torch.load(artifacts / "weights" / f"{peer}.pt", weights_only=True))
        with torch.no_grad():
            logits = loaded(inputs)
            torch.testing.assert_close(logits, network.eval()(inputs), rtol=1e-5, atol=1e-5)
        assert (logits.argmax(dim=1) == labels).float().mean().item() == pytest.approx(run.data.metrics[f"{peer}/acc"])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    registered = mlflow.pytorch.load_model("models:/digits-student/1")
    with torch.no_grad():
        accuracy = (registered(inputs).argmax(dim=1) == labels).float().mean().item()
    assert accuracy == pytest.approx(run.data.metrics["student_a/acc"])
    version = client.get_model_version("digits-student", "1")
    assert version.tags["cohort.method"] == "bdkd from teacher" and version.tags["cohort.topology"] == "e2e-three"
    assert version.tags["cohort.top1"] == f"{run.data.metrics['student_a/acc']:.4f}"
    # The ensemble, registered at the end of the run: the run's ensemble accuracy.
    with torch.no_grad():
        ensemble = mlflow.pytorch.load_model("models:/digits-ensemble/1")(inputs)
    assert (ensemble.argmax(dim=1) == labels).float().mean().item() == pytest.approx(run.data.metrics["ensemble/acc"])
    assert client.get_model_version("digits-ensemble", "1").tags["cohort.top1"] == \
        f"{run.data.metrics['ensemble/acc']:.4f}"

    # The validation split and temperature scaling.
    metrics = run.data.metrics
    for owner in ("teacher", "student_a", "student_b", "ensemble"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"{owner}/val_acc")] == [1, 2]
        assert 0.05 <= metrics[f"{owner}/ts_temperature"] <= 20
        assert {f"{owner}/{m}_ts" for m in ("ece", "adaece", "nll", "brier")} <= set(metrics)
    assert evaluate([run.info.run_id, "--tracking-uri", uri, "--format", "csv"]) == 0
    rows = {row["peer"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    for owner in ("teacher", "student_a", "student_b", "ensemble"):
        for metric in ("acc", "ece", "nll", "brier", "ece_ts", "nll_ts"):
            assert float(rows[owner][metric]) == pytest.approx(metrics[f"{owner}/{metric}"], rel=1e-4, abs=1e-6), (
                owner, metric)
    # Digits cannot be corrupted: one line, exit 2.
    assert evaluate([run.info.run_id, "--tracking-uri", uri, "--shift", "fog"]) == 2
    assert capsys.readouterr().err.strip().startswith("--shift: shifted data needs images of at least 32x32")
    assert evaluate(["0" * 32, "--tracking-uri", uri]) == 2
    assert "no such MLflow run" in capsys.readouterr().err
    assert evaluate([run.info.run_id, "--tracking-uri", uri, "--shift", "fgo"]) == 2
    assert "unknown corruption 'fgo' (did you mean 'fog'?)" in capsys.readouterr().err
    assert evaluate([run.info.run_id, "--tracking-uri", uri, "--shift", "fog", "--severity", "6"]) == 2
    assert "--severity" in capsys.readouterr().err

    # The trained teacher, frozen, distilled offline in a second run (one training less for the suite).
    # It takes the first run's progress queue: no second queue actor (cohort.driver.launch.progress_queue).
    queues = ray_processes("_QueueActor", os.getpid())
    offline_ltkd_from(run, uri, tmp_path)
    assert len(queues) == 1 and ray_processes("_QueueActor", os.getpid()) == queues


def _fingerprints_seen(storage: Path) -> str:
    """The last reported cohort metrics Ray Train kept (they include every peer's fingerprint)."""
    reports = [p.read_text() for p in storage.rglob("*.json")]
    return "\n".join(reports)


# --------------------------------------------------------------------------- equivalence


EQUIVALENCE = {
    "name": "equivalence",
    "seed": 11,
    "data": {"dataset": "digits", "batch_size": 256},
    "train": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005},
              "schedule": "cosine", "ce_weight": 0.7},
    "peers": {
        "big": {"model": "cnn_small"},
        "mid": {"model": "mlp", "optimizer": {"lr": 0.05}},
        "small": {"model": "mlp_tiny"},
    },
    "edges": [
        {"from": "big", "to": "mid", "loss": "bdkd", "temperature": 3.0, "delta_high": 1.5, "delta_low": 0.25},
        {"from": "small", "to": "mid", "loss": "kd", "weight": 0.5},
        {"from": {"ensemble": ["big", "mid"]}, "to": "small", "loss": "dkd", "temperature": 2.0, "warmup": 2},
        {"from": "mid", "to": "big", "loss": "reverse_kd", "reduce": "sum", "weight": 0.3},
        {"from": "small", "to": "big", "loss": "ltkd", "reduce": "sum", "weight": 0.2},
    ],
}


def reference_training(config: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The same cohort trained in one process, every network in turn, written out by hand."""
    torch.set_num_threads(1)
    topology = topology_from_dict(config)
    data = load_dataset(DataConfig())
    info = data.info
    models = {peer: build_peer(topology, peer, info) for peer in topology.peer_names}
    lrs = {"big": 0.1, "mid": 0.05, "small": 0.1}
    optimizers = {peer: torch.optim.SGD(models[peer].parameters(), lr=lrs[peer], momentum=0.9, weight_decay=0.0005)
                  for peer in models}
    schedulers = {peer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[peer], T_max=2) for peer in models}
    # Digits are balanced: 10 classes by count (ties by index) cut into thirds 4 / 3 / 3.
    counts = torch.bincount(data.train_y, minlength=10)
    ranked = sorted(range(10), key=lambda c: (-int(counts[c]), c))
    groups = torch.empty(10, dtype=torch.long)
    for rank, cls in enumerate(ranked):
        groups[cls] = 0 if rank < 4 else (1 if rank < 7 else 2)

    for epoch in (1, 2):
        for model in models.values():
            model.train()
        for inputs, labels in data.train_batches(256, 11, epoch):
            logits = {peer: model(inputs) for peer, model in models.items()}
            fixed = {peer: value.detach() for peer, value in logits.items()}
            ensemble = (fixed["big"] + fixed["mid"]) / 2
            objective = {
                # mid: two mean-reduced edges share their weights over their count (2)
                "mid": 0.7 * F.cross_entropy(logits["mid"], labels)
                + 1.0 / 2 * losses.bdkd(logits["mid"], fixed["big"], 3.0, 1.5, 0.25).mean()
                + 0.5 / 2 * losses.kd(logits["mid"], fixed["small"], 4.0).mean(),
                # small: DKD warm-up over 2 epochs, epoch counted from 1
                "small": 0.7 * F.cross_entropy(logits["small"], labels)
                + min(epoch / 2, 1.0) * losses.dkd(logits["small"], ensemble, labels, 2.0).mean(),
                # big: sum-reduced edges keep their weights
                "big": 0.7 * F.cross_entropy(logits["big"], labels)
                + 0.3 * losses.reverse_kd(logits["big"], fixed["mid"], 4.0).mean()
                + 0.2 * losses.ltkd(logits["big"], fixed["small"], groups, 4.0).mean(),
            }
            for peer in models:
                optimizers[peer].zero_grad()
                objective[peer].backward()
                optimizers[peer].step()
        for scheduler in schedulers.values():
            scheduler.step()
    return {peer: model.state_dict() for peer, model in models.items()}


@pytest.mark.ray
@pytest.mark.parametrize("exchange", [None, {"mode": "snapshot", "every": 1, "staleness": 0, "teachers": "train"}],
                         ids=["lockstep", "snapshot"])
def test_cohort_through_ray_equals_one_process_loop(ray_cluster, tmp_path, exchange):
    """Every step's logits through one collective (lockstep), or codistillation's snapshots
    (docs/codistillation.md) published every step with no staleness allowed: both give the one-process
    training. Why the snapshots do: in lockstep, the logits a peer receives at its step t are its
    teacher's forward at the teacher's step t, from the teacher's weights after t steps (before its
    step t). With snapshots, the peer at step t uses its teacher's newest version not newer than t and
    waits until that is t: the same weights, applied by the peer's copy to the same batch, in training
    mode (batch norm on the batch's statistics, as the teacher's own forward). The losses, gradients
    and steps are the same, across epochs too (versions count steps over the run). A reader that
    took the newest snapshot instead (a teacher may be a step ahead) fails this test."""
    uri = empty_store(tmp_path / "mlflow.db")
    path = write_topology(tmp_path, EQUIVALENCE if exchange is None else {**EQUIVALENCE, "exchange": exchange})
    boards_before = set(actors_of(ray_cluster, "SnapshotBoard"))
    assert main([str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
    _, run = finished_run(uri, "equivalence")
    if exchange is not None:
        # The run's snapshot board ended with its fit, by ray.kill (cohort.driver.trainer.end_actors),
        # not later by Ray's reference counting, after which a board's process was seen to live on.
        (board,) = [actor for key, actor in ended_actors(ray_cluster, "SnapshotBoard").items()
                    if key not in boards_before]
        assert "killed by `ray.kill`" in str(board["DeathCause"]), board
    if exchange is not None:  # every copy exactly current: no step behind
        topology = topology_from_dict(EQUIVALENCE)
        copies = {f"{peer}/staleness_{teacher}" for peer in topology.peer_names for teacher in topology.teachers_of(peer)}
        assert {key: value for key, value in run.data.metrics.items() if "staleness_" in key} == dict.fromkeys(copies, 0.0)
        assert len(copies) == 6  # big reads mid and small, mid reads big and small, small reads big and mid
        assert run.data.metrics["small/teacher_seconds"] > 0 and run.data.metrics["cohort/batches_identical"] == 1.0
    weights = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="weights",
                                                       tracking_uri=uri, dst_path=str(tmp_path / "w")))
    expected = reference_training(EQUIVALENCE)
    for peer, state in expected.items():
        trained = torch.load(weights / f"{peer}.pt", weights_only=True)
        initial = build_peer(topology_from_dict(EQUIVALENCE), peer, load_dataset(DataConfig()).info)
        moved = False
        for key, value in state.items():
            torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6, msg=f"{peer}.{key}")
            moved |= not torch.equal(value, initial.state_dict()[key])
        assert moved, f"{peer} did not train"


UNEVEN = {
    "name": "uneven-pace",
    "seed": 2,
    "data": {"dataset": "digits", "batch_size": 64},
    "train": {"epochs": 6, "checkpoint_every": 2},
    # A teacher several times costlier per step than its student (which also runs the teacher's
    # forward pass on its copy, every step); the student never waits for a snapshot (no staleness bound).
    "exchange": {"mode": "snapshot", "every": 5},
    "peers": {"teacher": {"model": "resnet20"}, "student": {"model": "mlp_tiny"}},
    "edges": [{"from": "teacher", "to": "student", "loss": "kd", "temperature": 4.0}],
}


@pytest.mark.ray
def test_a_codistilling_fast_peer_does_not_wait_for_the_slow_one_at_epoch_ends(ray_cluster, tmp_path):
    """No barrier at an epoch's end with snapshots (docs/codistillation.md): the student trains its
    last epoch before the teacher has trained its second-to-last, each epoch still evaluated and
    reported (in order, with the checkpoints). With the epoch barrier (the evaluation's collectives,
    Ray Train's report) the student could not start an epoch before the teacher ended the one before."""
    uri = empty_store(tmp_path / "mlflow.db")
    assert main([str(write_topology(tmp_path, UNEVEN)), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
    client, run = finished_run(uri, "uneven-pace")

    def history(key: str) -> list[float]:
        metrics = sorted(client.get_metric_history(run.info.run_id, key), key=lambda metric: metric.step)
        assert [metric.step for metric in metrics] == [1, 2, 3, 4, 5, 6], key
        return [metric.value for metric in metrics]

    student, teacher = history("student/train_ended_at"), history("teacher/train_ended_at")
    assert student == sorted(student) and teacher == sorted(teacher)
    assert student[5] < teacher[4], (student, teacher)  # the student's 6th epoch trained before the teacher's 5th
    assert max(history("student/epochs_ahead")) >= 1 and history("teacher/epochs_ahead")[-1] == 0
    assert all(seconds > 0 for seconds in history("student/eval_seconds") + history("student/eval_cpu_seconds"))
    assert history("student/acc")[-1] > 0.5  # each epoch's copy of the weights evaluated, not a blank network


@pytest.mark.ray
def test_workers_train_on_the_drivers_copy_of_the_data_and_weights(ray_cluster, tmp_path):
    """cohort.run sends what its plan loaded through the object store: the dataset and every peer
    checkpoint's weights (read once by the plan: a file here, an MLflow reference the same way). The
    workers never open ``data.root`` (here a table that does not exist) nor the checkpoint's path
    (deleted once the plan is made): on a cluster, files only the driver has."""
    from ray.util.queue import Queue

    from cohort.driver.launch import make_plan, make_trainer

    spec = {"name": "driver-copies", "data": {"batch_size": 256}, "train": {"epochs": 1},
            "peers": {"a": {"model": "mlp_tiny"}, "b": {"model": "mlp_tiny"}},
            "edges": [{"from": "a", "to": "b", "loss": "kd"}]}
    digits = load_dataset(DataConfig())
    state = {key: value * 1.5 for key, value in build_peer(topology_from_dict(spec), "a", digits.info).state_dict().items()}
    checkpoint = tmp_path / "a.pt"
    torch.save(state, checkpoint)
    frozen = {**spec, "peers": {**spec["peers"], "a": {"model": "mlp_tiny", "frozen": True, "checkpoint": str(checkpoint)}}}
    plan = make_plan(topology_from_dict(frozen), f"sqlite:///{tmp_path}/m.db", 2)
    checkpoint.unlink()
    assert set(plan.weights) == {"a"} and all(torch.equal(plan.weights["a"][k], v) for k, v in state.items())
    topology = topology_from_dict({**frozen, "data": {"dataset": "parquet", "root": str(tmp_path / "absent.parquet"),
                                                      "batch_size": 256}})
    progress = Queue()
    result = make_trainer(topology, 0.5, 1, str(tmp_path / "ray"), "driver-copies", progress=progress, dataset=digits,
                          weights=plan.weights, live_steps=True).fit()
    messages = [progress.get(timeout=10) for _ in range(progress.qsize())]
    # live_steps: rank 0's step counter came first (at most 4 a second), ending at the epoch's last step
    # with every training image counted; then the epoch's report.
    steps, (report,) = [m for m in messages if is_step(m)], [m for m in messages if not is_step(m)]
    assert messages[-1] is report and steps, messages
    last = epoch_steps(digits.info.train_size, 256)
    assert steps[-1]["step"] == steps[-1]["steps"] == last and steps[-1]["images"] == digits.info.train_size
    assert all(m["in_epoch"] == 1 for m in steps) and [m["step"] for m in steps] == sorted({m["step"] for m in steps})
    # Every peer's wait for its batches (made in its own process here: data.num_workers 0), within its epoch.
    for peer in ("a", "b"):
        assert 0 < report[f"{peer}/data_wait_seconds"] < report[f"{peer}/epoch_seconds"]
    assert report["b/train_acc"] > 0 and report["cohort/batches_identical"] == 1.0
    # Evaluated on digits' test split (360 images): a share of 360, not NaN, not another split's.
    assert 0 < report["b/acc"] <= 1 and report["b/acc"] * 360 == pytest.approx(round(report["b/acc"] * 360))
    with result.checkpoint.as_directory() as folder:
        trained = torch.load(Path(folder) / "a.pt", weights_only=True)
        # The workers wrote the reliability bins; the diagrams are the driver's to draw (no worker imports matplotlib).
        assert {"reliability_a.json", "reliability_b.json", "reliability_ensemble.json"} <= set(os.listdir(folder))
        assert not [name for name in os.listdir(folder) if name.endswith(".png")]
    for key, value in state.items():
        assert torch.equal(trained[key], value), key  # the frozen peer ran on exactly the driver's weights


@pytest.mark.ray
def test_the_dataset_comes_out_of_the_object_store_shared_not_copied(ray_cluster):
    """What cohort.run puts in the object store for its workers (here digits with a validation
    split: a wrapper around the tensors): every ``ray.get``, in the driver or in a worker process,
    reads the store's one copy (cohort.datasets.shared), with the values and batches of the original."""
    import ray

    data = load_dataset(DataConfig(val_fraction=0.1))
    reference = ray.put(data)
    first, second = ray.get(reference), ray.get(reference)
    assert first.inner.train_x.data_ptr() == second.inner.train_x.data_ptr() != data.inner.train_x.data_ptr()
    assert torch.equal(first.inner.train_x, data.inner.train_x) and torch.equal(first.val, data.val)
    expected = [(x, y) for x, y in data.train_batches(256, seed=2, epoch=1)]
    for (x, y), (x0, y0) in zip(first.train_batches(256, seed=2, epoch=1), expected, strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)

    @ray.remote
    def read_twice(holder: list) -> tuple[bool, str, int]:
        import zlib

        one, two = ray.get(holder[0]), ray.get(holder[0])
        pointer = one.inner.train_x.data_ptr()
        mapping = "?"  # the file this worker process has mapped at the pointer ('' for anonymous memory)
        for line in open("/proc/self/maps").read().splitlines():
            fields = line.split(maxsplit=5)
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low <= pointer < high:
                mapping = fields[5].strip() if len(fields) > 5 else ""
        return pointer == two.inner.train_x.data_ptr(), mapping, zlib.crc32(one.inner.train_x.numpy().tobytes())

    same, mapping, checksum = ray.get(read_twice.remote([reference]))
    # In the store's shared memory (a file Ray maps, /dev/shm/plasma... here), not a private copy.
    assert same and mapping.startswith("/") and "plasma" in mapping, mapping
    assert checksum == zlib.crc32(data.inner.train_x.numpy().tobytes())



class ProducerKiller:
    """Kills the run's batch producer (cohort.datasets.producer) once it holds batches, in a thread
    beside the run; ``killed`` says whether Ray restarted it (it answers from a new process)."""

    def __init__(self):
        import threading

        self.stop = threading.Event()
        self.killed: list[bool] = []
        self.thread = threading.Thread(target=self.kill_once_it_made_batches, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()

    def kill_once_it_made_batches(self) -> None:
        import time

        import ray

        while not self.stop.is_set():
            for actor in ray.util.list_named_actors(all_namespaces=True):
                if actor["name"].startswith("cohort-batches-"):
                    try:
                        producer = ray.get_actor(actor["name"], namespace=actor["namespace"])
                        if ray.get(producer.held.remote()):
                            before = ray.get(producer.pid.remote())
                            ray.kill(producer, no_restart=False)
                            self.killed.append(self.restarted(producer, before))
                            return
                    except ray.exceptions.RayError:
                        pass
            time.sleep(0.01)

    @staticmethod
    def restarted(producer, before: int) -> bool:
        """Whether the producer answers from a new process (the kill takes effect a moment later)."""
        import time

        import ray

        for _ in range(200):
            try:
                if ray.get(producer.pid.remote(), timeout=5) != before:
                    return True
            except ray.exceptions.RayError:
                pass
            time.sleep(0.05)
        return False


@pytest.mark.ray
def test_a_batch_producer_gives_the_peers_their_batches_and_survives_being_killed(ray_cluster, tmp_path):
    """data.pipeline: producer (cohort.datasets.producer): the node's producer has each batch made once
    for both peers, by its two decoders (data.decoders: Ray actors), and is killed once it holds the
    first ones (Ray restarts it, and it starts new decoders; the workers ask again for the batches it
    lost). The peers train on the batches every worker would make for itself (data.pipeline: peers),
    as computed here without Ray: their fingerprint is the plan's."""

    import numpy as np
    from PIL import Image

    from cohort.driver.launch import make_trainer

    pixels = np.random.default_rng(3)
    for split, count in (("train", 20), ("val", 4)):
        for name in ("cat", "dog"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for n in range(count):
                Image.fromarray(pixels.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "images" / split / name / f"{n}.png")
    spec = {"name": "producer", "seed": 5,
            "data": {"dataset": "imagefolder", "root": str(tmp_path / "images"), "image_size": 16, "batch_size": 4},
            "train": {"epochs": 2}, "peers": {"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}},
            "edges": [{"from": "a", "to": "b", "loss": "kd"}]}
    topology = topology_from_dict({**spec, "data": {**spec["data"], "pipeline": "producer", "decoders": 2}})
    trainer = make_trainer(topology, 0.5, 1, str(tmp_path / "ray"), "producer", pipeline="producer")
    with ProducerKiller() as killer:
        produced = trainer.fit().metrics
    assert killer.killed == [True], "the producer was not killed and restarted mid-run"
    assert produced["cohort/batches_identical"] == 1.0
    own = topology_from_dict({**spec, "data": {**spec["data"], "pipeline": "peers"}})
    assert produced["cohort/fingerprints"] == dict.fromkeys(("a", "b"), expected_fingerprint(own))


@pytest.mark.ray
def test_a_streamed_parquet_folder_trains_with_identical_batches(ray_cluster, tmp_path, capsys):
    """data.pipeline: stream (cohort.datasets.streaming): the node's producer reads the folder's row groups
    and decodes each batch once; both peers train on the streamed plan's batches (as computed here
    without Ray), identical on both, also when the producer is killed mid-run, and each epoch reports
    the time they waited for them. Long-tailed, with a validation split, as the table in memory would be."""
    from bench.common import write_image_table

    table = write_image_table(tmp_path / "table", 400, 100, size=16, files=2, group_rows=50)
    spec = {"name": "streamed", "seed": 9,
            "data": {"dataset": "parquet", "root": str(table), "batch_size": 32, "pipeline": "stream",
                     "memory_bound": "5MB", "long_tail": {"imbalance": 2}, "val_fraction": 0.1},
            "train": {"epochs": 2}, "peers": {"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}},
            "edges": [{"from": "a", "to": "b", "loss": "kd"}, {"from": "b", "to": "a", "loss": "kd"}]}
    uri = empty_store(tmp_path / "mlflow.db")
    # Its producer killed once it holds batches: Ray restarts it, and it reads the row groups of the
    # batches it lost again; the batches stay the plan's.
    with ProducerKiller() as killer:
        assert main([str(write_topology(tmp_path, spec)), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
    assert killer.killed == [True], "the producer was not killed and restarted mid-run"
    out = capsys.readouterr().out
    assert "data: streamed from its parquet files (data.pipeline: stream)" in out and "(data.memory_bound 5.0 MB)" in out
    client, run = finished_run(uri, "streamed")
    assert run.data.metrics["cohort/batches_identical"] == 1.0
    for peer in ("a", "b"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"{peer}/data_wait_seconds")] == [1, 2]
        # The long-tailed set's head / tail metrics, and the held-out rows' (read by each worker from the files).
        assert {f"{peer}/acc_tail", f"{peer}/val_acc", f"{peer}/val_nll"} <= set(run.data.metrics), sorted(run.data.metrics)
    assert f"{expected_fingerprint(topology_from_dict(spec))}" in _fingerprints_seen(tmp_path / "ray")


# --------------------------------------------------------------------------- failures


@pytest.mark.ray
def test_a_run_that_fails_midway_is_marked_failed(ray_cluster, tmp_path, capsys):
    uri = empty_store(tmp_path / "mlflow.db")
    # NaN injection: an absurd learning rate on one peer.
    # max_failures 0: a non-finite loss comes back at every restart from the checkpoint (two by default, 50 s here).
    diverging = {**THREE_PEERS, "name": "diverges", "train": {"epochs": 3, "max_failures": 0},
                 "peers": {**THREE_PEERS["peers"], "student_a": {"model": "mlp", "optimizer": {"lr": 1e6}}}}
    code = main([str(write_topology(tmp_path, diverging)), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # The first peer to see a non-finite value names itself, the step and the term: student_a's
    # own loss or gradient, or a loss that receives student_a's exploding logits.
    found = re.match(r"training failed: peer '(\w+)': non-finite (loss|gradient) at epoch 1, step \d+ "
                     r"\(terms?: (.+)\) \(MLflow run \w+ marked FAILED\)$", err[0])
    assert len(err) == 1 and found, err
    assert found.group(1) == "student_a" or "student_a" in found.group(3), err
    _, run = finished_run(uri, "diverges")
    assert run.info.status == "FAILED"


@pytest.mark.ray
def test_ctrl_c_in_a_notebook_stops_the_training_too(ray_cluster, tmp_path):
    """cohort.train on the Ray already running in this process (a notebook's): Ctrl-C after the first
    epoch raises KeyboardInterrupt, marks the run KILLED and ends the fit, its workers' CPUs free
    again. (The fit runs in a thread of its own, where Ray Train has no Ctrl-C handler: before,
    its workers trained on after the interrupt and held their CPUs.)"""
    import os
    import signal
    import threading

    import cohort
    from cohort.console.display import Display

    class CtrlCAfterEpoch1(io.StringIO):
        def write(self, text):
            if re.match(r"epoch +1/", text):
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    uri = empty_store(tmp_path / "mlflow.db")
    long_run = {**THREE_PEERS, "name": "interrupted", "train": {"epochs": 30},
                "peers": {"a": {"model": "mlp_tiny"}, "b": {"model": "mlp_tiny"}},
                "edges": [{"from": "a", "to": "b", "loss": "kd"}]}
    topology = cohort.load_topology(write_topology(tmp_path, long_run))
    out = CtrlCAfterEpoch1()
    with pytest.raises(KeyboardInterrupt):
        cohort.train(topology, tracking_uri=uri, storage=str(tmp_path / "ray"), display=Display("log", out))
    assert "epoch  1/30" in out.getvalue() and "epoch 30/30" not in out.getvalue()
    assert not [thread for thread in threading.enumerate() if thread.name == "cohort-fit"]
    # Nothing of the run holds a CPU. The fit's placement group goes a moment after the fit (Ray
    # removes it asynchronously: once, checked at once, its bundles were still listed); a run whose
    # workers trained on would hold them through its 29 other epochs, longer than this wait.
    assert all_cpus_free(ray_cluster, wait=3.0), ray_cluster.available_resources()
    _, run = finished_run(uri, "interrupted")
    assert run.info.status == "KILLED"


@pytest.mark.ray
def test_a_notebooks_run_whose_controller_is_killed_gives_its_cpus_back(ray_cluster, tmp_path):
    """Ray Train's controller killed from outside (as the out-of-memory killer does) while the
    notebook's driver lives on: the run fails with its reason, and its workers' placement group does
    not keep their CPUs (Ray would keep it until the notebook's Ray stops; cohort.driver.reclaim)."""
    import os
    import signal

    import cohort
    from cohort.config.errors import CohortError
    from cohort.console.display import Display

    def controller_pid() -> int:
        """This run's controller: the last one started (an earlier test's may still be ending)."""
        alive = [actor for actor in ray_cluster._private.state.actors().values()
                 if actor["ActorClassName"] == "TrainController" and actor["State"] == "ALIVE"]
        return max(alive, key=lambda actor: actor["StartTime"])["Pid"]

    class KillControllerAtEpoch1(io.StringIO):
        def write(self, text):
            if re.match(r"epoch +1/", text):
                os.kill(controller_pid(), signal.SIGKILL)
            return super().write(text)

    uri = empty_store(tmp_path / "mlflow.db")
    long_run = {**THREE_PEERS, "name": "controller-killed", "train": {"epochs": 30, "max_failures": 0},
                "peers": {"a": {"model": "mlp_tiny"}, "b": {"model": "mlp_tiny"}},
                "edges": [{"from": "a", "to": "b", "loss": "kd"}]}
    topology = cohort.load_topology(write_topology(tmp_path, long_run))
    out = KillControllerAtEpoch1()
    with pytest.raises(CohortError, match="training failed"):
        cohort.train(topology, tracking_uri=uri, storage=str(tmp_path / "ray"), display=Display("log", out))
    assert "epoch  1/30" in out.getvalue() and "epoch 30/30" not in out.getvalue()
    assert all_cpus_free(ray_cluster, wait=3.0), ray_cluster.available_resources()
    _, run = finished_run(uri, "controller-killed")
    assert run.info.status == "FAILED"


@pytest.mark.ray
def test_more_cpus_than_the_cluster_has(ray_cluster, tmp_path, capsys):
    topology = {**THREE_PEERS, "name": "too-big", "resources": {"cpus_per_peer": 4}}
    code = main([str(write_topology(tmp_path, topology)), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert code == 2
    assert "too-big.yaml: resources.cpus_per_peer: the cohort needs 12 CPUs" in capsys.readouterr().err


def test_unreachable_address(tmp_path, capsys):
    path = write_topology(tmp_path, THREE_PEERS)
    code = main([str(path), "--address", "127.0.0.1:9", "--tracking-uri", empty_store(tmp_path / "m.db")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("--address '127.0.0.1:9': no Ray cluster reachable there"), err


@pytest.mark.ray
@pytest.mark.parametrize("uri,expected", [
    ("sqlite:////nonexistent-folder/mlflow.db", "folder '/nonexistent-folder' does not exist"),
    ("http://127.0.0.1:9", "is not usable"),
])
def test_unreachable_tracking_uri(tmp_path, capsys, uri, expected):
    path = write_topology(tmp_path, THREE_PEERS)
    code = main([str(path), "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("e2e-three.yaml: tracking.uri: MLflow tracking store") and expected in err[0], err


# --------------------------------------------------------------------------- real images, offline teachers


SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10.parquet"


@pytest.mark.ray
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"{SHARED_CIFAR} is absent (it ships beside the repo, not in it)")
def test_cohort_on_a_cifar10_parquet_slice(ray_cluster, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(SHARED_CIFAR)
    train = table.filter(pc.equal(table["split"], "train")).take(list(range(0, 50_000, 50)))
    test = table.filter(pc.equal(table["split"], "test")).take(list(range(0, 10_000, 20)))
    path = tmp_path / "cifar10_slice.parquet"
    pq.write_table(pa.concat_tables([train, test]).replace_schema_metadata(table.schema.metadata), path)
    topology = {
        "name": "cifar-slice",
        "data": {"dataset": "parquet", "root": str(path), "batch_size": 100, "num_workers": 1},
        "train": {"epochs": 2, "optimizer": {"lr": 0.05}},
        "peers": {"teacher": {"model": "resnet8"}, "student": {"model": "cnn_small"}},
        "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
                  {"from": "student", "to": "teacher", "loss": "reverse_kd"}],
    }
    uri = empty_store(tmp_path / "mlflow.db")
    assert main([str(write_topology(tmp_path, topology)), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
    assert "1000 train / 500 test images, 10 classes" in capsys.readouterr().out
    _, run = finished_run(uri, "cifar-slice")
    assert run.data.metrics["cohort/batches_identical"] == 1.0
    for peer in ("teacher", "student"):
        assert 0.15 < run.data.metrics[f"{peer}/acc"] <= 1.0  # above chance (0.1) after 2 short epochs
        assert 0.0 <= run.data.metrics[f"{peer}/ece"] <= 1.0

    # Shifted data (cohort.evaluate): two corruptions at severity 3, logged into the run; again: no duplicates.
    from cohort.evaluate import main as evaluate

    command = [run.info.run_id, "--tracking-uri", uri, "--shift", "gaussian_noise,defocus_blur", "--severity", "3",
               "--format", "csv", "--out", str(tmp_path / "shift")]
    assert evaluate(command) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    settings = {(row["data"], row["severity"]) for row in rows}
    assert settings == {("clean", "0"), ("gaussian_noise", "3"), ("defocus_blur", "3"), ("mean", "3")}
    clean = {row["peer"]: float(row["acc"]) for row in rows if row["data"] == "clean"}
    noisy = {row["peer"]: float(row["acc"]) for row in rows if row["data"] == "gaussian_noise"}
    assert clean["teacher"] == pytest.approx(run.data.metrics["teacher/acc"])  # the run's own test split, again
    assert noisy["teacher"] < clean["teacher"]
    assert evaluate(command) == 2  # the figure is there: replaced only with --overwrite
    assert evaluate(command + ["--overwrite"]) == 0
    capsys.readouterr()
    client = mlflow.tracking.MlflowClient(uri)
    history = client.get_metric_history(run.info.run_id, "shift/gaussian_noise/teacher/acc")
    assert [(m.step, m.value) for m in history] == [(3, pytest.approx(noisy["teacher"]))]
    assert "shift/mean/ensemble/ece" in client.get_run(run.info.run_id).data.metrics


def offline_ltkd_from(first, uri: str, tmp_path: Path) -> None:
    """Offline LTKD: the teacher of a finished run (``first``, experiment e2e-three), loaded frozen
    through `mlflow:EXPERIMENT/PEER`, distilled with LTKD into a student on a long-tailed training set."""
    offline = {
        "name": "offline", "data": {"batch_size": 256, "long_tail": {"imbalance": 10}}, "train": {"epochs": 1},
        "peers": {"teacher": {"model": "cnn_small", "frozen": True, "checkpoint": "mlflow:e2e-three/teacher"},
                  "student": {"model": "mlp"}},
        "edges": [{"from": "teacher", "to": "student", "loss": "ltkd"}],
    }
    assert main([str(write_topology(tmp_path, offline)), "--tracking-uri", uri,
                 "--storage", str(tmp_path / "ray")]) == 0
    client, second = finished_run(uri, "offline")
    before = Path(mlflow.artifacts.download_artifacts(run_id=first.info.run_id, artifact_path="weights/teacher.pt",
                                                      tracking_uri=uri, dst_path=str(tmp_path / "a")))
    after = Path(mlflow.artifacts.download_artifacts(run_id=second.info.run_id, artifact_path="weights/teacher.pt",
                                                     tracking_uri=uri, dst_path=str(tmp_path / "b")))
    trained, frozen = torch.load(before, weights_only=True), torch.load(after, weights_only=True)
    # The frozen teacher is not logged as a model: it was not trained in this run.
    assert [item.path for item in client.list_artifacts(second.info.run_id, "models")] == ["models/student"]
    for key in trained:
        assert torch.equal(trained[key], frozen[key]), key  # forward only: not even BN statistics move
    # The frozen teacher is evaluated as it was trained (the test split is not long-tailed).
    assert second.data.metrics["teacher/acc"] == pytest.approx(first.data.metrics["teacher/acc"])
    # Long-tailed: head / medium / tail accuracy and ECE for every peer, and the class counts.
    for peer in ("teacher", "student", "ensemble"):
        for metric in ("acc_head", "acc_medium", "acc_tail", "ece_head", "ece_tail"):
            assert f"{peer}/{metric}" in second.data.metrics, (peer, metric)
    data = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=second.info.run_id, artifact_path="data.json",
                                                               tracking_uri=uri, dst_path=str(tmp_path / "c"))).read_text())
    assert data["train_size"] == sum(data["train_class_counts"]) < 1437
    assert data["train_class_counts"][0] > 10 * data["train_class_counts"][-1] * 0.9
    assert data["groups"] == {"head": [0, 1, 2, 3], "medium": [4, 5, 6], "tail": [7, 8, 9]}




