"""Teacher backbones, registered into `aml.registry` on import (any of them may also be a student)."""

from teachers import efficientnet, resnet, vgg  # noqa: F401
