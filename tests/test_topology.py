"""The topology format: valid files resolve as documented; every bad input is one clear line."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from cohort.config.errors import CohortError
from cohort.run import main
from cohort.topology import load_topology, topology_from_dict

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ROOT / "topologies" / "kd_offline_cifar100_resnet32x4_resnet8x4.yaml"
# Step 2 of a two-step recipe needs step 1's run in MLflow: its dry run says so (tested below).
SECOND_STEPS = {OFFLINE, ROOT / "topologies" / "ltkd_cifar10_lt_parquet.yaml", ROOT / "topologies" / "ltkd_cifar100_lt.yaml"}
SHIPPED = sorted(path for path in (ROOT / "topologies").glob("*.yaml") if path not in SECOND_STEPS)

BASE = {
    "name": "t",
    "peers": {"teacher": {"model": "cnn_small"}, "student": {"model": "mlp"}},
    "edges": [
        {"from": "teacher", "to": "student", "loss": "bdkd"},
        {"from": "student", "to": "teacher", "loss": "reverse_kd"},
    ],
}


def write(tmp_path: Path, content, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def with_change(change) -> dict:
    topology = yaml.safe_load(yaml.safe_dump(BASE, sort_keys=False))
    change(topology)
    return topology


def dry_run_error(capsys, path: Path, *extra: str) -> str:
    code = main([str(path), "--dry-run", *extra])
    captured = capsys.readouterr()
    assert code == 2, captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# --------------------------------------------------------------------------- valid files


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_topologies_dry_run(capsys, path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the files' relative paths (data roots) are relative to the repository
    data_root = load_topology(path).data.root
    if data_root and data_root.startswith("../shared") and not (ROOT / data_root).exists():
        pytest.skip(f"{data_root} is absent (it ships beside the repo, not in it)")
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    topology = load_topology(path)
    header = out.splitlines()[0]
    peers = f"{len(topology.peers)} peer{'s' if len(topology.peers) > 1 else ''}"
    assert header.startswith(f"{topology.name}: {peers} on {topology.data.dataset} "), header
    assert f"{topology.train.epochs} epochs, batch {topology.data.batch_size}, seed {topology.seed}" in header
    for peer in topology.peer_names:  # one plan row per peer: its model
        assert any(line.split()[1:3] == [peer, topology.peers[peer].model] for line in out.splitlines()
                   if line.startswith("  ") and len(line.split()) > 3), peer
    for edge in topology.edges:  # one line per edge and sender
        for sender in edge.senders if len(edge.senders) == 1 else ["+".join(edge.senders)]:
            assert f"    {edge.to} <- {sender}: {edge.loss}, weight {edge.weight:g}" in out, edge.label
    # The resolved topology it prints is the file's, every default filled in.
    resolved = yaml.safe_load(textwrap.dedent(out.split("resolved topology:\n", 1)[1]))
    assert resolved == topology.with_absolute_paths(ROOT).to_dict()  # relative paths: from the working folder


def test_one_epoch_is_one_epoch_in_the_plan(capsys):
    assert main([str(ROOT / "topologies" / "dml_pair.yaml"), "--set", "train.epochs=1", "--dry-run"]) == 0
    assert ", 1 epoch, batch 64, seed 0" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("path", sorted(SECOND_STEPS), ids=[p.name for p in sorted(SECOND_STEPS)])
def test_second_steps_need_their_teacher_run_first(capsys, tmp_path, path):
    line = dry_run_error(capsys, path, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert line.startswith(f"{path.name}: peers.teacher.checkpoint: 'mlflow:") and "no MLflow store" in line
    assert not (tmp_path / "mlflow.db").exists()


def test_defaults_are_filled_in():
    topology = topology_from_dict(BASE)
    assert topology.seed == 0
    assert topology.data.dataset == "digits"
    assert topology.peer_names == ["teacher", "student"]
    assert topology.experiment == "t"
    bdkd = topology.edges[0]
    assert bdkd.params == {"temperature": 4.0, "delta_high": 1.0, "delta_low": 0.5}
    assert bdkd.weight == 1.0 and bdkd.reduce == "mean" and bdkd.warmup == 0
    assert topology.incoming_edges("teacher") == [topology.edges[1]]


def test_resolved_topology_round_trips():
    topology = topology_from_dict(BASE)
    again = topology_from_dict(yaml.safe_load(topology.to_yaml()))
    assert again == topology
    flat = topology.flatten()
    assert flat["edges.0.delta_high"] == 1.0
    assert flat["peers.student.model"] == "mlp"


def test_overrides_apply_and_revalidate():
    topology = topology_from_dict(BASE, overrides=["edges.0.temperature=2", "peers.student.optimizer.lr=0.01",
                                                   "train.epochs=3"])
    assert topology.edges[0].params["temperature"] == 2.0
    assert topology.optimizer_for("student").lr == 0.01
    assert topology.optimizer_for("teacher").lr == topology.train.optimizer.lr
    assert topology.train.epochs == 3


def test_ensemble_sender_and_schedule_shorthand():
    topology = topology_from_dict(with_change(lambda t: (
        t["peers"].update({"third": {"model": "mlp_tiny"}}),
        t["edges"].append({"from": {"ensemble": ["teacher", "student"]}, "to": "third", "loss": "kd"}),
        t.update({"train": {"schedule": {"name": "multistep", "milestones": [2, 4], "gamma": 0.5}}}),
    )))
    assert topology.edges[2].senders == ("teacher", "student")
    assert topology.train.schedule.milestones == (2, 4)


# --------------------------------------------------------------------------- bad files


def test_missing_file(capsys, tmp_path):
    line = dry_run_error(capsys, tmp_path / "nope.yaml")
    assert "nope.yaml" in line and "no such file" in line


def test_empty_file(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, "  \n"))
    assert line == "bad.yaml: the file is empty"


def test_yaml_syntax_error_names_the_line(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, "name: t\npeers:\n  a: {model: mlp\n"))
    assert line.startswith("bad.yaml: line ") and "YAML error" in line


def test_top_level_not_a_mapping(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, "- name: t\n"))
    assert "bad.yaml: the top level must be a mapping" in line


@pytest.mark.parametrize("kind", ["topology", "space", "study"])
def test_every_file_kind_says_alike_what_its_top_level_lacks(tmp_path, kind):
    """Topologies, search spaces and study files are checked by one function (cohort.config.schema.validated):
    the same words for an empty file, a top level that is not a mapping, and a missing key."""
    from cohort.studies.file import load_study
    from cohort.tuning.search_space import load_space

    topology = load_topology(Path(__file__).resolve().parents[1] / "topologies" / "dml_pair.yaml")
    load, first_keys = {"topology": (load_topology, "name, peers, edges"),
                        "space": (lambda path: load_space(path, topology), "metric, mode, space"),
                        "study": (load_study, "name, seeds, baseline, arms")}[kind]
    for content, expected in (("\n", "bad.yaml: the file is empty"),
                              ("- a\n- b\n", f"bad.yaml: the top level must be a mapping of keys ({first_keys}, ...), "
                                               "not a list"),
                              ("colour: blue\n", f"bad.yaml: {first_keys.split(',')[0]}: missing (required)")):
        with pytest.raises(CohortError) as caught:
            load(write(tmp_path, content))
        assert str(caught.value).startswith(expected), (content, str(caught.value))


def test_duplicate_peer_names(capsys, tmp_path):
    text = textwrap.dedent("""\
        name: t
        peers:
          student: {model: mlp}
          student: {model: cnn_small}
        """)
    line = dry_run_error(capsys, write(tmp_path, text))
    assert "duplicate key 'student'" in line and "line 4" in line


BAD_CASES = {
    "unknown top-level key": (lambda t: t.update(nmae="x"), "nmae: unknown key (did you mean 'name'?)"),
    "unknown nested key": (lambda t: t.update(data={"batchsize": 4}), "data.batchsize: unknown key (did you mean 'batch_size'?)"),
    "unknown peer key": (lambda t: t["peers"]["student"].update(modle="mlp"), "peers.student.modle: unknown key"),
    "typo in an edge parameter": (lambda t: t["edges"][0].update(temprature=2), "edges[0].temprature: not a parameter of loss 'bdkd' (did you mean 'temperature'?)"),
    "parameter of another loss": (lambda t: t["edges"][1].update(delta_high=2), "edges[1].delta_high: not a parameter of loss 'reverse_kd'"),
    "missing name": (lambda t: t.pop("name"), "name: missing"),
    "no peers": (lambda t: t.update(peers={}), "peers: a cohort needs at least one peer"),
    "peers as a list": (lambda t: t.update(peers=[{"model": "mlp"}]), "peers: must be a mapping from peer name"),
    "edge to unknown peer": (lambda t: t["edges"][0].update(to="ghost"), "edges[0].to: unknown peer 'ghost'"),
    "edge from unknown peer": (lambda t: t["edges"][1].update({"from": "ghost"}), "edges[1].from: unknown peer 'ghost'"),
    "ensemble of an unknown peer": (lambda t: t["edges"][0].update({"from": {"ensemble": ["teacher", "ghost"]}}), "edges[0].from: unknown peer 'ghost'"),
    "self edge": (lambda t: t["edges"][0].update({"from": "student"}), "edges[0]: a peer cannot distill from itself"),
    "unknown loss": (lambda t: t["edges"][0].update(loss="kld"), "edges[0].loss: unknown loss 'kld'"),
    "unknown model": (lambda t: t["peers"]["student"].update(model="resnet9000"), "peers.student.model: unknown model 'resnet9000'"),
    "unknown torchvision model": (lambda t: t["peers"]["student"].update(model="torchvision:resnet9"), "peers.student.model: unknown model 'torchvision:resnet9'"),
    "unknown model option": (lambda t: t["peers"]["student"].update(model="mobilenetv2", model_args={"widht": 0.5}), "peers.student.model_args.widht: not an option of model 'mobilenetv2' (did you mean 'width'?)"),
    "unknown dataset": (lambda t: t.update(data={"dataset": "mnist"}), "data.dataset: unknown dataset 'mnist'"),
    "temperature zero": (lambda t: t["edges"][0].update(temperature=0), "edges[0].temperature: must be > 0"),
    "temperature not a number": (lambda t: t["edges"][0].update(temperature="hot"), "edges[0].temperature: must be a number"),
    "negative delta": (lambda t: t["edges"][0].update(delta_low=-0.5), "edges[0].delta_low: must be >= 0"),
    "negative weight": (lambda t: t["edges"][0].update(weight=-1), "edges[0].weight: must be greater than or equal to 0"),
    "lr zero": (lambda t: t.update(train={"optimizer": {"lr": 0}}), "train.optimizer.lr: must be greater than 0"),
    "lr not a number": (lambda t: t.update(train={"optimizer": {"lr": "fast"}}), "train.optimizer.lr: must be a valid number"),
    "peer lr negative": (lambda t: t["peers"]["student"].update(optimizer={"lr": -1}), "peers.student.optimizer.lr: must be greater than 0"),
    "batch size zero": (lambda t: t.update(data={"batch_size": 0}), "data.batch_size: must be greater than or equal to 1"),
    "epochs zero": (lambda t: t.update(train={"epochs": 0}), "train.epochs: must be greater than or equal to 1"),
    "cpus per peer zero": (lambda t: t.update(resources={"cpus_per_peer": 0}), "resources.cpus_per_peer: must be greater than 0"),
    "unknown optimizer": (lambda t: t.update(train={"optimizer": {"name": "lion"}}), "train.optimizer.name: 'lion' is not one of"),
    "bool loss parameter": (lambda t: t["edges"][0].update(loss="ltkd", rebalance="yes"), "edges[0].rebalance: must be true or false"),
    "frozen without checkpoint": (lambda t: t["peers"]["teacher"].update(frozen=True), "peers.teacher.checkpoint: a frozen peer needs a checkpoint"),
    "edge into a frozen peer": (lambda t: t["peers"]["teacher"].update(frozen=True, checkpoint="w.pt"), "edges[1].to: peer 'teacher' is frozen"),
    "gate with an unknown peer": (lambda t: t.update(gates=[{"rule": "switokd", "teacher": "teachr", "student": "student"}]), "gates[0].teacher: unknown peer 'teachr' (peers: teacher, student)"),
    "gate with an unknown rule": (lambda t: t.update(gates=[{"rule": "switch", "teacher": "teacher", "student": "student"}]), "gates[0].rule: unknown gate rule 'switch' (known: switokd)"),
    "gate with a parameter its rule does not take": (lambda t: t.update(gates=[{"rule": "switokd", "teacher": "teacher", "student": "student", "temperature": 2}]), "gates[0].temperature: not a parameter of gate rule 'switokd' (it takes: nothing)"),
    "gate on a frozen peer": (lambda t: (t["peers"]["student"].update(frozen=True, checkpoint="w.pt"), t["edges"].pop(0), t.update(gates=[{"rule": "switokd", "teacher": "teacher", "student": "student"}])), "gates[0].student: peer 'student' is frozen"),
    "gate on one peer": (lambda t: t.update(gates=[{"rule": "switokd", "teacher": "student", "student": "student"}]), "gates[0]: a gate needs two different peers"),
    "gate twice": (lambda t: t.update(gates=[{"rule": "switokd", "teacher": "teacher", "student": "student"} for _ in range(2)]), "gates[1]: gates[0] already gates teacher 'teacher' by student 'student'"),
    "gate without a student": (lambda t: t.update(gates=[{"rule": "switokd", "teacher": "teacher"}]), "gates[0].student: missing"),
    "multistep without milestones": (lambda t: t.update(train={"schedule": "multistep"}), "train.schedule.milestones: a multistep schedule needs milestones"),
    "a root for digits": (lambda t: t.update(data={"root": "somewhere"}), "data.root: digits are embedded in scikit-learn"),
    "image size for cifar": (lambda t: t.update(data={"dataset": "cifar10", "image_size": 64}), "data.image_size: only parquet and imagefolder"),
    "ltkd with an empty shot group": (lambda t: (t.update(data={"groups": "shots"}), t["edges"][0].update(loss="ltkd")), "data.groups: shots leaves group(s) 'medium', 'few' empty"),
    "reserved peer name": (lambda t: t["peers"].update(ensemble={"model": "mlp"}), "peers: peer name 'ensemble' is reserved"),
    "unequal replicas": (lambda t: t["peers"]["teacher"].update(replicas=2), "peers.student.replicas: every peer needs the same number of replicas ('teacher' has 2, 'student' has 1)"),
    "replicas zero": (lambda t: t["peers"]["student"].update(replicas=0), "peers.student.replicas: must be greater than or equal to 1"),
    "more replicas than a batch": (lambda t: (t.update(data={"batch_size": 2}), [p.update(replicas=3) for p in t["peers"].values()]), "data.batch_size: a batch of 2 cannot be split into 3 replicas' shards"),
    "fp16 on CPUs": (lambda t: t.update(train={"precision": "fp16"}), "train.precision: fp16 needs GPUs (resources.use_gpu: true); on CPUs use bf16"),
    "unknown precision": (lambda t: t.update(train={"precision": "fp8"}), "train.precision: 'fp8' is not one of"),
    "GPU fraction without GPUs": (lambda t: t.update(resources={"gpus_per_peer": 0.5}), "resources.gpus_per_peer: applies to GPUs only: set resources.use_gpu: true"),
    "GPU fraction above one": (lambda t: t.update(resources={"use_gpu": True, "gpus_per_peer": 2}), "resources.gpus_per_peer: must be less than or equal to 1"),
    "GPU fraction zero": (lambda t: t.update(resources={"use_gpu": True, "gpus_per_peer": 0}), "resources.gpus_per_peer: must be greater than 0"),
    "accelerator type without GPUs": (lambda t: t.update(resources={"accelerator_type": "A100"}), "resources.accelerator_type: applies to GPUs only"),
    "node labels not a mapping": (lambda t: t.update(resources={"node_labels": ["zone-a"]}), "resources.node_labels: must be a mapping, not a list"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_topology_is_one_line_naming_file_and_key(capsys, tmp_path, case):
    change, expected = BAD_CASES[case]
    line = dry_run_error(capsys, write(tmp_path, with_change(change)))
    assert line.startswith("bad.yaml: "), line
    assert expected in line, line


SEED_RANGE = "seed: must be a whole number from 0 to 4294967295 (2**32 - 1, what numpy's seeding takes)"
REFUSED_SETS = {
    "seed=4294967296": SEED_RANGE,
    "seed=100000000000000000000000": SEED_RANGE,
    "seed=-1": SEED_RANGE,
    "seed=true": "seed: must be a number, not true",
    "train.epochs=true": "train.epochs: must be a number, not true",
    "train.ce_weight=false": "train.ce_weight: must be a number, not false",
    "train.optimizer.lr=.inf": "train.optimizer.lr: must be a finite number, not inf",
    "peers.student.optimizer.lr=.nan": "peers.student.optimizer.lr: must be a finite number, not nan",
    "edges.0.weight=.inf": "edges[0].weight: must be a finite number, not inf",
    "name=../x": "name: '../x' must be letters, digits, '_', '.' or '-'",
    "name=a/b": "name: 'a/b' must be letters",
    "name=.hidden": "name: '.hidden' must be letters",
    "name=a..b": "name: 'a..b' must be letters",
}


@pytest.mark.parametrize("assignment", list(REFUSED_SETS))
def test_values_that_would_fail_in_training_or_escape_the_store_are_refused(capsys, tmp_path, assignment):
    """Seeds numpy cannot take, booleans read as numbers, infinities and names that are paths:
    refused at validation (the dry run), one line naming the key."""
    line = dry_run_error(capsys, write(tmp_path, BASE), "--set", assignment)
    assert line.startswith("bad.yaml (with --set): " + REFUSED_SETS[assignment]), line


def test_plain_values_at_the_edges_are_accepted():
    """The largest seed, a whole number a sweep's quniform gives as a float, 1e-3 (YAML reads it as a
    string) and a name with dots and dashes."""
    topology = topology_from_dict(BASE, "t", ["seed=4294967295", "train.epochs=2.0", "train.optimizer.lr=1e-3",
                                              "name=v1.2-run_3"])
    assert (topology.seed, topology.train.epochs, topology.train.optimizer.lr, topology.name) == \
        (4294967295, 2, 0.001, "v1.2-run_3")
    assert isinstance(topology.train.epochs, int)


def test_a_name_with_a_control_character_is_refused(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, {**BASE, "name": "a\nb"}))
    assert line.startswith("bad.yaml: name: 'a\\nb' must be letters"), line


def test_unknown_set_key(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, BASE), "--set", "edges.0.temprature=2")
    assert "--set edges.0.temprature: unknown key 'edges.0.temprature' (did you mean 'temperature'?)" in line


def test_set_index_out_of_range(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, BASE), "--set", "edges.7.weight=2")
    assert "'edges.7' is not an index below 2" in line


def test_set_that_makes_the_topology_invalid(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, BASE), "--set", "edges.0.to=ghost")
    assert line.startswith("bad.yaml (with --set): edges[0].to: unknown peer 'ghost'"), line


def test_set_without_equals(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, BASE), "--set", "train.epochs")
    assert "expected key=value" in line


def test_dataset_root_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "nowhere.parquet"
    line = dry_run_error(capsys, write(tmp_path, with_change(lambda t: t.update(data={"dataset": "parquet", "root": str(missing)}))))
    assert line.startswith(f"bad.yaml: data.root: '{missing}' does not exist"), line


# --------------------------------------------------------------------------- frozen peers' checkpoints


def frozen_teacher(tmp_path: Path, checkpoint: Path) -> Path:
    return write(tmp_path, with_change(lambda t: (
        t["peers"]["teacher"].update(frozen=True, checkpoint=str(checkpoint)),
        t["edges"].pop(1),
    )))


def test_frozen_peer_with_good_checkpoint(capsys, tmp_path):
    from cohort.datasets import load_dataset
    from cohort.topology import DataConfig
    from cohort.worker.peer import build_peer

    topology = topology_from_dict(BASE)
    model = build_peer(topology, "teacher", load_dataset(DataConfig()).info)
    torch.save(model.state_dict(), tmp_path / "teacher.pt")
    assert main([str(frozen_teacher(tmp_path, tmp_path / "teacher.pt")), "--dry-run"]) == 0
    assert "frozen, from" in capsys.readouterr().out


def test_frozen_peer_checkpoint_missing(capsys, tmp_path):
    line = dry_run_error(capsys, frozen_teacher(tmp_path, tmp_path / "absent.pt"))
    assert line.startswith("bad.yaml: peers.teacher.checkpoint: checkpoint") and "does not exist" in line


def test_frozen_peer_checkpoint_with_a_pickle_payload_is_refused(capsys, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    line = dry_run_error(capsys, frozen_teacher(tmp_path, tmp_path / "evil.pt"))
    assert line.startswith("bad.yaml: peers.teacher.checkpoint: cannot load checkpoint") and "weights only" in line
    assert "this must never run" not in capsys.readouterr().out


def test_frozen_peer_checkpoint_of_another_model(capsys, tmp_path):
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "other.pt")
    line = dry_run_error(capsys, frozen_teacher(tmp_path, tmp_path / "other.pt"))
    assert "does not fit the model" in line


def test_frozen_peer_checkpoint_with_other_class_count(capsys, tmp_path):
    from cohort.models import build_model

    torch.save(build_model("cnn_small", num_classes=100, in_channels=1).state_dict(), tmp_path / "c100.pt")
    line = dry_run_error(capsys, frozen_teacher(tmp_path, tmp_path / "c100.pt"))
    assert "number of classes" in line and "(100, 32)" in line


def test_command_line_prints_no_traceback(tmp_path):
    bad = write(tmp_path, with_change(lambda t: t["edges"][0].update({"from": "ghost"})))
    done = subprocess.run([sys.executable, "-m", "cohort.run", str(bad), "--dry-run"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "bad.yaml: edges[0].from: unknown peer 'ghost' (peers: teacher, student)"


def test_cohort_error_has_no_location_when_none_applies():
    assert str(CohortError("plain")) == "plain"
    assert str(CohortError("msg", "f.yaml")) == "f.yaml: msg"


@pytest.mark.parametrize("reference,expected", [
    ("runs:/../../etc/x", "'..' is not an MLflow run id (32 hex characters)"),
    ("runs:/a/b/../../../../tmp/x", "'a' is not an MLflow run id (32 hex characters)"),
    ("runs:/" + "0" * 31 + "g/weights/teacher.pt", "is not an MLflow run id (32 hex characters)"),
    ("runs:/" + "a" * 32 + "/../../x.pt", "expected runs:/RUN_ID/weights/PEER.pt"),
    ("runs:/" + "a" * 32, "expected runs:/RUN_ID/weights/PEER.pt"),
])
def test_a_runs_reference_without_a_run_id_is_refused_before_any_path(capsys, tmp_path, monkeypatch, reference,
                                                                     expected):
    """The run id names a folder: it must be an MLflow run id (32 hex characters), checked first."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    line = dry_run_error(capsys, frozen_teacher(tmp_path, reference), "--tracking-uri", uri)
    assert line.startswith(f"bad.yaml: peers.teacher.checkpoint: {reference!r}: ") and expected in line, line
    assert not (tmp_path / "home").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_run_id_is_32_hex_characters():
    from cohort.tracking.tracker import checkpoint_run_id

    run_id = "0123456789abcdef" * 2
    assert checkpoint_run_id(f"runs:/{run_id}/weights/teacher.pt", "here") == run_id
    for bad in ("runs:/../../etc/x", f"runs:/{run_id}x/weights/t.pt", f"runs:/{run_id.upper()}/weights/t.pt", "runs:/"):
        with pytest.raises(CohortError) as raised:
            checkpoint_run_id(bad, "peers.t.checkpoint")
        assert raised.value.where == "peers.t.checkpoint"


# --------------------------------------------------------------------------- hostile YAML


def laughs(depth: int) -> str:
    """A topology whose ``seed:`` is a ``depth``-level nested alias ("billion laughs")."""
    anchors = ["  - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    anchors += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, depth)]
    return "name: t\nanchors:\n" + "\n".join(anchors) + f"\nseed: *l{depth - 1}\npeers:\n  a: {{model: mlp}}\n"


def test_nested_aliases_are_refused_at_parse_time(capsys, tmp_path):
    import time
    import tracemalloc

    path = write(tmp_path, laughs(9))
    tracemalloc.start()
    started = time.perf_counter()
    line = dry_run_error(capsys, path)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert line == "bad.yaml: line 3: YAML anchors and aliases (&name / *name) are not allowed: write the value out"
    assert elapsed < 1.0 and peak < 10_000_000


@pytest.mark.parametrize("text, line", [
    ("name: &n t\npeers:\n  a: {model: mlp}\n", 1),
    ("name: t\npeers:\n  a: &m {model: mlp}\n  b: *m\n", 3),
    ("name: t\nbase: &b {model: mlp}\npeers:\n  a:\n    <<: *b\n", 2),
])
def test_any_anchor_or_alias_is_refused(capsys, tmp_path, text, line):
    assert dry_run_error(capsys, write(tmp_path, text)).startswith(f"bad.yaml: line {line}: YAML anchors and aliases")


def test_set_value_with_aliases_is_refused():
    with pytest.raises(CohortError, match=r"--set seed: line 1: YAML anchors and aliases"):
        topology_from_dict(BASE, "t.yaml", ["seed=[&a [1, 1], *a]"])


def test_strict_text_loader_refuses_duplicate_keys_and_aliases():
    from cohort.config.loader import read_yaml_text

    with pytest.raises(CohortError, match=r"^topology.yaml: line 2: YAML error: duplicate key 'name' \(first on line 1\)$"):
        read_yaml_text("name: a\nname: b\n", "topology.yaml")
    with pytest.raises(CohortError, match=r"^topology.yaml: line 1: YAML anchors and aliases"):
        read_yaml_text("seed: &s 1\nother: *s\n", "topology.yaml")
    assert read_yaml_text("name: a\n", "topology.yaml") == {"name": "a"}


def test_resume_reads_the_stored_topology_strictly():
    # resume needs Ray and MLflow; this checks it reads topology.yaml with the strict loader.
    import inspect

    from cohort.tracking import tracker

    source = inspect.getsource(tracker.logged_topology)
    assert "read_yaml(" in source and "safe_load" not in source


def test_resolved_topology_is_written_without_aliases(monkeypatch):
    from cohort.config.loader import read_yaml_text
    from cohort.topology import Topology

    topology = topology_from_dict(BASE)
    shared = topology.to_dict()
    shared["peers"]["student"]["model_args"] = shared["peers"]["teacher"]["model_args"]  # one object used twice
    monkeypatch.setattr(Topology, "to_dict", lambda self: shared)
    assert read_yaml_text(topology.to_yaml(), "topology.yaml") == shared


# --------------------------------------------------------------------------- huge values in errors


def deep(levels: int) -> dict:
    tree: dict = {"leaf": list(range(1000))}
    for level in range(levels):
        tree = {f"k{level}": tree, "wide": list(range(1000)), "text": "x" * 10_000}
    return tree


HUGE = "y" * 100_000  # far longer than any message may be: errors must not echo it


@pytest.mark.parametrize("change", [
    lambda t: t.update({"seed": list(range(20_000))}),
    lambda t: t.update({"seed": deep(50)}),
    lambda t: t.update({"seed": HUGE}),
    lambda t: t.update({"name": list(range(20_000))}),
    lambda t: t.update({HUGE: 1}),
    lambda t: t["peers"].update({"1" + HUGE: {"model": "mlp"}}),
    lambda t: t["peers"]["student"].update({"model": HUGE}),
    lambda t: t["peers"]["student"].update({"model_args": {HUGE: 1}}),
    lambda t: t["peers"]["student"].update({"replicas": deep(50)}),
    lambda t: t["edges"][0].update({"from": list(range(20_000))}),
    lambda t: t["edges"][0].update({"from": HUGE}),
    lambda t: t["edges"][0].update({"to": HUGE}),
    lambda t: t["edges"][0].update({"loss": HUGE}),
    lambda t: t["edges"][0].update({"reduce": HUGE}),
    lambda t: t["edges"][0].update({"temperature": list(range(20_000))}),
    lambda t: t["edges"][0].update({"temperature": deep(50)}),
    lambda t: t["edges"][0].update({"temperature": 10 ** 4000}),
    lambda t: t.update({"train": {"precision": deep(50)}}),
    lambda t: t.update({"data": {"dataset": HUGE}}),
], ids=lambda _: "case")
def test_huge_values_make_short_errors(change):
    from cohort.models import known_models

    with pytest.raises(CohortError) as raised:
        topology_from_dict(with_change(change), "t.yaml")
    message = str(raised.value).replace(", ".join(known_models()), "...")  # the list of model names is no value
    assert len(message) < 300, message[:400]


def test_huge_set_values_and_keys_make_short_errors():
    for override in [f"seed={list(range(20_000))}", f"{HUGE}=1", f"peers.{HUGE}=1", f"x{HUGE}"]:
        with pytest.raises(CohortError) as raised:
            topology_from_dict(BASE, "t.yaml", [override])
        assert len(str(raised.value)) < 300, str(raised.value)[:400]


def test_huge_number_in_a_file_is_one_short_line(capsys, tmp_path):
    line = dry_run_error(capsys, write(tmp_path, "name: t\nseed: " + "9" * 5000 + "\n"))
    assert line.startswith("bad.yaml: line 2: YAML error: the number '999") and len(line) < 200


@pytest.mark.parametrize("space", [
    {"metric": "a/acc", "mode": "max", "space": {HUGE: {"uniform": [0, 1]}}},
    {"metric": "a/acc", "mode": "max", "space": {"seed": {HUGE: [0, 1]}}},
    {"metric": "a/acc", "mode": "max", "space": {"seed": {"uniform": [10 ** 4000, 1]}}},
    {"metric": "a/acc", "mode": "max", "space": {"edges.0.loss": {"choice": [HUGE]}}},
    {"metric": "a/acc", "mode": "max", "space": {"edges.0.temperature": {"choice": [list(range(10_000))]}}},
    {"metric": HUGE + " +", "mode": "max", "space": {"seed": {"randint": [0, 3]}}},
    {"metric": "a/acc + '" + HUGE + "'", "mode": "max", "space": {"seed": {"randint": [0, 3]}}},
    {"metric": "a/acc", "mode": deep(5), "space": {"seed": {"randint": [0, 3]}}},
    {"metric": "-a/acc" + "-y" * 50_000, "mode": "max", "space": {"seed": {"randint": [0, 3]}}},
], ids=lambda _: "case")
def test_huge_values_in_a_search_space_make_short_errors(tmp_path, space):
    # Also: a 4000-digit bound is refused (not an OverflowError), a long metric word parses in linear time.
    from cohort.tuning.search_space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, width=10 ** 9))
    with pytest.raises(CohortError) as raised:
        load_space(path, topology_from_dict(BASE))
    assert len(str(raised.value)) < 300, str(raised.value)[:400]


def test_quoted_is_repr_for_short_values():
    from cohort.config.errors import named, quoted

    for value in ["ghost", 3, 2.5, True, None, [1, 2], {"a": 1}]:
        assert quoted(value) == repr(value)
    assert len(quoted("x" * 10 ** 6)) <= 60 and len(quoted(list(range(10 ** 5)))) < 60
    assert named("peers.a") == "peers.a" and len(named("k" * 10 ** 6)) == 59


def test_metric_keys_after_a_minus_sign():
    from cohort.tuning.search_space import MetricExpression

    expression = MetricExpression("-student/ece - 0.5*-teacher/nll")
    assert expression.keys == ["student/ece", "teacher/nll"]
    assert expression({"student/ece": 0.25, "teacher/nll": 2.0}) == -0.25 + 1.0


def test_gates_resolve_and_show_in_the_plan(capsys, tmp_path):
    gated = with_change(lambda t: t.update(gates=[{"rule": "switokd", "teacher": "teacher", "student": "student"}]))
    topology = topology_from_dict(gated)
    assert [(g.rule, g.teacher, g.student, g.params) for g in topology.gates] == [("switokd", "teacher", "student", {})]
    assert topology.flatten()["gates.0.teacher"] == "teacher"
    assert topology_from_dict(yaml.safe_load(topology.to_yaml())) == topology  # the resolved file reads back
    assert main([str(write(tmp_path, gated, "gated.yaml")), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "switokd: teacher teacher, student student; switches student->teacher:reverse_kd" in out
