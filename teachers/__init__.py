"""Teacher backbone families, registered into `aml.registry` on import (any of them may also be a student)."""

from teachers import resnet, vgg  # noqa: F401
