"""Shifted test sets: the 15 corruptions on real images, seeding, the cache, and bad input."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import empty_store
from PIL import Image

from cohort.config.errors import CohortError
from cohort.datasets.long_tail import LongTailed
from cohort.datasets.registry import load_dataset
from cohort.evaluation import shift
from cohort.topology import DataConfig

pytest.importorskip("imagecorruptions", reason="the shift extra (imagecorruptions-imaug) is not installed")

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10.parquet"
needs_shared_cifar = pytest.mark.skipif(not SHARED_CIFAR.exists(),
                                        reason=f"real CIFAR-10 images are not at {SHARED_CIFAR}")
NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
# Corruptions whose damage grows at every step of severity; the library's parameters for glass
# blur, snow, frost and fog do not make it grow at every step (it still grows from 1 to 5).
MONOTONE = NOISE + ("defocus_blur", "motion_blur", "zoom_blur", "brightness", "contrast", "elastic_transform",
                    "pixelate", "jpeg_compression")


@pytest.fixture(scope="module")
def cifar_images() -> torch.Tensor:
    """Four real CIFAR-10 test images (of four classes) as uint8 [4, 3, 32, 32]."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"real CIFAR-10 images are not at {SHARED_CIFAR}")
    table = pq.read_table(SHARED_CIFAR, columns=["split", "image"])
    test = table.filter(pa.compute.equal(table["split"], "test")).take([0, 2500, 5000, 7500])
    images = [np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")) for blob in test["image"].to_pylist()]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def damage(cifar_images) -> dict[str, list[float]]:
    """Every corruption at every severity: the mean absolute change of the pixels, checked on the way."""
    table = {}
    for corruption in shift.CORRUPTIONS:
        table[corruption] = []
        for severity in shift.SEVERITIES:
            out = shift.corrupt_images(cifar_images, corruption, severity, seed=0)
            assert out.dtype == torch.uint8 and out.shape == cifar_images.shape, (corruption, severity)
            table[corruption].append(float((out.float() - cifar_images.float()).abs().mean()))
    return table


def synthetic(count: int = 3, channels: int = 3, size: int = 32) -> torch.Tensor:
    """Smooth images with some structure: gradients and a bright square."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for n in range(count):
        planes = [(x * (4 + n + c) + y * (2 + c)) % 200 + 20 for c in range(channels)]
        image = torch.stack(planes).float()
        image[:, 8 + n:16 + n, 10:20] = 240
        images.append(image)
    return torch.stack(images).to(torch.uint8)


# --------------------------------------------------------------------------- the corruptions


def test_the_fifteen_standard_corruptions_in_order():
    from imagecorruptions import get_corruption_names

    assert len(shift.CORRUPTIONS) == 15
    assert list(shift.CORRUPTIONS) == get_corruption_names("common")


@needs_shared_cifar
def test_every_corruption_changes_the_images_and_more_at_higher_severity(damage):
    for corruption, changes in damage.items():
        assert min(changes) > 1.0, (corruption, changes)  # every severity changes the image
        assert changes[-1] > changes[0], (corruption, changes)
    for corruption in MONOTONE:
        assert all(a < b for a, b in zip(damage[corruption], damage[corruption][1:])), (corruption, damage[corruption])


def test_contrast_against_its_formula():
    # CIFAR-10-C contrast: each channel pulled towards its mean by the factor 0.2 at severity 3;
    # the library truncates to uint8.
    images = synthetic()
    out = shift.corrupt_images(images, "contrast", 3, seed=0)
    x = images.double() / 255
    mean = x.mean(dim=(2, 3), keepdim=True)
    expected = (((x - mean) * 0.2 + mean).clamp(0, 1) * 255).floor().to(torch.uint8)
    difference = (out.int() - expected.int()).abs()
    assert int(difference.max()) <= 1 and float((difference == 0).float().mean()) > 0.99


@needs_shared_cifar
def test_same_seed_same_bytes_other_seed_other_noise(cifar_images):
    for corruption in shift.CORRUPTIONS:
        first = shift.corrupt_images(cifar_images, corruption, 3, seed=7)
        assert torch.equal(first, shift.corrupt_images(cifar_images, corruption, 3, seed=7)), corruption
    # impulse noise and glass blur draw from generators of their own (scikit-image's, numba's)
    for corruption in NOISE + ("glass_blur",):
        assert not torch.equal(shift.corrupt_images(cifar_images, corruption, 3, seed=7),
                               shift.corrupt_images(cifar_images, corruption, 3, seed=8)), corruption


def test_results_do_not_depend_on_batching_and_leave_numpy_alone():
    images = synthetic(4)
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    whole = shift.corrupt_images(images, "gaussian_noise", 2, seed=1)
    assert np.random.rand() == expected_draw  # numpy's global generator is restored
    parts = torch.cat([shift.corrupt_images(images[:1], "gaussian_noise", 2, seed=1),
                       shift.corrupt_images(images[1:], "gaussian_noise", 2, seed=1, start=1)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1] - images[1] + images[0])  # each image draws its own noise


def test_one_channel_images_are_corrupted_as_gray_and_stay_one_channel():
    gray = synthetic(2, channels=1)
    for corruption in ("gaussian_noise", "frost", "defocus_blur"):
        out = shift.corrupt_images(gray, corruption, 3, seed=0)
        assert out.shape == gray.shape and out.dtype == torch.uint8
        assert not torch.equal(out, gray)
        rgb = shift.corrupt_images(gray.repeat(1, 3, 1, 1), corruption, 3, seed=0).double()
        luma = (rgb * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
        assert torch.equal(out, luma.round().clamp(0, 255).to(torch.uint8)), corruption


def test_small_images_are_refused():
    with pytest.raises(CohortError, match="at least 32x32 pixels, not 8x8"):
        shift.corrupt_images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "fog", 1, seed=0)
    digits = load_dataset(DataConfig(dataset="digits"))
    assert shift.corruptions_for(digits.info) == ()
    with pytest.raises(CohortError) as error:
        shift.shifted_dataset(digits, "gaussian_noise", 1, seed=0)
    assert str(error.value) == ("shifted data needs images of at least 32x32 pixels with 1 or 3 channels; digits "
                                "images are 1x8x8 (channels x height x width)")


# --------------------------------------------------------------------------- names and severities


def test_parse_corruptions():
    assert shift.parse_corruptions("all") == list(shift.CORRUPTIONS)
    assert shift.parse_corruptions("fog, gaussian_noise,fog") == ["fog", "gaussian_noise"]
    with pytest.raises(CohortError) as error:
        shift.parse_corruptions("fog,gausian_noise")
    message = str(error.value)
    assert message.startswith("--shift: unknown corruption 'gausian_noise' (did you mean 'gaussian_noise'?); known: "
                              "all, gaussian_noise, shot_noise,")
    assert "\n" not in message and all(name in message for name in shift.CORRUPTIONS)
    with pytest.raises(CohortError, match="unknown corruption an empty name"):
        shift.parse_corruptions("fog,")


@pytest.mark.parametrize("text, expected", [("3", [3]), ("1-5", [1, 2, 3, 4, 5]), ("1,3", [1, 3]),
                                            ("4,1-2", [1, 2, 4]), (" 2 ", [2])])
def test_parse_severities(text, expected):
    assert shift.parse_severities(text) == expected


@pytest.mark.parametrize("text, message", [("0", "'0': severities go from 1 to 5"), ("6", "'6': severities"),
                                           ("1-6", "'1-6': severities"), ("5-1", "'5-1': severities"),
                                           ("high", "'high' is not a severity"), ("", "'' is not a severity")])
def test_bad_severities(text, message):
    with pytest.raises(CohortError) as error:
        shift.parse_severities(text)
    assert str(error.value).startswith(f"--severity: {message}") and "\n" not in str(error.value)


def test_bad_arguments_to_the_library():
    with pytest.raises(CohortError, match="unknown corruption 'blur'"):
        shift.corrupt_images(synthetic(1), "blur", 1, seed=0)
    with pytest.raises(CohortError, match="6: severities go from 1 to 5"):
        shift.corrupt_images(synthetic(1), "fog", 6, seed=0)


# --------------------------------------------------------------------------- datasets and the cache


def image_table(path: Path, train: int = 6, test: int = 4, size: int = 32) -> Path:
    rows = []
    for split, count in (("train", train), ("test", test)):
        for n, image in enumerate(synthetic(count, size=size)):
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            rows.append((buffer.getvalue(), n % 2, split))
    pq.write_table(pa.table({"image": [r[0] for r in rows], "label": [r[1] for r in rows],
                             "split": [r[2] for r in rows]}), path)
    return path


def batches(iterator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in iterator]


def test_shifted_parquet_dataset(tmp_path):
    data = load_dataset(DataConfig(dataset="parquet", root=str(image_table(tmp_path / "t.parquet"))))
    shifted = shift.shifted_dataset(data, "shot_noise", 4, seed=3, cache_dir=tmp_path / "cache")
    assert shifted.info.test_size == data.info.test_size and shifted.info.train_class_counts == data.info.train_class_counts
    assert shifted.info.notes[-1] == "test split: shot_noise at severity 4 (seed 3)"
    for (x, y), (x0, y0) in zip(shifted.train_batches(4, seed=1, epoch=2), data.train_batches(4, seed=1, epoch=2)):
        assert torch.equal(x, x0) and torch.equal(y, y0)  # training is untouched
    (x, y), = batches(shifted.test_batches(64))
    (x0, y0), = batches(data.test_batches(64))
    assert torch.equal(y, y0)
    expected = shift.corrupt_images(data.test_images, "shot_noise", 4, seed=3)
    assert torch.allclose(x, (expected.float() / 255 - data.mean) / data.std)
    assert not torch.allclose(x, x0)


def test_a_streamed_parquet_table_is_corrupted_as_the_one_held_in_memory(tmp_path):
    root = str(image_table(tmp_path / "t.parquet"))
    memory = load_dataset(DataConfig(dataset="parquet", root=root))
    streamed = load_dataset(DataConfig(dataset="parquet", root=root, pipeline="stream"))
    clean, labels, mean, std = shift.clean_test_split(streamed)
    assert torch.equal(clean, memory.test_images) and torch.equal(labels, memory.test_labels)
    assert torch.equal(mean, streamed.mean.flatten()) and torch.equal(std, streamed.std.flatten())
    shifted = shift.shifted_dataset(streamed, "shot_noise", 4, seed=3, cache_dir=tmp_path / "cache")
    (x, _), = batches(shifted.test_batches(64))
    expected = shift.corrupt_images(memory.test_images, "shot_noise", 4, seed=3)
    assert torch.allclose(x, (expected.float() / 255 - streamed.mean) / streamed.std)


def test_the_cache_is_used_and_keyed(tmp_path, monkeypatch):
    data = load_dataset(DataConfig(dataset="parquet", root=str(image_table(tmp_path / "t.parquet"))))
    first = shift.shifted_dataset(data, "fog", 2, seed=0, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith("parquet-") and "-fog-s2-seed0-" in files[0].name

    def no_corruption(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(shift, "corrupt_images", no_corruption)
    again = shift.shifted_dataset(data, "fog", 2, seed=0, cache_dir=tmp_path / "cache")
    assert torch.equal(again.test_images, first.test_images)
    with pytest.raises(AssertionError, match="not used"):  # another seed is another entry
        shift.shifted_dataset(data, "fog", 2, seed=1, cache_dir=tmp_path / "cache")
    monkeypatch.undo()

    files[0].write_bytes(b"damaged")  # a damaged entry is generated again, and replaced
    repaired = shift.shifted_dataset(data, "fog", 2, seed=0, cache_dir=tmp_path / "cache")
    assert torch.equal(repaired.test_images, first.test_images)
    assert torch.equal(torch.load(files[0], weights_only=True), first.test_images)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [files[0].name]  # no temporary files left


def test_default_cache_dir_follows_cohort_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COHORT_CACHE", str(tmp_path / "elsewhere"))
    assert shift.default_cache_dir() == tmp_path / "elsewhere" / "shift"
    data = load_dataset(DataConfig(dataset="parquet", root=str(image_table(tmp_path / "t.parquet"))))
    shift.shifted_dataset(data, "pixelate", 1, seed=0)
    assert len(list((tmp_path / "elsewhere" / "shift").glob("parquet-*-pixelate-s1-seed0-*.pt"))) == 1
    monkeypatch.delenv("COHORT_CACHE")
    assert shift.default_cache_dir() == Path.home() / ".cache" / "cohort" / "shift"


def test_long_tailed_sets_corrupt_the_underlying_test_images(tmp_path):
    data = load_dataset(DataConfig(dataset="parquet", root=str(image_table(tmp_path / "t.parquet", train=10))))
    tailed = LongTailed(data, imbalance=2.0, profile="exponential")
    shifted = shift.shifted_dataset(tailed, "jpeg_compression", 5, seed=0, cache_dir=tmp_path)
    plain = shift.shifted_dataset(data, "jpeg_compression", 5, seed=0, cache_dir=tmp_path)
    assert torch.equal(shifted.test_images, plain.test_images)
    assert shifted.info.train_size == tailed.info.train_size < data.info.train_size
    assert torch.equal(shifted.train_targets, tailed.train_targets)
    # shifting a shifted set corrupts the clean images, not the corrupted ones
    twice = shift.shifted_dataset(shifted, "jpeg_compression", 5, seed=0, cache_dir=tmp_path)
    assert torch.equal(twice.test_images, plain.test_images)


def test_image_folders_are_corrupted_as_the_network_sees_them(tmp_path):
    for split in ("train", "val"):
        for index, name in enumerate(("cat", "dog")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for n in range(2):
                Image.new("RGB", (50, 40), (40 * index + 20 * n, 100, 200)).save(folder / f"{n}.png")
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=32))
    clean, labels, mean, std = shift.clean_test_split(data)
    assert clean.shape == (4, 3, 32, 32) and clean.dtype == torch.uint8
    (x0, y0), = batches(data.test_batches(8))
    assert torch.equal(labels, y0)
    assert torch.allclose((clean.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), x0, atol=1e-5)
    shifted = shift.shifted_dataset(data, "brightness", 5, seed=0, cache_dir=tmp_path / "cache")
    (x, y), = batches(shifted.test_batches(8))
    assert torch.equal(y, y0) and float(x.mean()) > float(x0.mean())  # brighter

    def unreadable(path):
        raise AssertionError(f"read {path} again")

    data.test.loader = unreadable  # the test images were read once, for the first setting
    shift.shifted_dataset(data, "brightness", 4, seed=0, cache_dir=tmp_path / "cache")


def test_without_the_library_one_line(monkeypatch):
    monkeypatch.setattr(shift, "library_version", lambda: "unknown")
    with pytest.raises(CohortError) as error:
        shift.corrupt_images(synthetic(1), "fog", 1, seed=0)
    assert str(error.value) == "shifted data needs the imagecorruptions-imaug package: pip install 'cohort[shift]'"


# --------------------------------------------------------------------------- cohort.evaluate --shift, without Ray


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A finished cohort run on a parquet table of 32x32 images (2 classes), as the driver leaves one:
    its topology and its peers' final weights (untrained: the metrics' values do not matter here)."""
    from cohort.topology import topology_from_dict
    from cohort.tracking.tracker import Tracker
    from cohort.worker.peer import build_peer

    folder = tmp_path_factory.mktemp("evaluate")
    topology = topology_from_dict({
        "name": "image-run", "seed": 1, "data": {"dataset": "parquet", "root": str(image_table(folder / "own.parquet"))},
        "peers": {"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}},
        "edges": [{"from": "a", "to": "b", "loss": "kd"}]})
    data = load_dataset(topology.data)
    uri = empty_store(folder / "mlflow.db")
    tracker = Tracker(uri, topology.experiment)
    run_id = tracker.start(topology)
    (folder / "weights").mkdir()
    for peer in topology.peer_names:
        torch.manual_seed(0)
        torch.save(build_peer(topology, peer, data.info).state_dict(), folder / "weights" / f"{peer}.pt")
        tracker.log_file(folder / "weights" / f"{peer}.pt", "weights")
    tracker.finish("FINISHED")
    other = image_table(folder / "other.parquet", test=5)  # the same classes, other test images
    return {"uri": uri, "run_id": run_id, "folder": folder, "other": other, "client": tracker.client}


def evaluate_run(image_run, *argv: str) -> int:
    from cohort.evaluate import main as evaluate

    return evaluate([image_run["run_id"], "--tracking-uri", image_run["uri"], "--quiet", *argv])


def shift_keys(image_run) -> dict[str, float]:
    metrics = image_run["client"].get_run(image_run["run_id"]).data.metrics
    return {key: value for key, value in metrics.items() if key.startswith("shift/")}


def test_shifted_results_on_other_data_go_under_keys_that_name_it(image_run, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("COHORT_CACHE", str(tmp_path / "cache"))
    client, run_id = image_run["client"], image_run["run_id"]
    own = ["--shift", "pixelate", "--severity", "2", "--out", str(tmp_path / "own")]
    assert evaluate_run(image_run, *own) == 0, capsys.readouterr().err
    first = shift_keys(image_run)
    assert "shift/pixelate/b/acc" in first and "shift/mean/ensemble/ece" in first
    other = ["--shift", "pixelate", "--severity", "2", "--set", f"data.root={image_run['other']}",
             "--out", str(tmp_path / "other")]
    assert evaluate_run(image_run, *other) == 0, capsys.readouterr().err
    assert evaluate_run(image_run, *other, "--overwrite") == 0, capsys.readouterr().err  # again: idempotent
    added = {key: value for key, value in shift_keys(image_run).items() if key not in first}
    label = next(iter(added)).split("/")[2]
    assert label.startswith("parquet-") and set(added) == {key.replace("shift/", f"shift/data/{label}/", 1)
                                                           for key in first}
    for key, value in first.items():  # the run's own keys hold their one value, from the run's test split
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(2, value)], key
    for key in added:
        assert len(client.get_metric_history(run_id, key)) == 1, key
    assert (tmp_path / "own" / "shift_severity.png").is_file()
    assert (tmp_path / "other" / f"shift_severity_{label}.png").is_file()
    logged = {}
    for prefix in ("shift", f"shift/data/{label}"):
        path = client.download_artifacts(run_id, f"{prefix}/shift_results.json", str(tmp_path / prefix))
        logged[prefix] = json.loads(Path(path).read_text())
    assert logged["shift"]["data"]["source"] == "the run's test split" and logged["shift"]["data"]["test_images"] == 4
    assert logged[f"shift/data/{label}"]["data"] | {"section": None} == {
        "source": "other data", "label": label, "keys": f"shift/data/{label}/<corruption>/<peer>/<metric>",
        "dataset": "parquet", "test_images": 5, "fingerprint": logged[f"shift/data/{label}"]["data"]["fingerprint"],
        "section": None, "data_file": None}
    assert logged[f"shift/data/{label}"]["data"]["section"]["root"] == str(image_run["other"])
    assert set(logged["shift"]["results"]) == {"clean/0", "pixelate/2", "mean/2"}


def test_the_python_api_evaluates_as_the_command_does(image_run, tmp_path, monkeypatch, capsys):
    """cohort.evaluate_run (docs/python-api.md): its table is the command's --format csv, row for row; it
    says where the shifted results went (the command's keys) and where the figure is."""
    import csv
    import io
    import math

    import cohort

    monkeypatch.setenv("COHORT_CACHE", str(tmp_path / "cache"))
    argv = ["--shift", "pixelate", "--severity", "2", "--format", "csv"]
    assert evaluate_run(image_run, *argv, "--out", str(tmp_path / "command")) == 0
    printed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    result = cohort.evaluate_run(image_run["run_id"], tracking_uri=image_run["uri"], shift=["pixelate"], severity=2,
                             out=tmp_path / "api")
    assert capsys.readouterr().out.strip()  # 'quiet': the table only
    table = result.table()
    assert len(table) == len(printed) == 9  # clean, pixelate 2 and their mean: a, b, ensemble each
    for row, line in zip(table.to_dict("records"), printed):
        assert (row["data"], str(row["severity"]), row["peer"]) == (line["data"], line["severity"], line["peer"])
        for key, value in line.items():
            if key not in ("data", "severity", "peer"):
                assert math.isclose(row[key], float(value), rel_tol=1e-12), (key, row, line)
    assert result.run_id == image_run["run_id"] and result.logged_under == "shift/"
    assert result.figure == tmp_path / "api" / "shift_severity.png" and result.figure.is_file()
    logged = shift_keys(image_run)
    assert logged["shift/pixelate/ensemble/acc"] == pytest.approx(
        table.query("data == 'pixelate' and peer == 'ensemble'")["acc"].item())
    with pytest.raises(cohort.CohortError, match="^--severity applies to corrupted test data"):
        cohort.evaluate_run(image_run["run_id"], tracking_uri=image_run["uri"], severity=3)


def write_data_file(path: Path, root: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"data": {"dataset": "parquet", "root": str(root)}}))
    return path


@pytest.mark.parametrize("case", ["existing figure", "folder as figure", "file as folder", "under a file", "control characters in --out",
                                  "control characters in --peer", "--data that cannot be shifted",
                                  "--data that does not exist"])
def test_bad_input_is_one_line_before_anything_is_logged(image_run, tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv("COHORT_CACHE", str(tmp_path / "cache"))
    shift_args = ["--shift", "pixelate", "--severity", "1"]
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "shift_severity.png").write_bytes(b"an earlier figure")
    (tmp_path / "folders" / "shift_severity.png").mkdir(parents=True)
    small = write_data_file(tmp_path / "small.yaml", image_table(tmp_path / "small.parquet", size=16))
    argv, expected = {
        "existing figure": (["--out", str(tmp_path / "earlier")],
                            f"--out: {str(tmp_path / 'earlier' / 'shift_severity.png')!r} exists: give --overwrite to "
                            "replace it, or another --out"),
        "folder as figure": (["--out", str(tmp_path / "folders")],
                             f"--out: {str(tmp_path / 'folders' / 'shift_severity.png')!r} is a folder, not a file"),
        "file as folder": (["--out", str(tmp_path / "taken")], f"--out: {str(tmp_path / 'taken')!r} is a file, not a folder"),
        "under a file": (["--out", str(tmp_path / "taken" / "figures")],
                         f"--out: {str(tmp_path / 'taken')!r} is a file, not a folder"),
        "control characters in --out": (["--out", str(tmp_path / "taken" / "a\x1b[2Jb\rc")],
                                        f"--out: {str(tmp_path / 'taken')!r} is a file, not a folder"),
        "control characters in --peer": (["--peer", "gh\x1b[2Jost\n"], "--peer 'gh\\x1b[2Jost\\n': the run has a, b, "
                                                                       "ensemble"),
        "--data that cannot be shifted": (["--data", str(small)],
                                          "--shift: shifted data needs images of at least 32x32 pixels with 1 or 3 "
                                          "channels; parquet images are 3x16x16 (channels x height x width)"),
        "--data that does not exist": (["--data", str(tmp_path / "absent.yaml")], f"{tmp_path / 'absent.yaml'}: no such file"),
    }[case]
    before = shift_keys(image_run)
    code = evaluate_run(image_run, *shift_args, *argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(expected), err
    assert shift_keys(image_run) == before  # nothing logged
    assert (tmp_path / "earlier" / "shift_severity.png").read_bytes() == b"an earlier figure"
    assert not (tmp_path / "cache").exists()  # nothing corrupted: refused before the work
