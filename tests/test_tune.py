"""Search spaces, metric expressions, and a small sweep through Ray Tune on digits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import WorkersWatch, all_cpus_free, as_started_here, empty_store

from cohort.config.errors import CohortError
from cohort.topology import load_topology, topology_from_dict
from cohort.tune import main as tune_main
from cohort.tuning.search_space import MetricExpression, load_space
from cohort.tuning.sweep import plan_resources, reuses_trial_processes

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


@pytest.mark.parametrize("name", ["bdkd.yaml", "bdkd_pbt.yaml", "dml.yaml"])
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
    "a setting of another scheduler": ({"scheduler": {"name": "asha", "perturbation_interval": 2}},
                                       "scheduler.perturbation_interval: not a setting of asha (it takes grace_period, "
                                       "reduction_factor)"),
    "pbt with optuna": ({"scheduler": "pbt", "search": "optuna"}, "search: pbt explores by itself and cannot be "
                                                                   "combined with optuna"),
    "pbt with nothing to mutate": ({"scheduler": "pbt", "search": "grid",
                                    "space": {"edges.0.temperature": {"grid": [1, 2]}}},
                                   "scheduler: pbt needs at least one space entry that is not {grid: [...]}"),
    "pbt quantile above one half": ({"scheduler": {"name": "pbt", "quantile_fraction": 0.7}},
                                    "scheduler.quantile_fraction: must be less than or equal to 0.5"),
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


@pytest.mark.parametrize("scheduler,reused", [("fifo", True), ({"name": "asha"}, False),
                                               ({"name": "pbt", "perturbation_interval": 1}, False)])
def test_only_trials_that_run_to_their_end_hand_their_process_on(tmp_path, scheduler, reused):
    """ASHA and PBT stop trials inside their fit: Tune must not offer that process to another trial."""
    space = load_space(write(tmp_path, "s.yaml", {**GOOD_SPACE, "scheduler": scheduler}), topology_from_dict(TOPOLOGY))
    assert reuses_trial_processes(space) is reused


def test_metric_that_no_trial_reports_stops_before_ray(tmp_path, capsys):
    space = write(tmp_path, "space.yaml", {**GOOD_SPACE, "metric": "ghost/acc"})
    code = tune_main([str(write(tmp_path, "t.yaml", TOPOLOGY)), str(space), "--tracking-uri",
                      f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "tune")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("space.yaml: metric: 'ghost/acc' is not reported (available: cohort/batches_identical, ")
    assert "student/ece" in err


@pytest.mark.parametrize("case", ["the sweep's best file exists", "a file as --out", "a folder as the best file"])
def test_an_unusable_out_stops_before_ray(tmp_path, capsys, monkeypatch, case):
    """The best topology is named after the sweep (best_<sweep>.yaml: another sweep of the same
    topology does not replace it), and where it goes is checked before Ray starts."""
    import cohort.driver.cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cohort.driver.cluster, "start_ray", no_ray)
    (tmp_path / "out").mkdir()
    best = tmp_path / "out" / "best_sweep-me-space.yaml"
    out, expected = {
        "the sweep's best file exists": (tmp_path / "out", f"--out: {str(best)!r} exists: give --overwrite to replace "
                                                           "it, or another --out"),
        "a file as --out": (tmp_path / "t.yaml", f"--out: {str(tmp_path / 't.yaml')!r} is a file, not a folder"),
        "a folder as the best file": (tmp_path / "out", f"--out: {str(best)!r} is a folder, not a file"),
    }[case]
    if case == "a folder as the best file":
        best.mkdir()
    else:
        best.write_text("# an earlier session's best topology\n")
    code = tune_main([str(write(tmp_path, "t.yaml", TOPOLOGY)), str(write(tmp_path, "space.yaml", GOOD_SPACE)),
                      "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "tune"),
                      "--out", str(out)])
    assert code == 2 and capsys.readouterr().err == expected + "\n"
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "tune").exists()
    assert best.is_dir() or best.read_text() == "# an earlier session's best topology\n"


@pytest.mark.parametrize("settings, expected", [
    ({"perturbation_interval": 2}, "scheduler.perturbation_interval: 2 epochs leaves no perturbation in a run of 2 "
                                   "epochs (train.epochs)"),
    ({"perturbation_interval": 1, "checkpoint_every": 2},
     "scheduler.perturbation_interval: 1 is not a multiple of train.checkpoint_every (2)"),
])
def test_pbt_that_cannot_perturb_stops_before_ray(tmp_path, capsys, settings, expected):
    topology = {**TOPOLOGY, "train": {**TOPOLOGY["train"], "checkpoint_every": settings.get("checkpoint_every", 1)}}
    space = write(tmp_path, "space.yaml", {**GOOD_SPACE, "scheduler": {
        "name": "pbt", "perturbation_interval": settings["perturbation_interval"]}})
    code = tune_main([str(write(tmp_path, "t.yaml", topology)), str(space), "--tracking-uri",
                      f"sqlite:///{tmp_path}/m.db", "--storage", str(tmp_path / "tune")])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith(f"space.yaml: {expected}")


def test_each_trial_run_logs_its_resolved_topology(tmp_path):
    """The sweep's callback gives every trial's MLflow run the trial's topology, sampled values
    applied, as topology.yaml; PBT's new values rewrite it; an invalid sample logs none."""
    import types

    import mlflow

    from cohort.tracking.tracker import Tracker
    from cohort.tuning.sweep import SweepCallback

    uri = empty_store(tmp_path / "mlflow.db")
    parent = Tracker(uri, "sweep-me").start(topology_from_dict(TOPOLOGY), "sweep")
    callback = SweepCallback(uri, "sweep-me", parent, 2, "student/acc", tmp_path / "children.json",
                             base=topology_from_dict(TOPOLOGY).to_dict())
    client = mlflow.tracking.MlflowClient(uri)

    def logged(trial) -> dict:
        path = client.download_artifacts(callback.children[trial.trial_id], "topology.yaml", str(tmp_path / trial.trial_id))
        return yaml.safe_load(Path(path).read_text())

    trial = types.SimpleNamespace(trial_id="t1", config={"edges.0.temperature": 3.25, "train.optimizer.lr": 0.125})
    callback.on_trial_start(0, [], trial)
    topology = topology_from_dict(logged(trial), "topology.yaml")
    assert topology.edges[0].temperature == 3.25 and topology.train.optimizer.lr == 0.125
    assert topology.peer_names == ["teacher", "student"] and topology.edges[1].loss == "reverse_kd"

    trial.config = {"edges.0.temperature": 1.5, "train.optimizer.lr": 0.125}  # PBT's exploit and explore
    callback.on_trial_start(0, [], trial)
    assert topology_from_dict(logged(trial), "topology.yaml").edges[0].temperature == 1.5

    invalid = types.SimpleNamespace(trial_id="t2", config={"edges.0.temperature": -1.0})
    callback.on_trial_start(0, [], invalid)
    run_id = callback.children["t2"]
    assert client.get_run(run_id).data.params["edges.0.temperature"] == "-1.0"
    assert [artifact.path for artifact in client.list_artifacts(run_id)] == []


def test_restored_optimizer_takes_the_new_settings_and_keeps_its_schedule():
    import torch

    from cohort.topology import OptimizerConfig
    from cohort.worker.peer import apply_optimizer_settings

    def optimizer_and_schedule(lr):
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)

    optimizer, schedule = optimizer_and_schedule(0.1)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    saved_optimizer, saved_schedule = optimizer.state_dict(), schedule.state_dict()

    # What a PBT-perturbed trial does: build its own optimizer, load the donor's state, apply its values.
    restored, restored_schedule = optimizer_and_schedule(0.05)
    restored.load_state_dict(saved_optimizer)
    restored_schedule.load_state_dict(saved_schedule)
    apply_optimizer_settings(restored, restored_schedule, OptimizerConfig(lr=0.05, momentum=0.5, weight_decay=1e-3))
    group = restored.param_groups[0]
    cosine = lambda base, epoch: base * (1 + math.cos(math.pi * epoch / 10)) / 2  # noqa: E731
    assert group["lr"] == pytest.approx(cosine(0.05, 4))
    assert (group["momentum"], group["weight_decay"]) == (0.5, 1e-3)
    restored.step()
    restored_schedule.step()
    assert restored.param_groups[0]["lr"] == pytest.approx(cosine(0.05, 5))

    # A restart with unchanged values leaves the state exactly as saved.
    same, same_schedule = optimizer_and_schedule(0.1)
    same.load_state_dict(saved_optimizer)
    same_schedule.load_state_dict(saved_schedule)
    apply_optimizer_settings(same, same_schedule, OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=5e-4))
    assert same.param_groups[0]["lr"] == saved_optimizer["param_groups"][0]["lr"]


def test_trials_share_the_sweeps_data_unless_their_values_change_it():
    from cohort.datasets import dataset_identity
    from cohort.tuning.sweep import trial_dataset, trial_topology

    def shared(base: dict) -> dict:
        topology = topology_from_dict(base)
        return {dataset_identity(topology.data, topology.seed): "the sweep's digits"}

    same = shared(TOPOLOGY)
    assert trial_dataset(same, trial_topology(TOPOLOGY, {"edges.0.temperature": 2.5})) == "the sweep's digits"
    assert trial_dataset(same, trial_topology(TOPOLOGY, {"seed": 7})) == "the sweep's digits"  # no split to draw
    assert trial_dataset(same, trial_topology(TOPOLOGY, {"data.batch_size": 32})) is None
    held_out = {**TOPOLOGY, "data": {**TOPOLOGY["data"], "val_fraction": 0.1}}
    assert trial_dataset(shared(held_out), trial_topology(held_out, {"train.optimizer.lr": 0.1})) == "the sweep's digits"
    assert trial_dataset(shared(held_out), trial_topology(held_out, {"seed": 7})) is None  # another validation split


# --------------------------------------------------------------------------- a sweep through Ray Tune


@pytest.mark.ray
def test_interrupted_sweep_resumes_without_running_finished_trials_again(tmp_path):
    import re
    import signal
    import subprocess
    import sys

    import mlflow

    # Its own Ray in each command (before this module's shared Ray starts). Small batches make an
    # epoch last long enough for Ctrl-C to land inside the second trial, an epoch after Tune has
    # taken that trial's first checkpoint.
    topology = {**TOPOLOGY, "data": {"batch_size": 16}, "train": {**TOPOLOGY["train"], "epochs": 4}}
    space = {**GOOD_SPACE, "max_concurrent": 1, "scheduler": "fifo"}
    uri = empty_store(tmp_path / "mlflow.db")
    command = [sys.executable, "-m", "cohort.tune", str(write(tmp_path, "t.yaml", topology)),
               str(write(tmp_path, "s.yaml", space)), "--num-samples", "2", "--tracking-uri", uri,
               "--storage", str(tmp_path / "tune"), "--out", str(tmp_path)]
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if re.search(r"trial \w+_00001 epoch 2/4", line):
            driver.send_signal(signal.SIGINT)
            break
    out, err = driver.communicate(timeout=180)
    assert driver.returncode == 2, "".join(seen) + out + err
    assert "continue with --resume --name sweep-me-s" in err

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    first_trial = re.search(r"trial (\w+)_00000 started", "".join(seen)).group(1) + "_00000"
    assert f"trial {first_trial} started" not in resumed.stdout  # finished: not run again
    # The interrupted trial went on from its last checkpoint: it does not train epoch 1 again.
    assert re.search(r"_00001 epoch 4/4", resumed.stdout) and not re.search(r"_00001 epoch 1/4", resumed.stdout), (
        resumed.stdout)

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-me").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for run in children:  # every epoch logged exactly once, across the two commands
        assert [m.step for m in client.get_metric_history(run.info.run_id, "objective")] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # Without a dashboard, as `ray start --include-dashboard=false` leaves a cluster: Ray Train's own
    # cleaner, which asks the dashboard's state API, then never gives back the CPUs of a trial that
    # ASHA or PBT stops in its fit. The sweep's driver does (cohort.driver.reclaim), or the next
    # trial would wait for them (ASHA: the third trial; PBT: the exploited trial's restart).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield as_started_here(ray)
    ray.shutdown()


@pytest.mark.ray
def test_the_placement_group_of_an_actor_killed_with_its_owner_is_found_and_removed(ray_cluster):
    from ray.util.placement_group import placement_group

    from cohort.driver.reclaim import Reclaimer

    # As a Tune trial (the owner) and its Train controller (the child, which reserves the workers).
    @ray_cluster.remote(num_cpus=0)
    class Controller:
        def reserve(self):
            group = placement_group([{"CPU": 0.5}] * 2)
            ray_cluster.get(group.ready())
            return group.id.hex()

    @ray_cluster.remote(num_cpus=0)
    class Trial:
        def start(self):
            self.controller = Controller.remote()
            return ray_cluster.get(self.controller.reserve.remote())

    reclaimer = Reclaimer()
    trial = Trial.remote()
    group_id = ray_cluster.get(trial.start.remote())
    assert reclaimer.reclaim() == []  # its creator lives
    ray_cluster.kill(trial)
    assert reclaimer.settle(timeout=30.0) == [group_id]
    assert all_cpus_free(ray_cluster, wait=30.0), ray_cluster.available_resources()


@pytest.mark.ray
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
    import cohort

    uri = empty_store(tmp_path / "mlflow.db")
    # Through the Python API (python -m cohort.tune calls it): its lines as the command's, and its result.
    topology = cohort.load_topology(write(tmp_path, "t.yaml", TOPOLOGY))
    with WorkersWatch("sklearn/") as watch:
        result = cohort.sweep(topology, write(tmp_path, "s.yaml", space), num_samples=2, tracking_uri=uri,
                             storage=str(tmp_path / "tune"), out=tmp_path, display="log")
    out = capsys.readouterr().out
    # The trials' workers train on the digits the sweep's driver loaded: none imports scikit-learn
    # to read them itself.
    assert watch.workers and not watch.loaded, (watch.workers, watch.loaded)
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
        # Every trial's run holds its resolved topology, the sampled values applied, as cohort.run's runs do.
        logged = client.download_artifacts(run.info.run_id, "topology.yaml", str(tmp_path))
        trial_topology = topology_from_dict(yaml.safe_load(Path(logged).read_text()), "topology.yaml")
        assert trial_topology.train.optimizer.lr == float(run.data.params["train.optimizer.lr"])
        assert trial_topology.edges[0].temperature == pytest.approx(float(run.data.params["edges.0.temperature"]))

    best = tmp_path / "best_sweep-me-s.yaml"  # named after the sweep (topology sweep-me, space s.yaml)
    assert best.exists()
    from cohort.run import main as run_main

    assert run_main([str(best), "--dry-run"]) == 0
    assert parents[0].data.metrics["best_objective"] == pytest.approx(max(r.data.metrics["objective"] for r in finished))

    # The result is the sweep as MLflow and the best file hold it.
    assert (result.name, result.parent_run_id, result.tracking_uri) == ("sweep-me-s", parents[0].info.run_id, uri)
    assert result.best_file == best and result.best_value == pytest.approx(parents[0].data.metrics["best_objective"])
    assert f"trial {result.best_trial}" in out
    assert {key: float(value) for key, value in result.best_config.items()} == pytest.approx(
        {key[len("best."):]: float(value) for key, value in parents[0].data.params.items() if key.startswith("best.")})
    assert result.best_topology.train.optimizer.lr == result.best_config["train.optimizer.lr"]
    table = result.table()
    assert list(table.index) == [1, 2, 3, 4] and table.loc[1, "value"] == result.best_value
    assert table.loc[1, "trial"] == result.best_trial
    assert {"train.optimizer.lr", "edges.0.temperature", "epochs", "value", "failed"} <= set(table.columns)
    assert int(table["failed"].sum()) == len(invalid) and table["value"].isna().sum() == len(invalid)
    assert sorted(table["value"].dropna()) == pytest.approx(sorted(r.data.metrics["objective"] for r in finished))


@pytest.mark.ray
def test_small_pbt_sweep_copies_the_better_trial(ray_cluster, tmp_path, capsys):
    import mlflow

    # Two trials from a grid of learning rates, decided synchronously after epoch 1: the one whose
    # rate is too small to learn is in the bottom half, so PBT restarts it from the other's epoch-1
    # checkpoint with the other's values (the temperature perturbed), and it goes on at epoch 2.
    space = {
        "metric": "student/acc", "mode": "max", "max_concurrent": 2,
        "scheduler": {"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "synch": True,
                      "resample_probability": 0.0},
        "search": "random",
        "space": {"train.optimizer.lr": {"grid": [0.2, 0.00001]}, "edges.0.temperature": {"uniform": [1.0, 4.0]}},
    }
    uri = empty_store(tmp_path / "mlflow.db")
    args = [str(write(tmp_path, "t.yaml", TOPOLOGY)), str(write(tmp_path, "s.yaml", space)), "--num-samples", "1",
            "--tracking-uri", uri, "--storage", str(tmp_path / "tune"), "--out", str(tmp_path)]
    assert tune_main(args) == 0
    out = capsys.readouterr().out
    assert "continues from a better trial's checkpoint (PBT) at epoch 2 with" in out, out

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-me").experiment_id])
    children = {float(r.data.params["train.optimizer.lr"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {0.2, 0.00001} and all(r.info.status == "FINISHED" for r in children.values())
    good, exploited = children[0.2], children[0.00001]
    changed = json.loads(exploited.data.tags["cohort.pbt.epoch_002"])
    assert changed["train.optimizer.lr"] == 0.2
    assert changed["edges.0.temperature"] in (pytest.approx(float(good.data.params["edges.0.temperature"]) * 0.8),
                                              pytest.approx(float(good.data.params["edges.0.temperature"]) * 1.2))
    history = {m.step: m.value for m in client.get_metric_history(exploited.info.run_id, "student/acc")}
    donor = {m.step: m.value for m in client.get_metric_history(good.info.run_id, "student/acc")}
    # The exploited trial went on at epoch 2 (not again from epoch 1) from the donor's weights, far
    # above what its tiny learning rate had reached; nothing was exploited after the last epoch.
    assert sorted(history) == [1, 2] and sorted(donor) == [1, 2]
    assert history[1] < donor[1] and history[2] > history[1] + 0.1, (history, donor)
    assert [key for key in good.data.tags if key.startswith("cohort.pbt.")] == []
    assert "rank" in out and out.count("continues from a better trial's checkpoint") == 1
