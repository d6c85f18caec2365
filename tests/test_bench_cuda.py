"""The GPU benchmark's decisions, without a GPU: what it measures, with which backend, on how many
GPUs (`python -m bench.exchange --device cuda --dry-run`), and its refusal where torch sees no GPU.
The measuring itself needs a GPU: `python -m bench.exchange --device cuda`."""
from __future__ import annotations

import pytest
import torch

from bench.common import summarize
from bench.exchange import main
from bench.exchange_cuda import (
    ONE_PROCESS,
    PAIRS,
    PER_GPU,
    SHARED,
    SHARED_MPS,
    TEST_IMAGES,
    Measurement,
    cuda_topology,
    encode_slice,
    make_plan,
    markdown,
    mps_unavailable,
    ratios,
)
from cohort.config.errors import CohortError
from cohort.datasets import load_dataset
from cohort.worker.grid import exchange_backend

NO_CUDA = not torch.cuda.is_available()


def kinds(plan, pair="resnet32x4-resnet8x4", batch=64) -> list[str]:
    return [item.kind for item in plan.measurements if item.pair == pair and item.batch == batch]


def test_one_gpu_measures_one_process_against_the_shared_gpu_and_says_what_it_leaves_out():
    plan = make_plan(1, "nvidia-cuda-mps-control is not on PATH")
    assert {(item.pair, item.batch) for item in plan.measurements} == {
        (pair, batch) for pair in PAIRS for batch in (64, 128)}
    assert kinds(plan) == [ONE_PROCESS, SHARED]
    shared = next(item for item in plan.measurements if item.kind == SHARED)
    # Two workers on one GPU: the backend the product itself chooses for half a GPU each.
    assert (shared.gpus, shared.workers, shared.gpus_per_peer) == (1, 2, 0.5)
    assert exchange_backend(True, 0.5).host_copies and shared.backend == "gloo on host copies"
    assert plan.not_measured == ("shared_gpu_mps: nvidia-cuda-mps-control is not on PATH",
                                 "gpu_per_peer (NCCL, device scaling): needs 2 GPUs, 1 here")
    assert plan.first_step.kind == SHARED and plan.first_step.batch == 64


def test_two_gpus_add_one_gpu_per_peer_over_nccl_and_mps_where_it_can_be_tried():
    plan = make_plan(2, None)
    assert kinds(plan, "wrn_40_2-wrn_16_2", 128) == [ONE_PROCESS, SHARED, SHARED_MPS, PER_GPU]
    per_gpu = next(item for item in plan.measurements if item.kind == PER_GPU)
    assert (per_gpu.gpus, per_gpu.gpus_per_peer, per_gpu.backend) == (2, 1.0, "nccl")
    assert exchange_backend(True, 1.0).name == "nccl" and plan.not_measured == ()


def test_without_a_gpu_there_is_no_plan():
    with pytest.raises(CohortError, match="at least one GPU"):
        make_plan(0, None)


def test_mps_is_tried_only_where_its_control_program_is():
    assert mps_unavailable(False, "/usr/bin/nvidia-cuda-mps-control") is None
    assert "not on PATH" in mps_unavailable(False, None)
    assert mps_unavailable(True, "/usr/bin/nvidia-cuda-mps-control") == "not tried (--no-mps)"


def test_the_planned_topologies_are_the_products_own(tmp_path):
    plan = make_plan(2, None)
    for item in plan.measurements:
        topology = cuda_topology(item, tmp_path / "slice.parquet", epochs=4, precision="bf16", cpus_per_peer=2)
        assert [topology.peers[peer].model for peer in ("teacher", "student")] == list(PAIRS[item.pair])
        assert topology.data.batch_size == item.batch and topology.train.precision == "bf16"
        resources = topology.resources
        assert resources.use_gpu == (item.kind != ONE_PROCESS) and resources.cpus_per_peer == 2
        if resources.use_gpu:
            backend = exchange_backend(True, resources.gpus_per_worker)
            assert f"{backend.name}{' on host copies' if backend.host_copies else ''}" == item.backend
            assert topology.num_workers == item.workers


def test_dry_run_prints_the_plan_here_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "exchange_cuda.json"
    assert main(["--device", "cuda", "--dry-run", "--gpus", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("GPU benchmark plan: 2 GPUs")
    assert "wrn_40_2-wrn_16_2/b128/gpu_per_peer" in printed and "2 GPUs, 1 each" in printed and "nccl" in printed
    assert "resnet32x4-resnet8x4/b64/shared_gpu" in printed and "gloo on host copies" in printed
    assert not out.exists()


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal where torch sees no GPU")
def test_without_a_gpu_the_benchmark_refuses_in_one_line(tmp_path, capsys):
    out = tmp_path / "exchange_cuda.json"
    assert main(["--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("no CUDA GPU: torch ") and "--dry-run" in err and "\n" not in err
    assert not out.exists()
    assert main(["--device", "cuda", "--dry-run", "--out", str(out)]) == 0  # assumes one GPU
    assert "assumed: torch sees no GPU here" in capsys.readouterr().out


def test_a_slice_from_image_arrays_reads_back_through_the_product_loader(tmp_path):
    generator = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 256, (700, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.arange(700) % 10)
    test = (torch.randint(0, 256, (600, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.arange(600) % 10)
    names = tuple(f"class{i}" for i in range(10))
    path = encode_slice(train, test, names, tmp_path, train_images=128)
    data = load_dataset(cuda_topology(Measurement(ONE_PROCESS, "wrn_40_2-wrn_16_2", 64, 1, 0, None, ""), path, 2,
                                      "fp32", 1).data)
    assert (data.info.train_size, data.info.test_size, data.info.class_names) == (128, TEST_IMAGES, names)
    # PNG is lossless: every drawn image is one of the source's, pixel for pixel, with its label.
    source = {bytes(image.numpy()): int(label) for image, label in zip(*train)}
    assert all(source[bytes(image.numpy())] == int(label) for image, label in zip(data.train_images, data.train_labels))


def test_ratios_and_table_from_measurements():
    def entry(kind, values, **extra):
        return {"kind": kind, **summarize(values), "images_per_second": 64 / sorted(values)[len(values) // 2], **extra}

    shared_extra = {"exchange_share": {"teacher": summarize([0.02]), "student": summarize([0.5])},
                    "peak_gpu_mb": {"teacher": 900.0, "student": 300.0}}
    measurements = {"p/b64/one_process": entry(ONE_PROCESS, [0.2, 0.3, 0.4]),
                    "p/b64/shared_gpu": entry(SHARED, [0.2, 0.2, 0.2], **shared_extra),
                    "p/b64/gpu_per_peer": entry(PER_GPU, [0.1, 0.15, 0.2])}
    found = ratios(measurements)["p/b64"]
    assert found["shared_gpu_speedup"]["value"] == pytest.approx(0.3 / 0.2)
    assert found["device_scaling"]["value"] == pytest.approx(0.3 / 0.15 / 2)
    assert (found["device_scaling"]["min"], found["device_scaling"]["max"]) == pytest.approx((1.0, 1.0))
    assert "shared_gpu_mps_speedup" not in found
    table = markdown({"measurements": measurements, "ratios": ratios(measurements),
                      "not_measured": ["shared_gpu_mps: not tried (--no-mps)"], "time_to_first_step_s": 9.5})
    row = next(line for line in table.splitlines() if line.startswith("| p/b64"))
    assert "× 1.50" in row and "not measured" in row and "scaling 1.00" in row and "2.0%, 50.0%" in row
    assert "900, 300" in row and "9.5 s" in table and "not measured: shared_gpu_mps" in table
