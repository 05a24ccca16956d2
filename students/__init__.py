"""Student backbones, registered into `aml.registry` on import (any of them may also be a teacher)."""

from students import efficientnet, mobilenet, resnet18  # noqa: F401
