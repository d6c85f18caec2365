"""Peers as MLflow models: what a finished run logs for each trained peer (``models/<peer>``, the
``mlflow.pytorch`` flavor), registering one in the Model Registry, and reading a finished run's
topology and a peer's weights back (for ``cohort.export``).

A peer's model takes the image batch its dataset serves (float32 ``[N, C, H, W]``, already
normalized: the model's metadata says how) and returns logits ``[N, classes]``. It is saved as
``torch.export``'s graph (MLflow's ``pt2`` format): loading it needs torch, not cohort's code, and
the archive holds no pickled object (docs/trained-peers.md: how a loader has MLflow check that). Only the driver calls this module (MLflow has one writer per run).

The cohort's ensemble (``ensemble``: the mean of every peer's probabilities, as the run's
``ensemble/*`` metrics) is a model too, taken out of a finished run by ``cohort.export``: one
graph holding every peer, returning the log of the mean probabilities.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cohort.config.errors import CohortError, first_line, quoted
from cohort.config.schema import SAFE_NAME, SAFE_NAME_RULE
from cohort.topology import Topology
from cohort.worker.report import ENSEMBLE

MODELS_FOLDER = "models"  # a peer's model: runs:/RUN_ID/models/<peer>
WEIGHTS_FOLDER = "weights"  # its state_dict: runs:/RUN_ID/weights/<peer>.pt
EXAMPLE_SIZE = 4  # test images in a model's input example (more than one: the batch stays dynamic)
REGISTRY_TAG = "cohort."  # prefix of the tags a registered version carries


CALIBRATED = "_calibrated"  # models/<peer>_calibrated: the peer's logits divided by its fitted temperature


def model_uri(run_id: str, peer: str) -> str:
    return f"runs:/{run_id}/{MODELS_FOLDER}/{peer}"


class TemperatureScaled(torch.nn.Module):
    """A peer whose logits are divided by the temperature its run fitted (``cohort.metrics.temperature``):
    softmax of its output gives the calibrated probabilities; the arg max is the peer's."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images) / self.temperature


def fitted_temperature(final: Mapping[str, Any], peer: str, run_id: str) -> float:
    """The temperature the run fitted for ``peer`` (refused when it fitted none)."""
    value = final.get(f"{peer}/ts_temperature")
    if value is None:
        raise CohortError(f"run {run_id} fitted no temperature for {peer!r} (train with data.val_fraction > 0 to "
                          "have one)", "--calibrated")
    return float(value)


class PeerEnsemble(torch.nn.Module):
    """The cohort's ensemble as one model: the mean of its peers' probabilities, returned as their
    log (softmax of the output gives the mean exactly; its arg max is the ensemble's prediction)."""

    def __init__(self, peers: Mapping[str, torch.nn.Module]):
        super().__init__()
        self.peers = torch.nn.ModuleDict(dict(peers))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([peer(images).float().log_softmax(dim=1) for peer in self.peers.values()])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.peers))


def exported_peers(topology: Topology) -> list[str]:
    """The peers a run logs as models: the ones it trained (a frozen peer comes from elsewhere)."""
    return [peer for peer in topology.peer_names if not topology.peers[peer].frozen]


def takeable(topology: Topology) -> list[str]:
    """What ``cohort.export`` takes out of a finished run: a trained peer, or the ensemble of all."""
    return [*exported_peers(topology), ENSEMBLE]


def needed_weights(topology: Topology, name: str) -> list[str]:
    """The peers whose weights the model ``name`` (a peer, or the ensemble) is made of."""
    return list(topology.peer_names) if name == ENSEMBLE else [name]


def model_of(topology: Topology, name: str, info, weights: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.nn.Module:
    """The model ``name`` with its final weights (``weights``: each needed peer's state_dict), in eval mode."""
    if name == ENSEMBLE:
        return PeerEnsemble({peer: trained_peer(topology, peer, info, weights[peer])
                             for peer in topology.peer_names}).eval()
    return trained_peer(topology, name, info, weights[name])


def architecture(topology: Topology, name: str) -> str:
    """``resnet8x4``, or ``ensemble(teacher+student)``."""
    return f"{ENSEMBLE}({'+'.join(topology.peer_names)})" if name == ENSEMBLE else topology.peers[name].model


def method_of(topology: Topology, name: str) -> str:
    return "mean of the peers' probabilities" if name == ENSEMBLE else incoming_methods(topology, name)


def trained_peer(topology: Topology, peer: str, info, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The peer's network with its final weights (checked against the model), in eval mode."""
    from cohort.worker.peer import build_peer, check_weights

    model = build_peer(topology, peer, info, weights if topology.peers[peer].checkpoint else None)
    model.load_state_dict(check_weights(dict(weights), model, f"weights/{peer}.pt", "--peer"))
    return model.eval()


# --------------------------------------------------------------------------- what a model records


def incoming_methods(topology: Topology, peer: str) -> str:
    """The methods of the edges into ``peer``, e.g. ``bdkd from teacher; kd from ensemble(a+b)``."""
    parts = []
    for edge in topology.incoming_edges(peer):
        source = edge.senders[0] if len(edge.senders) == 1 else f"ensemble({'+'.join(edge.senders)})"
        parts.append(f"{edge.loss} from {source}")
    return "; ".join(parts) or "labels only"


def test_metric_names(topology: Topology, info, groups) -> list[str]:
    """The names of a peer's test metrics in an epoch's report (``acc``, ``ece``, ... and the
    per-group ones where the run has groups), computed by the metric code itself."""
    from cohort.metrics import scores as metrics
    from cohort.worker.report import metric_groups

    logits, labels = torch.randn(4, info.num_classes), torch.arange(4) % info.num_classes
    return sorted(metrics.evaluate(logits, labels, *metric_groups(topology, groups)))


def peer_test_metrics(final: Mapping[str, Any], peer: str, names: list[str]) -> dict[str, float]:
    """A peer's final test metrics from the run's last report, keyed without the peer's prefix: the
    ``names``, and the temperature-scaled ones (``*_ts``, ``ts_temperature``) where a run reports them."""
    from cohort.tracking.tracker import flat_metrics
    from cohort.worker.report import metric_key

    prefix = metric_key(peer, "")
    flat = flat_metrics(final)
    wanted = set(names)
    return {key[len(prefix):]: value for key, value in flat.items() if key.startswith(prefix)
            and (key[len(prefix):] in wanted or key.endswith("_ts") or key[len(prefix):] == "ts_temperature")}


def model_metadata(topology: Topology, peer: str, info, preprocessing: Mapping[str, Any], test_metrics: Mapping[str, float],
                   run_id: str) -> dict[str, Any]:
    """What the MLmodel file records under ``metadata.cohort``."""
    return {"cohort": {
        "run_id": run_id, "topology": topology.name, "peer": peer, "model": architecture(topology, peer),
        "method": method_of(topology, peer),
        "input": {"dtype": "float32", "layout": "NCHW", "shape": ["batch", *info.input_size]},
        "output": {"logits": info.num_classes, "class_names": list(info.class_names)},
        "preprocessing": dict(preprocessing), "dataset": info.name, "test_metrics": dict(test_metrics)}}


def pip_requirements() -> list[str]:
    """What serving the model needs: torch (the graph format is torch's own) and MLflow."""
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


def save_peer_model(model: torch.nn.Module, example: torch.Tensor, folder: str | Path,
                    metadata: Mapping[str, Any]) -> None:
    """The peer in MLflow's pytorch flavor at ``folder``: eval mode, ``pt2`` (torch.export) format
    with a dynamic batch size, the input example and its signature (images in, logits out)."""
    import mlflow
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        logits = model(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    mlflow.pytorch.save_model(model, str(folder), signature=signature, input_example=example.numpy(),
                              metadata=dict(metadata), serialization_format="pt2",
                              pip_requirements=pip_requirements())


def log_peer_models(tracker, topology: Topology, info, dataset, groups, weights: Mapping[str, Mapping[str, torch.Tensor]],
                    final: Mapping[str, Any], peers: list[str] | None = None,
                    temperature: float | None = None) -> dict[str, str]:
    """Log every trained peer of a finished run (or those of ``peers``, which may name the ensemble)
    as ``models/<peer>``: {peer: model URI}. With ``temperature``: the calibrated variant,
    ``models/<peer>_calibrated``.

    ``weights``: each peer's final state_dict; ``final``: the run's last report (its test metrics);
    ``dataset``: the run's data (the input example: its first test images)."""
    example = next(iter(dataset.test_batches(EXAMPLE_SIZE)))[0].float()
    names = test_metric_names(topology, info, groups)
    logged = {}
    for peer in peers or exported_peers(topology):
        model = model_of(topology, peer, info, weights)
        metadata = model_metadata(topology, peer, info, dataset.preprocessing(),
                                  peer_test_metrics(final, peer, names), tracker.run_id)
        name = peer
        if temperature is not None:  # the calibrated variant: logits / T
            model, name = TemperatureScaled(model, temperature), f"{peer}{CALIBRATED}"
            metadata["cohort"]["temperature"] = temperature
        with tempfile.TemporaryDirectory(prefix="cohort-model-") as folder:
            try:
                save_peer_model(model, example, Path(folder) / name, metadata)
            except Exception as error:  # noqa: BLE001 - torch.export's and MLflow's failures alike
                raise CohortError(f"peer {peer!r} ({architecture(topology, peer)}) could not be saved as an MLflow "
                                  f"model: {first_line(error)}") from None
            tracker.log_folder(Path(folder) / name, f"{MODELS_FOLDER}/{name}")
        logged[peer] = model_uri(tracker.run_id, name)
    return logged


# --------------------------------------------------------------------------- the Model Registry


def check_registered_name(name: str, where: str) -> str:
    """A registered model's name: a plain, safe name (``cohort.config.schema.SAFE_NAME``), as a
    topology's; it names the registry's folders and is printed in ``models:/NAME/VERSION``."""
    if not SAFE_NAME.fullmatch(name):
        raise CohortError(f"{quoted(name)} is not a registered model name: it must be {SAFE_NAME_RULE}", where)
    return name


def parse_registrations(values: list[str], topology: Topology, where: str = "--register") -> dict[str, str]:
    """``--register PEER=NAME`` options as {peer: name}, each peer a trained peer of the topology
    (or ``ensemble``: the cohort's ensemble)."""
    registrations: dict[str, str] = {}
    for value in values:
        peer, equals, name = value.partition("=")
        if not equals or not peer:
            raise CohortError(f"{quoted(value)}: expected PEER=NAME", where)
        if peer not in topology.peers and peer != ENSEMBLE:
            raise CohortError(f"{quoted(value)}: unknown peer {peer!r} (peers: {', '.join(topology.peer_names)}; or "
                              f"{ENSEMBLE})", where)
        if peer != ENSEMBLE and topology.peers[peer].frozen:
            raise CohortError(f"{quoted(value)}: peer {peer!r} is frozen: a run logs only the peers it trains", where)
        if peer in registrations:
            raise CohortError(f"{quoted(value)}: peer {peer!r} is registered twice", where)
        registrations[peer] = check_registered_name(name, where)
    return registrations


def registry_tags(topology: Topology, peer: str, test_metrics: Mapping[str, float], run_id: str) -> dict[str, str]:
    """The tags of a registered version: where it comes from and how good and calibrated it is."""
    tags = {"topology": topology.name, "peer": peer, "model": architecture(topology, peer),
            "method": method_of(topology, peer), "run_id": run_id}
    for tag, metric in (("top1", "acc"), ("ece", "ece"), ("ece_ts", "ece_ts")):
        if metric in test_metrics:
            tags[tag] = f"{test_metrics[metric]:.4f}"
    return {REGISTRY_TAG + key: value for key, value in tags.items()}


def register_peer(uri: str, run_id: str, peer: str, name: str, tags: Mapping[str, str],
                  artifact: str | None = None) -> tuple[int, bool]:
    """Register ``models/<peer>`` (or ``models/<artifact>``) of the run under ``name``: (its version,
    whether the name existed)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        try:
            client.get_registered_model(name)
            existed = True
        except MlflowException:
            client.create_registered_model(name)
            existed = False
        source = f"{client.get_run(run_id).info.artifact_uri}/{MODELS_FOLDER}/{artifact or peer}"
        version = client.create_model_version(name, source, run_id=run_id, tags=dict(tags))
    except MlflowException as error:
        raise CohortError(f"cannot register {peer!r} as {name!r} in {uri}: {first_line(error)}", "--register") from None
    return int(version.version), existed


def registered_line(peer: str, name: str, version: int, existed: bool) -> str:
    if existed:
        return (f"registered {peer} as {name!r} version {version} (the name existed: a new version); "
                f"load it with mlflow.pytorch.load_model('models:/{name}/{version}')")
    return f"registered {peer} as {name!r} version {version}; load it with mlflow.pytorch.load_model('models:/{name}/{version}')"


# --------------------------------------------------------------------------- a finished run, read back


def finished_run(client, run_id: str, uri: str):
    """The MLflow run ``run_id`` and its topology, refused unless it finished."""
    from cohort.tracking.tracker import RUN_ID, logged_topology

    if not RUN_ID.fullmatch(run_id):
        raise CohortError(f"{quoted(run_id)} is not an MLflow run id (32 hex characters)")
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - unknown id, unreachable store: the same answer
        raise CohortError(f"no MLflow run {run_id} in {uri} (give --tracking-uri where the run is)") from None
    if run.info.status != "FINISHED":
        raise CohortError(f"run {run_id} is {run.info.status}, not FINISHED: it has no final weights")
    return run, logged_topology(client, run_id)


def model_weights(client, run_id: str, topology: Topology, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The final state_dicts the model ``name`` (a trained peer, or the ensemble) is made of,
    {peer: state_dict}; a frozen peer refused (the run did not train it)."""
    if name not in topology.peers and name != ENSEMBLE:
        raise CohortError(f"run {run_id} has no peer {name!r} (peers: {', '.join(topology.peer_names)}; or "
                          f"{ENSEMBLE}, the mean of their probabilities)", "--peer")
    if name not in takeable(topology):
        raise CohortError(f"peer {name!r} of run {run_id} is frozen: the run did not train it", "--peer")
    return {peer: run_weights(client, run_id, topology, peer) for peer in needed_weights(topology, name)}


def run_weights(client, run_id: str, topology: Topology, peer: str) -> dict[str, torch.Tensor]:
    """The final state_dict of ``peer`` logged by the run."""
    from cohort.worker.peer import read_weights

    if peer not in topology.peers:
        raise CohortError(f"run {run_id} has no peer {peer!r} (peers: {', '.join(topology.peer_names)})", "--peer")
    with tempfile.TemporaryDirectory(prefix="cohort-export-") as folder:
        try:
            path = client.download_artifacts(run_id, f"{WEIGHTS_FOLDER}/{peer}.pt", folder)
        except Exception:  # noqa: BLE001
            raise CohortError(f"run {run_id} has no weights for {peer!r} ({WEIGHTS_FOLDER}/{peer}.pt)", "--peer") from None
        return read_weights(path, "--peer", name=f"runs:/{run_id}/{WEIGHTS_FOLDER}/{peer}.pt")


def has_model(client, run_id: str, peer: str) -> bool:
    try:
        return any(item.path.endswith("MLmodel") for item in client.list_artifacts(run_id, f"{MODELS_FOLDER}/{peer}"))
    except Exception:  # noqa: BLE001
        return False


@dataclass(frozen=True)
class RunWriter:
    """The one method of cohort.tracking.tracker.Tracker that logging a model uses, on an existing run."""

    client: Any
    run_id: str

    def log_folder(self, folder, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


@dataclass(frozen=True)
class Registration:
    """A peer registered from a finished run: what was logged first (``notes``) and the new version."""

    run_id: str
    peer: str
    name: str
    version: int
    existed: bool
    calibrated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        """What a command prints: the notes, then the registration with how to load it."""
        return [*self.notes, registered_line(self.peer, self.name, self.version, self.existed)]

    def fields(self) -> dict[str, Any]:
        """The registration as a JSON object's fields (``--log-format json``)."""
        return {"run_id": self.run_id, "peer": self.peer, "name": self.name, "version": self.version,
                "model_uri": f"models:/{self.name}/{self.version}", "new_name": not self.existed,
                "calibrated": self.calibrated}


def register_finished_peer(client, uri: str, run_id: str, peer: str, name: str,
                           calibrated: bool = False) -> Registration:
    """Register a finished run's trained ``peer`` under ``name``: its ``models/<peer>`` (logged first
    from its weights where the run has none), or with ``calibrated`` the peer divided by its fitted
    temperature (``models/<peer>_calibrated``)."""
    from cohort.datasets import load_dataset
    from cohort.worker.peer import cohort_groups

    run, topology = finished_run(client, run_id, uri)
    weights = model_weights(client, run_id, topology, peer)
    final = dict(run.data.metrics)  # each metric's last value: the final epoch's
    temperature = fitted_temperature(final, peer, run_id) if calibrated else None
    dataset = load_dataset(topology.data, topology.seed)
    info = dataset.info
    groups = cohort_groups(topology, info)
    metrics = peer_test_metrics(final, peer, test_metric_names(topology, info, groups))
    tags = registry_tags(topology, peer, metrics, run_id)
    lines = []
    if temperature is not None:
        log_peer_models(RunWriter(client, run_id), topology, info, dataset, groups, weights, final,
                        peers=[peer], temperature=temperature)
        tags[REGISTRY_TAG + "temperature"] = f"{temperature:.6g}"
        lines.append(f"logged {peer} divided by its fitted temperature {temperature:.4g} as "
                     f"runs:/{run_id}/{MODELS_FOLDER}/{peer}{CALIBRATED}")
    elif not has_model(client, run_id, peer):
        log_peer_models(RunWriter(client, run_id), topology, info, dataset, groups, weights, final, peers=[peer])
        lines.append(f"logged {peer} as {model_uri(run_id, peer)} (the run had no models/{peer})")
    version, existed = register_peer(uri, run_id, peer, name, tags,
                                     artifact=f"{peer}{CALIBRATED}" if temperature is not None else None)
    return Registration(run_id, peer, name, version, existed, temperature is not None, lines)
