"""Temperature scaling and the validation split, without Ray: the fit against a brute-force
search and on logits whose best temperature is known by construction; the split's sizes,
stratification, seeding and its place after the long tail."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import empty_store

from cohort.datasets import describe_dataset, load_dataset
from cohort.datasets.validation import validation_counts
from cohort.metrics.temperature import (
    T_MAX,
    T_MIN,
    fit_temperature,
    nll_at,
    scaled_metrics,
    validation_metrics,
)
from cohort.topology import DataConfig, topology_from_dict


def sampled(n: int, classes: int, scale: float, temperature: float, seed: int = 0):
    """Labels drawn from softmax(z) and logits z · T: the NLL-optimal temperature is T (as n grows)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=generator, dtype=torch.float64) * scale
    labels = torch.multinomial(z.softmax(dim=1), 1, generator=generator).flatten()
    return z * temperature, labels


def grid_minimum(logits: torch.Tensor, labels: torch.Tensor, points: int = 11, levels: int = 8) -> float:
    """An independent search: the NLL (written out here) on a grid of log T over [T_MIN, T_MAX], then
    on a grid between the best point's two neighbours, ``levels`` times (the NLL has one minimum
    along log T); the last grid's steps are 8e-6 of T. Small grids, more levels: 88 NLLs instead of
    41 x 4's 164, on tensors that fit in the cache (a third of the time)."""
    low, high = math.log(T_MIN), math.log(T_MAX)
    logits = logits.double()
    picked = logits.gather(1, labels[:, None]).T  # [1, N]: each sample's logit of its label
    for _ in range(levels):
        grid = torch.linspace(low, high, points, dtype=torch.float64)
        temperatures = grid.exp()[:, None]  # [points, 1]
        nll = (torch.logsumexp(logits / temperatures[:, :, None], dim=2) - picked / temperatures).mean(dim=1)
        best = int(nll.argmin())
        step = (high - low) / (points - 1)
        low, high = max(float(grid[best]) - step, math.log(T_MIN)), min(float(grid[best]) + step, math.log(T_MAX))
    return math.exp(float(grid[best]))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5, 4.0])
def test_the_fit_finds_the_temperature_the_logits_were_made_with(temperature):
    """The fit is the sample's NLL minimum (against a grid, to 1e-4), and that minimum is near the
    temperature the logits were made with (the population's optimum: 3 % at 20,000 samples)."""
    logits, labels = sampled(20000, 10, 2.0, temperature)
    fitted = fit_temperature(logits, labels)
    best = grid_minimum(logits, labels)
    assert fitted == pytest.approx(best, rel=1e-4)
    assert nll_at(logits, labels, fitted) <= nll_at(logits, labels, best) + 1e-10
    assert fitted == pytest.approx(temperature, rel=0.03)


def test_the_fit_agrees_with_a_brute_force_grid():
    logits, labels = sampled(3000, 7, 3.0, 1.7, seed=1)
    best = grid_minimum(logits, labels)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(best, rel=1e-4)
    assert nll_at(logits, labels, fitted) <= nll_at(logits, labels, best) + 1e-10


def test_overconfident_logits_are_cooled_and_calibration_improves():
    logits, labels = sampled(20000, 10, 1.5, 3.0, seed=2)  # 3x too confident
    out = scaled_metrics(logits[:10000], labels[:10000], logits[10000:], labels[10000:])
    from cohort.metrics import scores as metrics

    before = metrics.evaluate(logits[10000:], labels[10000:])
    assert out["ts_temperature"] == pytest.approx(3.0, rel=0.05)
    assert out["ece_ts"] < before["ece"] / 3 and out["nll_ts"] < before["nll"]
    assert set(out) == {"ts_temperature", "ece_ts", "adaece_ts", "nll_ts", "brier_ts"}


def test_the_fit_is_deterministic_and_bounded():
    logits, labels = sampled(500, 5, 2.0, 1.3, seed=3)
    assert fit_temperature(logits, labels) == fit_temperature(logits.clone(), labels.clone())
    # Labels that always disagree with the arg max: the NLL falls as T grows, up to the bound.
    wrong = (logits.argmax(dim=1) + 1) % 5
    assert fit_temperature(logits, wrong) == pytest.approx(T_MAX, rel=1e-4)
    with pytest.raises(ValueError, match="no validation samples"):
        fit_temperature(logits[:0], labels[:0])


def test_validation_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    out = validation_metrics(logits, labels)
    assert out["val_acc"] == pytest.approx(2 / 3)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (math.e + 1))
                 + math.log(1 / (math.exp(3) + 1))) / 3
    assert out["val_nll"] == pytest.approx(expected)


# --------------------------------------------------------------------------- the validation split


def test_validation_counts_by_hand():
    assert validation_counts([100, 10, 5, 2, 1, 0], 0.1) == [10, 1, 1, 1, 0, 0]  # at least one where a class has two
    assert validation_counts([3, 3], 0.9) == [2, 2]  # one always left for training
    assert validation_counts([50, 7], 0.0) == [0, 0]


def test_the_split_is_stratified_seeded_and_disjoint():
    config = DataConfig(val_fraction=0.2)
    data = load_dataset(config, seed=0)
    whole = load_dataset(DataConfig())
    assert data.info.val_size == sum(validation_counts(whole.info.train_class_counts, 0.2))
    assert data.info.train_size + data.info.val_size == whole.info.train_size
    assert describe_dataset(config) == data.info  # the plan's sizes are the loaded ones
    assert set(data.keep.tolist()).isdisjoint(data.val.tolist())
    counts = torch.bincount(data.val_targets, minlength=10).tolist()
    assert counts == validation_counts(whole.info.train_class_counts, 0.2)
    assert torch.equal(load_dataset(config, seed=0).val, data.val)  # the same images for the same seed
    assert not torch.equal(load_dataset(config, seed=1).val, data.val)
    # Validation batches are the held-out training images, unaugmented; training never serves them.
    images, labels = next(data.val_batches(1000))
    assert torch.equal(images, whole.train_x[data.val]) and torch.equal(labels, whole.train_y[data.val])
    served = torch.cat([inputs for inputs, _ in data.train_batches(64, 0, 1)])
    assert len(served) <= data.info.train_size


def test_the_split_is_carved_after_the_long_tail():
    config = DataConfig(dataset="digits", long_tail={"imbalance": 10}, val_fraction=0.1)
    tail_only = load_dataset(DataConfig(dataset="digits", long_tail={"imbalance": 10}))
    data = load_dataset(config, seed=0)
    assert data.info.val_size == sum(validation_counts(tail_only.info.train_class_counts, 0.1))
    assert set(data.val.tolist()) <= set(range(tail_only.info.train_size))
    assert min(torch.bincount(data.val_targets, minlength=10).tolist()) >= 1


def test_val_fraction_is_checked():
    from cohort.config.errors import CohortError

    base = {"name": "t", "peers": {"a": {"model": "mlp"}}, "edges": []}
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(CohortError, match="data.val_fraction"):
            topology_from_dict({**base, "data": {"val_fraction": bad}})
    with pytest.raises(CohortError, match="train.calibrate_every"):
        topology_from_dict({**base, "train": {"calibrate_every": -1}})


# --------------------------------------------------------------------------- cohort.evaluate's arithmetic


def test_evaluation_means_rows_and_mlflow_keys():
    from cohort.evaluation.logged_run import (
        mean_over_corruptions,
        render,
        result_rows,
        shift_metric_items,
    )

    def owners(acc):
        return {"student": {"acc": acc, "ece": 1 - acc}, "ensemble": {"acc": acc + 0.01, "ece": 0.5}}

    results = {("clean", 0): owners(0.9), ("fog", 1): owners(0.8), ("fog", 3): owners(0.6),
               ("snow", 1): owners(0.7), ("snow", 3): owners(0.4)}
    means = mean_over_corruptions(results)
    assert list(means) == [1, 3]
    assert means[1]["student"]["acc"] == pytest.approx(0.75) and means[3]["student"]["ece"] == pytest.approx(0.5)
    results.update({("mean", severity): value for severity, value in means.items()})
    rows = result_rows(results, "student")
    assert [(row["data"], row["severity"]) for row in rows] == [
        ("clean", 0), ("fog", 1), ("snow", 1), ("fog", 3), ("snow", 3), ("mean", 1), ("mean", 3)]
    text = render(rows, "table")
    assert text.splitlines()[0].split() == ["data", "severity", "peer", "top-1", "ece"]
    assert "clean  -         student  90.00%  0.1000" in text
    keys = {(key, step) for key, _, step in shift_metric_items(results)}
    assert ("shift/fog/student/acc", 3) in keys and ("shift/mean/ensemble/ece", 1) in keys
    assert not any(key.startswith("shift/clean") for key, _ in keys)


# --------------------------------------------------------------------------- cohort.evaluate's input


def test_severity_without_shift_is_refused_before_mlflow(tmp_path, capsys):
    from cohort.evaluate import main as evaluate

    code = evaluate(["0" * 32, "--severity", "3", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "--severity applies to corrupted test data: give it with --shift"
    assert not (tmp_path / "mlflow.db").exists()


class Payload:
    """A pickled object whose unpickling would create a folder: ``weights_only`` must never run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (self.marker,)


def test_a_pickled_object_in_a_runs_weights_is_one_line_and_never_runs(tmp_path, capsys):
    """cohort.evaluate reads a run's weights/<peer>.pt through the loader every checkpoint goes
    through (cohort.worker.peer.read_weights): a pickle payload is one line, and nothing in it executes."""
    from mlflow.tracking import MlflowClient

    from cohort.evaluate import main as evaluate

    uri = empty_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "artifacts")))
    topology = topology_from_dict({"name": "t", "peers": {"net": {"model": "mlp_tiny"}}})
    client.log_text(run.info.run_id, topology.to_yaml(), "topology.yaml")
    marker = tmp_path / "executed"
    (tmp_path / "weights").mkdir()
    torch.save({"weight": Payload(str(marker))}, tmp_path / "weights" / "net.pt")
    client.log_artifact(run.info.run_id, str(tmp_path / "weights" / "net.pt"), "weights")
    client.set_terminated(run.info.run_id)
    capsys.readouterr()  # MLflow's own lines creating the store

    code = evaluate([run.info.run_id, "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"run {run.info.run_id}: cannot load checkpoint 'weights/net.pt': cannot load "), err
    assert "as weights only" in err[0] and not marker.exists()
def test_shifted_results_on_other_data_have_their_own_keys():
    from cohort.evaluation.logged_run import same_test_data, shift_metric_items
    from cohort.topology import DataConfig

    run = DataConfig(dataset="parquet", root="/data/a.parquet")
    assert same_test_data(run, run.model_copy(update={"batch_size": 7, "eval_batch_size": 9, "val_fraction": 0.2}))
    assert not same_test_data(run, run.model_copy(update={"root": "/data/b.parquet"}))
    results = {("clean", 0): {"a": {"acc": 0.9}}, ("fog", 2): {"a": {"acc": 0.5}}, ("mean", 2): {"a": {"acc": 0.5}}}
    assert shift_metric_items(results, "parquet-0123abcd") == [("shift/data/parquet-0123abcd/fog/a/acc", 0.5, 2),
                                                               ("shift/data/parquet-0123abcd/mean/a/acc", 0.5, 2)]
    assert [key for key, _, _ in shift_metric_items(results)] == ["shift/fog/a/acc", "shift/mean/a/acc"]
