"""A cohort across the two nodes of a Ray cluster started on this machine (Ray's cluster
utilities: a head and a worker node of 1 CPU each, on 127.0.0.1), joined with --address, its
workers placed by a node label."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import empty_store, end_orphaned_workers, raylet_pids

from cohort.run import main

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.ray

LABEL = {"cohort-pool": "cpu"}
PAIR = {
    "name": "two-nodes",
    "seed": 1,
    "data": {"dataset": "digits", "batch_size": 128},
    "train": {"epochs": 1},
    "peers": {"teacher": {"model": "mlp"}, "student": {"model": "mlp_tiny"}},
    "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
              {"from": "student", "to": "teacher", "loss": "reverse_kd"}],
    # A whole CPU per peer on nodes of one CPU each: one peer per node.
    "resources": {"cpus_per_peer": 1, "node_labels": LABEL},
}


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "labels": LABEL})
    try:
        cluster.add_node(num_cpus=1, labels=LABEL)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        raylets = raylet_pids(cluster)
        ray.shutdown()  # the driver's connection, made by cohort.run
        cluster.shutdown()
        end_orphaned_workers(raylets)


@pytest.fixture(autouse=True)
def disconnect_after():
    """Each cohort.run joins the cluster with --address; leave for the next test to join again."""
    yield
    import ray

    ray.shutdown()


def test_a_cohort_runs_across_two_nodes(two_nodes, tmp_path, capsys):
    uri = empty_store(tmp_path / "mlflow.db")
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(PAIR, sort_keys=False))
    assert main([str(path), "--address", two_nodes.address, "--tracking-uri", uri,
                 "--storage", str(tmp_path / "ray")]) == 0
    assert "node label cohort-pool=cpu" in capsys.readouterr().out
    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["cohort/batches_identical"] == 1.0
    workers = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="workers.json", tracking_uri=uri, dst_path=str(tmp_path))).read_text())
    assert [w["peer"] for w in workers] == ["teacher", "student"]
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    assert {w["node_id"] for w in workers} == nodes and len(nodes) == 2


def test_codistilling_peers_on_two_nodes_finish_and_report_staleness(two_nodes, tmp_path):
    """exchange.mode snapshot across nodes: each peer reads the other's weights from the object store
    of the other node, through the run's board; no collective within an epoch."""
    topology = {**PAIR, "name": "two-nodes-snapshot", "exchange": {"mode": "snapshot", "every": 3, "data": "disjoint"}}
    uri = empty_store(tmp_path / "mlflow.db")
    path = tmp_path / "two-nodes-snapshot.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    assert main([str(path), "--address", two_nodes.address, "--tracking-uri", uri,
                 "--storage", str(tmp_path / "ray")]) == 0
    client = mlflow.tracking.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("two-nodes-snapshot").experiment_id])[0]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and "cohort/batches_identical" not in metrics  # disjoint data
    # Snapshots every 3 steps: each copy is 0 to 2 steps behind when nobody lags, more when the other lags.
    assert 0 < metrics["student/staleness_teacher"] and 0 < metrics["teacher/staleness_student"]
    assert 0 <= metrics["cohort/churn"] <= 1
    workers = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="workers.json", tracking_uri=uri, dst_path=str(tmp_path))).read_text())
    assert len({w["node_id"] for w in workers}) == 2


def test_a_label_no_node_has_is_refused_before_start(two_nodes, tmp_path, capsys):
    topology = {**PAIR, "name": "no-such-label", "resources": {"node_labels": {"cohort-pool": "gpu"}}}
    path = tmp_path / "no-such-label.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    assert main([str(path), "--address", two_nodes.address, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    assert capsys.readouterr().err.strip() == ("no-such-label.yaml: resources.node_labels: no node of the Ray "
                                               "cluster has the labels {'cohort-pool': 'gpu'}")
