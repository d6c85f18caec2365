"""Datasets: identical batches on every peer, the CIFAR augmentation, and each loader's bad input."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cohort.config.errors import CohortError
from cohort.datasets import ImageArrays, batch_seed, load_dataset
from cohort.topology import DataConfig

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10.parquet"
needs_shared_cifar = pytest.mark.skipif(not SHARED_CIFAR.exists(),
                                        reason=f"{SHARED_CIFAR} is absent (it ships beside the repo, not in it)")


def encoded(color: tuple[int, int, int], size: int = 8, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_table(path: Path, rows: list[tuple[bytes, int, str]], columns=("image", "label", "split"),
                classes: str | None = "red,green,blue") -> Path:
    data = {"image": [r[0] for r in rows], "label": [r[1] for r in rows], "split": [r[2] for r in rows]}
    table = pa.table({name: data[name] for name in columns})
    if classes:
        table = table.replace_schema_metadata({"classes": classes})
    pq.write_table(table, path)
    return path


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def tiny_rows(bad: int = 0) -> list[tuple[bytes, int, str]]:
    rows = [(encoded(COLORS[i % 3]), i % 3, "train") for i in range(12)]
    rows += [(encoded(COLORS[i % 3], fmt="JPEG"), i % 3, "test") for i in range(6)]
    rows += [(b"not an image at all", 0, "train")] * bad
    return rows


def all_batches(iterator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in iterator]


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


# --------------------------------------------------------------------------- identical batches


def test_digits_split_and_identical_batches():
    data = load_dataset(DataConfig())
    assert (data.info.train_size, data.info.test_size, data.info.num_classes) == (1437, 360, 10)
    first = all_batches(data.train_batches(64, seed=5, epoch=2))
    assert_same_batches(first, all_batches(load_dataset(DataConfig()).train_batches(64, seed=5, epoch=2)))
    other_epoch = all_batches(data.train_batches(64, seed=5, epoch=3))
    assert not torch.equal(first[0][1], other_epoch[0][1])
    assert sum(len(y) for _, y in first) == 1437


def test_batches_do_not_depend_on_num_workers(tmp_path):
    data = load_dataset(DataConfig(dataset="parquet", root=str(write_table(tmp_path / "t.parquet", tiny_rows()))))
    in_process = all_batches(data.train_batches(5, seed=1, epoch=1, num_workers=0))
    in_workers = all_batches(data.train_batches(5, seed=1, epoch=1, num_workers=2))
    assert_same_batches(in_process, in_workers)
    assert_same_batches(all_batches(data.test_batches(4, 0)), all_batches(data.test_batches(4, 2)))


def test_final_batch_of_one_sample_is_folded_in():
    data = load_dataset(DataConfig())
    sizes = [len(y) for _, y in data.train_batches(1436, seed=0, epoch=1)]
    assert sizes == [1437]


# --------------------------------------------------------------------------- the CIFAR augmentation


def test_augmentation_is_a_padded_crop_and_a_flip_seeded_by_the_batch():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(6)
    data = ImageArrays("t", (images, labels), (images, labels), 6, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    seed = batch_seed(0, 1, 0)
    augmented = data._augment(images, seed)
    assert torch.equal(augmented, data._augment(images, seed))
    assert not torch.equal(augmented, data._augment(images, batch_seed(0, 1, 1)))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for image, crop in zip(padded, augmented):
        windows = [image[:, top:top + 8, left:left + 8] for top in range(9) for left in range(9)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(-1)) for w in windows)
    normalized, _ = data.make_batch(torch.arange(6), train=False, seed=0)
    torch.testing.assert_close(normalized, images.float() / 255)


# --------------------------------------------------------------------------- parquet


def test_parquet_table(tmp_path):
    data = load_dataset(DataConfig(dataset="parquet", root=str(write_table(tmp_path / "t.parquet", tiny_rows()))))
    info = data.info
    assert (info.train_size, info.test_size, info.num_classes, info.in_channels) == (12, 6, 3, 3)
    assert info.class_names == ("red", "green", "blue") and info.train_class_counts == (4, 4, 4)
    assert info.notes == ()
    inputs, labels = next(iter(data.test_batches(6)))
    assert inputs.shape == (6, 3, 8, 8)
    # Test images are not augmented: a solid red image stays solid, channel 0 brightest.
    red = inputs[labels == 0][0]
    assert red[0].std() < 1e-4 and red[0].mean() > red[1].mean()


def test_parquet_directory_of_files(tmp_path):
    rows = tiny_rows()
    write_table(tmp_path / "a.parquet", rows[:12])
    write_table(tmp_path / "b.parquet", rows[12:])
    data = load_dataset(DataConfig(dataset="parquet", root=str(tmp_path)))
    assert (data.info.train_size, data.info.test_size) == (12, 6)


def test_parquet_undecodable_rows_are_skipped_and_reported(tmp_path):
    data = load_dataset(DataConfig(dataset="parquet", root=str(write_table(tmp_path / "t.parquet", tiny_rows(bad=2)))))
    assert data.info.train_size == 12
    assert data.info.notes == ("skipped 2 undecodable image(s) in t.parquet (rows 18, 19)",)


@pytest.mark.filterwarnings("ignore:.*torchcodec:UserWarning", "ignore::DeprecationWarning")
def test_decoded_images_fill_one_tensor_around_rows_that_do_not_decode():
    """Each decoded image in its row's place of one tensor (bad rows left out), as decoding each alone."""
    import torchvision.io

    from cohort.datasets.parquet import decode_images

    blobs = [b"junk", encoded((10, 20, 30)), encoded((200, 100, 0), fmt="JPEG"), b"junk", encoded((0, 0, 255))]
    images, good = decode_images(blobs, None)
    assert good == [1, 2, 4] and images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    for image, row in zip(images, good, strict=True):
        alone = torchvision.io.decode_image(torch.frombuffer(bytearray(blobs[row]), dtype=torch.uint8),
                                            mode=torchvision.io.ImageReadMode.RGB)
        assert torch.equal(image, alone)
    first, good = decode_images(blobs, None, stop_at_first=True)
    assert good == [1] and torch.equal(first, images[:1])
    nothing, good = decode_images([b"junk"], None)
    assert good == [] and nothing.numel() == 0


@pytest.mark.parametrize("count, chunk", [(1, 1024), (7, 3), (300, 64), (300, 1024)])
def test_channel_statistics_are_torch_float64s_without_a_float_copy(count, chunk):
    """The normalization's per-channel mean and std (Bessel-corrected) of ``pixels / 255``, from
    integer sums chunk by chunk: torch's float64 figures on the whole tensor."""
    from cohort.datasets.augment import channel_statistics

    generator = torch.Generator().manual_seed(count)
    images = torch.randint(0, 256, (count, 3, 5, 4), generator=generator, dtype=torch.uint8)
    mean, std = channel_statistics(images, chunk=chunk)
    pixels = images.double() / 255
    assert mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), rel=1e-13)
    assert std == pytest.approx(pixels.std(dim=(0, 2, 3)).tolist(), rel=1e-12)
    # By hand: two pixels per channel, 0 and 255 (mean 1/2, std sqrt(1/2)); a constant channel has no spread.
    two = torch.tensor([[[[0]], [[255]], [[7]]], [[[255]], [[0]], [[7]]]], dtype=torch.uint8)
    assert channel_statistics(two) == (pytest.approx([0.5, 0.5, 7 / 255]), pytest.approx([0.5 ** 0.5, 0.5 ** 0.5, 0.0]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_parquet_splits_are_decoded_apart_in_the_tables_order(tmp_path):
    """Rows of both splits interleaved, a bad one in each: each split holds its images in the table's
    order, the notes name the bad rows by their row in the table, and a test image whose size differs
    from the training images' is refused naming its row."""
    import torchvision.io

    colors = [(10 * n, 255 - 10 * n, 7 * n) for n in range(10)]
    rows = [(encoded(colors[n]), n % 3, "train" if n % 2 == 0 else "test") for n in range(10)]
    rows[4] = (b"junk", 1, "train")
    rows[7] = (b"junk", 1, "test")
    data = load_dataset(DataConfig(dataset="parquet", root=str(write_table(tmp_path / "t.parquet", rows))))

    def alone(row):
        return torchvision.io.decode_image(torch.frombuffer(bytearray(rows[row][0]), dtype=torch.uint8),
                                           mode=torchvision.io.ImageReadMode.RGB)

    for images, labels, kept in ((data.train_images, data.train_labels, [0, 2, 6, 8]),
                                 (data.test_images, data.test_labels, [1, 3, 5, 9])):
        assert torch.equal(images, torch.stack([alone(row) for row in kept]))
        assert labels.tolist() == [rows[row][1] for row in kept]
    assert data.info.notes == ("skipped 2 undecodable image(s) in t.parquet (rows 4, 7)",)
    rows[5] = (encoded((1, 2, 3), size=16), 0, "test")
    with pytest.raises(CohortError, match=r"row 5: image of size \(16, 16\), earlier ones are \(8, 8\)"):
        load_dataset(DataConfig(dataset="parquet", root=str(write_table(tmp_path / "u.parquet", rows))))


def test_parquet_missing_columns(tmp_path):
    path = write_table(tmp_path / "t.parquet", tiny_rows(), columns=("image", "label"))
    with pytest.raises(CohortError, match=r"t.parquet: missing column\(s\) split \(an image table needs image, label, split\)"):
        load_dataset(DataConfig(dataset="parquet", root=str(path)))


def test_parquet_nothing_decodes(tmp_path):
    path = write_table(tmp_path / "t.parquet", [(b"junk", 0, "train"), (b"junk", 1, "test")])
    with pytest.raises(CohortError, match="none of the 2 images"):
        load_dataset(DataConfig(dataset="parquet", root=str(path)))


def test_parquet_mixed_sizes_need_image_size(tmp_path):
    rows = tiny_rows() + [(encoded((9, 9, 9), size=16), 1, "train")]
    path = write_table(tmp_path / "t.parquet", rows)
    with pytest.raises(CohortError, match="set data.image_size"):
        load_dataset(DataConfig(dataset="parquet", root=str(path)))
    resized = load_dataset(DataConfig(dataset="parquet", root=str(path), image_size=8))
    assert resized.info.train_size == 13


def test_parquet_not_a_parquet_file(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_text("hello")
    with pytest.raises(CohortError, match="not a readable parquet file"):
        load_dataset(DataConfig(dataset="parquet", root=str(path)))


def damaged(path: Path) -> Path:
    """``path``'s pages overwritten, its footer (schema and row groups) intact: pyarrow opens the file
    and fails only when it reads the columns."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4:len(data) - 8 - footer] = b"\xff" * (len(data) - 12 - footer)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["load", "describe", "stream"])
def test_parquet_damaged_pages_are_one_line_naming_the_file(tmp_path, how):
    """A file whose footer reads but whose pages do not (a copy cut short and patched, a bad disk):
    the plan (describe), the load and the stream each stop with one line naming the file and
    data.root, never pyarrow's traceback."""
    from cohort.datasets import describe_dataset

    path = damaged(write_table(tmp_path / "t.parquet", tiny_rows()))
    pq.read_schema(path)  # the footer is intact: only reading the pages fails
    config = DataConfig(dataset="parquet", root=str(path), batch_size=4,
                        **({"pipeline": "stream"} if how == "stream" else {}))
    with pytest.raises(CohortError) as raised:
        (describe_dataset if how == "describe" else load_dataset)(config)
    assert raised.value.where == "data.root" and raised.value.message.startswith("t.parquet"), str(raised.value)
    assert "not readable" in raised.value.message and "\n" not in str(raised.value)


@needs_shared_cifar
def test_shared_cifar10_parquet_slice(tmp_path):
    table = pq.read_table(SHARED_CIFAR)
    # Rows are ordered by split and class: take every 100th train and every 50th test row.
    train = table.filter(pa.compute.equal(table["split"], "train")).take(list(range(0, 50_000, 100)))
    test = table.filter(pa.compute.equal(table["split"], "test")).take(list(range(0, 10_000, 50)))
    path = tmp_path / "slice.parquet"
    pq.write_table(pa.concat_tables([train, test]).replace_schema_metadata(table.schema.metadata), path)
    data = load_dataset(DataConfig(dataset="parquet", root=str(path)))
    info = data.info
    assert (info.train_size, info.test_size, info.num_classes) == (500, 200, 10)
    assert info.class_names[0] == "airplane" and info.train_class_counts == (50,) * 10
    inputs, labels = next(iter(data.train_batches(64, seed=0, epoch=1)))
    assert inputs.shape == (64, 3, 32, 32) and inputs.dtype == torch.float32
    assert abs(float(inputs.mean())) < 0.5  # normalized with the training split's statistics


# --------------------------------------------------------------------------- image folders


def image_folder(root: Path, train_classes=("cat", "dog"), val_classes=("cat", "dog")) -> Path:
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for n in range(3):
                Image.new("RGB", (20, 24), (40 * index + n, 100, 200)).save(folder / f"{n}.png")
    return root


def test_imagefolder(tmp_path):
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(image_folder(tmp_path)), image_size=16))
    assert (data.info.train_size, data.info.test_size, data.info.num_classes) == (6, 6, 2)
    assert data.info.class_names == ("cat", "dog")
    first = all_batches(data.train_batches(4, seed=3, epoch=1, num_workers=0))
    assert first[0][0].shape == (4, 3, 16, 16)
    assert_same_batches(first, all_batches(data.train_batches(4, seed=3, epoch=1, num_workers=1)))
    inputs, _ = next(iter(data.test_batches(6)))
    assert inputs.shape == (6, 3, 16, 16)
    # The size every image becomes is in the plan, not only in the docs: by default ImageNet's 224.
    assert data.info.notes == ("every image resized and cropped to 16x16 (data.image_size)",)
    default = load_dataset(DataConfig(dataset="imagefolder", root=str(image_folder(tmp_path / "default"))))
    assert default.info.notes == ("every image resized and cropped to 224x224 (data.image_size)",)


def test_imagefolder_with_different_classes(tmp_path):
    root = image_folder(tmp_path, val_classes=("cat", "cow"))
    with pytest.raises(CohortError, match=r"train and val classes differ \(only in train: \['dog'\], only in val: \['cow'\]\)"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(root)))


def test_imagefolder_without_val(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(CohortError, match="has no val/ folder"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)))


# --------------------------------------------------------------------------- CIFAR through torchvision


def test_cifar_without_data_says_how_to_get_it(tmp_path):
    with pytest.raises(CohortError, match=r"no CIFAR-10 data in .*: set data.download: true"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_cifar100_from_torchvision_files(tmp_path, monkeypatch):
    """torchvision's own CIFAR-100 reader on files in its format (their checksums are skipped)."""
    import torchvision.datasets

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("train", 20), ("test", 10)):
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "fine_labels": list(range(count))}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    data = load_dataset(DataConfig(dataset="cifar100", root=str(tmp_path)))
    assert (data.info.train_size, data.info.test_size, data.info.num_classes) == (20, 10, 100)
    inputs, labels = next(iter(data.train_batches(8, seed=0, epoch=1)))
    assert inputs.shape == (8, 3, 32, 32) and labels.dtype == torch.long


# --------------------------------------------------------------------------- long-tailed training sets


@pytest.mark.parametrize("classes,per_class,expected", [
    (10, 5000, {10: 20431, 50: 13996, 100: 12406}),   # CIFAR-10-LT
    (100, 500, {10: 19573, 50: 12608, 100: 10847}),   # CIFAR-100-LT
])
def test_long_tail_counts_match_the_literature(classes, per_class, expected):
    from cohort.datasets import long_tail_counts

    for imbalance, total in expected.items():
        counts = long_tail_counts(per_class, classes, imbalance, "exponential")
        assert sum(counts) == total
        assert counts[0] == per_class and counts[-1] == int(per_class / imbalance)
        assert counts == sorted(counts, reverse=True)
    assert long_tail_counts(500, 4, 10, "step") == [500, 500, 50, 50]


def test_long_tailed_dataset_keeps_a_fixed_subset_and_the_test_split():
    balanced = load_dataset(DataConfig())
    config = DataConfig(long_tail={"imbalance": 10})
    first, again = load_dataset(config), load_dataset(config)
    counts = first.info.train_class_counts
    per_class = balanced.info.train_class_counts
    assert counts[0] == per_class[0] and counts[-1] == int(max(per_class) / 10)
    assert first.info.train_size == sum(counts) < balanced.info.train_size
    assert torch.equal(first.keep, again.keep)  # the same images on every peer and every run
    assert first.info.test_size == balanced.info.test_size
    assert_same_batches(all_batches(first.test_batches(100)), all_batches(balanced.test_batches(100)))
    labels = torch.cat([y for _, y in first.train_batches(64, seed=0, epoch=1)])
    assert tuple(torch.bincount(labels, minlength=10).tolist()) == counts


def test_long_tail_settings_are_validated():
    from cohort.topology import topology_from_dict

    base = {"name": "t", "peers": {"a": {"model": "mlp"}}}
    with pytest.raises(CohortError, match=r"data.long_tail.imbalance: must be greater than or equal to 1"):
        topology_from_dict({**base, "data": {"long_tail": {"imbalance": 0.5}}}, "t.yaml")
    with pytest.raises(CohortError, match=r"data.long_tail.profile: 'linear' is not one of"):
        topology_from_dict({**base, "data": {"long_tail": {"imbalance": 10, "profile": "linear"}}}, "t.yaml")


# --------------------------------------------------------------------------- adding a dataset


@pytest.fixture
def tiny_dataset():
    """A dataset registered as a new file in cohort/datasets/ would register it: by the decorator."""
    from cohort.datasets import DATASETS, TensorSplits, register_dataset

    seen = {}

    @register_dataset("tiny")
    def load_tiny(root: str | None = None, dataset: str = "") -> TensorSplits:
        seen.update(root=root, dataset=dataset)
        images, labels = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3
        return TensorSplits(dataset, (images[:9], labels[:9]), (images[9:], labels[9:]), num_classes=3)

    yield seen
    del DATASETS["tiny"]


def test_a_registered_dataset_validates_and_loads(tiny_dataset):
    from cohort.topology import topology_from_dict

    topology = topology_from_dict({"name": "t", "peers": {"a": {"model": "mlp"}},
                                   "data": {"dataset": "tiny", "root": "somewhere", "batch_size": 4}}, "t.yaml")
    dataset = load_dataset(topology.data)
    assert tiny_dataset == {"root": "somewhere", "dataset": "tiny"}
    assert (dataset.info.name, dataset.info.num_classes, dataset.info.train_size, dataset.info.test_size) == \
        ("tiny", 3, 9, 3)
    assert sum(len(y) for _, y in dataset.train_batches(4, seed=0, epoch=1)) == 9


@pytest.mark.parametrize("setting,value,message", [
    ("image_size", 32, "t.yaml: data.image_size: only parquet and imagefolder datasets are resized, not tiny"),
    ("download", True, "t.yaml: data.download: only cifar10 and cifar100 can be downloaded, not tiny"),
])
def test_a_setting_the_dataset_does_not_declare_is_refused(tiny_dataset, setting, value, message):
    from cohort.topology import topology_from_dict

    with pytest.raises(CohortError) as error:
        topology_from_dict({"name": "t", "peers": {"a": {"model": "mlp"}},
                            "data": {"dataset": "tiny", setting: value}}, "t.yaml")
    assert str(error.value) == message


def test_a_dataset_without_root_says_so():
    from cohort.datasets import DATASETS, TensorSplits, register_dataset
    from cohort.topology import topology_from_dict

    register_dataset("rootless")(lambda: TensorSplits("rootless", (torch.zeros(2, 1, 2, 2), torch.zeros(2).long()),
                                                      (torch.zeros(1, 1, 2, 2), torch.zeros(1).long()), 1))
    try:
        with pytest.raises(CohortError) as error:
            topology_from_dict({"name": "t", "peers": {"a": {"model": "mlp"}},
                                "data": {"dataset": "rootless", "root": "x"}}, "t.yaml")
        assert str(error.value) == "t.yaml: data.root: rootless takes no root"
    finally:
        del DATASETS["rootless"]


def test_a_loader_declares_only_data_settings_with_defaults():
    from cohort.datasets import DATASETS, register_dataset

    with pytest.raises(ValueError, match=r"parameter 'colour' is not a data setting"):
        register_dataset("bad")(lambda colour="red": None)
    with pytest.raises(ValueError, match=r"setting 'root' needs a default"):
        register_dataset("bad")(lambda root: None)
    with pytest.raises(ValueError, match=r"dataset 'digits' is registered twice"):
        register_dataset("digits")(lambda: None)
    assert "bad" not in DATASETS


def test_dataset_settings_are_data_config_fields_and_every_dataset_file_is_imported():
    import pkgutil
    import sys

    import cohort.datasets
    from cohort.datasets import DATASET_SETTINGS

    for name, unset in DATASET_SETTINGS.items():
        assert DataConfig.model_fields[name].default == unset
    for module in pkgutil.iter_modules(cohort.datasets.__path__):
        assert f"cohort.datasets.{module.name}" in sys.modules


# --------------------------------------------------------------------------- through Ray's object store, and the plan's data line


def test_a_pickled_dataset_carries_numpy_arrays_and_comes_back_with_the_same_batches(tmp_path):
    """What Ray stores of a dataset: its tensors as numpy arrays (which Ray reads back without a
    copy, cohort.datasets.shared), through every wrapper; unpickled, the same batches and info."""
    from cohort.datasets.shared import SharedArray

    root = str(write_table(tmp_path / "t.parquet", tiny_rows()))
    data = load_dataset(DataConfig(dataset="parquet", root=root, long_tail={"imbalance": 2}, val_fraction=0.25))
    state = data.__getstate__()
    assert isinstance(state["keep"], SharedArray) and isinstance(state["val"], SharedArray)
    inner = state["inner"].inner.__getstate__()  # the validation split's long tail's image table
    assert isinstance(inner["train_images"], SharedArray) and inner["train_images"].array.dtype == np.uint8
    assert not any(isinstance(value, torch.Tensor) for value in inner.values())

    again = pickle.loads(pickle.dumps(data))
    assert isinstance(again.inner.inner.train_images, torch.Tensor) and again.info == data.info
    assert_same_batches(all_batches(again.train_batches(3, seed=4, epoch=2)),
                        all_batches(data.train_batches(3, seed=4, epoch=2)))
    assert_same_batches(all_batches(again.test_batches(4)), all_batches(data.test_batches(4)))
    assert_same_batches(all_batches(again.val_batches(2)), all_batches(data.val_batches(2)))


def test_a_read_only_array_becomes_a_tensor_over_it_without_a_warning():
    import warnings

    from cohort.datasets.shared import tensor_over

    array = np.arange(12, dtype=np.uint8)
    array.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = tensor_over(array)
    assert tensor.data_ptr() == array.ctypes.data and tensor.tolist() == list(range(12))


def test_memory_bytes_are_the_arrays_sizes_and_wrappers_keep_them(tmp_path):
    root = str(write_table(tmp_path / "t.parquet", tiny_rows()))
    table = load_dataset(DataConfig(dataset="parquet", root=root))
    # 18 images of 3x8x8 uint8, 18 int64 labels, the 3-channel mean and std in float32.
    assert table.info.memory_bytes == 18 * 3 * 8 * 8 + 18 * 8 + 2 * 3 * 4
    wrapped = load_dataset(DataConfig(dataset="parquet", root=root, long_tail={"imbalance": 2}, val_fraction=0.25))
    assert wrapped.info.memory_bytes == table.info.memory_bytes
    digits = load_dataset(DataConfig())
    assert digits.info.memory_bytes == (1797 * 64 * 4 + 1797 * 8)  # float32 8x8 pixels, int64 labels
    assert load_dataset(DataConfig(dataset="imagefolder", root=str(image_folder(tmp_path)))).info.memory_bytes == 0


def test_the_plan_says_which_data_pipeline_runs_and_what_it_holds(tmp_path):
    import yaml

    from cohort import load_topology
    from cohort.run import dry_run_text

    def data_line(data: dict) -> str:
        topology = {"name": "t", "data": data, "peers": {"a": {"model": "cnn_small"}}}
        path = tmp_path / "t.yaml"
        path.write_text(yaml.safe_dump(topology))
        text = dry_run_text(load_topology(path), f"sqlite:///{tmp_path}/mlflow.db", [])
        (line,) = [line for line in text.splitlines() if line.startswith("  data: ")]
        return line

    assert data_line({"dataset": "digits"}) == ("  data: in memory, shared through Ray's object store: 474 kB once "
                                                 "per node (not per peer), loaded by the driver")
    table = str(write_table(tmp_path / "t.parquet", tiny_rows()))
    assert "object store: 3.6 kB once per node" in data_line({"dataset": "parquet", "root": table})
    # CIFAR not downloaded yet: the size it will have, 60,000 uint8 images of 3x32x32 and their labels.
    cifar = data_line({"dataset": "cifar10", "root": str(tmp_path / "cifar"), "download": True})
    assert "object store: 185 MB once per node" in cifar
    folder = data_line({"dataset": "imagefolder", "root": str(image_folder(tmp_path)), "image_size": 16})
    assert folder == "  data: read from its files by every peer's worker, which decodes each batch itself"


def test_the_data_wait_counts_the_time_in_next_not_the_training_step():
    import time

    from cohort.worker.loop import waited_for
    from cohort.worker.report import EpochStats

    def slow_batches():
        for number in range(3):
            time.sleep(0.03)
            yield number

    stats = EpochStats()
    for _ in waited_for(slow_batches(), stats):
        time.sleep(0.1)  # the step: not waiting for data
    assert 0.09 <= stats.data_wait_seconds < 0.2
    assert stats.summary()["data_wait_seconds"] == stats.data_wait_seconds


def test_the_dry_run_reads_a_tables_sizes_without_decoding_it(tmp_path, monkeypatch):
    from dataclasses import replace

    import cohort.datasets.parquet as parquet
    from cohort.datasets.registry import describe_dataset

    root = str(write_table(tmp_path / "t.parquet", tiny_rows()))
    loaded = load_dataset(DataConfig(dataset="parquet", root=root)).info
    wrapped = DataConfig(dataset="parquet", root=root, long_tail={"imbalance": 2}, val_fraction=0.25)
    loaded_wrapped = load_dataset(wrapped).info
    decoded = []
    real = parquet.decode_images
    monkeypatch.setattr(parquet, "decode_images", lambda *a, **k: (out := real(*a, **k), decoded.append(len(out[1])))[0])
    assert describe_dataset(DataConfig(dataset="parquet", root=root)) == loaded
    assert describe_dataset(DataConfig(dataset="parquet", root=root, image_size=16)) == replace(
        loaded, input_size=(3, 16, 16), memory_bytes=18 * 3 * 16 * 16 + 18 * 8 + 2 * 3 * 4)
    assert describe_dataset(wrapped) == loaded_wrapped
    assert decoded == [1, 1, 1]  # one image decoded per preview (the input shape), not the table
    # Undecodable rows are found when the run loads the table; a table where nothing decodes is refused already.
    junk = write_table(tmp_path / "junk.parquet", [(b"junk", 0, "train"), (b"junk", 1, "test")])
    with pytest.raises(CohortError, match="none of the 2 images"):
        describe_dataset(DataConfig(dataset="parquet", root=str(junk)))
