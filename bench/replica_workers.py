"""The worker's own training code (``cohort.worker.loop.train_epoch``: DDP, cohort.worker.syncbn, the exchange,
the batch guard, the shard loss scale) in gloo processes without Ray: ``replicas: M`` against
``replicas: 1`` on a topology, in float32 (as the workers train) or float64 (every ``.float()``
of the worker and of cohort.worker.syncbn made a no-op, and the batches cast).

Prints, for every step of the bdkd edges' receiver, how many samples' switch (entropy comparison)
differs between the two runs, and at the end the largest weight difference of every peer and the
test metrics of both runs.

    python -m bench.replica_workers topologies/bdkd_pair.yaml --dtype float64
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from cohort.config.loader import read_yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, config: dict, dtype_name: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    if dtype == torch.float64:
        torch.Tensor.float = lambda self, *args, **kwargs: self  # the worker's and syncbn's casts to fp32
    import importlib

    bdkd_module = importlib.import_module("cohort.losses.bdkd")
    from cohort.datasets import load_dataset
    from cohort.losses.batch import WHOLE_BATCH
    from cohort.topology import topology_from_dict
    from cohort.worker.exchange import (
        LogitExchange,
        ReplicaBatch,
        gather_in_group,
        grid_groups,
    )
    from cohort.worker.grid import slot_of
    from cohort.worker.guard import BatchGuard
    from cohort.worker.loop import PeerStep, train_epoch
    from cohort.worker.peer import build_optimizer, build_peer, cohort_groups
    from cohort.worker.syncbn import sync_batch_norm

    entropies: list[torch.Tensor] = []
    plain_entropy = bdkd_module.entropy

    def recording_entropy(log_p):
        value = plain_entropy(log_p)
        entropies.append(value.detach().clone())
        return value

    bdkd_module.entropy = recording_entropy
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        topology = topology_from_dict(config)
        slot = slot_of(rank, topology.peer_names)
        peer, shards = slot.peer, topology.replicas
        data = load_dataset(topology.data, topology.seed)
        plain_batch = data.make_batch
        data.make_batch = lambda *args: (lambda x, y: (x.to(dtype), y))(*plain_batch(*args))
        grouping = cohort_groups(topology, data.info)
        net = build_peer(topology, peer, data.info).to(dtype)
        exchange_group, peer_group = grid_groups(topology.peer_names, shards, rank)
        if peer_group is not None:
            sync_batch_norm(net, peer_group, "cpu", False)
        optimizer, scheduler = build_optimizer(net, topology.optimizer_for(peer), topology)
        exchange = LogitExchange(topology.peer_names, exchange_group)
        guard = BatchGuard(peer, slot.shard, shards, topology.train.check_batches_every,
                           lambda record: gather_in_group(record, dist.group.WORLD))
        model = nn.parallel.DistributedDataParallel(net, process_group=peer_group) if peer_group is not None else net
        run = PeerStep(topology=topology, peer=peer, model=model, optimizer=optimizer, exchange=exchange, guard=guard,
                       groups=grouping[0] if grouping else None, shard=slot.shard,
                       batch=ReplicaBatch(peer_group) if peer_group is not None else WHOLE_BATCH)
        snapshots, grads = [], {}
        plain_step = optimizer.step

        def recording_step(*args, **kwargs):
            if not snapshots:
                grads.update({name: p.grad.detach().double().clone() for name, p in net.named_parameters()})
            result = plain_step(*args, **kwargs)
            snapshots.append(torch.cat([p.detach().double().flatten() for p in net.parameters()]))
            return result

        optimizer.step = recording_step
        if os.environ.get("DEBUG"):
            print(rank, "set up", flush=True)
        for epoch in range(1, topology.train.epochs + 1):
            train_epoch(run, data, epoch)
            if os.environ.get("DEBUG"):
                print(rank, "epoch", epoch, flush=True)
            scheduler.step()
        # bdkd computes H(p_receiver) then H(p_sender): the gap H_s - H_r per step (this shard's samples).
        gaps = [entropies[i + 1] - entropies[i] for i in range(0, len(entropies), 2)]
        # Plain pickles: a tensor sent through torch's queue lives in shared memory its sender must outlive.
        queue.put(pickle.dumps((rank, peer, slot.shard, {k: v.double() for k, v in net.state_dict().items()}, gaps, snapshots, grads)))
    finally:
        dist.destroy_process_group()


def train(config: dict, replicas: int, dtype: str) -> dict:
    config = {**config, "peers": {name: {**peer, "replicas": replicas} for name, peer in config["peers"].items()}}
    world = len(config["peers"]) * replicas
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, world, port, config, dtype, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    results = []
    while len(results) < len(processes):
        try:
            results.append(pickle.loads(queue.get(timeout=5)))
        except Exception:
            if any(p.exitcode not in (None, 0) for p in processes):
                for p in processes:
                    p.kill()
                raise SystemExit("a worker failed") from None
    for process in processes:
        process.join()
    out = {}
    for _rank, peer, _shard, state, gaps, snapshots, grads in sorted(results, key=lambda r: r[0]):
        entry = out.setdefault(peer, {"state": state, "gaps": [], "snapshots": snapshots, "grads": grads})
        entry["gaps"].append(gaps)
    for entry in out.values():  # the shards' gaps of each step, in batch order
        entry["gaps"] = [torch.cat(parts) for parts in zip(*entry["gaps"])] if entry["gaps"][0] else []
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("topology")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int)
    args = parser.parse_args(argv)
    config = read_yaml(args.topology)  # the project's strict loader
    config["train"]["epochs"] = args.epochs
    if args.batch_size:
        config["data"]["batch_size"] = args.batch_size
    one = train(config, 1, args.dtype)
    many = train(config, args.replicas, args.dtype)
    print(f"{args.dtype}: {args.replicas} replicas against 1 (the worker's code over gloo, 1 thread each)")
    for peer in one:
        a, b = one[peer], many[peer]
        if a["gaps"]:
            flips = [int(((x > 0) != (y > 0)).sum()) for x, y in zip(a["gaps"], b["gaps"])]
            print(f"  {peer}: bdkd switches that differ, step by step: {flips} (total {sum(flips)} of "
                  f"{sum(len(x) for x in a['gaps'])} samples); smallest |gap| {min(float(x.abs().min()) for x in a['gaps']):.2e}")
        steps = [float((x - y).abs().max()) for x, y in zip(a["snapshots"], b["snapshots"])]
        print(f"  {peer}: largest parameter difference after each step: " + " ".join(f"{d:.1e}" for d in steps))
        if os.environ.get("DEBUG"):
            for name, g in a["grads"].items():
                print(f"    first step's gradient {name}: |g| {float(g.abs().max()):.2e}, "
                      f"difference {float((g - b['grads'][name]).abs().max()):.2e}")
        worst = max((float((a['state'][k] - b['state'][k]).abs().max()), k) for k in a["state"]
                     if a["state"][k].is_floating_point())
        print(f"  {peer}: largest weight difference {worst[0]:.3e} ({worst[1]})")


if __name__ == "__main__":
    main()
