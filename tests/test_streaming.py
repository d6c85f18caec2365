"""Parquet tables streamed (data.pipeline: stream, cohort.datasets.streaming), without Ray: the batch
plan as a function of (seed, epoch), every row once an epoch, the shuffle window bounded, the memory
bound's arithmetic and refusal, auto's choice, and the plan's data line."""
from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from bench.common import write_image_table
from cohort.config.errors import CohortError
from cohort.datasets import load_dataset
from cohort.datasets.producer import BatchProducer, data_pipeline
from cohort.datasets.streaming import (
    HELD_BATCHES,
    decoded_batch_bytes,
    stream_memory,
    stream_order,
    stream_window,
)
from cohort.topology import DataConfig, topology_from_dict


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """Three files of 16x16 PNGs, 300 training and 60 test rows, in row groups of 40 rows."""
    return write_image_table(tmp_path_factory.mktemp("table"), 300, 60, size=16, files=3, group_rows=40)


def streamed(root: Path, **data) -> object:
    return load_dataset(DataConfig(dataset="parquet", root=str(root), pipeline="stream", **data))


def test_the_order_is_a_function_of_seed_and_epoch_with_every_row_once():
    counts = [7, 0, 5, 9, 3, 6]
    order = stream_order(counts, seed=4, epoch=2, window=2)
    assert torch.equal(order, stream_order(counts, seed=4, epoch=2, window=2))
    assert sorted(order.tolist()) == list(range(sum(counts)))
    assert not torch.equal(order, stream_order(counts, seed=4, epoch=3, window=2))
    assert not torch.equal(order, stream_order(counts, seed=5, epoch=2, window=2))


@pytest.mark.parametrize("window", [1, 2, 3])
def test_each_stretch_of_the_order_comes_from_a_window_of_row_groups(window):
    counts = [5] * 10
    order = stream_order(counts, seed=0, epoch=1, window=window)
    group = order // 5  # rows of group g are 5g .. 5g + 4
    for first in range(0, len(order), 5 * window):
        assert len(set(group[first:first + 5 * window].tolist())) <= window
    if window > 1:  # rows are shuffled within the window, not read group after group
        assert any(len(set(group[first:first + 5].tolist())) > 1 for first in range(0, len(order), 5 * window))


def test_streamed_rows_are_the_tables_rows_and_each_epoch_takes_every_training_row_once(table):
    data, memory = streamed(table), load_dataset(DataConfig(dataset="parquet", root=str(table)))
    assert (data.info.train_size, data.info.test_size) == (memory.info.train_size, memory.info.test_size) == (300, 60)
    assert data.info.train_class_counts == memory.info.train_class_counts
    plan = data.train_plan(32, seed=1, epoch=1)
    rows = torch.cat([indices for indices, _, _ in plan])
    assert sorted(rows.tolist()) == list(range(300))
    indices, _, seed = plan[0]
    # The same images and labels as the table held in memory, augmented alike: only the normalization differs.
    inputs, labels = data.make_batch(indices, True, seed)
    assert torch.equal(labels, memory.train_labels[indices])
    assert torch.allclose(inputs * data.std + data.mean, memory.make_batch(indices, True, seed)[0] * memory.std + memory.mean,
                          atol=1e-5)
    tests = list(data.test_batches(25))
    assert [len(y) for _, y in tests] == [25, 25, 10]
    assert torch.equal(torch.cat([y for _, y in tests]), memory.test_labels)


@pytest.mark.parametrize("data", [{"val_fraction": 0.2}, {"long_tail": {"imbalance": 5}},
                                  {"long_tail": {"imbalance": 5, "profile": "step"}, "val_fraction": 0.1}],
                         ids=["validation", "long-tail", "both"])
def test_a_stream_keeps_and_holds_out_the_rows_the_table_in_memory_does(table, data):
    """data.long_tail and data.val_fraction on a streamed table: the same training and validation
    images as in memory for the same seed, the epoch still taking every kept row once, grouped by
    row group; the validation batches unaugmented, in the table's order."""
    stream = load_dataset(DataConfig(dataset="parquet", root=str(table), pipeline="stream", **data), seed=7)
    memory = load_dataset(DataConfig(dataset="parquet", root=str(table), **data), seed=7)
    assert (stream.info.train_size, stream.info.val_size, stream.info.train_class_counts) == (
        memory.info.train_size, memory.info.val_size, memory.info.train_class_counts)
    assert stream.info.train_size < 300
    assert [note for note in stream.info.notes if "long-tailed" in note] == [
        note for note in memory.info.notes if "long-tailed" in note]
    assert torch.equal(stream.train_targets, memory.train_targets)
    plan = stream.train_plan(32, seed=7, epoch=2)
    positions = torch.cat([indices for indices, _, _ in plan])
    assert sorted(positions.tolist()) == list(range(stream.info.train_size))
    indices, _, seed = plan[1]
    inputs, labels = stream.make_batch(indices, True, seed)
    expected, expected_labels = memory.make_batch(indices, True, seed)
    table_in_memory = memory
    while hasattr(table_in_memory, "inner"):  # under the long tail and the validation split
        table_in_memory = table_in_memory.inner

    def pixels(batch, dataset):  # what the two pipelines share: their normalizations differ
        return batch * dataset.std + dataset.mean

    assert torch.equal(labels, expected_labels)  # the same images, augmented alike
    assert torch.allclose(pixels(inputs, stream), pixels(expected, table_in_memory), atol=1e-5)
    held, expected_held = list(stream.val_batches(25)), list(memory.val_batches(25))
    assert len(held) == len(expected_held) and (len(held) > 0) == ("val_fraction" in data)
    for (x, y), (x_memory, y_memory) in zip(held, expected_held):
        assert torch.equal(y, y_memory)
        assert torch.allclose(pixels(x, stream), pixels(x_memory, table_in_memory), atol=1e-5)


def test_a_pickled_stream_carries_no_images_and_makes_the_same_batches(table):
    data = streamed(table)
    plan = data.train_plan(32, seed=2, epoch=1)
    before = data.make_batch(*plan[0])
    copy = pickle.loads(pickle.dumps(data))
    assert len(pickle.dumps(data)) < 20_000  # layout, labels and splits: no encoded or decoded images
    assert all(torch.equal(a, b) for a, b in zip(before, copy.make_batch(*plan[0])))


def test_the_producer_makes_the_streamed_batches_from_a_bounded_cache(table):
    data = streamed(table, batch_size=32)
    producer = BatchProducer(data, 32, seed=3)
    for number, item in enumerate(data.train_plan(32, 3, 1)):
        made = producer.batch(1, number)
        assert all(torch.equal(torch.as_tensor(a), b) for a, b in zip(made, data.make_batch(*item)))
    assert len(producer.dataset._caches[True]) <= 2 * data.window  # noqa: SLF001 - what the bound counts


def test_normalization_comes_from_the_schema_metadata_when_the_table_has_it(tmp_path, table):
    for file in sorted(table.glob("*.parquet")):
        written = pq.read_table(file)
        metadata = {**written.schema.metadata, b"mean": b"0.5,0.25,0.125", b"std": b"2,2,2"}
        pq.write_table(written.replace_schema_metadata(metadata), tmp_path / file.name, row_group_size=40)
    data = streamed(tmp_path)
    assert data.mean.flatten().tolist() == [0.5, 0.25, 0.125] and data.std.flatten().tolist() == [2, 2, 2]
    sampled = streamed(table)
    # Up to 64 evenly spaced training rows of each of up to 16 row groups: all 300 of this small table.
    assert sampled.info.notes == ("normalization: per-channel mean and std of 300 training images sampled across "
                                  "the table (the stream pipeline makes no pass over the whole table)",)


# --------------------------------------------------------------------------- the memory bound


def test_the_window_is_the_largest_that_keeps_the_pipeline_under_the_bound():
    batch, group = decoded_batch_bytes(128, (3, 32, 32)), 3_000_000
    assert batch == 128 * (3 * 32 * 32 * 4 + 8)
    assert stream_memory(batch, group, 4) == HELD_BATCHES * batch + 9 * group
    for bound in (50_000_000, 100_000_000, 333_333_333):
        window = stream_window(bound, batch, group, groups=1000)
        assert stream_memory(batch, group, window) <= bound < stream_memory(batch, group, window + 1)
    assert stream_window(10**12, batch, group, groups=9) == 9  # never more than the table's row groups
    assert stream_window(None, batch, group, groups=20) == 8 and stream_window(None, batch, group, groups=3) == 3


def test_a_bound_too_small_for_one_window_is_refused_naming_the_field():
    batch, group = decoded_batch_bytes(128, (3, 32, 32)), 3_000_000
    least = stream_memory(batch, group, 1)
    assert stream_window(least, batch, group, groups=10) == 1
    with pytest.raises(CohortError) as refused:
        stream_window(least - 1, batch, group, groups=10)
    assert refused.value.where == "data.memory_bound"
    # 3 ahead, 12 behind, the one asked for, a worker's chunk of 4, and the working memory of making one
    assert HELD_BATCHES == 23
    assert str(refused.value) == ("data.memory_bound: 45 MB cannot hold one window of the stream pipeline: 45 MB "
                                  "(23 decoded batches of 1.6 MB and 3 row groups of up to 3.0 MB encoded); set at "
                                  "least that, or a smaller data.batch_size")


def test_the_bound_sets_the_streamed_datasets_window_and_is_checked_when_it_loads(table):
    data = streamed(table, batch_size=32, memory_bound=10_000_000)
    assert data.window == data.info.stream_window >= 1
    assert data.info.stream_bytes == stream_memory(decoded_batch_bytes(32, (3, 16, 16)), data.group_bytes, data.window)
    assert data.info.stream_bytes <= 10_000_000
    with pytest.raises(CohortError, match="cannot hold one window") as refused:
        streamed(table, batch_size=32, memory_bound=100_000)
    assert refused.value.where == "data.memory_bound"


@pytest.mark.parametrize("data, field, message", [
    ({"dataset": "digits", "pipeline": "stream"}, "pipeline", "only parquet datasets stream, not digits"),
    ({"dataset": "digits", "memory_bound": "1GB"}, "memory_bound", "only parquet datasets stream, not digits"),
    ({"dataset": "parquet", "root": "t", "pipeline": "peers", "memory_bound": "1GB"}, "memory_bound",
     "bounds the stream pipeline only, not data.pipeline peers (use stream or auto)"),
    ({"dataset": "parquet", "root": "t", "pipeline": "stream", "sampler": {"m_per_class": 2}}, "sampler",
     "the stream pipeline (data.pipeline) makes no class-balanced batches"),
    ({"dataset": "parquet", "root": "t", "memory_bound": "1GB", "sampler": {"m_per_class": 2}}, "sampler",
     "the stream pipeline (data.memory_bound) makes no class-balanced batches"),
])
def test_what_cannot_stream_is_refused_in_one_line(data, field, message):
    with pytest.raises(CohortError) as refused:
        topology_from_dict({"name": "t", "data": data, "peers": {"a": {"model": "mlp"}}})
    assert str(refused.value).endswith(f"data.{field}: {message}"), str(refused.value)


def test_auto_streams_a_table_whose_decoded_images_exceed_the_bound(table):
    def pipeline(**data) -> str:
        topology = topology_from_dict({"name": "t", "data": {"dataset": "parquet", "root": str(table), "batch_size": 2,
                                                             **data}, "peers": {"a": {"model": "mlp"}}})
        return data_pipeline(topology, load_dataset(topology.data).info)

    # In memory: 360 images of 3x16x16 uint8 and their labels, about 280 kB; streamed in batches of 2:
    # 16 batches of 6 kB and two row groups of 36 kB, about 170 kB.
    assert pipeline() == "peers"
    assert pipeline(memory_bound="100MB") == "peers"
    assert pipeline(memory_bound="250kB") == "stream"
    assert pipeline(pipeline="stream") == "stream"


def test_the_plan_says_the_data_are_streamed_what_the_producer_holds_and_the_bound(tmp_path, table):
    from cohort import load_topology
    from cohort.run import dry_run_text

    topology = {"name": "t", "data": {"dataset": "parquet", "root": str(table), "batch_size": 32,
                                      "pipeline": "stream", "memory_bound": "5MB"}, "peers": {"a": {"model": "cnn_small"}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topology))
    text = dry_run_text(load_topology(path), f"sqlite:///{tmp_path}/mlflow.db", [])
    (line,) = [line for line in text.splitlines() if line.startswith("  data: ")]
    window = streamed(table, batch_size=32, memory_bound=5_000_000).window
    assert line.startswith(f"  data: streamed from its parquet files (data.pipeline: stream): one batch producer per "
                           f"node reads a shuffle window of {window} row groups and decodes each training batch once "
                           "for the workers there, 3 batches ahead; the driver decodes none of it; the producer holds "
                           "at most "), line
    assert line.endswith(" (data.memory_bound 5.0 MB); test batches: every worker reads and decodes its own, "
                         "two row groups at a time"), line
    path.write_text(yaml.safe_dump({**topology, "data": {**topology["data"], "memory_bound": "50kB"}}))
    with pytest.raises(CohortError, match="data.memory_bound: 50 kB cannot hold one window"):
        dry_run_text(load_topology(path), f"sqlite:///{tmp_path}/mlflow.db", [])


# --------------------------------------------------------------------------- bad files


def test_a_row_that_does_not_decode_stops_the_stream_in_one_line(tmp_path):
    import io

    import pyarrow as pa
    from PIL import Image

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
        return buffer.getvalue()

    images = [png(n * 10) for n in range(12)]
    images[9] = b"not an image"
    table = pa.table({"image": images, "label": [n % 2 for n in range(12)], "split": ["train"] * 10 + ["test"] * 2})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    data = streamed(tmp_path / "t.parquet", batch_size=12)
    (indices, _, seed), = data.train_plan(12, seed=0, epoch=1)
    with pytest.raises(CohortError) as refused:
        data.make_batch(indices, True, seed)
    assert str(refused.value) == ("data.root: t.parquet, row group 2: row 1 does not decode (the stream pipeline "
                                  "stops at a bad image: fix or drop its row)")


def test_a_file_gone_or_unreadable_mid_run_stops_the_stream_in_one_line(tmp_path, table):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(table, copy)
    data = streamed(copy)
    (copy / "part-0001.parquet").write_bytes(b"PAR1 not a parquet file any more")
    (copy / "part-0002.parquet").unlink()
    with pytest.raises(CohortError, match=r"^data.root: part-000[12].parquet, row group \d: not readable \(.+\)$"):
        for item in data.train_plan(32, seed=0, epoch=1):
            data.make_batch(*item)
