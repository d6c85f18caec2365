"""A peer's training state on disk: written atomically, read back with ``weights_only=True``.

Each peer writes ``<peer>.state.pt`` (model, optimizer, schedule, epoch, RNG state, running batch
fingerprint) and then ``<peer>.manifest.json`` with the file's size and SHA-256. The manifest is
written last, by rename, so a crash while writing never leaves a state that looks complete, and a
truncated or altered file is refused when read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from cohort.config.errors import CohortError, first_line


def state_path(folder: str | Path, peer: str) -> Path:
    return Path(folder) / f"{peer}.state.pt"


def manifest_path(folder: str | Path, peer: str) -> Path:
    return Path(folder) / f"{peer}.manifest.json"


def save_peer_state(folder: str | Path, peer: str, state: dict[str, Any]) -> None:
    target = state_path(folder, peer)
    partial = target.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, target)
    manifest = {"file": target.name, "bytes": target.stat().st_size, "sha256": _sha256(target),
                "epoch": state.get("epoch")}
    partial_manifest = manifest_path(folder, peer).with_suffix(".partial")
    partial_manifest.write_text(json.dumps(manifest))
    os.replace(partial_manifest, manifest_path(folder, peer))


def load_peer_state(folder: str | Path, peer: str) -> dict[str, Any]:
    """The state a peer saved, verified against its manifest; a one-line error otherwise."""
    target, manifest_file = state_path(folder, peer), manifest_path(folder, peer)
    if not manifest_file.exists() or not target.exists():
        raise CohortError(f"checkpoint {folder} has no complete state for peer {peer!r}")
    manifest = read_manifest(manifest_file)
    if target.stat().st_size != manifest["bytes"] or _sha256(target) != manifest["sha256"]:
        raise CohortError(f"checkpoint file {target} is truncated or altered (size or SHA-256 differs from its "
                          "manifest)")
    return load_tensors(target)


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest's content, checked: a dict with an int ``bytes`` and a str ``sha256``."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CohortError(f"checkpoint manifest {path} is unreadable: {first_line(error, 200)}") from None
    if not isinstance(manifest, dict):
        raise CohortError(f"checkpoint manifest {path} is not a JSON object")
    for key, kind in (("bytes", int), ("sha256", str)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CohortError(f"checkpoint manifest {path} has no {kind.__name__} {key!r}")
    return manifest


def load_tensors(path: str | Path) -> Any:
    """``torch.load`` of plain tensors and containers only: a pickled object is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every unpickling failure is the same user problem
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise CohortError(f"cannot load {path} as weights only: {reason[:200]}") from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
