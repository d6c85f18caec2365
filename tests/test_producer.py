"""The batch producer (cohort.datasets.producer) in this process, without Ray: the same batches as
every worker makes itself, a bounded window ahead, and which pipeline a topology gets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cohort.config.errors import CohortError
from cohort.datasets import load_dataset
from cohort.datasets.base import disjoint_part
from cohort.datasets.producer import BatchDecoder, BatchProducer, as_batch, data_pipeline
from cohort.topology import DataConfig, SamplerConfig, topology_from_dict


def noisy_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 5) -> Path:
    """An image folder of random pixels (a crop or a flip of them shows in the bytes)."""
    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for n in range(per_class):
                pixels = generator.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.png")
    return root


def same(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("shards, sampler", [(1, None), (2, None), (1, SamplerConfig(m_per_class=2))])
def test_the_producer_makes_the_batches_every_worker_makes_itself(tmp_path, shards, sampler):
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(noisy_folder(tmp_path)), image_size=16))
    # Made here first: the producer's thread draws from torch's global generator (as the worker did).
    expected = {epoch: list(data.train_batches(4, 7, epoch, shards=shards, sampler=sampler)) for epoch in (1, 2)}
    producer = BatchProducer(data, 4, seed=7, shards=shards, sampler=sampler, window=2)
    for epoch in (1, 2):
        assert producer.batches_in(epoch) == len(expected[epoch]) > 2
        made = [as_batch(producer.batch(epoch, number)) for number in range(len(expected[epoch]))]
        assert all(same(mine, theirs) for mine, theirs in zip(made, expected[epoch], strict=True))
    # Asked out of order, or again after it was forgotten: the same batch (a pure function of epoch and number).
    assert same(as_batch(producer.batch(1, 2)), expected[1][2])
    assert not same(as_batch(producer.batch(1, 0)), as_batch(producer.batch(2, 0)))


def test_decoders_make_the_batches_every_worker_makes_itself(tmp_path):
    """data.decoders: batch k made by decoder k mod N (in-process stand-ins for the Ray actors), the
    producer handing out what they made: the same bytes as the worker's own batches."""
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(noisy_folder(tmp_path)), image_size=16))
    expected = list(data.train_batches(4, 7, 1))
    decoders, calls = [BatchDecoder(data), BatchDecoder(data)], []

    def make(number, item):
        calls.append(number % 2)
        return decoders[number % 2].make(item)

    producer = BatchProducer(data, 4, seed=7, window=2, make=make)
    made = [as_batch(producer.batch(1, number)) for number in range(len(expected))]
    assert all(same(mine, theirs) for mine, theirs in zip(made, expected, strict=True))
    assert sorted(calls) == sorted(number % 2 for number in range(len(expected)))  # each batch once, in turn
    assert producer.made() == len(expected)


def test_a_disjoint_part_of_the_producers_batches(tmp_path):
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(noisy_folder(tmp_path)), image_size=16))
    theirs = list(data.train_batches(2, 1, 3, part=(1, 3)))
    producer = BatchProducer(data, 2, seed=1)
    numbers = disjoint_part(list(range(producer.batches_in(3))), 1, 3)
    mine = [as_batch(producer.batch(3, number)) for number in numbers]
    assert len(mine) == len(theirs) == 2
    assert all(same(a, b) for a, b in zip(mine, theirs, strict=True))


def test_the_window_bounds_what_the_producer_holds():
    data = load_dataset(DataConfig())  # digits: 23 batches of 64
    producer = BatchProducer(data, 64, seed=0, window=3, lag=6, workers=2)
    producer.batch(1, 0, "a")
    assert producer.held() == [(1, 0), (1, 1), (1, 2)]  # the batch and the next two: nothing further
    producer.batch(1, 1, "a")
    producer.batch(1, 2, "a")  # "b" has not asked yet: batches are kept for it (up to the lag)
    assert producer.held() == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]
    producer.batch(1, 0, "b")  # the second worker, behind: its batch is there, made once
    producer.batch(1, 3, "a")
    assert producer.held() == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
    producer.batch(1, 1, "b")  # both have passed batch 0
    assert producer.held() == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
    producer.batch(1, 3, "b")
    assert producer.held() == [(1, 3), (1, 4), (1, 5)]
    for number in range(4, 12):  # "b" stalls: at most lag batches behind the furthest are kept for it
        producer.batch(1, number, "a")
    assert producer.held() == [(1, 6), (1, 7), (1, 8), (1, 9), (1, 10), (1, 11), (1, 12), (1, 13)]
    producer.batch(1, 21, "a")  # the window stops at the epoch's end
    assert producer.held() == [(1, 21), (1, 22)]
    producer.batch(2, 0, "a")  # a new epoch drops the last one's batches
    assert producer.held() == [(2, 0), (2, 1), (2, 2)]
    with pytest.raises(CohortError, match="epoch 2 has 23 training batches, not a batch 23"):
        producer.batch(2, 23, "a")
    producer.pool.shutdown(wait=True)
    assert producer.made() <= 14 + 2 + 3  # none twice: 0-13 and 21-22 of epoch 1, the window of epoch 2


def test_a_chunk_asked_for_is_kept_until_every_worker_has_passed_its_first_batch():
    """Workers ask for chunks, each the next one while they read the last: a worker that asked for
    batches 4-7 has taken only those before 4. Forgetting on its last number instead dropped a chunk
    the other workers were still waiting on; four workers then made and dropped it over and over."""
    data = load_dataset(DataConfig())  # digits: 23 batches of 64
    producer = BatchProducer(data, 64, seed=0, window=3, lag=12, workers=2)
    producer.batches(1, [0, 1, 2, 3], "a")
    producer.batches(1, [4, 5, 6, 7], "a")  # "a" reads 0-3 and asks for 4-7 meanwhile
    producer.batches(1, [0, 1, 2, 3], "b")
    assert producer.held() == [(1, n) for n in range(0, 10)]  # "b" has not passed 0 before: all kept
    producer.batches(1, [4, 5, 6, 7], "b")  # both have passed 0-3, neither 4-7
    assert producer.held() == [(1, n) for n in range(4, 10)]
    producer.batches(1, [8, 9, 10, 11], "b")
    producer.batches(1, [8, 9, 10, 11], "a")
    assert producer.held() == [(1, n) for n in range(8, 14)]
    producer.pool.shutdown(wait=True)
    assert producer.made() == 14  # none made twice


def test_a_batch_forgotten_while_its_worker_waits_is_still_made_for_it():
    """A worker far behind the others (a slow peer beside a fast one, codistilling): its batch, still
    waiting to be made, is forgotten when a faster worker's request leaves it more than the lag
    behind. The waiting worker gets its batch all the same (it got CancelledError before)."""
    import threading
    import time

    data = load_dataset(DataConfig())  # digits: 23 batches of 64
    started, gate = threading.Event(), threading.Event()

    class Held:  # the producer's thread stays on batch 0 until the gate opens
        def __getattr__(self, name):
            return getattr(data, name)

        def make_batch(self, indices, train, seed):
            started.set()
            gate.wait(timeout=30)
            return data.make_batch(indices, train, seed)

    producer = BatchProducer(Held(), 64, seed=0, window=1, lag=2, workers=2)
    got: dict[str, object] = {}

    def ask(key: str, number: int) -> None:
        try:
            got[key] = producer.batch(1, number, key.split("-")[0])
        except BaseException as error:  # noqa: BLE001 - what the worker would have raised
            got[key] = error

    def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    threads = [threading.Thread(target=ask, args=("fast", 0))]
    threads[0].start()
    started.wait(timeout=30)  # batch 0 is being made: what is asked next waits its turn
    threads.append(threading.Thread(target=ask, args=("slow", 1)))
    threads[1].start()
    until(lambda: (1, 1) in producer.held())
    threads.append(threading.Thread(target=ask, args=("fast-again", 5)))
    threads[2].start()
    until(lambda: (1, 1) not in producer.held())  # forgotten: more than the lag behind batch 5
    gate.set()
    for thread in threads:
        thread.join(timeout=30)
    expected = list(data.train_batches(64, 0, 1))
    assert not isinstance(got["slow"], BaseException), repr(got["slow"])
    assert same(as_batch(got["slow"]), expected[1]) and same(as_batch(got["fast-again"]), expected[5])


def test_which_pipeline_makes_the_batches(tmp_path):
    folder = str(noisy_folder(tmp_path))

    def pipeline(peers: int = 2, replicas: int = 1, **changes) -> str:
        data = {"dataset": "imagefolder", "root": folder, "image_size": 16, **changes.pop("data", {})}
        raw = {"name": "t", "data": data, **changes,
               "peers": {f"p{n}": {"model": "mlp", "replicas": replicas} for n in range(peers)}}
        topology = topology_from_dict(raw)
        return data_pipeline(topology, load_dataset(topology.data).info)

    assert pipeline() == "producer"  # image folders: decoded per batch, for more than one worker
    assert pipeline(peers=1) == "peers"
    assert pipeline(peers=1, replicas=2) == "producer"  # a peer's replicas take the same batches
    assert pipeline(data={"pipeline": "peers"}) == "peers"
    assert pipeline(peers=1, data={"pipeline": "producer"}) == "producer"
    assert pipeline(exchange={"mode": "snapshot", "data": "disjoint"}) == "peers"  # each peer its own batches
    digits = topology_from_dict({"name": "t", "peers": {"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}}})
    assert data_pipeline(digits, load_dataset(digits.data).info) == "peers"  # plain slices of memory
    with pytest.raises(CohortError, match="data.pipeline"):
        topology_from_dict({"name": "t", "data": {"pipeline": "shared"}, "peers": {"a": {"model": "mlp"}}})
    assert pipeline(peers=1, data={"decoders": 2}) == "producer"  # decoders asked for: a producer for them
    with_decoders = topology_from_dict({"name": "t", "data": {"decoders": 2}, "peers": {"a": {"model": "mlp"}}})
    assert data_pipeline(with_decoders, load_dataset(with_decoders.data).info) == "producer"


@pytest.mark.parametrize("data, message", [
    ({"pipeline": "peers", "decoders": 2}, "data.decoders: decoders make a batch producer's batches: data.pipeline "
                                           "peers has none (use producer or auto)"),
    ({"dataset": "parquet", "root": "t", "pipeline": "stream", "decoders": 2},
     "data.decoders: the stream pipeline reads its row groups through one cache per node: it takes no decoders yet"),
    ({"decoders": -1}, "data.decoders"),
])
def test_decoders_without_a_producer_are_refused_in_one_line(data, message):
    with pytest.raises(CohortError) as refused:
        topology_from_dict({"name": "t", "data": data, "peers": {"a": {"model": "mlp"}}})
    assert message in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_the_plan_says_when_a_producer_makes_the_batches(tmp_path):
    import yaml

    from cohort import load_topology
    from cohort.run import dry_run_text

    folder = str(noisy_folder(tmp_path / "images"))
    topology = {"name": "t", "data": {"dataset": "imagefolder", "root": folder, "image_size": 16, "num_workers": 2},
                "peers": {"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topology))
    text = dry_run_text(load_topology(path), f"sqlite:///{tmp_path}/mlflow.db", [])
    (line,) = [line for line in text.splitlines() if line.startswith("  data: ")]
    assert line == ("  data: one batch producer per node makes each training batch once for the workers there "
                    "(data.pipeline: producer; one thread, no CPU reserved: the workers' decoding, done once), "
                    "3 batches ahead, shared through Ray's object store; it holds the files' list; it reads and "
                    "decodes them; test batches: every worker its own")
    path.write_text(yaml.safe_dump({**topology, "data": {**topology["data"], "decoders": 4}}))
    text = dry_run_text(load_topology(path), f"sqlite:///{tmp_path}/mlflow.db", [])
    (line,) = [line for line in text.splitlines() if line.startswith("  data: ")]
    assert "(data.pipeline: producer; its 4 decoders spread over the cluster's nodes (data.decoders), no CPU " in line
    assert "4 batches ahead" in line


def test_the_workers_take_the_drivers_choice_or_decide_alike_from_their_data(tmp_path):
    from cohort.datasets.producer import ProducerClient
    from cohort.worker.loop import batch_producer

    spec = {"name": "t", "data": {"dataset": "imagefolder", "root": str(noisy_folder(tmp_path)), "image_size": 16},
            "peers": {"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}}}
    topology = topology_from_dict(spec)
    data = load_dataset(topology.data)
    decided = {"key": "k", "choice": None}  # data.pipeline: auto, on an image folder with two workers
    assert isinstance(batch_producer({"pipeline": decided}, topology, data, 0, 2), ProducerClient)
    assert batch_producer({"pipeline": {**decided, "choice": "peers"}}, topology, data, 0, 2) is None
    assert batch_producer({}, topology_from_dict({**spec, "peers": {"a": {"model": "cnn_small"}}}), data, 0, 1) is None


def test_a_worker_asks_again_of_its_producer_found_anew_when_it_died(monkeypatch):
    """A producer that died loses the batches it put (its references fail): the worker finds its
    producer again (Ray restarted it, or a new one) and asks again, a few times at most."""
    import ray
    from ray.exceptions import RayActorError

    from cohort.datasets import producer as module

    made = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0, 1]))
    outcomes = []

    class Handle:
        class batch:  # noqa: N801 - a Ray actor method's shape: handle.batch.remote(...)
            @staticmethod
            def remote(epoch, number, worker):
                return ("asked", epoch, number, worker)

    def get(reference, timeout=None):
        if isinstance(reference, tuple) and reference[0] == "asked":
            return "reference"
        outcome = outcomes.pop(0)
        if outcome == "lost":
            raise RayActorError()
        return made

    connected = []
    monkeypatch.setattr(ray, "get", get)
    client = module.ProducerClient(lambda: connected.append(1) or Handle(), worker="3")
    outcomes[:] = ["lost", "made"]
    inputs, labels = client.fetch(1, 0)
    assert torch.equal(inputs, torch.from_numpy(made[0])) and torch.equal(labels, torch.from_numpy(made[1]))
    assert len(connected) == 2  # found again after the failure
    outcomes[:] = ["lost"] * module.ATTEMPTS
    with pytest.raises(RayActorError):
        client.fetch(1, 1)


def test_a_worker_asks_for_a_chunk_of_batches_per_call_and_the_next_chunk_ahead(monkeypatch):
    """Each call to the producer costs its process Ray's handling, whatever it carries: a worker asks for
    CHUNK batches per call, and for the next CHUNK as it starts on these (no wait between chunks). A
    call whose producer died under it: those batches are asked for again one by one, of the producer
    found anew. The bytes stay those the worker would make itself."""
    import ray
    from ray.exceptions import RayActorError

    from cohort.datasets import producer as module

    data = load_dataset(DataConfig())  # digits: 23 batches of 64
    producer = BatchProducer(data, 64, seed=0, workers=1)
    events: list[tuple] = []
    dies = {"chunk": 8}  # the call for the chunk from batch 8 on finds its producer dead

    class Reference:
        def __init__(self, value, number=None):
            self.value, self.number = value, number

    class Handle:
        class batches:  # noqa: N801 - a Ray actor method's shape: handle.batches.remote(...)
            @staticmethod
            def remote(epoch, numbers, worker):
                events.append(("ask", tuple(numbers)))
                if numbers[0] == dies.get("chunk"):
                    del dies["chunk"]
                    return Reference(RayActorError())
                return Reference([Reference(made, n) for n, made in zip(numbers, producer.batches(epoch, numbers, worker))])

        class batch:  # noqa: N801
            @staticmethod
            def remote(epoch, number, worker):
                events.append(("ask", (number,)))
                return Reference(Reference(producer.batch(epoch, number, worker), number))

    def get(reference, timeout=None):
        if isinstance(reference.value, BaseException):
            raise reference.value
        if reference.number is not None:
            events.append(("read", reference.number))
        return reference.value

    connected = []
    monkeypatch.setattr(ray, "get", get)
    client = module.ProducerClient(lambda: connected.append(1) or Handle(), worker="0")
    expected = list(data.train_batches(64, 0, 1))
    taken = list(client.train_batches(data, 64, 0, 1))
    assert len(taken) == 23 and all(same(a, b) for a, b in zip(taken, expected, strict=True))
    chunk = module.CHUNK
    asks = [numbers for kind, numbers in events if kind == "ask"]
    assert asks[:3] == [tuple(range(0, chunk)), tuple(range(chunk, 2 * chunk)), tuple(range(2 * chunk, 3 * chunk))]
    # The next chunk is asked for before this one's first batch is read.
    assert events.index(("ask", tuple(range(chunk, 2 * chunk)))) < events.index(("read", 0))
    assert events.index(("ask", tuple(range(2 * chunk, 3 * chunk)))) < events.index(("read", chunk))
    # Batches 8-11 came one by one, of the producer found again; every other call carried a chunk.
    assert [numbers for numbers in asks if len(numbers) == 1] == [(8,), (9,), (10,), (11,)] and len(connected) == 2
    assert len(asks) == -(-23 // chunk) + 4
    producer.pool.shutdown(wait=True)
