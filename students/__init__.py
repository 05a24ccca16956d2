"""Student backbone families, registered into `aml.registry` on import (any of them may also be a teacher)."""

from students import efficientnet, mobilenet  # noqa: F401
