"""The model zoo: a name in a topology's ``peers.<name>.model`` resolves here.

Builders are registered by decorator and called as ``builder(num_classes=..., in_channels=...)``.
Any torchvision classification model is also available as ``torchvision:<name>``, and with the
optional timm (``pip install 'cohort[timm]'``) any timm model as ``timm:<name>``. A model's taps
(its penultimate feature and its stages) are in cohort.models.taps, the heads a method attaches
to a peer's network in cohort.models.heads.
"""
# Registration happens on import of each family's module.
from cohort.models import (
                                    mobilenetv2_cifar,  # noqa: E402,F401
                                    resnet_cifar,  # noqa: E402,F401
                                    shufflenetv2_cifar,  # noqa: E402,F401
                                    small,  # noqa: E402,F401
                                    vgg_cifar,  # noqa: E402,F401
                                    wrn,  # noqa: E402,F401
)
from cohort.models.registry import (
                                    MODEL_STAGES,
                                    MODELS,
                                    TIMM_PREFIX,
                                    TORCHVISION_PREFIX,
                                    build_model,
                                    count_parameters,
                                    declared_stages,
                                    init_weights,
                                    known_models,
                                    model_exists,
                                    model_options,
                                    register_model,
                                    unknown_model,
)

__all__ = ["MODELS", "MODEL_STAGES", "TIMM_PREFIX", "TORCHVISION_PREFIX", "build_model", "count_parameters",
           "declared_stages", "init_weights", "known_models", "model_exists", "model_options", "register_model",
           "unknown_model"]
