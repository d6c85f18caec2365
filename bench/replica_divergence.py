"""Replicas against one replica, in one process (no Ray): where do they part, and why?

Trains a topology's cohort twice on the same batches, in lockstep:

- ``one``: every peer on the whole batch (``replicas: 1``);
- ``two``: every peer as M replicas would (``replicas: M``): each shard's forward, batch norm
  over all shards' moments (what ``cohort.worker.syncbn`` all-reduces: sums of the shards' sums), each
  shard's loss times ``shard_loss_scale``, the replicas' gradients averaged (DDP), one step.

At every step it records, for every ``bdkd`` edge, how many samples' switch (the entropy
comparison that picks the forward or the reverse KL's weight) differs between the two runs, the
smallest entropy gap of the step, and the largest weight difference between the runs. In float64
arithmetic noise is ~1e-16 relative, so a difference that stays there is arithmetic; one that does
not is a real difference of the computation.

    python -m bench.replica_divergence topologies/bdkd_pair.yaml --dtype float64
    python -m bench.replica_divergence topologies/bdkd_pair.yaml --dtype float32 --perturb 1e-7
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from cohort.config.loader import read_yaml
from cohort.config.overrides import parse_assignment
from cohort.datasets import load_dataset
from cohort.losses.combine import peer_objective
from cohort.losses.divergence import entropy, log_probs
from cohort.topology import topology_from_dict
from cohort.worker.grid import shard_bounds, shard_loss_scale
from cohort.worker.peer import build_optimizer, build_peer, cohort_groups


def shard_forward(model: nn.Sequential, shards: list[torch.Tensor], synced: bool = True) -> list[torch.Tensor]:
    """Each shard's output of ``model``, with batch norm's statistics over all the shards (as
    ``PeerSyncBatchNorm`` computes them: the shards' sums added, two passes) when ``synced``."""
    xs = list(shards)
    for layer in model:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training and synced and len(xs) > 1:
            dims = [0, *range(2, xs[0].dim())]
            shape = [1, -1] + [1] * (xs[0].dim() - 2)
            total = sum(x.numel() / x.shape[1] for x in xs)
            mean = sum(x.sum(dims) for x in xs) / total
            centered = [x - mean.reshape(shape) for x in xs]
            var = sum((c * c).sum(dims) for c in centered) / total
            xs = [c * torch.rsqrt(var + layer.eps).reshape(shape) * layer.weight.reshape(shape)
                  + layer.bias.reshape(shape) for c in centered]
            with torch.no_grad():
                layer.num_batches_tracked.add_(1)
                m = layer.momentum
                layer.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                layer.running_var.mul_(1 - m).add_(var.detach() * (total / max(total - 1.0, 1.0)), alpha=m)
        else:
            xs = [layer(x) for x in xs]
    return xs


def switches(topology, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every bdkd edge's per-sample switch (receiver more confident than its sender) and entropy gap."""
    out = {}
    for edge in topology.edges:
        if edge.loss != "bdkd":
            continue
        t = edge.params.get("temperature", 4.0)
        receiver = logits[edge.to]
        sender = torch.stack([logits[s] for s in edge.senders]).mean(0)
        gap = entropy(log_probs(sender.detach(), t)) - entropy(log_probs(receiver.detach(), t))
        out[edge.label] = gap
    return out


class Cohort:
    def __init__(self, topology, info, dtype, groups, perturb: float = 0.0, seed: int = 0):
        self.topology = topology
        self.models = {p: build_peer(topology, p, info).to(dtype) for p in topology.peer_names}
        if perturb:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for model in self.models.values():
                    for param in model.parameters():
                        param.mul_(1 + perturb * torch.randn(param.shape, generator=gen, dtype=dtype))
        self.optimizers = {p: build_optimizer(m, topology.optimizer_for(p), topology) for p, m in self.models.items()}
        self.groups = groups

    def step(self, inputs, labels, epoch: int, shards: int, synced: bool = True) -> dict[str, torch.Tensor]:
        """One training step of every peer; the whole batch's logits of every peer (before the step)."""
        topology, size = self.topology, len(labels)
        bounds = [shard_bounds(size, shards, s) for s in range(shards)]
        xs = [inputs[a:b] for a, b in bounds]
        ys = [labels[a:b] for a, b in bounds]
        logits = {p: shard_forward(m, xs, synced) if shards > 1 else [m(inputs)] for p, m in self.models.items()}
        for peer in self.models:
            optimizer, _ = self.optimizers[peer]
            total = 0
            for s in range(shards):
                exchanged = {p: logits[p][s].detach() for p in logits}
                loss, _ = peer_objective(logits[peer][s], ys[s], topology.incoming_edges(peer), exchanged,
                                         topology.train.ce_weight, epoch, self.groups)
                # DDP: each replica's gradient of its scaled loss, averaged over the replicas.
                total = total + (loss * shard_loss_scale(len(ys[s]), size, shards) if shards > 1 else loss)
            optimizer.zero_grad(set_to_none=True)
            (total / shards).backward()
            optimizer.step()
        return {p: torch.cat(v).detach() for p, v in logits.items()}

    def end_epoch(self):
        for _, scheduler in self.optimizers.values():
            scheduler.step()

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        out = {}
        for peer, model in self.models.items():
            model.eval()
            xs, ys = zip(*data.test_batches(256))
            logits = torch.cat([model(x.to(next(model.parameters()).dtype)) for x in xs]).double()
            y = torch.cat(ys)
            probs = logits.softmax(1)
            conf, pred = probs.max(1)
            acc = (pred == y).double()
            edges = torch.linspace(0, 1, 16, dtype=torch.float64)
            ece = sum((abs(acc[(conf > lo) & (conf <= hi)].sum() - conf[(conf > lo) & (conf <= hi)].sum())
                       for lo, hi in zip(edges[:-1], edges[1:])), torch.tensor(0.0)) / len(y)
            out[peer] = {"acc": float(acc.mean()), "nll": float(nn.functional.cross_entropy(logits, y)),
                         "ece": float(ece)}
            model.train()
        return out


def max_distance(a: Cohort, b: Cohort) -> dict[str, float]:
    return {p: max(float((x - y).abs().max()) for x, y in zip(a.models[p].state_dict().values(),
                                                              b.models[p].state_dict().values())
                   if x.is_floating_point())
            for p in a.models}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("topology")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--per-shard-bn", action="store_true", help="batch norm per shard (sync_batchnorm: false)")
    parser.add_argument("--perturb", type=float, default=0.0,
                        help="instead of replicas: one replica against one replica whose initial weights are "
                             "multiplied by (1 + PERTURB * N(0, 1)) (the chaos baseline)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE of the edges, e.g. delta_low=1.0")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = read_yaml(args.topology)  # the project's strict loader
    config["train"]["epochs"] = args.epochs
    if args.batch_size:
        config["data"]["batch_size"] = args.batch_size
    for item in args.set:
        key, value = parse_assignment(item)
        for edge in config["edges"]:
            if edge["loss"] == "bdkd":
                edge[key] = value
    topology = topology_from_dict(config)
    data = load_dataset(topology.data, topology.seed)
    grouping = cohort_groups(topology, data.info)
    groups = grouping[0] if grouping else None
    one = Cohort(topology, data.info, dtype, groups)
    two = Cohort(topology, data.info, dtype, groups, perturb=args.perturb)
    shards = 1 if args.perturb else args.replicas
    print(f"{args.dtype}, {'perturbed 1 replica' if args.perturb else f'{shards} replicas'} against 1, "
          f"batch {topology.data.batch_size}, threads {args.threads}")
    print("epoch step  size  flipped/edge  min|gap|  max|dW| per peer")
    for epoch in range(1, args.epochs + 1):
        for step, (inputs, labels) in enumerate(data.train_batches(topology.data.batch_size, topology.seed, epoch,
                                                                   shards=args.replicas)):
            inputs = inputs.to(dtype)
            a = one.step(inputs, labels, epoch, 1)
            b = two.step(inputs, labels, epoch, shards, synced=not args.per_shard_bn)
            gaps_a, gaps_b = switches(topology, a), switches(topology, b)
            flipped = {e: int(((gaps_a[e] > 0) != (gaps_b[e] > 0)).sum()) for e in gaps_a}
            near = min((float(g.abs().min()) for g in gaps_a.values()), default=float("nan"))
            dist = max_distance(one, two)
            print(f"{epoch:5d} {step:4d} {len(labels):5d}  {flipped}  {near:.2e}  "
                  + "  ".join(f"{p}={d:.2e}" for p, d in dist.items()), flush=True)
        one.end_epoch()
        two.end_epoch()
    print("one:", one.evaluate(data))
    print("two:", two.evaluate(data))


if __name__ == "__main__":
    main()
