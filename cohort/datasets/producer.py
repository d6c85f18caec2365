"""One producer of training batches per cohort per node (``data.pipeline: producer``).

Without it every peer's worker makes every training batch itself: a cohort of N peers decodes and
augments each batch N times for identical results. A ``BatchProducer`` makes each batch of the same
plan once (order from the seed and epoch, augmentation seeded by the batch seed: the same bytes as
``CohortDataset.train_batches``) and puts it in Ray's object store once, as numpy arrays: every
worker on the node reads it there without a copy (``cohort.datasets.shared``).

A batch is a pure function of ``(epoch, batch number)``, so the producer keeps no state a worker
depends on: a producer restarted by Ray, or a worker group restarted from a checkpoint, is asked
again and makes the same batch. It makes a bounded window of batches ahead of the furthest one
asked for, and forgets a batch once every worker of the node has asked for a later one (or when it
lies ``LAG`` batches behind the furthest: a worker that stalled or left holds nothing up, and one
that far behind has its batches made for it alone); the workers hold their own references, and
the object store frees a batch when the last drops it. A worker asks for ``CHUNK`` batches in one
call, and for the next ``CHUNK`` as it starts on these: Ray's handling of a call costs the producer's
process a few milliseconds, whatever the call carries, and it grows with the workers.

The workers find their node's producer by name and the first to ask creates it
(``node_producer``); it is owned by that worker and ends with the worker group.

With ``data.decoders: N`` the producer makes no batch itself: N ``BatchDecoder`` actors, spread over
the cluster's nodes (CPU-only nodes included), each holding the dataset once, make them in turn
(batch ``k`` by decoder ``k mod N``) and put them in the object store on their node; the producer
hands out their references, and a batch made on another node is copied to a worker's node once.
The window still bounds what is made ahead; the batches and their bytes stay the same.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cohort.config.errors import CohortError
from cohort.datasets.base import Batch, CohortDataset, DatasetInfo, disjoint_part
from cohort.datasets.shared import tensor_over

if TYPE_CHECKING:
    from cohort.topology import Topology  # cohort.topology imports this package's registry

WINDOW = 3  # batches made ahead of the furthest one asked for
LAG = 4 * WINDOW  # batches kept behind the furthest one asked for, at most, for a worker not there yet
ATTEMPTS = 4  # a worker asks again this many times when its producer died under it
# Batches a worker asks for in one call, the next call sent as it starts on these: each call costs
# the producer's process a few milliseconds of Ray's handling, whatever it carries (bench.data_cpu).
CHUNK = 4


def data_pipeline(topology: Topology, info: DatasetInfo) -> str:
    """Which pipeline makes the training batches: ``peers`` (each worker its own), ``producer`` (one per
    node), or ``stream`` (one per node, for a streamed dataset: ``info.stream_window``). ``auto``: a producer
    where batches are decoded from files and more than one worker takes each batch (not under
    codistillation's disjoint data, where each peer takes its own); stream when the data are streamed."""
    setting = topology.data.pipeline
    if info.stream_window:  # loaded streamed (cohort.datasets.registry.streamed): the node's producer reads it
        return "stream"
    if setting != "auto":
        return setting
    if topology.data.decoders:  # asked for: its decoders make the batches
        return "producer"
    disjoint = topology.exchange.snapshot and topology.exchange.data == "disjoint"
    return "producer" if info.decodes_batches and topology.num_workers > 1 and not disjoint else "peers"


class BatchProducer:
    """Makes the training batches of a run's plan, each once, a window ahead of the furthest asked for,
    for ``workers`` workers.

    One thread makes them, one after the other: an image folder's augmentation seeds torch's global
    generator image by image (``cohort.datasets.folder``), which two threads would share.

    ``put``: what a made batch (numpy inputs and labels) becomes, ``ray.put`` in the actor; by
    default the arrays themselves (in-process use).
    """

    def __init__(self, dataset: CohortDataset, batch_size: int, seed: int, shards: int = 1, sampler: Any = None,
                 window: int = WINDOW, put: Callable[[Any], Any] | None = None, lag: int = LAG, workers: int = 1,
                 make: Callable[[int, tuple], Any] | None = None):
        self.dataset, self.batch_size, self.seed, self.shards, self.sampler = dataset, batch_size, seed, shards, sampler
        self.window, self.lag = window, lag
        self.make = make  # (batch number, plan item) -> the batch's reference, made elsewhere (decoders)
        self.workers = workers  # the workers of the node: until each has asked, only the lag drops batches
        self.put = put or (lambda made: made)
        self.plans: dict[int, list] = {}  # the plans of the latest two epochs asked for
        self.futures: dict[tuple[int, int], Future] = {}  # (epoch, number) -> the batch, made or being made
        self.furthest = (0, -1)  # the furthest (epoch, number) asked for
        self.positions: dict[str, tuple[int, int]] = {}  # each worker's furthest (epoch, first number) asked for
        self.count = 0  # batches made so far (one asked for again after it was forgotten counts again)
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cohort-batches")

    def batch(self, epoch: int, number: int, worker: str = "") -> Any:
        """Batch ``number`` of ``epoch``, as ``put`` made it, for ``worker`` (who asks: it has taken the
        batches before this one); the next batches of the window are started."""
        return self.batches(epoch, [number], worker)[0]

    def batches(self, epoch: int, numbers: list[int], worker: str = "") -> list[Any]:
        """Batches ``numbers`` of ``epoch`` (ascending), as ``put`` made them, for ``worker``, who will
        take them in turn: one call for several batches (``ProducerClient`` asks ``CHUNK`` at a time);
        the next batches of the window after the last are started."""
        from concurrent.futures import CancelledError

        while True:
            with self.lock:
                count = len(self._plan(epoch))
                for number in numbers:
                    if not 0 <= number < count:
                        raise CohortError(f"epoch {epoch} has {count} training batches, not a batch {number}")
                # The worker has taken the batches before its first (those of its last call it holds
                # itself): the window goes on from its last.
                self.furthest = max(self.furthest, (epoch, numbers[-1]))
                self.positions[worker] = max(self.positions.get(worker, (0, -1)), (epoch, numbers[0]))
                self._forget()
                # A batch the window has already left behind (a worker far behind the others) is
                # made for this worker alone: kept, the next request would forget it again.
                wanted = [self._submit(epoch, number) if self._forgettable(epoch, number)
                          else self._start(epoch, number) for number in numbers]
                far_epoch, far_number = self.furthest
                for ahead in range(far_number + 1, min(far_number + self.window, len(self._plan(far_epoch)))):
                    self._start(far_epoch, ahead)
            try:
                return [future.result() for future in wanted]
            except CancelledError:  # forgotten before it was made, by a request far ahead: ask again
                continue

    def batches_in(self, epoch: int) -> int:
        """How many training batches ``epoch`` has."""
        with self.lock:
            return len(self._plan(epoch))

    def held(self) -> list[tuple[int, int]]:
        """The batches made or being made, in order."""
        with self.lock:
            return sorted(self.futures)

    def _plan(self, epoch: int) -> list:
        if epoch not in self.plans:
            self.plans[epoch] = self.dataset.train_plan(self.batch_size, self.seed, epoch, self.shards, self.sampler)
            for old in sorted(self.plans)[:-2]:
                del self.plans[old]
        return self.plans[epoch]

    def _start(self, epoch: int, number: int) -> Future:
        key = (epoch, number)
        if key not in self.futures:
            self.futures[key] = self._submit(epoch, number)
        return self.futures[key]

    def _submit(self, epoch: int, number: int) -> Future:
        """The batch being made, by the producer's thread, or started at once elsewhere (``make``: its
        reference is the batch)."""
        item = self._plan(epoch)[number]
        if self.make is None:
            return self.pool.submit(self._make, item)
        self.count += 1
        made: Future = Future()
        made.set_result(self.make(number, item))
        return made

    def made(self) -> int:
        """How many batches it has made."""
        return self.count

    def _make(self, item: tuple) -> Any:
        self.count += 1  # one thread makes batches
        inputs, labels = self.dataset.make_batch(*item)
        return self.put((inputs.numpy(), labels.numpy()))

    def _forgettable(self, epoch: int, number: int) -> bool:
        """Whether ``_forget`` drops this batch: ``lag`` behind the furthest asked for, or of an earlier epoch."""
        far_epoch, far_number = self.furthest
        return epoch < far_epoch or number <= far_number - self.lag

    def _forget(self) -> None:
        """Drop the batches every worker has passed, and those ``lag`` behind the furthest (or of an earlier epoch)."""
        slowest = min(self.positions.values()) if len(self.positions) >= self.workers else (0, -1)
        for key in list(self.futures):
            if key < slowest or self._forgettable(*key):
                self.futures.pop(key).cancel()  # not made yet: never made


def as_batch(made: tuple) -> Batch:
    """A made batch's numpy arrays as tensors over the same memory (read-only in the object store)."""
    inputs, labels = made
    return tensor_over(inputs), tensor_over(labels)


class ProducerClient:
    """A worker's side: its node's producer (``connect()`` finds or creates it) and the batches it asks
    for, as ``worker`` (its rank: the producer keeps a batch until every worker has passed it)."""

    def __init__(self, connect: Callable[[], Any], worker: str = ""):
        self.connect, self.worker = connect, worker
        self.handle = None

    def train_batches(self, data: CohortDataset, batch_size: int, seed: int, epoch: int, shards: int = 1,
                      sampler: Any = None, part: tuple[int, int] | None = None) -> Iterator[Batch]:
        """``data.train_batches``'s batches (the same arguments, the same bytes), from the producer:
        ``CHUNK`` at a time, the next ``CHUNK`` asked for as this worker starts taking these."""
        numbers = list(range(len(data.train_plan(batch_size, seed, epoch, shards, sampler))))
        numbers = numbers if part is None else disjoint_part(numbers, *part)
        chunks = [numbers[first:first + CHUNK] for first in range(0, len(numbers), CHUNK)]
        asked = self.ask(epoch, chunks[0]) if chunks else None
        for index, chunk in enumerate(chunks):
            references = self.answer(asked)
            asked = self.ask(epoch, chunks[index + 1]) if index + 1 < len(chunks) else None
            for number in chunk:
                yield self.read(references.pop(0) if references else None, epoch, number)

    def ask(self, epoch: int, numbers: list[int]) -> Any:
        """The call for batches ``numbers`` (its answer: their references), or None where the producer
        could not be found."""
        from ray.exceptions import RayActorError

        try:
            if self.handle is None:
                self.handle = self.connect()
            return self.handle.batches.remote(epoch, numbers, self.worker)
        except RayActorError:
            self.handle = None
            return None

    def answer(self, asked: Any) -> list | None:
        """The references a call gave, or None where its producer died under it (each batch is then
        asked for again, alone: ``fetch``)."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        if asked is None:
            return None
        try:
            return list(ray.get(asked))
        except RayActorError:
            self.handle = None
            return None
        except ObjectLostError:
            return None

    def read(self, reference: Any, epoch: int, number: int) -> Batch:
        """Batch ``number`` from its reference, or asked for again where there is none or it was lost."""
        import ray
        from ray.exceptions import ObjectLostError

        if reference is not None:
            try:
                return as_batch(ray.get(reference))
            except ObjectLostError:  # it went with the producer that made it
                pass
        return self.fetch(epoch, number)

    def fetch(self, epoch: int, number: int) -> Batch:
        """One batch. A producer that died (restarted by Ray, or gone with a worker group) loses the
        batches it put: the batch is asked for again, of the producer found anew."""
        import ray
        from ray.exceptions import ObjectLostError, RayActorError

        for attempt in range(ATTEMPTS):
            try:
                if self.handle is None:
                    self.handle = self.connect()
                return as_batch(ray.get(ray.get(self.handle.batch.remote(epoch, number, self.worker))))
            except ObjectLostError:  # the batch went with the producer that owned it: ask it again, restarted
                if attempt == ATTEMPTS - 1:
                    raise
            except RayActorError:  # the producer is gone for good: find or create the node's producer anew
                if attempt == ATTEMPTS - 1:
                    raise
                self.handle = None
        raise AssertionError("unreachable")


class BatchDecoder:
    """One of a producer's decoders (``data.decoders``): a Ray actor holding the dataset, making the
    batches of the plan items it is given (numpy arrays: Ray puts them in its node's object store)."""

    def __init__(self, dataset: CohortDataset):
        self.dataset = dataset

    def make(self, item: tuple) -> tuple:
        inputs, labels = self.dataset.make_batch(*item)
        return inputs.numpy(), labels.numpy()

    def pid(self) -> int:
        """The actor's process (the benchmark reads its CPU time)."""
        import os

        return os.getpid()


def start_decoders(dataset: Any, count: int) -> list:
    """``count`` ``BatchDecoder`` actors spread over the cluster's nodes (no CPU reserved of Ray's, as
    the producer; restarted by Ray when one dies, its call made again)."""
    import ray

    actor = ray.remote(BatchDecoder).options(num_cpus=0, scheduling_strategy="SPREAD", max_restarts=-1,
                                             max_task_retries=-1)
    reference = dataset if isinstance(dataset, ray.ObjectRef) else ray.put(dataset)
    return [actor.remote(reference) for _ in range(count)]


def node_producer(key: str, dataset: Any, topology: Topology, workers: int) -> Any:
    """This node's producer of the run ``key``: found by its name, or created here (no CPU reserved of
    Ray's: it does on the node, once, what each worker did in its own; restarted by Ray when it dies).
    ``dataset``: the dataset, or its reference in the object store; ``workers``: the run's workers on this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    data = topology.data
    actor = ray.remote(RemoteProducer).options(
        name=f"cohort-batches-{key}-{node}", get_if_exists=True, num_cpus=0, max_concurrency=64,
        max_restarts=-1, max_task_retries=-1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    # The decoders get the dataset's reference as it is (a list: Ray resolves a reference given alone).
    source = [dataset] if isinstance(dataset, ray.ObjectRef) else None
    return actor.remote(dataset, data.batch_size, topology.seed, topology.replicas, data.sampler,
                        max(WINDOW, data.decoders), workers, data.decoders, source)


class RemoteProducer(BatchProducer):
    """The producer as a Ray actor: each batch ``ray.put`` once, or made by its ``decoders``
    (``start_decoders``, a window of at least one batch per decoder); a call returns its reference."""

    def __init__(self, dataset: CohortDataset, batch_size: int, seed: int, shards: int, sampler: Any, window: int,
                 workers: int, decoders: int = 0, source: list | None = None):
        import ray

        self.decoders = start_decoders(source[0] if source else dataset, decoders) if decoders else []
        make = (lambda number, item: self.decoders[number % len(self.decoders)].make.remote(item)) if decoders else None
        super().__init__(dataset, batch_size, seed, shards, sampler, window, put=ray.put, workers=workers, make=make)

    def decoder_pids(self) -> list[int]:
        """The decoders' processes (the benchmark reads their CPU time)."""
        import ray

        return ray.get([decoder.pid.remote() for decoder in self.decoders])

    def pid(self) -> int:
        """The actor's process (the benchmark reads its CPU time)."""
        import os

        return os.getpid()
