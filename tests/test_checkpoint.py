"""Training-state files: atomic, verified, tensors only."""
from __future__ import annotations

import pytest
import torch

from cohort.config.errors import CohortError
from cohort.worker.checkpoint import (
    load_peer_state,
    manifest_path,
    save_peer_state,
    state_path,
)


def a_state() -> dict:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {"epoch": 3, "fingerprint": 12345, "rng": {"torch": torch.get_rng_state()},
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {}}


def test_state_round_trips(tmp_path):
    state = a_state()
    save_peer_state(tmp_path, "student", state)
    loaded = load_peer_state(tmp_path, "student")
    assert loaded["epoch"] == 3 and loaded["fingerprint"] == 12345
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert not list(tmp_path.glob("*.partial"))


def test_truncated_state_is_refused(tmp_path):
    save_peer_state(tmp_path, "student", a_state())
    data = state_path(tmp_path, "student").read_bytes()
    state_path(tmp_path, "student").write_bytes(data[: len(data) // 2])
    with pytest.raises(CohortError, match="truncated or altered"):
        load_peer_state(tmp_path, "student")


def test_state_without_manifest_is_not_complete(tmp_path):
    save_peer_state(tmp_path, "student", a_state())
    manifest_path(tmp_path, "student").unlink()
    with pytest.raises(CohortError, match="no complete state for peer 'student'"):
        load_peer_state(tmp_path, "student")


def test_pickle_payload_is_refused_even_with_a_valid_manifest(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    save_peer_state(tmp_path, "student", {"epoch": 1, "model": {"w": Payload()}})
    with pytest.raises(CohortError, match="as weights only"):
        load_peer_state(tmp_path, "student")


@pytest.mark.parametrize("content", [
    "{not json", "", "\xff\xfe", "[1, 2]", "null", '{"sha256": "ab"}', '{"bytes": 10}',
    '{"bytes": "10", "sha256": "ab"}', '{"bytes": true, "sha256": "ab"}', '{"bytes": 10, "sha256": 5}',
])
def test_malformed_manifest_is_one_line_naming_it(tmp_path, content):
    save_peer_state(tmp_path, "student", a_state())
    manifest_path(tmp_path, "student").write_bytes(content.encode("latin-1"))
    with pytest.raises(CohortError) as raised:
        load_peer_state(tmp_path, "student")
    message = str(raised.value)
    assert str(manifest_path(tmp_path, "student")) in message and len(message.splitlines()) == 1
