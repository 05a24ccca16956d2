"""Families whose main role is the student, registered into `aml.registry` on import; installed as `aml.students`.

One family per file, named for it; a model's role is the registry's metadata (`default_role`), so a family
keeps its larger members here too (efficientnet.py also registers the Lite2 teacher).
"""

from aml.students import efficientnet, mobilenet  # noqa: F401
