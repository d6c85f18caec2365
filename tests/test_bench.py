"""The benchmark's own pieces, without running it (a run takes minutes: `python -m bench.exchange`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.common import TEST_IMAGES, ratio, summarize, write_slice
from bench.exchange import EQUAL, bench_topology, main
from cohort.datasets import load_dataset

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10.parquet"


def test_missing_data_is_one_line_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.parquet"
    assert main(["--data", str(missing), "--quick", "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{missing}: no such file") and "--data PATH" in err and "\n" not in err
    assert not (tmp_path / "out.json").exists()


def test_ratios_pair_the_repeats():
    cohort, baseline = summarize([2.0, 4.0, 3.0]), summarize([4.0, 6.0, 9.0])
    assert cohort["median"] == 3.0 and (cohort["min"], cohort["max"]) == (2.0, 4.0)
    result = ratio(baseline, cohort, scale=2.0)
    assert result["value"] == pytest.approx(6.0 / 3.0 / 2.0)
    assert (result["min"], result["max"]) == pytest.approx((0.75, 1.5))


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"{SHARED_CIFAR} is absent (it ships beside the repo, not in it)")
def test_the_slice_is_real_cifar10_read_by_the_product_loader(tmp_path):
    path = write_slice(SHARED_CIFAR, tmp_path, train_images=3 * 64)
    topology = bench_topology("slice", EQUAL, path, epochs=2)
    data = load_dataset(topology.data)
    assert (data.info.train_size, data.info.test_size, data.info.input_size) == (3 * 64, TEST_IMAGES, (3, 32, 32))
    # Drawn at random from a table sorted by class: every class is there.
    assert min(data.info.train_class_counts) > 0 and data.info.class_names[0] == "airplane"
    assert len(list(data.train_batches(64, topology.seed, 1))) == 3


def test_a_bracketed_baseline_is_the_mean_of_before_and_after_repeat_by_repeat():
    from bench.exchange import bracketed

    before = {**summarize([1.0, 2.0, 3.0]), "cpu_seconds": summarize([1.0, 1.0, 1.0])}
    after = {**summarize([3.0, 2.0, 5.0]), "cpu_seconds": summarize([3.0, 1.0, 1.0])}
    baseline = bracketed(before, after)
    assert baseline["values"] == [2.0, 2.0, 4.0] and baseline["median"] == 2.0
    assert baseline["cpu_seconds"]["values"] == [2.0, 1.0, 1.0]


def test_the_live_display_is_met_only_within_the_noise_of_two_runs_without_it():
    """The step counter's ratio against the largest deviation from 1 of the off/off ratio (its median,
    its smallest and largest repeat)."""
    from bench.exchange import display_rows

    noise = {"value": 0.99, "min": 0.97, "max": 1.02}  # two runs without the counter differ by up to 3%
    within = {"overhead": {"value": 1.025, "min": 1.0, "max": 1.05}, "noise": noise, "step_messages_per_epoch": 12.0}
    row, noise_row = display_rows(within)
    assert row[0].endswith("(2 × resnet20; 12.0 messages an epoch)") and row[1] == "1.025 (1.000–1.050)"
    assert row[2] == "1 within noise (±0.030): met" and noise_row[1] == "0.990 (0.970–1.020)"
    beyond = {**within, "overhead": {"value": 1.04, "min": 1.03, "max": 1.05}}
    assert display_rows(beyond)[0][2] == "1 within noise (±0.030): missed"


def test_display_only_refuses_missing_data_before_starting_anything(tmp_path, capsys):
    missing = tmp_path / "nowhere.parquet"
    assert main(["--display-only", "--data", str(missing), "--quick", "--out", str(tmp_path / "d.json")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"{missing}: no such file")
    assert not (tmp_path / "d.json").exists()


def test_the_representations_row_shows_each_methods_bytes_and_its_step_against_logits():
    from bench.exchange import representation_rows

    entry = lambda median, sent: {"median": median, "min": median, "max": median, "exchange_bytes": sent}  # noqa: E731
    results = {"step_seconds": {"logits": entry(0.1, 5120), "mcl": entry(0.12, 70656), "attention": entry(0.15, 1.0e6)},
               "step_ratio": {"mcl": {"value": 1.2, "min": 1.1, "max": 1.3},
                              "attention": {"value": 1.5, "min": 1.4, "max": 1.6}}}
    logits, mcl, attention = representation_rows(results)
    assert "5,120 bytes a step" in logits[0] and logits[1] == "100 ms (100–100)"
    assert "embeddings (MCL): 70,656 bytes a step" in mcl[0] and mcl[1] == "120 ms (120–120); 1.20 (1.10–1.30)"
    assert "attention maps (AT): 1,000,000 bytes" in attention[0]


def test_representations_refuse_missing_data_before_starting_anything(tmp_path, capsys):
    missing = tmp_path / "nowhere.parquet"
    assert main(["--representations", "--data", str(missing), "--quick", "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"{missing}: no such file")
    assert not (tmp_path / "r.json").exists()


def test_data_memory_pieces(tmp_path):
    """bench.data_memory without a run: its short epochs, its topologies, its process tree and PSS."""
    import os
    import pickle
    import subprocess

    from bench.data_memory import FewSteps, cohort_topology, descendants, per_extra_peer, pss_kb, sample
    from cohort.topology import DataConfig, topology_from_dict

    digits = load_dataset(DataConfig())
    short = pickle.loads(pickle.dumps(FewSteps(digits, 3)))
    assert len(list(short.train_batches(64, 0, 1))) == 3 and short.info == digits.info
    for (x, y), (x0, y0) in zip(short.test_batches(100), digits.test_batches(100), strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    ring = topology_from_dict(cohort_topology(4, "parquet", tmp_path / "t.parquet"))
    assert len(ring.peers) == 4 and len(ring.edges) == 4 and ring.train.epochs == 1
    assert not topology_from_dict(cohort_topology(1, "digits", tmp_path)).edges

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in descendants(os.getpid())
        sizes = pss_kb(os.getpid())
        assert sizes["pss"] > 0 and set(sizes) == {"pss", "anon", "file", "shmem"}
        now = sample(os.getpid())
        assert now["processes"] >= 2 and now["total"] == pytest.approx(now["driver"] + now["workers"] + now["ray"])
    finally:
        child.kill()
        child.wait()
    runs = {"1": {"peak_mb": {"total": 1000.0}}, "4": {"peak_mb": {"total": 2500.0}}}
    assert per_extra_peer(runs) == 500.0 and per_extra_peer({"2": runs["1"]}) is None


def test_parquet_load_bench_names_a_missing_table_in_one_line(tmp_path, capsys):
    from bench.parquet_load import main as parquet_load

    missing = tmp_path / "nowhere.parquet"
    assert parquet_load(["--data", str(missing), "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{missing}: no such file: give the table with --data PATH" and not (tmp_path / "out.json").exists()
