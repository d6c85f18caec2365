"""A peer's initial weights come from the topology's seed and the peer's key (its name, or its
``init_seed``), never its rank: the same role starts from the same weights in every topology, and
peers that share an ``init_seed`` start identical (an arena of several methods in one cohort)."""
from __future__ import annotations

import pytest
import torch

from cohort.datasets import describe_dataset
from cohort.topology import DataConfig, topology_from_dict
from cohort.worker.peer import build_peer, peer_seed

INFO = describe_dataset(DataConfig())


def topology(peers: dict, seed: int = 0):
    names = list(peers)
    return topology_from_dict({"name": "t", "seed": seed, "peers": peers,
                               "edges": [{"from": names[0], "to": names[-1], "loss": "kd"}]})


def weights(topology, peer: str) -> dict[str, torch.Tensor]:
    return build_peer(topology, peer, INFO).state_dict()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_peer_starts_from_the_same_weights_wherever_it_stands():
    first = topology({"student": {"model": "cnn_small"}, "teacher": {"model": "cnn_medium"}})
    second = topology({"teacher": {"model": "cnn_medium"}, "other": {"model": "mlp"}, "student": {"model": "cnn_small"}})
    assert first.peer_names.index("student") != second.peer_names.index("student")
    assert same(weights(first, "student"), weights(second, "student"))
    assert same(weights(first, "teacher"), weights(second, "teacher"))


def test_names_and_seeds_give_different_draws():
    cohort = topology({"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}})
    assert not same(weights(cohort, "a"), weights(cohort, "b"))
    reseeded = topology({"a": {"model": "cnn_small"}, "b": {"model": "cnn_small"}}, seed=1)
    assert not same(weights(cohort, "a"), weights(reseeded, "a"))


def test_peers_sharing_an_init_seed_start_identical():
    arena = topology({"kd_student": {"model": "cnn_small", "init_seed": "student"},
                      "bdkd_student": {"model": "cnn_small", "init_seed": "student"},
                      "teacher": {"model": "cnn_medium"}})
    assert same(weights(arena, "kd_student"), weights(arena, "bdkd_student"))
    assert peer_seed(arena, "kd_student") == peer_seed(arena, "bdkd_student") != peer_seed(arena, "teacher")
    # An integer key too; and the key is not the name: a peer named like another's key differs.
    numbered = topology({"student": {"model": "cnn_small"}, "x": {"model": "cnn_small", "init_seed": 7},
                         "y": {"model": "cnn_small", "init_seed": 7}})
    assert same(weights(numbered, "x"), weights(numbered, "y"))
    assert not same(weights(numbered, "x"), weights(numbered, "student"))
    assert not same(weights(arena, "kd_student"), weights(numbered, "student"))


@pytest.mark.parametrize("value", [[1], {"a": 1}, 1.5])
def test_an_init_seed_is_a_name_or_an_integer(value):
    from cohort.config.errors import CohortError

    with pytest.raises(CohortError, match=r"peers\.a\.init_seed"):
        topology({"a": {"model": "mlp", "init_seed": value}, "b": {"model": "mlp"}})


def test_the_shipped_arena_starts_its_students_from_identical_weights():
    from pathlib import Path

    from cohort.topology import load_topology

    arena = load_topology(Path(__file__).resolve().parents[1] / "topologies" / "arena_digits.yaml")
    students = [peer for peer in arena.peer_names if arena.peers[peer].init_seed == "student"]
    assert students == ["labels_only", "kd", "bdkd", "dkd"]
    first = weights(arena, students[0])
    assert all(same(first, weights(arena, student)) for student in students[1:])
    assert not same(first, weights(arena, "teacher"))
    # Each student is taught by another method (the baseline by none).
    assert {edge.to: edge.loss for edge in arena.edges} == {"kd": "kd", "bdkd": "bdkd", "dkd": "dkd"}
