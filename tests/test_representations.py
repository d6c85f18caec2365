"""Representations without Ray: the exchange's packed layout, heads on Sequential-built nets, bad
input (unknown taps, maps that cannot be matched, mcl edges without embeddings, samplers the batch or
the dataset cannot fill), each one line and exit 2 before anything starts, and replicas: MCL and
attention on shards give, averaged as DDP does, each peer's whole-batch gradient."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from cohort.config.errors import CohortError
from cohort.datasets import DatasetInfo
from cohort.models import build_model
from cohort.models.heads import EmbeddingHead, attach_heads
from cohort.run import main
from cohort.topology import topology_from_dict
from cohort.worker.payload import Part, PayloadLayout, TapShapes, payload_layout
from cohort.worker.peer import build_peer

REPO = Path(__file__).resolve().parents[1]


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / "topologies" / name).read_text())


def dry_run_error(capsys, tmp_path: Path, topology: dict) -> str:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    code = main([str(path), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


# --------------------------------------------------------------------------- the layout


def test_a_layout_packs_each_peers_parts_into_one_padded_row_and_unpacks_them():
    layout = PayloadLayout({"a": (Part("logits", ((3,),)), Part("embedding", ((4,),))),
                            "b": (Part("logits", ((3,),)), Part("maps->a", ((2, 2), (1, 1))))})
    assert layout.row == 8 and layout.width("a") == 7 and layout.bytes_per_image("a") == 32
    logits, embedding = torch.randn(5, 3), torch.randn(5, 4)
    maps = [torch.randn(5, 2, 2), torch.randn(5, 1, 1)]
    row_a = layout.pack("a", {"logits": [logits], "embedding": [embedding]})
    row_b = layout.pack("b", {"logits": [logits], "maps->a": maps})
    assert row_a.shape == row_b.shape == (5, 8)
    assert torch.equal(row_a[:, 7], torch.zeros(5))  # padding
    back = layout.unpack("b", row_b)
    assert torch.equal(back["logits"][0], logits) and all(torch.equal(x, y) for x, y in zip(back["maps->a"], maps))
    assert torch.equal(layout.unpack("a", row_a)["embedding"][0], embedding)
    with pytest.raises(ValueError, match="the layout says"):
        layout.pack("a", {"logits": [logits], "embedding": [torch.randn(5, 5)]})


def test_senders_send_embeddings_once_and_maps_at_each_receivers_matched_sizes():
    topology = topology_from_dict({
        "name": "t", "peers": {"a": {"model": "cnn_small", "embedding": {"dim": 8}},
                               "b": {"model": "cnn_medium", "embedding": {"dim": 8}}, "c": {"model": "cnn_small"}},
        "edges": [{"from": "a", "to": "b", "loss": "mcl"}, {"from": "b", "to": "a", "loss": "mcl"},
                  {"from": "a", "to": "c", "loss": "attention"}, {"from": "c", "to": "a", "loss": "kd"}]})
    shapes = {"a": TapShapes(8, ((16, 8, 8), (32, 4, 4))), "b": TapShapes(8, ()), "c": TapShapes(None, ((16, 4, 4), (32, 2, 2)))}
    layout = payload_layout(topology, 10, shapes)
    assert [part.name for part in layout.parts["a"]] == ["logits", "embedding", "maps->c"]
    assert layout.parts["a"][2].shapes == ((4, 4), (2, 2))  # pooled to the smaller
    assert [part.name for part in layout.parts["c"]] == ["logits"]
    assert layout.row == 10 + 8 + 16 + 4


# --------------------------------------------------------------------------- heads


def test_a_sequential_net_with_a_head_keeps_its_forward_and_its_keys():
    torch.manual_seed(0)
    net = build_model("cnn_small", num_classes=10, in_channels=1)
    keys = set(net.state_dict())
    inputs = torch.randn(4, 1, 8, 8)
    before = net(inputs)
    attach_heads(net, {"embedding": EmbeddingHead(32, 16)})
    assert torch.equal(net(inputs), before)
    assert keys < set(net.state_dict()) and all(k.startswith("cohort_heads.") for k in set(net.state_dict()) - keys)


def test_a_peer_is_built_with_its_head_from_its_seed():
    topology = topology_from_dict(shipped("mcl_pair.yaml"))
    info = DatasetInfo("digits", 10, 1, 100, 10, (10,) * 10, input_size=(1, 8, 8))
    first, again = (build_peer(topology, "student", info) for _ in range(2))
    head = first.cohort_heads["embedding"]
    assert head.project[0].in_features == 32 and head.project[2].out_features == 128
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    # the backbone's initial weights are those of the same peer without a head
    plain = topology_from_dict({**shipped("mcl_pair.yaml"), "edges": [],
                                "peers": {"teacher": {"model": "cnn_medium"}, "student": {"model": "cnn_small"}}})
    bare = build_peer(plain, "student", info).state_dict()
    assert all(torch.equal(value, first.state_dict()[key]) for key, value in bare.items())


# --------------------------------------------------------------------------- bad input


def test_shipped_representation_topologies_plan_what_travels(capsys):
    for name, line in (("mcl_pair.yaml", "teacher: logits 10, embedding 128 floats per image; 34.5 KiB"),
                       ("attention_pair.yaml", "teacher: logits 10, maps->student 80 floats per image; 22.5 KiB")):
        assert main([str(REPO / "topologies" / name), "--dry-run"]) == 0
        assert line in capsys.readouterr().out


def with_taps(stages: list[str]) -> dict:
    topology = shipped("attention_pair.yaml")
    topology["peers"]["teacher"]["taps"] = {"stages": stages}
    return topology


def mcl_without_embedding() -> dict:
    topology = shipped("mcl_pair.yaml")
    del topology["peers"]["student"]["embedding"]
    return topology


def with_data(**data) -> dict:
    topology = shipped("mcl_pair.yaml")
    topology["data"] = {**topology["data"], **data}
    return topology


def with_replicas() -> dict:
    topology = shipped("mcl_pair.yaml")
    for peer in topology["peers"].values():
        peer["replicas"] = 2
    return topology


def ensemble_sender() -> dict:
    topology = shipped("attention_pair.yaml")
    topology["peers"]["third"] = {"model": "cnn_small"}
    topology["edges"][0]["from"] = {"ensemble": ["student", "third"]}
    return topology


@pytest.mark.parametrize("topology, expected", [
    (with_taps(["nope"]), "peers.teacher.taps: peer 'teacher' has no module 'nope' to tap"),
    (with_taps(["5"]), "edges[0]: student -> teacher: attention maps cannot be matched: 2 stages against 1"),
    (mcl_without_embedding(), "edges[0]: loss 'mcl' contrasts embeddings: peer 'student' needs an embedding head"),
    (with_data(sampler={"m_per_class": 3}), "data.sampler.m_per_class: batch_size 64 is not a multiple of"),
    (with_data(sampler={"m_per_class": 2}), "data.batch_size:"),
    (with_data(sampler={"m_per_class": 1}), "data.sampler.m_per_class:"),
    (ensemble_sender(), "edges[0].from: loss 'attention' exchanges maps, which are not averaged"),
], ids=["unknown-tap", "unmatched-maps", "mcl-without-embedding", "m-not-dividing", "too-few-classes", "m-of-one",
        "ensemble-of-maps"])
def test_bad_representation_input_is_one_line_before_anything_starts(capsys, tmp_path, topology, expected):
    assert expected in dry_run_error(capsys, tmp_path, topology)


def test_an_mcl_pair_with_replicas_plans_its_whole_batch_exchange(capsys, tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(with_replicas(), sort_keys=False))
    assert main([str(path), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 0
    out = capsys.readouterr().out
    assert "teacher: logits 10, embedding 128 floats per image" in out
    assert "one all_gather over every worker: the whole batch's embeddings to each replica" in out
    # Each worker sends its shard's rows (batch 64 on 2 replicas), padded to the widest peer's 138 floats.
    assert f"{138 * 4 * 32 / 1024:,.1f} KiB per worker (its shard's 32 images)" in out


def test_an_embedding_only_sent_is_computed_without_a_graph():
    from types import SimpleNamespace

    from cohort.worker.representations import PeerTaps

    head = EmbeddingHead(4, 8)
    recorder = SimpleNamespace(penultimate=torch.randn(3, 4), stages=None)
    read, sent = (PeerTaps("a", None, recorder, head, None, live_embedding=live).own()[0] for live in (True, False))
    assert read.requires_grad and not sent.requires_grad and torch.equal(read, sent)


def test_a_head_on_a_model_without_a_linear_classifier_is_one_line():
    topology = topology_from_dict({"name": "t", "data": {"dataset": "digits"},
                                   "peers": {"a": {"model": "torchvision:squeezenet1_0", "embedding": {"dim": 8}}}})
    info = DatasetInfo("x", 10, 3, 100, 10, (10,) * 10, input_size=(3, 32, 32))
    with pytest.raises(CohortError, match="has no nn.Linear classifier to take the penultimate feature from") as error:
        build_peer(topology, "a", info)
    assert error.value.where == "peers.a.taps"


# --------------------------------------------------------------------------- replicas


class TinyPeer(torch.nn.Module):
    """A stage (conv 8x8), a penultimate feature (pooled), a classifier and an embedding head."""

    def __init__(self, width: int):
        super().__init__()
        self.stage = torch.nn.Conv2d(1, width, 3, padding=1)
        self.classifier = torch.nn.Linear(width, 10)
        self.head = EmbeddingHead(width, 8)

    def forward(self, inputs):
        stage = self.stage(inputs).relu()
        feature = stage.mean(dim=(2, 3))
        return self.classifier(feature), self.head(feature), [stage]


REPLICA_TOPOLOGY = {
    "name": "r", "train": {"ce_weight": 0.8},
    "peers": {"a": {"model": "cnn_small", "embedding": {"dim": 8, "vcl": 0.3, "tau": 0.2}},
              "b": {"model": "cnn_medium", "embedding": {"dim": 8, "vcl": 0.2, "tau": 0.2}}},
    "edges": [{"from": "b", "to": "a", "loss": "mcl", "reduce": "sum", "tau": 0.2, "beta": 0.5, "lam": 0.7},
              {"from": "a", "to": "b", "loss": "mcl", "reduce": "sum", "tau": 0.2, "gamma": 0.4},
              {"from": "a", "to": "b", "loss": "attention", "reduce": "sum", "beta": 30.0}]}


def replica_gradients(replicas: int, broken: str = "") -> dict[str, list[torch.Tensor]]:
    """Each peer's gradient, averaged over its replicas as DDP does, of what every replica's worker
    computes (cohort.worker.loop: pack, gather, ``received``, ``peer_objective``, ``shard_loss_scale``)
    on its shard of one batch of 14 (uneven shards with 3 replicas). ``broken``: ``"shard"`` (each
    replica's loss over its shard only) or ``"scale"`` (the whole-batch terms not scaled)."""
    from cohort.losses.combine import peer_objective
    from cohort.worker.grid import shard_bounds, shard_loss_scale
    from cohort.worker.payload import pad_rows
    from cohort.worker.representations import BatchShards, PeerTaps

    topology = topology_from_dict({**REPLICA_TOPOLOGY, "peers": {
        name: {**peer, "replicas": replicas} for name, peer in REPLICA_TOPOLOGY["peers"].items()}})
    layout = payload_layout(topology, 10, {name: TapShapes(8, ((4, 8, 8),)) for name in "ab"})
    peers = {"a": TinyPeer(4), "b": TinyPeer(4)}
    torch.manual_seed(0)
    for net in peers.values():
        for parameter in net.parameters():
            parameter.data = torch.randn_like(parameter) * 0.5
    inputs = torch.randn(14, 1, 8, 8)
    labels = torch.tensor([3, 3, 1, 1, 7, 7, 3, 2, 2, 5, 5, 1, 9, 7])  # 9 has no positive
    taps = {name: PeerTaps(name, layout, None, None, (topology.peers[name].embedding.vcl, 0.2),
                           whole_batch=replicas > 1) for name in peers}
    forwards, buffers = {}, []
    for shard in range(replicas):  # rank order: shard by shard, peer by peer
        start, stop = shard_bounds(14, replicas, shard)
        for name, net in peers.items():
            logits, embedding, stages = net(inputs[start:stop])
            forwards[name, shard] = (logits, embedding, stages)
            sent = layout.pack(name, taps[name].outgoing(logits, embedding, stages))
            buffers.append(pad_rows(sent, shard_bounds(14, replicas, 0)[1]))
    averaged = {}
    for name, net in peers.items():
        per_replica = []
        for shard in range(replicas):
            start, stop = shard_bounds(14, replicas, shard)
            logits, embedding, stages = forwards[name, shard]
            shards = BatchShards(labels, replicas, shard) if replicas > 1 and broken != "shard" else None
            rows = (shards.whole(buffers, list(peers)) if shards is not None else
                    {peer: buffers[shard * 2 + index][:stop - start] for index, peer in enumerate(peers)})
            peer_logits, representations = taps[name].received(rows, embedding, stages, shards)
            if broken == "scale":
                representations = dataclasses.replace(representations, gradient=1.0)
            loss, _ = peer_objective(logits, labels[start:stop], topology.incoming_edges(name), peer_logits,
                                     topology.train.ce_weight, representations=representations)
            scaled = loss * shard_loss_scale(stop - start, 14, replicas)
            per_replica.append(torch.autograd.grad(scaled, list(net.parameters()), retain_graph=True))
        averaged[name] = [torch.stack(grads).mean(dim=0) for grads in zip(*per_replica)]
    return averaged


@pytest.mark.parametrize("replicas", [2, 3])
def test_mcl_and_attention_with_replicas_give_the_whole_batch_gradient(replicas):
    """Every replica computes MCL over the whole batch (its own rows live, the other shards'
    gathered) and its shard's CE and attention terms; DDP's average of their gradients is each
    peer's one-process gradient. Without the gather, or without the scale, it is not."""
    whole = replica_gradients(1)
    for name, averaged in replica_gradients(replicas).items():
        assert len(averaged) == len(whole[name]) == 8  # the stage, the classifier and the head
        for got, want in zip(averaged, whole[name]):
            # float32, as the exchange is: the other shards' rows of a peer's own embedding are copies
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for broken in ("shard", "scale"):
        wrong = replica_gradients(replicas, broken)
        gap = max(float((g - w).abs().max()) for name in whole for g, w in zip(wrong[name], whole[name]))
        assert gap > 1e-3, broken


def test_with_replicas_a_peer_sends_the_embedding_its_own_loss_reads():
    topology = topology_from_dict({
        "name": "t", "peers": {"a": {"model": "cnn_small", "embedding": {"dim": 8}, "replicas": 2},
                               "b": {"model": "cnn_small", "embedding": {"dim": 8, "vcl": 0}, "replicas": 2},
                               "c": {"model": "cnn_small", "embedding": {"dim": 8, "vcl": 0}, "replicas": 2}},
        "edges": [{"from": "c", "to": "b", "loss": "mcl"}]})
    layout = payload_layout(topology, 10, {name: TapShapes(8, ()) for name in "abc"})
    # a: its VCL; b: the edge into it; c: sends for the edge from it
    assert {name: [part.name for part in layout.parts[name]] for name in "abc"} == {
        "a": ["logits", "embedding"], "b": ["logits", "embedding"], "c": ["logits", "embedding"]}
    single = topology_from_dict({**topology.model_dump(by_alias=True), "peers": {
        name: {**peer.model_dump(exclude_none=True), "replicas": 1} for name, peer in topology.peers.items()}})
    assert [part.name for part in payload_layout(single, 10, {n: TapShapes(8, ()) for n in "abc"}).parts["a"]] == ["logits"]
