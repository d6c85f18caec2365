"""Which `gpu` tests run where (tests/conftest.py): the decision, without a GPU."""
from __future__ import annotations

import conftest
import pytest
from conftest import NO_CUDA, gpu_skip_reason, skip_gpu_tests


def test_without_cuda_every_gpu_test_gives_the_same_reason():
    assert gpu_skip_reason(False, 0, 1) == gpu_skip_reason(False, 0, 2) == NO_CUDA


def test_with_cuda_a_test_runs_when_there_are_enough_gpus():
    assert gpu_skip_reason(True, 1, 1) is None and gpu_skip_reason(True, 4, 2) is None
    assert gpu_skip_reason(True, 1, 2) == "needs 2 GPUs, torch sees 1"


class Item:
    def __init__(self, marker):
        self.marker, self.added = marker, []

    def get_closest_marker(self, name):
        return self.marker if name == "gpu" else None

    def add_marker(self, marker):
        self.added.append(marker)


@pytest.mark.parametrize("cuda, expected", [
    ((False, 0), [NO_CUDA, NO_CUDA, None]),
    ((True, 1), [None, "needs 2 GPUs, torch sees 1", None]),
    ((True, 2), [None, None, None]),
])
def test_collection_skips_the_gpu_tests_that_cannot_run(monkeypatch, cuda, expected):
    monkeypatch.setattr(conftest, "cuda_devices", lambda: cuda)
    items = [Item(pytest.mark.gpu.mark), Item(pytest.mark.gpu(devices=2).mark), Item(None)]
    skip_gpu_tests(items)
    reasons = [item.added[0].kwargs["reason"] if item.added else None for item in items]
    assert reasons == expected
