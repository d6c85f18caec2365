"""Taps (a peer's penultimate feature and stages, cohort.models.taps), MCL's embedding head
(cohort.models.heads) and timm peers' taps: what the hooks record is what the network computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cohort.config.errors import CohortError
from cohort.models import MODELS, build_model, count_parameters, declared_stages
from cohort.models.heads import HEADS_ATTRIBUTE, EmbeddingHead, attach_heads, heads_of
from cohort.models.taps import TapRecorder, TapSpec, resolution_ends, resolve_taps, tap_shapes
from cohort.topology import PeerConfig

torch.set_num_threads(2)

DIGITS = {"mlp_tiny", "mlp", "cnn_small", "cnn_medium"}
TIMM_SKIP = "timm not installed: pip install 'cohort[timm]'"


def zoo_model(name: str, **options) -> tuple[nn.Module, tuple[int, int, int]]:
    """A zoo model for 10 classes and the size of its images (8x8 digits for the small nets)."""
    size = (1, 8, 8) if name in DIGITS else (3, 32, 32)
    return build_model(name, num_classes=10, in_channels=size[0], **options), size


# --------------------------------------------------------------------------- declared stages


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_models_stages_exist_and_shrink(name):
    model, size = zoo_model(name)
    spec = resolve_taps(model, name, peer="a")
    modules = dict(model.named_modules())
    assert all(stage in modules for stage in spec.stages)
    if name.startswith("mlp"):
        assert spec.stages == ()
        return
    assert len(spec.stages) >= 2
    shapes = tap_shapes(model, spec, size)
    sides = [shapes["stages"][stage][1:] for stage in spec.stages]
    assert all(len(shape) == 3 for shape in shapes["stages"].values())
    assert all(h == w for h, w in sides)
    assert all(later[0] <= earlier[0] for earlier, later in zip(sides, sides[1:])), sides
    # the last stage is what the network pools into its penultimate feature
    assert shapes["stages"][spec.stages[-1]][0] == shapes["penultimate"] == spec.feature_size


def test_the_declared_stages_are_the_ends_of_resolutions():
    assert declared_stages("resnet8", build_model("resnet8", 10)) == ("layer1", "layer2", "layer3")
    assert declared_stages("wrn_16_2", build_model("wrn_16_2", 10)) == ("block1", "block2", "block3")
    model, size = zoo_model("cnn_small")
    assert declared_stages("cnn_small", model) == ("5", "12")
    assert all(isinstance(dict(model.named_modules())[name], nn.ReLU) for name in ("5", "12"))
    # dropout before the classifier moves the classifier, not the stages
    dropped, _ = zoo_model("cnn_small", dropout=0.5)
    assert declared_stages("cnn_small", dropped) == ("5", "12")
    assert resolve_taps(dropped, "cnn_small").classifier == "16" != resolve_taps(model, "cnn_small").classifier
    shapes = tap_shapes(build_model("mobilenetv2", 10), resolve_taps(build_model("mobilenetv2", 10), "mobilenetv2"),
                        (3, 32, 32))
    assert [shape[1] for shape in shapes["stages"].values()] == [16, 8, 4, 2]
    shufflenet = build_model("shufflenetv2", 10)
    shapes = tap_shapes(shufflenet, resolve_taps(shufflenet, "shufflenetv2"), (3, 32, 32))
    assert [shape[1] for shape in shapes["stages"].values()] == [16, 8, 4]


def test_resolution_ends_of_a_sequential():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    # the stride-2 stem comes first: no resolution ends before it
    assert resolution_ends(net) == ("3", "6")
    assert resolution_ends(nn.Sequential(net[2], net[3]), "features") == ("features.1",)


def test_the_stages_and_classifier_keep_the_state_dict_keys():
    # declaring stages renames nothing: old checkpoints still load
    for name in ("resnet8", "vgg8", "cnn_small"):
        model, _ = zoo_model(name)
        before = list(model.state_dict())
        TapRecorder(model, resolve_taps(model, name), True, True)
        assert list(model.state_dict()) == before


# --------------------------------------------------------------------------- what the recorder holds


def manual_resnet8(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    stages = []
    out = model.stem(x)
    for layer in (model.layer1, model.layer2, model.layer3):
        out = layer(out)
        stages.append(out)
    return torch.flatten(model.pool(out), 1), stages


def test_the_penultimate_feature_is_what_the_classifier_receives():
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    recorder = TapRecorder(model, resolve_taps(model, "resnet8"), want_penultimate=True, want_stages=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feature, stages = manual_resnet8(model, x)
    assert recorder.penultimate.shape == (4, 64)
    torch.testing.assert_close(recorder.penultimate, feature)
    torch.testing.assert_close(model.fc(recorder.penultimate), logits)
    assert len(recorder.stages) == 3
    for recorded, manual in zip(recorder.stages, stages):
        torch.testing.assert_close(recorded, manual)


def test_the_penultimate_feature_of_a_wide_resnet_and_a_vgg():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    wrn = build_model("wrn_16_1", 10).eval()
    vgg = build_model("vgg8", 10).eval()
    wrn_recorder = TapRecorder(wrn, resolve_taps(wrn, "wrn_16_1"), True, False)
    vgg_recorder = TapRecorder(vgg, resolve_taps(vgg, "vgg8"), True, False)
    with torch.no_grad():
        wrn(x)
        vgg(x)
        out = wrn.block3(wrn.block2(wrn.block1(wrn.conv1(x))))
        torch.testing.assert_close(wrn_recorder.penultimate, torch.flatten(wrn.pool(F.relu(wrn.bn(out))), 1))
        torch.testing.assert_close(vgg_recorder.penultimate, torch.flatten(vgg.pool(vgg.features(x)), 1))
    assert wrn_recorder.stages == []  # not wanted: none taken


def test_the_recorded_tensors_carry_gradients_to_the_network():
    torch.manual_seed(0)
    model = build_model("resnet8", 10).train()
    recorder = TapRecorder(model, resolve_taps(model, "resnet8"), True, True)
    model(torch.randn(4, 3, 32, 32))
    assert recorder.penultimate.requires_grad and all(stage.grad_fn is not None for stage in recorder.stages)
    (recorder.penultimate.pow(2).sum() + recorder.stages[0].mean()).backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the classifier is after the tap


def test_each_forward_replaces_the_last_ones_tensors_and_no_grad_gives_plain_tensors():
    model = build_model("resnet8", 10).eval()
    recorder = TapRecorder(model, resolve_taps(model, "resnet8"), True, True)
    with torch.no_grad():
        model(torch.zeros(3, 3, 32, 32))
        model(torch.ones(5, 3, 16, 16))
    assert recorder.penultimate.shape == (5, 64) and recorder.stages[0].shape == (5, 16, 16, 16)
    assert recorder.penultimate.grad_fn is None and not recorder.stages[2].requires_grad
    recorder.clear()
    with pytest.raises(RuntimeError, match="no penultimate feature recorded"):
        recorder.penultimate  # noqa: B018
    with pytest.raises(RuntimeError, match="'layer1' was not recorded"):
        recorder.stages  # noqa: B018
    recorder.remove()
    model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError):
        recorder.penultimate  # noqa: B018


def test_a_model_inside_a_wrapper_records():
    class Wrapper(nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, x):
            return self.network(x * 2)

    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    wrapper = Wrapper(model)
    recorder = TapRecorder(model, resolve_taps(model, "resnet8"), True, True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        wrapper(x)
        torch.testing.assert_close(recorder.penultimate, manual_resnet8(model, 2 * x)[0])


def test_a_model_in_distributed_data_parallel_records(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model("resnet8", 10).train()
        ddp = nn.parallel.DistributedDataParallel(model)
        spec = resolve_taps(ddp, "resnet8", peer="a")  # the names are the network's, not "module.…"
        assert spec.classifier == "fc" and spec.stages == ("layer1", "layer2", "layer3")
        recorder = TapRecorder(ddp, spec, True, True)
        ddp(torch.randn(2, 3, 32, 32))
        recorder.penultimate.sum().backward()
        assert recorder.stages[2].shape == (2, 64, 8, 8) and model.stem[0].weight.grad is not None
        assert tap_shapes(ddp, spec, (3, 32, 32))["penultimate"] == 64 and ddp.training
    finally:
        dist.destroy_process_group()


def test_a_stage_changed_in_place_afterwards_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2, 3))
    spec = resolve_taps(net, "custom", {"stages": ["0", "1"]}, peer="a")
    recorder = TapRecorder(net, spec, True, True)
    net(torch.randn(2, 1, 6, 6))
    with pytest.raises(RuntimeError, match="'0' was changed in place"):
        recorder.stages  # noqa: B018
    assert recorder.penultimate.shape == (2, 2)


def test_tap_shapes_restores_the_training_mode():
    model = build_model("resnet8", 10)
    spec = resolve_taps(model, "resnet8")
    for training in (True, False):
        model.train(training)
        shapes = tap_shapes(model, spec, (3, 32, 32))
        assert model.training is training and model.layer1.training is training
    assert shapes == {"penultimate": 64, "stages": {"layer1": (16, 32, 32), "layer2": (32, 16, 16),
                                                    "layer3": (64, 8, 8)}}
    # the hooks are gone: a later forward records nothing anywhere
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


# --------------------------------------------------------------------------- a peer's own taps and errors


def error_of(model, name, declared=None, **wanted) -> CohortError:
    with pytest.raises(CohortError) as caught:
        resolve_taps(model, name, declared, peer="a", **wanted)
    assert "\n" not in str(caught.value) and caught.value.where == "peers.a.taps"
    return caught.value


def test_an_unknown_stage_names_the_peer_and_the_modules():
    error = error_of(build_model("resnet8", 10), "resnet8", {"stages": ["layer1", "layer9"]})
    assert error.message == ("peer 'a' has no module 'layer9' to tap (did you mean 'layer3'?) (stages it declares: "
                             "layer1, layer2, layer3; top-level modules: stem, layer1, layer2, layer3, pool, fc)")


def test_a_bad_classifier_is_refused():
    model = build_model("resnet8", 10)
    error = error_of(model, "resnet8", {"penultimate": "pool"})
    assert error.message.startswith("peer 'a': module 'pool' is a AdaptiveAvgPool2d, not the nn.Linear classifier")
    assert error.message.endswith("(its classifier: fc; top-level modules: stem, layer1, layer2, layer3, pool, fc)")
    error = error_of(model, "resnet8", {"penultimate": "head"})
    assert "peer 'a' has no module 'head'" in error.message and "top-level modules: stem, layer1" in error.message
    convolutional = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    error = error_of(convolutional, "custom")
    assert "has no nn.Linear classifier" in error.message and "peers.a.taps.penultimate" in error.message
    # without the penultimate feature asked for, such a net still has stages
    assert resolve_taps(convolutional, "custom", {"stages": ["0"]}, penultimate=False) == TapSpec(None, None, ("0",))


def test_stages_asked_of_a_model_that_declares_none():
    error = error_of(build_model("mlp", 10, 1), "mlp", stages=True)
    assert "declares no stages to tap: name them in peers.a.taps.stages" in error.message
    many = nn.Sequential(*[nn.Identity() for _ in range(20)], nn.Linear(3, 3))
    assert error_of(many, "custom", stages=True).message.endswith("8, 9, 10, 11, ...)")


def test_a_torchvision_model_with_declared_stages():
    name = "torchvision:resnet18"
    model = build_model(name, num_classes=10)
    assert resolve_taps(model, name) == TapSpec("fc", 512, ())
    config = PeerConfig(model=name, taps={"stages": ["layer2", "layer3", "layer4"]})
    spec = resolve_taps(model, name, config.taps, peer="a", stages=True)
    assert spec == TapSpec("fc", 512, ("layer2", "layer3", "layer4"))
    assert tap_shapes(model, spec, (3, 32, 32)) == {
        "penultimate": 512, "stages": {"layer2": (128, 4, 4), "layer3": (256, 2, 2), "layer4": (512, 1, 1)}}
    recorder = TapRecorder(model, spec, True, True)
    model.train()(torch.randn(2, 3, 32, 32))
    assert recorder.penultimate.shape == (2, 512) and recorder.stages[2].shape == (2, 512, 1, 1)


def test_the_topologys_taps_are_checked():
    assert PeerConfig(model="resnet8").taps is None
    assert PeerConfig(model="resnet8", taps={"penultimate": "fc"}).taps.stages is None
    with pytest.raises(ValueError, match="each once"):
        PeerConfig(model="resnet8", taps={"stages": ["layer1", "layer1"]})
    with pytest.raises(ValueError, match="extra"):
        PeerConfig(model="resnet8", taps={"stage": ["layer1"]})


# --------------------------------------------------------------------------- heads


def test_the_embedding_head_gives_unit_rows():
    torch.manual_seed(0)
    head = EmbeddingHead(64)
    z = head(torch.randn(5, 64))
    assert z.shape == (5, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert count_parameters(head) == 64 * 128 + 128 + 128 * 128 + 128
    assert EmbeddingHead(10, dim=16)(torch.randn(2, 10)).shape == (2, 16)


def test_attached_heads_travel_with_the_network():
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    plain = count_parameters(model)
    assert heads_of(model) is None
    assert attach_heads(model, {"mcl": EmbeddingHead(64)}) is model
    assert isinstance(heads_of(model)["mcl"], EmbeddingHead)
    assert count_parameters(model) == plain + count_parameters(heads_of(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    state = model.state_dict()
    assert f"{HEADS_ATTRIBUTE}.mcl.project.0.weight" in state

    torch.manual_seed(1)
    fresh = attach_heads(build_model("resnet8", 10).eval(), {"mcl": EmbeddingHead(64)})
    feature = torch.randn(2, 64)
    assert not torch.allclose(heads_of(fresh)["mcl"](feature), heads_of(model)["mcl"](feature))
    fresh.load_state_dict(state)
    torch.testing.assert_close(heads_of(fresh)["mcl"](feature), heads_of(model)["mcl"](feature))
    with pytest.raises(RuntimeError, match="cohort_heads"):
        build_model("resnet8", 10).load_state_dict(state)  # a network without the head does not take it


# --------------------------------------------------------------------------- timm peers


TIMM_MODELS = {
    "resnet18": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 32},
}


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_models_forward_on_cifar_and_have_taps(name):
    pytest.importorskip("timm", reason=TIMM_SKIP)
    torch.manual_seed(0)
    model = build_model(f"timm:{name}", num_classes=10, **TIMM_MODELS[name]).train()
    spec = resolve_taps(model, f"timm:{name}", peer="a")
    assert spec.classifier in dict(model.named_modules()) and spec.feature_size == model.num_features
    assert spec.stages == tuple(info["module"] for info in model.feature_info) and spec.stages
    recorder = TapRecorder(model, spec, True, True)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert recorder.penultimate.shape == (2, spec.feature_size)
    torch.testing.assert_close(dict(model.named_modules())[spec.classifier](recorder.penultimate), logits)
    assert len(recorder.stages) == len(spec.stages)
    recorder.remove()
    shapes = tap_shapes(model, spec, (3, 32, 32))
    assert shapes["penultimate"] == spec.feature_size and model.training
    if name.startswith("vit"):
        assert set(shapes["stages"].values()) == {(5, 192)}  # tokens (class token and 2x2 patches), not maps
    else:
        sides = [shape[1] for shape in shapes["stages"].values()]
        assert sides == sorted(sides, reverse=True) and sides[-1] == 1


def test_a_timm_name_imports_timm_only_when_used(fresh_interpreter):
    loaded = fresh_interpreter("model names").modules  # model_exists and known_models, in a fresh interpreter
    assert "cohort.models" in loaded and "torch" in loaded and "timm" not in loaded


def test_without_timm_a_timm_peer_says_how_to_install_it(monkeypatch):
    from cohort.models import registry

    monkeypatch.setattr(registry, "timm_installed", lambda: False)
    assert not registry.model_exists("timm:resnet18")
    with pytest.raises(ValueError, match=r"needs timm, which is not installed: pip install 'cohort\[timm\]'"):
        PeerConfig(model="timm:resnet18")
    with pytest.raises(CohortError, match="pip install"):
        build_model("timm:resnet18", 10)


def test_timm_names_are_checked():
    pytest.importorskip("timm", reason=TIMM_SKIP)
    from cohort.models import model_options

    assert not PeerConfig.model_fields["taps"].is_required()
    assert model_options("timm:resnet18") is None
    with pytest.raises(ValueError, match="unknown model 'timm:not_a_model'"):
        PeerConfig(model="timm:not_a_model")
    assert build_model("timm:resnet18", 10, in_channels=1).eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
