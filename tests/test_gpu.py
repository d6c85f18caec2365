"""The GPU paths end to end: `python -m pytest -m gpu` on a machine with CUDA (a few minutes on one
GPU; skipped elsewhere, see tests/conftest.py).

Cohorts on digits, through `python -m cohort.run` as a user runs them: two peers sharing one GPU
(gloo on host copies) in fp32, bf16 and fp16; fp16 interrupted and resumed (the scaler's state
checkpointed and restored); replicas on a shared GPU; a frozen teacher on the GPU; with two GPUs,
one GPU per peer over NCCL.

The fp32 runs are compared with the same cohort on CPUs, trained by the same test. Why the
tolerance: the two-replica CPU test (tests/test_replicas.py) measured that a change of summation
order in the batch gradient alone moves these MLPs' weights by up to ~1e-5 over their 30 steps; on a
GPU every matmul and reduction (forward, loss, backward) sums in another order than on the CPU, so
the bound here is ten times that: weights and continuous metrics within rtol 1e-3, atol 1e-4, and
accuracy within one test image (a near-tie may flip). MLPs only: cuDNN runs fp32 convolutions in
TF32 on Ampere and later GPUs by default (torch.backends.cudnn.allow_tf32), which no fp32 tolerance
of this kind covers; the CNNs run in the bf16 test, checked for learning, not against the CPU.
These bounds are derived, not yet measured on a GPU: the first run on one says whether they hold.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cohort.run import main
from cohort.worker.checkpoint import load_peer_state

mlflow = pytest.importorskip("mlflow")
pytestmark = [pytest.mark.ray, pytest.mark.gpu]

TEST_IMAGES = 360  # digits' test split
PAIR = {
    "name": "gpu-pair",
    "seed": 4,
    "data": {"dataset": "digits", "batch_size": 100},
    "train": {"epochs": 2, "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005},
              "check_batches_every": 4},
    "peers": {"teacher": {"model": "mlp"}, "student": {"model": "mlp_tiny", "optimizer": {"name": "adam", "lr": 0.003}}},
    "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
              {"from": "student", "to": "teacher", "loss": "kd", "temperature": 2.0}],
}
SHARED_GPU = {"use_gpu": True, "gpus_per_peer": 0.5}  # two workers on one GPU: gloo on host copies
PEERS = ("teacher", "student")
CONTINUOUS = ("teacher/nll", "teacher/train_loss", "student/nll", "student/ece", "student/train_loss",
              "ensemble/brier", "ensemble/nll")
ACCURACIES = ("teacher/acc", "student/acc", "ensemble/acc")
RTOL, ATOL = 1e-3, 1e-4


def variant(topology: dict = PAIR, **changes) -> dict:
    """The topology with top-level sections replaced (``train`` is merged into the original's)."""
    if "train" in changes:
        changes["train"] = {**topology["train"], **changes["train"]}
    return {**topology, **changes}


def train(folder: Path, topology: dict, capsys=None) -> tuple[str, object, Path, str]:
    """Train through ``python -m cohort.run``: (tracking URI, MLflow run, its weights folder, stdout)."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    path = folder / "topology.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    assert main([str(path), "--tracking-uri", uri, "--storage", str(folder / "ray")]) == 0
    out = capsys.readouterr().out if capsys is not None else ""
    run = the_run(uri, topology["name"])
    assert run.info.status == "FINISHED" and run.data.metrics["cohort/batches_identical"] == 1.0
    return uri, run, artifact(uri, run, "weights", folder / "artifacts"), out


def the_run(uri: str, experiment: str):
    client = mlflow.tracking.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return runs[0] if runs else None


def artifact(uri: str, run, path: str, folder: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path, tracking_uri=uri,
                                                    dst_path=str(folder)))


def devices(uri: str, run, folder: Path) -> list[tuple[str, str]]:
    """(node, device) of every worker, in rank order, as the run reported them."""
    workers = json.loads(artifact(uri, run, "workers.json", folder / "workers").read_text())
    return [(worker["node_id"], worker["device"]) for worker in workers]


def assert_like_cpu(cpu, gpu, peers=PEERS) -> None:
    """The GPU run ended where the CPU run ended, to the module's tolerance."""
    _, cpu_run, cpu_weights, _ = cpu
    _, gpu_run, gpu_weights, _ = gpu
    for peer in peers:
        trained = torch.load(gpu_weights / f"{peer}.pt", weights_only=True)
        reference = torch.load(cpu_weights / f"{peer}.pt", weights_only=True)
        assert trained.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(trained[key].double().cpu(), value.double(), rtol=RTOL, atol=ATOL,
                                       msg=lambda text, name=f"{peer}.{key}": f"{name}: {text}")
    for key in CONTINUOUS:
        assert gpu_run.data.metrics[key] == pytest.approx(cpu_run.data.metrics[key], rel=RTOL, abs=ATOL), key
    for key in ACCURACIES:
        assert gpu_run.data.metrics[key] == pytest.approx(cpu_run.data.metrics[key], abs=1.01 / TEST_IMAGES), key


@pytest.fixture(scope="module")
def cpu_reference(ray_cluster, tmp_path_factory):
    return train(tmp_path_factory.mktemp("cpu"), PAIR)


def test_fp32_on_a_shared_gpu_trains_like_the_cpu(cpu_reference, tmp_path, capsys):
    gpu = train(tmp_path, variant(resources=SHARED_GPU), capsys)
    uri, run, _, out = gpu
    assert "exchange: gloo on host copies" in out
    placed = devices(uri, run, tmp_path)
    assert len(placed) == 2 and len(set(placed)) == 1 and placed[0][1].startswith("cuda")  # one GPU, shared
    assert_like_cpu(cpu_reference, gpu)


def test_replicas_on_a_shared_gpu_train_like_one_worker_per_peer_on_the_cpu(cpu_reference, tmp_path, capsys):
    # 2 peers x 2 replicas, four workers on one GPU: the exchange and DDP's all-reduce over gloo.
    peers = {name: {**peer, "replicas": 2} for name, peer in PAIR["peers"].items()}
    gpu = train(tmp_path, variant(peers=peers, resources={"use_gpu": True, "gpus_per_peer": 0.25}), capsys)
    uri, run, _, out = gpu
    assert "worker grid: 2 replicas per peer" in out and "0.25 of a shared GPU" in out
    assert "exchange: gloo on host copies" in out
    placed = devices(uri, run, tmp_path)
    assert len(placed) == 4 and len(set(placed)) == 1 and placed[0][1].startswith("cuda")
    assert_like_cpu(cpu_reference, gpu)


@pytest.mark.gpu(devices=2)
def test_one_gpu_per_peer_over_nccl_trains_like_the_cpu(cpu_reference, tmp_path, capsys):
    gpu = train(tmp_path, variant(resources={"use_gpu": True}), capsys)
    uri, run, _, out = gpu
    assert "exchange: nccl (every worker has a GPU of its own)" in out
    placed = devices(uri, run, tmp_path)
    assert len(set(placed)) == 2 and all(device.startswith("cuda") for _, device in placed)
    assert_like_cpu(cpu_reference, gpu)


def test_a_frozen_teacher_on_the_gpu(cpu_reference, tmp_path):
    # The CPU run's trained teacher, frozen: on the GPU it only evaluates and sends its logits.
    checkpoint = cpu_reference[2] / "teacher.pt"
    frozen = variant(name="gpu-frozen", peers={"teacher": {"model": "mlp", "frozen": True, "checkpoint": str(checkpoint)},
                                               "student": PAIR["peers"]["student"]},
                     edges=[PAIR["edges"][0]])
    cpu = train(tmp_path / "cpu", frozen)
    gpu = train(tmp_path / "gpu", variant(frozen, resources=SHARED_GPU))
    loaded = torch.load(checkpoint, weights_only=True)
    kept = torch.load(gpu[2] / "teacher.pt", weights_only=True)
    assert all(torch.equal(kept[key].cpu(), value) for key, value in loaded.items())  # frozen: not one bit moved
    # Evaluation alone (no training step to amplify the forward pass's rounding): ten times tighter.
    assert gpu[1].data.metrics["teacher/nll"] == pytest.approx(cpu[1].data.metrics["teacher/nll"], rel=RTOL / 10,
                                                               abs=ATOL / 10)
    assert gpu[1].data.metrics["teacher/acc"] == pytest.approx(cpu[1].data.metrics["teacher/acc"],
                                                               abs=1.01 / TEST_IMAGES)
    assert_like_cpu(cpu, gpu, peers=("student",))


def test_bf16_on_a_shared_gpu_learns(ray_cluster, tmp_path, capsys):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    # CNNs: cuDNN's convolutions under autocast. bf16 rounds differently on a GPU and on a CPU,
    # so the check is that it learns: two short epochs well above chance (0.1), everything finite.
    cnns = variant(name="gpu-bf16", train={"precision": "bf16"}, resources=SHARED_GPU,
                   peers={"teacher": {"model": "cnn_medium"}, "student": {"model": "cnn_small"}})
    _, run, weights, out = train(tmp_path, cnns, capsys)
    assert "exchange: gloo on host copies" in out
    for peer in PEERS:
        assert run.data.metrics[f"{peer}/acc"] > 0.3, peer
        state = torch.load(weights / f"{peer}.pt", weights_only=True)
        assert all(value.dtype != torch.bfloat16 for value in state.values())  # autocast: weights stay fp32
        assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    assert all(value == value for key, value in run.data.metrics.items() if "/" in key)  # no NaN


FP16 = variant(name="gpu-fp16", train={"precision": "fp16", "epochs": 4, "checkpoint_every": 1},
               resources=SHARED_GPU)


def last_scalers(storage: Path) -> dict[str, dict]:
    """Each peer's GradScaler state in the run's last checkpoint."""
    manifests = list(storage.rglob("teacher.manifest.json"))
    assert manifests, f"no checkpoint under {storage}"
    last = max(manifests, key=lambda path: json.loads(path.read_text())["epoch"]).parent
    return {peer: load_peer_state(last, peer)["scaler"] for peer in PEERS}


@pytest.fixture(scope="module")
def fp16_uninterrupted(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16")
    uri, run, _, _ = train(folder, FP16)
    return run.data.metrics, last_scalers(folder / "ray")


def test_fp16_interrupted_and_resumed_on_the_gpu_ends_like_an_uninterrupted_run(fp16_uninterrupted, tmp_path):
    expected, expected_scalers = fp16_uninterrupted
    # The scaler is in the checkpoint: a loss scale and its count of steps since the last overflow.
    assert all(state and state["scale"] > 0 for state in expected_scalers.values()), expected_scalers
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(FP16, sort_keys=False))
    driver = subprocess.Popen([sys.executable, "-m", "cohort.run", str(path), "--tracking-uri", uri,
                               "--storage", str(tmp_path / "ray")], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        for line in driver.stdout:
            if line.startswith("epoch 2/"):
                break
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-2000:]
    run = the_run(uri, FP16["name"])
    assert main(["--resume", run.info.run_id, "--tracking-uri", uri]) == 0
    run = the_run(uri, FP16["name"])
    assert run.info.status == "FINISHED"
    # A fresh scaler after the resume would restart its count at 0 (and its scale at 2**16): the
    # states match only if the checkpoint's was restored.
    assert last_scalers(tmp_path / "ray") == expected_scalers
    # The same GPU, kernels and batches: the resumed run ends where the uninterrupted one did.
    for key in CONTINUOUS + ACCURACIES:
        assert run.data.metrics[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key
