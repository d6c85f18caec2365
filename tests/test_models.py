"""The CIFAR model zoo of the KD literature: shapes, gradients and published parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cohort.models import MODELS, build_model, count_parameters, model_exists

torch.set_num_threads(2)

RESNETS = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4",
]
WRNS = ["wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_16_8", "wrn_40_1", "wrn_40_2"]
NEW_MODELS = RESNETS + WRNS + ["vgg8", "vgg11", "vgg13", "mobilenetv2", "mobilenetv2_half", "shufflenetv2"]

# Exact counts for 100 classes, next to the figure in millions that the KD papers report
# (CRD, DKD and their successors). Those figures are rounded to two decimals, so they pin a count
# only to +-0.005M: resnet8's 83,892 is "0.08M" although it is 4.9% above 80,000.
PARAMETERS_100 = {
    "resnet8": (83_892, 0.08),
    "resnet20": (278_324, 0.28),
    "resnet56": (861_620, 0.86),
    "resnet110": (1_736_564, 1.74),
    "resnet8x4": (1_233_540, 1.23),
    "resnet32x4": (7_433_860, 7.43),
    "wrn_16_2": (703_284, 0.70),
    "wrn_40_1": (569_780, 0.57),
    "wrn_40_2": (2_255_156, 2.26),
    "vgg8": (3_965_028, 3.96),
    "vgg13": (9_462_180, 9.46),
    "mobilenetv2_half": (812_836, 0.81),
    "shufflenetv2": (1_355_528, 1.36),
}
# Not in the usual tables; pinned so that an accidental architecture change shows up.
PARAMETERS_100_UNPUBLISHED = {
    "resnet14": 181_108,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "wrn_16_1": 180_916,
    "wrn_16_4": 2_772_020,
    "wrn_16_8": 11_007_540,
    "vgg11": 9_277_284,
    "mobilenetv2": 2_353_060,
}


def test_every_new_model_is_registered():
    assert [name for name in NEW_MODELS if not model_exists(name)] == []
    assert set(PARAMETERS_100) | set(PARAMETERS_100_UNPUBLISHED) == set(NEW_MODELS)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_forward_backward_on_cifar_sized_batch(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    model.train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([3, 7])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"


@pytest.mark.parametrize("name", NEW_MODELS)
@pytest.mark.parametrize("size", [24, 64])
def test_other_input_sizes_run(name, size):
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


@pytest.mark.parametrize("name", sorted(PARAMETERS_100))
def test_parameter_count_matches_the_literature(name):
    expected, published_millions = PARAMETERS_100[name]
    count = count_parameters(build_model(name, num_classes=100))
    assert count == expected
    tolerance = max(0.02 * published_millions, 0.005) * 1e6
    assert abs(count - published_millions * 1e6) <= tolerance


@pytest.mark.parametrize("name", sorted(PARAMETERS_100_UNPUBLISHED))
def test_parameter_count_is_stable(name):
    assert count_parameters(build_model(name, num_classes=100)) == PARAMETERS_100_UNPUBLISHED[name]


@pytest.mark.parametrize("name", RESNETS)
def test_resnets_take_single_channel_images(name):
    model = build_model(name, num_classes=10, in_channels=1).eval()
    assert model.stem[0].in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_mobilenetv2_width_multiplier():
    def count(**options):
        return count_parameters(MODELS["mobilenetv2"](num_classes=100, in_channels=3, **options))

    half = count(width=0.5)
    assert half == count_parameters(build_model("mobilenetv2_half", num_classes=100)) == 812_836
    assert count(width=0.25) < half < count() < count(width=1.4)
    with pytest.raises(ValueError):
        count(width=0.0)


def test_shufflenetv2_net_size():
    counts = [
        count_parameters(MODELS["shufflenetv2"](num_classes=100, in_channels=3, net_size=size))
        for size in (0.5, 1, 1.5, 2)
    ]
    assert counts[1] == 1_355_528
    assert counts == sorted(counts) and len(set(counts)) == 4
    with pytest.raises(ValueError):
        MODELS["shufflenetv2"](num_classes=100, in_channels=3, net_size=0.75)


def test_torchvision_models_are_reachable():
    model = build_model("torchvision:resnet18", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert not model_exists("torchvision:not_a_model")


# timm models for 1000 classes: the exact counts, each against the figure published for it.
TIMM_PARAMETERS_1000 = {
    "resnet18": 11_689_512,  # torchvision's and timm's ResNet-18: 11,689,512 (11.69M)
    "efficientnet_b0": 5_288_548,  # timm's model card: 5.3M; the paper (Tan & Le, 2019): 5.3M
    "convnext_atto": 3_695_520,  # timm's model card: 3.7M
    "vit_tiny_patch16_224": 5_717_416,  # timm's model card: 5.7M
}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMETERS_1000))
def test_timm_parameter_counts(name):
    pytest.importorskip("timm", reason="timm not installed: pip install 'cohort[timm]'")
    assert model_exists(f"timm:{name}")
    assert count_parameters(build_model(f"timm:{name}", num_classes=1000)) == TIMM_PARAMETERS_1000[name]
    assert not model_exists("timm:not_a_model")
