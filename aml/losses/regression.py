"""Regression (`reg`, docs/REFERENCE.md §5): 1/2 d(s(x), t(x))^2 on any image x; labels not used."""

from __future__ import annotations

import torch

from aml.losses.common import check_pair, reduce, sqdist


def reg(student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """Half squared distance between each image's student (B, D) and frozen teacher (B, D) vectors."""
    check_pair(student, teacher)
    return reduce(0.5 * sqdist(student, teacher.detach()), reduction)
