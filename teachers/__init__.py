"""Families whose main role is the teacher, registered into `aml.registry` on import; installed as `aml.teachers`.

One family per file, named for it; a model's role is the registry's metadata (`default_role`), so a family
keeps its smaller members here too (resnet.py also registers the ResNet-18 student).
"""

from aml.teachers import resnet, vgg  # noqa: F401
