"""Training-state files: atomic, verified, tensors only."""
from __future__ import annotations

from pathlib import Path

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


# --------------------------------------------------------------------------- a run's final results


class FolderCheckpoint:
    """What log_checkpoint_artifacts asks of a Ray checkpoint: its folder."""

    def __init__(self, folder):
        self.folder = folder

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.folder))


class RecordingTracker:
    """Each logged file's artifact path and bytes (the drawn diagrams' folder is gone afterwards)."""

    def __init__(self):
        self.logged: dict[str, bytes] = {}

    def log_file(self, path, artifact_path=None):
        name = f"{artifact_path}/{Path(path).name}"
        assert name not in self.logged, f"{name} logged twice"
        self.logged[name] = Path(path).read_bytes()


def test_workers_write_weights_and_bins_and_the_driver_draws_the_diagrams(tmp_path):
    """A worker's final results are its weights and reliability bins, no figure (no worker imports
    matplotlib); the driver logs them with each diagram drawn from its bins, and leaves the training
    state out. A checkpoint that holds its diagrams already (an earlier cohort's) keeps them."""
    import json

    from cohort.metrics.reliability import ReliabilityBins, reliability_bins, reliability_bins_probs
    from cohort.tracking.tracker import log_checkpoint_artifacts
    from cohort.worker.loop import save_final

    torch.manual_seed(0)
    model, logits, labels = torch.nn.Linear(4, 3), torch.randn(200, 3) * 3, torch.randint(0, 3, (200,))
    ensemble = torch.softmax(torch.randn(200, 3), dim=1)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_final(str(folder), "student", model, logits, labels, ensemble)
    save_peer_state(folder, "student", a_state())
    assert not list(folder.glob("*.png"))
    for name, expected in (("student", reliability_bins(logits, labels)),
                           ("ensemble", reliability_bins_probs(ensemble, labels))):
        bins = ReliabilityBins.from_dict(json.loads((folder / f"reliability_{name}.json").read_text()))
        for field in ("edges", "counts", "accuracy", "confidence"):
            torch.testing.assert_close(getattr(bins, field), getattr(expected, field), equal_nan=True)

    tracker = RecordingTracker()
    log_checkpoint_artifacts(tracker, FolderCheckpoint(folder))
    assert set(tracker.logged) == {"weights/student.pt", "reliability/reliability_student.json",
                                   "reliability/reliability_student.png", "reliability/reliability_ensemble.json",
                                   "reliability/reliability_ensemble.png"}
    assert all(tracker.logged[f"reliability/reliability_{name}.png"][:8] == b"\x89PNG\r\n\x1a\n"
               for name in ("student", "ensemble"))

    (folder / "reliability_student.png").write_bytes(b"an earlier cohort's diagram")
    tracker = RecordingTracker()
    log_checkpoint_artifacts(tracker, FolderCheckpoint(folder))
    assert tracker.logged["reliability/reliability_student.png"] == b"an earlier cohort's diagram"
    assert tracker.logged["reliability/reliability_ensemble.png"][:8] == b"\x89PNG\r\n\x1a\n"
