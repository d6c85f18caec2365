"""The model zoo: a name in a topology's ``peers.<name>.model`` resolves here.

Builders are registered by decorator and called as ``builder(num_classes=..., in_channels=...)``.
Any torchvision classification model is also available as ``torchvision:<name>``.
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
                                    MODELS,
                                    TORCHVISION_PREFIX,
                                    build_model,
                                    count_parameters,
                                    init_weights,
                                    known_models,
                                    model_exists,
                                    model_options,
                                    register_model,
)

__all__ = ["MODELS", "TORCHVISION_PREFIX", "build_model", "count_parameters", "init_weights", "known_models",
           "model_exists", "model_options", "register_model"]
