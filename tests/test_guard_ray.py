"""The batch guard through Ray: one peer fed another batch stops the whole run with one line.

The batch is swapped inside the Ray Train worker of rank 1 by a worker set-up hook (every worker
process of this module's Ray runs it), so the cohort's own code runs unchanged.
"""
from __future__ import annotations

import pytest
import yaml
from conftest import empty_store

from cohort.run import main

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.ray

# Digits in batches of 64: 23 steps an epoch, fewer than the default interval of 50; the swapped
# batch (epoch 1, step 5) is found by the check that ends epoch 1, at run step 23.
TOPOLOGY = {
    "name": "guard",
    "seed": 2,
    "data": {"dataset": "digits", "batch_size": 64},
    "train": {"epochs": 3, "max_failures": 0},
    "peers": {"a": {"model": "mlp_tiny"}, "b": {"model": "mlp_tiny"}},
    "edges": [{"from": "a", "to": "b", "loss": "kd"}],
}


def swap_a_batch_on_rank_1() -> None:
    """Worker set-up hook: rank 1 (peer b) trains on a flipped copy of its 5th batch of epoch 1."""
    from cohort.datasets import CohortDataset

    original = CohortDataset.train_batches

    def train_batches(self, batch_size, seed, epoch, *args, **kwargs):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        for step, (inputs, labels) in enumerate(original(self, batch_size, seed, epoch, *args, **kwargs)):
            if rank == 1 and epoch == 1 and step == 4:
                inputs = inputs.flip(0)
            yield inputs, labels

    CohortDataset.train_batches = train_batches


@pytest.fixture(scope="module")
def ray_cluster():
    import sys

    import ray
    import ray.cloudpickle

    # The hook travels by value: Ray's workers cannot import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": swap_a_batch_on_rank_1})
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("exchange", [None, {"mode": "snapshot", "every": 5}], ids=["lockstep", "snapshot"])
def test_a_peer_on_other_batches_stops_the_run_with_one_line(ray_cluster, tmp_path, capsys, exchange):
    """With snapshots the check runs on each worker's reporter thread (cohort.worker.handoff), on
    the fingerprints of the epoch's end, while the training goes on: its error is the same one line."""
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump(TOPOLOGY if exchange is None else {**TOPOLOGY, "exchange": exchange},
                                   sort_keys=False))
    uri = empty_store(tmp_path / "mlflow.db")
    code = main([str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("training failed: the training batches differ at step 23 (epoch 1): "
                             "a / b saw different data; every peer must load the same data"), err
    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("guard").experiment_id])[0]
    assert run.info.status == "FAILED"
    # It stopped in epoch 1: no later epoch was logged (nor trained, in lockstep).
    assert [m.step for m in client.get_metric_history(run.info.run_id, "a/acc")] == []
