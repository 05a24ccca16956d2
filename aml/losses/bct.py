"""Backward-compatible training (`bct`; Shen et al., CVPR 2020; docs/REFERENCE.md §9): the upgrade's loss.

The new model (the student) must search the database the old model (the frozen teacher) indexed and stay strong
on its own. Three terms on the student's vectors s of class-labelled images, all weighted:

    bct = weight_own       * NormSoftmax(s, y; own_proxies)   the new model's own classifier (BCT's L(w_new, phi_new))
        + weight_influence * NormSoftmax(s, y; proxies)       the old model's frozen classifier (BCT's influence loss)
        + weight_reg       * 1/2 d(s, t)^2                    the asymmetric term (AML's `reg`) on the same images

`proxies` are the teacher's (the class objective's `teacher-trained`: NormSoftmax fitted to the old model's
cached vectors, frozen); `own_proxies` the new model's, trained with it (the class objective starts them at the
teacher's). Setting two weights to 0 leaves one term: the influence term alone is `normsoftmax` with trained
proxies, the asymmetric term alone is `reg` on class-balanced batches.
"""

from __future__ import annotations

import torch

from aml.losses.common import check_pair, reduce, sqdist
from aml.losses.normsoftmax import TEMPERATURE, normsoftmax


def bct(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    own_proxies: torch.Tensor,
    temperature: float = TEMPERATURE,
    weight_own: float = 1.0,
    weight_influence: float = 1.0,
    weight_reg: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """The weighted sum of the student's own NormSoftmax, the teacher-proxy NormSoftmax and `reg`, per image."""
    check_pair(student, teacher)
    values = weight_reg * 0.5 * sqdist(student, teacher.detach())
    if weight_own:
        values = values + weight_own * normsoftmax(
            student, labels, own_proxies, temperature=temperature, reduction="none"
        )
    if weight_influence:
        values = values + weight_influence * normsoftmax(
            student, labels, proxies.detach(), temperature=temperature, reduction="none"
        )
    return reduce(values, reduction)
