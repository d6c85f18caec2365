"""Sharing a cohort's CPUs: torch threads in proportion to each peer's compute, and where the time
before the first step goes. Pure functions, no Ray."""
from __future__ import annotations

import pytest
import torch.nn as nn

from cohort.console.plan import describe_plan
from cohort.driver.launch import fit_cluster, make_plan
from cohort.driver.placement import TRAINING_STEP_FORWARDS, peer_threads, step_flops
from cohort.driver.startup import PARTS, describe_startup, startup_breakdown
from cohort.models import build_model
from cohort.topology import topology_from_dict


def test_step_flops_counts_a_linear_layer_exactly():
    # A 10 -> 3 linear layer: 2 * 10 * 3 multiply-adds counted as FLOPs per sample, forward.
    layer = nn.Sequential(nn.Flatten(), nn.Linear(10, 3))
    assert step_flops(layer, (10,), frozen=True) == 60
    assert step_flops(layer, (10,)) == TRAINING_STEP_FORWARDS * 60


def test_step_flops_orders_the_cifar_resnets_and_keeps_training_mode():
    resnet20, resnet8 = build_model("resnet20", num_classes=10), build_model("resnet8", num_classes=10)
    big, small = step_flops(resnet20, (3, 32, 32)), step_flops(resnet8, (3, 32, 32))
    # resnet20: about 41 M multiply-adds per 32x32 image, resnet8 about 12.5 M (the papers' counts).
    assert 3 * 2 * 38e6 < big < 3 * 2 * 44e6
    assert 2.5 < big / small < 3.8
    assert resnet20.training


def test_equal_peers_keep_an_equal_share():
    assert peer_threads({"a": 5.0, "b": 5.0}, 1.0) == {"a": 1, "b": 1}
    assert peer_threads({"a": 5.0, "b": 5.0, "c": 5.0}, 0.66) == {"a": 1, "b": 1, "c": 1}
    assert peer_threads({"a": 5.0, "b": 5.0}, 4.0) == {"a": 4, "b": 4}
    assert peer_threads({"a": 5.0, "b": 5.0}, 1.5) == {"a": 1, "b": 1}


def test_shares_follow_compute_rounded_down_never_beyond_the_cpus():
    # 8 CPUs, a teacher with 3x the student's compute: shares 6 and 2, exactly proportional.
    assert peer_threads({"teacher": 3.0, "student": 1.0}, 4.0) == {"teacher": 6, "student": 2}
    # 2 CPUs, shares 1.5 and 0.5: rounding up would put 3 spinning threads on 2 cores.
    assert peer_threads({"teacher": 3.0, "student": 1.0}, 1.0) == {"teacher": 1, "student": 1}
    # A big teacher and two small students on 12 CPUs: shares 7.2, 2.4, 2.4.
    assert peer_threads({"t": 6.0, "s1": 2.0, "s2": 2.0}, 4.0) == {"t": 7, "s1": 2, "s2": 2}


def test_every_peer_gets_at_least_one_thread():
    assert peer_threads({"giant": 1000.0, "tiny": 1.0}, 1.0) == {"giant": 1, "tiny": 1}
    assert peer_threads({"giant": 1000.0, "tiny": 1.0}, 2.0) == {"giant": 3, "tiny": 1}
    assert peer_threads({"a": 0.0, "b": 0.0}, 2.0) == {"a": 2, "b": 2}


@pytest.fixture
def unequal_digits():
    return topology_from_dict({"name": "unequal", "peers": {"teacher": {"model": "cnn_medium"},
                                                            "student": {"model": "mlp_tiny"}},
                               "edges": [{"from": "teacher", "to": "student", "loss": "kd"}]})


def test_the_plan_gives_the_teacher_more_threads_and_shows_them(unequal_digits, tmp_path):
    plan = make_plan(unequal_digits, f"sqlite:///{tmp_path}/mlflow.db", available_cpus=2, download=False)
    assert plan.compute["teacher"] > 10 * plan.compute["student"]
    assert plan.threads == {"teacher": 1, "student": 1}  # 2 CPUs: one each
    roomy = unequal_digits.model_copy(update={"resources": unequal_digits.resources.model_copy(
        update={"cpus_per_peer": 4.0})})
    plan = fit_cluster(make_plan(roomy, None, 8, download=False), {"CPU": 8.0})
    assert plan.threads == {"teacher": 7, "student": 1}
    rows = {line.split()[1]: line.split() for line in describe_plan(plan).splitlines() if line.startswith("  0 ")
            or line.startswith("  1 ")}
    assert rows["teacher"][5] == "7" and rows["student"][5] == "1"


MARKS = {"command": 100.0, "ray_start": 104.0, "ray_ready": 107.0}


def test_startup_parts_follow_the_last_peer_and_add_up():
    workers = {"a": {"worker_start": 110.0, "data_loaded": 111.0, "model_built": 111.5, "first_step": 112.0},
               "b": {"worker_start": 110.5, "data_loaded": 112.5, "model_built": 112.7, "first_step": 113.0}}
    breakdown = startup_breakdown(MARKS, workers)
    assert breakdown == pytest.approx({"driver": 4.0, "ray": 3.0, "workers": 3.5, "data": 2.0, "models": 0.2,
                                       "first_step": 0.3, "total": 13.0})
    assert sum(value for part, value in breakdown.items() if part != "total") == pytest.approx(breakdown["total"])
    assert describe_startup(breakdown).startswith("first step 13.0s after the command started (driver 4.0s, ray 3.0s")


def test_no_breakdown_without_every_mark_or_for_workers_older_than_this_driver():
    complete = {"worker_start": 110.0, "data_loaded": 111.0, "model_built": 111.5, "first_step": 112.0}
    assert startup_breakdown(MARKS, {"a": complete, "b": {**complete, "first_step": None}}) == {}
    assert startup_breakdown(MARKS, {"a": complete, "b": {}}) == {}
    replayed = {name: value - 50 for name, value in complete.items()}
    assert startup_breakdown(MARKS, {"a": replayed}) == {}


def test_the_breakdown_counts_from_the_call_in_python_and_from_the_process_in_a_command(monkeypatch, tmp_path):
    """Two trainings in one process (a notebook's cells): each breakdown counts from its own call to
    ``cohort.train``, not from the process's start (the second said 'driver 28.9s'); a command's
    counts from its process's start, imports included, also through the ``cohort.train`` it calls."""
    import time

    import cohort
    import cohort.driver.cluster as cluster
    import cohort.driver.training as training
    from cohort.driver.startup import COMMAND_STARTED, asked_at, asked_since, process_started

    monkeypatch.setattr(cluster, "start_ray", lambda address, verbose, dashboard=False: {"CPU": 2.0})
    monkeypatch.setattr(training, "start_run",
                        lambda *args: (cluster.timed_start_ray(cluster.RayOptions())[1], asked_since()))
    topology = cohort.load_topology("topologies/dml_pair.yaml")
    for _ in range(2):
        called = time.time()
        marks, since = cohort.train(topology, tracking_uri=f"sqlite:///{tmp_path}/m.db", display="quiet")
        assert called <= marks["command"] <= marks["ray_start"] <= marks["ray_ready"]
        assert since == "cohort.train was called"  # what the breakdown's line says it counts from
    with asked_at(process_started(), COMMAND_STARTED):  # python -m cohort.run (cohort.console.command.run_command)
        marks, since = cohort.train(topology, tracking_uri=f"sqlite:///{tmp_path}/m.db", display="quiet")
    assert marks["command"] == process_started() < called and since == "the command started"
    _, marks = cluster.timed_start_ray(cluster.RayOptions())  # outside both: from Ray's start
    assert marks["command"] == marks["ray_start"] and asked_since() == "Ray's start began"
    breakdown = {part: 1.0 for part, _ in PARTS} | {"total": 6.0}
    assert describe_startup(breakdown, "cohort.train was called").startswith(
        "first step 6.0s after cohort.train was called (driver 1.0s, ray 1.0s")


# --------------------------------------------------------------------------- the plan while Ray starts


class FakeRay:
    """What ``plan_while_ray_starts`` asks of Ray: whether it runs, and to stop."""

    def __init__(self, running: bool):
        self.running, self.stopped = running, 0

    def is_initialized(self):
        return self.running

    def shutdown(self):
        self.stopped += 1


@pytest.fixture
def start_parts(monkeypatch):
    """Ray start, plan and tracker replaced by stand-ins that record their order."""
    import argparse
    import sys
    import threading
    import types

    import cohort.driver.launch
    import cohort.tracking.tracker

    parts = {"ray": FakeRay(running=False), "ray_started": threading.Event(), "plan_saw_ray_starting": None,
             "plan_error": None, "ray_error": None}

    def fake_start(args):
        parts["ray_started"].set()
        if parts["ray_error"]:
            raise parts["ray_error"]
        return {"CPU": 2.0}, {"command": 0.0, "ray_start": 1.0, "ray_ready": 2.0}

    def fake_plan(topology, tracking_uri, cpus):
        # The plan waits for Ray's start to begin: done one after the other, this would time out.
        parts["plan_saw_ray_starting"] = parts["ray_started"].wait(timeout=10)
        if parts["plan_error"]:
            raise parts["plan_error"]
        return type("P", (), {"tracking_uri": tracking_uri})()

    monkeypatch.setitem(sys.modules, "ray", parts["ray"])
    for name in ("ray.train", "ray.train.torch"):  # imported ahead by the plan's thread
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(cohort.driver.launch, "timed_start_ray", fake_start)
    monkeypatch.setattr(cohort.driver.launch, "make_plan", fake_plan)
    monkeypatch.setattr(cohort.tracking.tracker, "Tracker", lambda uri, experiment: ("tracker", uri, experiment))
    parts["args"] = argparse.Namespace(address=None, verbose=False, dashboard=False)
    parts["topology"] = type("T", (), {"experiment": "exp"})()
    return parts


def test_the_plan_is_made_while_ray_starts(start_parts):
    from cohort.driver.launch import plan_while_ray_starts

    plan, tracker, cluster, marks = plan_while_ray_starts(start_parts["args"], start_parts["topology"], "sqlite:///m.db")
    assert start_parts["plan_saw_ray_starting"] is True
    assert plan.tracking_uri == "sqlite:///m.db" and tracker == ("tracker", "sqlite:///m.db", "exp")
    assert cluster == {"CPU": 2.0} and marks["ray_ready"] == 2.0
    assert start_parts["ray"].stopped == 0


def test_a_failed_plan_stops_the_ray_started_for_it(start_parts):
    from cohort.config.errors import CohortError
    from cohort.driver.launch import plan_while_ray_starts

    start_parts["plan_error"] = CohortError("checkpoint 'a.pt' does not fit the model", "peers.a.checkpoint")
    with pytest.raises(CohortError, match="does not fit the model"):
        plan_while_ray_starts(start_parts["args"], start_parts["topology"], "sqlite:///m.db")
    assert start_parts["ray"].stopped == 1


def test_a_failed_plan_leaves_a_ray_that_was_already_running(start_parts):
    from cohort.config.errors import CohortError
    from cohort.driver.launch import plan_while_ray_starts

    start_parts["ray"].running = True
    start_parts["plan_error"] = CohortError("bad data", "data.root")
    with pytest.raises(CohortError, match="bad data"):
        plan_while_ray_starts(start_parts["args"], start_parts["topology"], "sqlite:///m.db")
    assert start_parts["ray"].stopped == 0


def test_when_both_fail_the_input_error_is_reported(start_parts):
    from cohort.config.errors import CohortError
    from cohort.driver.launch import plan_while_ray_starts

    start_parts["ray_error"] = CohortError("--address '127.0.0.1:9': no Ray cluster reachable there")
    with pytest.raises(CohortError, match="no Ray cluster reachable"):
        plan_while_ray_starts(start_parts["args"], start_parts["topology"], "sqlite:///m.db")
    start_parts["plan_error"] = CohortError("bad data", "data.root")
    with pytest.raises(CohortError, match="bad data"):
        plan_while_ray_starts(start_parts["args"], start_parts["topology"], "sqlite:///m.db")


def test_the_cohort_trainer_starts_neither_a_datasets_manager_nor_a_placement_group_cleaner(tmp_path):
    """Each helper actor is one more process per fit (cohort.driver.trainer); a Ray that renames
    their callbacks makes this fail instead of silently starting them again."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cohort.driver.trainer import cohort_trainer_class, unused_callback_classes

    assert [c.__name__ for c in unused_callback_classes()] == ["DatasetsCallback", "PlacementGroupCleanerCallback"]

    def callbacks(trainer_class, **kwargs) -> set[str]:
        trainer = trainer_class(lambda config: None, scaling_config=ScalingConfig(num_workers=2),
                                run_config=RunConfig(storage_path=str(tmp_path)), **kwargs)
        return {type(callback).__name__ for callback in trainer._create_default_callbacks()}

    ray_own = callbacks(TorchTrainer)
    assert ray_own - callbacks(cohort_trainer_class()) == {"DatasetsCallback", "PlacementGroupCleanerCallback"}
    # A Tune trial's too: the sweep's driver gives back the CPUs of a trial killed with its controller
    # (cohort.driver.reclaim).
    assert ray_own - callbacks(cohort_trainer_class(resource_requests=False)) == {"DatasetsCallback",
                                                                                   "PlacementGroupCleanerCallback"}
    # On a Ray whose placement groups cohort cannot read (cohort.driver.reclaim.readable), the cleaner stays.
    assert [c.__name__ for c in unused_callback_classes(cleaner=True)] == ["DatasetsCallback"]
    assert ray_own - callbacks(cohort_trainer_class(cleaner=True)) == {"DatasetsCallback"}
    # Given Ray Datasets (cohort never does), the trainer is Ray's own.
    assert callbacks(cohort_trainer_class(), datasets={"train": [1]}) == ray_own


def test_a_fit_keeps_ray_trains_cleaner_only_where_its_placement_groups_cannot_be_read(tmp_path, monkeypatch):
    """Where cohort.driver.reclaim cannot read the placement groups (a Ray that changed its private
    table reader), nothing of cohort's would give back a killed controller's CPUs: Ray's cleaner stays."""
    import cohort.driver.reclaim as reclaim
    from cohort.driver.launch import make_trainer

    topology = topology_from_dict({"name": "cleaner", "peers": {"a": {"model": "mlp_tiny"}, "b": {"model": "mlp_tiny"}},
                                   "edges": [{"from": "a", "to": "b", "loss": "kd"}]})

    def names(trainer) -> set[str]:
        return {type(callback).__name__ for callback in trainer._create_default_callbacks()}

    monkeypatch.setattr(reclaim, "group_records", lambda: [])  # a Ray whose table reads (empty)
    assert "PlacementGroupCleanerCallback" not in names(make_trainer(topology, 0.5, 1, str(tmp_path), "read"))
    monkeypatch.setattr(reclaim, "group_records", lambda: None)  # one whose table does not
    assert "PlacementGroupCleanerCallback" in names(make_trainer(topology, 0.5, 1, str(tmp_path), "unread"))


def test_a_cohort_trainer_on_a_ray_started_here_asks_no_autoscaler(tmp_path, monkeypatch):
    """On a Ray the command started on its machine there is no autoscaler to tell a fit's resources:
    the controller gets Ray's fixed scaling policy without its calls to Ray Data's autoscaling
    coordinator (one more process, waited for before the workers start). Elsewhere, Ray's own."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    from cohort.driver import trainer as module
    from cohort.driver.cluster import started_here

    assert not started_here()  # no Ray in this process
    silent = module.silent_scaling_policy_class()
    assert silent is not None and silent.__base__ is FixedScalingPolicy  # a Ray that renamed it fails here
    policy = silent(scaling_config=ScalingConfig(num_workers=2))
    # Every call Ray's policy makes to the coordinator (an actor, so a Ray to reach) is a no-op here.
    policy.after_controller_start(None)
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2
    assert policy.make_decision_for_running_worker_group(None, None).__class__.__name__ == "NoopDecision"
    policy.before_controller_abort()

    given = []
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: given.append(kwargs))
    for resource_requests, expected in ((False, silent), (True, FixedScalingPolicy)):
        trainer = module.cohort_trainer_class(resource_requests)(
            lambda config: None, scaling_config=ScalingConfig(num_workers=3), run_config=RunConfig(storage_path=str(tmp_path)))
        trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(trainer.scaling_config), other=1)
        assert type(given[-1]["scaling_policy"]) is expected and given[-1]["other"] == 1
        assert given[-1]["scaling_policy"].scaling_config.num_workers == 3


def test_a_cohort_trainer_kills_its_runs_actors_when_the_fit_ends_or_fails(tmp_path, monkeypatch):
    """A codistilling run's snapshot board ends with the fit that used it, by ``ray.kill``, whether the
    fit returned or raised (cohort.driver.trainer: left to Ray's reference counting, a board's process
    was seen to outlive its Ray). An actor already gone, or a Ray already stopped, is no error."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cohort.driver.trainer import cohort_trainer_class

    killed = []

    def kill(actor):
        killed.append(actor)
        if actor == "gone":
            raise ValueError("no such actor")

    monkeypatch.setattr(ray, "kill", kill)
    outcomes = iter(["result", RuntimeError("the workers failed")])

    def fit(self):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(TorchTrainer, "fit", fit)

    def trainer(**kwargs):
        return cohort_trainer_class()(lambda config: None, scaling_config=ScalingConfig(num_workers=2),
                                      run_config=RunConfig(storage_path=str(tmp_path)), **kwargs)

    assert trainer(run_actors=["gone", "board"]).fit() == "result"
    assert killed == ["gone", "board"]
    with pytest.raises(RuntimeError, match="the workers failed"):
        trainer(run_actors=["board of the failed run"]).fit()
    assert killed[-1] == "board of the failed run"
    assert trainer().run_actors == ()


def test_a_command_stops_its_quiet_ray_itself_and_leaves_a_verbose_one_to_rays_exit_hook(monkeypatch):
    """``exit_process`` stops a Ray that ``start_ray`` started or joined without worker logs (Ray's own
    exit hook would first wait 0.5 s for them); a ``--verbose`` one, whose logs the driver prints,
    and a process without Ray are left to that hook."""
    import sys
    import types

    from cohort.driver import cluster

    stopped = []
    fake = types.SimpleNamespace(is_initialized=lambda: True, shutdown=lambda: stopped.append(True),
                                 get_runtime_context=lambda: types.SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.setattr(cluster, "QUIET", set())
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    cluster.stop_quiet_ray()  # Ray never imported: nothing to stop, nothing imported
    assert "ray" not in sys.modules
    monkeypatch.setitem(sys.modules, "ray", fake)
    cluster.stop_quiet_ray()  # started with --verbose: not in QUIET
    assert stopped == []
    cluster.QUIET.add("127.0.0.1:6379")
    cluster.stop_quiet_ray()
    assert stopped == [True]

    def failing_shutdown():
        raise RuntimeError("the raylet is gone")

    monkeypatch.setattr(fake, "shutdown", failing_shutdown)
    cluster.stop_quiet_ray()  # left to Ray's exit hook: the command's exit code stands
