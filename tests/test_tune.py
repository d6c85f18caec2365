"""Search spaces, metric expressions, and a small sweep through Ray Tune on digits."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from cohort.errors import CohortError
from cohort.search_space import MetricExpression, load_space
from cohort.topology import load_topology, topology_from_dict
from cohort.tune import main as tune_main
from cohort.tune import plan_resources

ROOT = Path(__file__).resolve().parents[1]

TOPOLOGY = {
    "name": "sweep-me",
    "data": {"batch_size": 128},
    "train": {"epochs": 2, "optimizer": {"lr": 0.05}},
    "peers": {"teacher": {"model": "mlp"}, "student": {"model": "mlp_tiny"}},
    "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
              {"from": "student", "to": "teacher", "loss": "reverse_kd"}],
}
GOOD_SPACE = {"metric": "student/acc", "mode": "max", "space": {"edges.0.temperature": {"uniform": [1, 4]}}}


def write(folder: Path, name: str, content: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def space_error(tmp_path: Path, space: dict) -> str:
    with pytest.raises(CohortError) as raised:
        load_space(write(tmp_path, "space.yaml", space), topology_from_dict(TOPOLOGY))
    return str(raised.value)


# --------------------------------------------------------------------------- space files


@pytest.mark.parametrize("name", ["bdkd.yaml", "dml.yaml"])
def test_shipped_spaces_fit_their_topologies(name):
    topology = load_topology(ROOT / "topologies" / ("dml_pair.yaml" if name == "dml.yaml" else "three_peers.yaml"))
    space = load_space(ROOT / "tune_spaces" / name, topology)
    assert space.space and space.mode in ("min", "max")


def test_shipped_ltkd_space_fits_an_ltkd_edge(tmp_path):
    topology = topology_from_dict({**TOPOLOGY, "edges": [{"from": "teacher", "to": "student", "loss": "ltkd"}]})
    space = load_space(ROOT / "tune_spaces" / "ltkd.yaml", topology)
    assert set(space.space) == {"edges.0.alpha", "edges.0.beta", "edges.0.temperature"}


BAD_SPACES = {
    "not a topology path": ({"space": {"edges.0.temprature": {"uniform": [1, 4]}}},
                            "space.yaml: space.edges.0.temprature: not a path of topology 'sweep-me'"),
    "low above high": ({"space": {"edges.0.temperature": {"uniform": [4, 1]}}},
                       "space.edges.0.temperature: uniform needs low < high, got [4, 1]"),
    "loguniform at zero": ({"space": {"edges.0.temperature": {"loguniform": [0, 1]}}},
                           "space.edges.0.temperature: loguniform needs low > 0"),
    "unknown distribution": ({"space": {"edges.0.temperature": {"normal": [0, 1]}}},
                             "unknown distribution 'normal'"),
    "two distributions": ({"space": {"edges.0.temperature": {"uniform": [1, 2], "choice": [1]}}},
                          "must be one distribution"),
    "empty choice": ({"space": {"edges.0.temperature": {"choice": []}}}, "choice takes a non-empty list"),
    "choice making the topology invalid": ({"space": {"edges.0.loss": {"choice": ["kd", "kld"]}}},
                                           "space.edges.0.loss: value 'kld' makes the topology invalid"),
    "unknown key": ({"metrc": "x/acc"}, "metrc: unknown key (did you mean 'metric'?)"),
    "bad mode": ({"mode": "maximize"}, "mode: 'maximize' is not one of"),
    "unknown scheduler": ({"scheduler": {"name": "hyperband"}}, "scheduler.name: 'hyperband' is not one of"),
    "grid search without grid entries": ({"search": "grid"}, "search: grid needs every space entry"),
    "metric that is code": ({"metric": "__import__('os').system('ls')"}, "metric: "),
    "metric without a key": ({"metric": "2 + 2"}, "names no metric"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_bad_space_is_one_clear_error(tmp_path, case):
    change, expected = BAD_SPACES[case]
    message = space_error(tmp_path, {**GOOD_SPACE, **change})
    assert message.startswith("space.yaml: ") and expected in message, message
    assert "\n" not in message


def test_metric_expression():
    expression = MetricExpression("student/acc - 0.5 * student/ece")
    assert expression.keys == ["student/acc", "student/ece"]
    assert expression({"student/acc": 0.9, "student/ece": 0.1}) == pytest.approx(0.85)
    assert MetricExpression("max(a/acc, b_2/acc) / 2")({"a/acc": 0.4, "b_2/acc": 0.8}) == pytest.approx(0.4)
    assert MetricExpression("-ensemble/nll")({"ensemble/nll": 0.3}) == pytest.approx(-0.3)
    assert MetricExpression("student/ece").is_plain_key
    with pytest.raises(KeyError, match=r"'ghost/acc' is not reported \(available: a/acc\)"):
        MetricExpression("ghost/acc")({"a/acc": 1.0})
    assert math.isinf(MetricExpression("a/acc / b/ece")({"a/acc": 1.0, "b/ece": 0.0}))


def test_plan_resources():
    assert plan_resources(3, samples=4, cpus=2, max_concurrent=None, cpus_per_peer=None) == (2, 0.33)
    assert plan_resources(2, samples=1, cpus=8, max_concurrent=None, cpus_per_peer=None) == (1, 1.0)
    assert plan_resources(2, samples=4, cpus=2, max_concurrent=None, cpus_per_peer=None) == (2, 0.49)
    assert plan_resources(2, samples=8, cpus=8, max_concurrent=None, cpus_per_peer=None) == (4, 0.99)
    assert plan_resources(3, samples=4, cpus=2, max_concurrent=None, cpus_per_peer=0.5) == (1, 0.5)
    with pytest.raises(CohortError, match="one trial needs 6.01 CPUs"):
        plan_resources(3, samples=4, cpus=2, max_concurrent=None, cpus_per_peer=2)


def test_metric_that_no_trial_reports_stops_before_ray(tmp_path, capsys):
    space = write(tmp_path, "space.yaml", {**GOOD_SPACE, "metric": "ghost/acc"})
    code = tune_main([str(write(tmp_path, "t.yaml", TOPOLOGY)), str(space), "--tracking-uri",
                      f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "tune")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("space.yaml: metric: 'ghost/acc' is not reported (available: cohort/batches_identical, ")
    assert "student/ece" in err


# --------------------------------------------------------------------------- a sweep through Ray Tune


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # As cohort.tune starts it: with the dashboard (on 127.0.0.1), whose state API lets Ray Train
    # release the workers of trials that ASHA stops.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_small_asha_sweep_on_digits(ray_cluster, tmp_path, capsys):
    import mlflow

    # Trials run one after the other (grid values of each sample in order; the random values are
    # seeded by the topology), so the scheduler's decisions are reproducible: the tiny learning rate
    # learns almost nothing in one epoch and ASHA stops it at its first rung. A sampled temperature <= 0
    # makes a trial invalid: it fails with the reason and the sweep goes on.
    space = {
        "metric": "student/acc - 0.5 * student/ece", "mode": "max", "max_concurrent": 1,
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 4},
        "search": "random",
        "space": {"train.optimizer.lr": {"grid": [0.2, 0.0001]}, "edges.0.temperature": {"uniform": [-1.0, 6.0]}},
    }
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [str(write(tmp_path, "t.yaml", TOPOLOGY)), str(write(tmp_path, "s.yaml", space)), "--num-samples", "2",
            "--tracking-uri", uri, "--storage", str(tmp_path / "tune"), "--out", str(tmp_path)]
    assert tune_main(args) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "best: trial" in out

    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-me")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    invalid = [r for r in children if float(r.data.params["edges.0.temperature"]) <= 0]
    assert invalid and len(invalid) < 4, "the seeded sample should hold valid and invalid temperatures"
    for run in children:
        assert run.info.status == ("FAILED" if run in invalid else "FINISHED")
    for run in invalid:
        assert "edges[0].temperature: must be > 0" in run.data.tags["cohort.error"]
        assert "edges[0].temperature: must be > 0" in out
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert any(r.data.tags.get("cohort.stopped_early") == "true" for r in finished), (
        [(r.info.start_time, r.data.params, r.data.metrics.get("objective"), r.data.tags.get("cohort.stopped_early"))
         for r in finished])
    for run in finished:
        history = client.get_metric_history(run.info.run_id, "objective")
        assert [m.step for m in history] in ([1], [1, 2])
        assert "train.optimizer.lr" in run.data.params

    best = tmp_path / "best_sweep-me.yaml"
    assert best.exists()
    from cohort.run import main as run_main

    assert run_main([str(best), "--dry-run"]) == 0
    assert parents[0].data.metrics["best_objective"] == pytest.approx(max(r.data.metrics["objective"] for r in finished))
