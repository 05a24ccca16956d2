"""Relational knowledge distillation (Park et al., CVPR 2019), distance + angle, over a batch (docs/REFERENCE.md §5).

Labels are not used; student and teacher embed the same B images.

- distance term: smooth-L1 between psi_D(s) and psi_D(t), psi_D = the (B, B) pairwise distances divided by
  their mean non-zero distance;
- angle term: smooth-L1 between psi_A(s) and psi_A(t), psi_A[i, j, k] = <e_ij, e_ik>,
  e_ij = normalise(e_j - e_i) (a zero difference normalises to zero);
- total = 2 x angle + 1 x distance.

Averages run over all B^2 ordered pairs and B^3 ordered triples (degenerate ones give 0 on both sides),
exactly as the reference implementations (lenscloth/RKD `RkdDistance`/`RKdAngle`; budnikm/aml `RKdAD`).
The value is defined for the whole batch: "sum" and "mean" give the same scalar, "none" is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aml.losses.common import check_pair, check_per_sample, pdist


def _distance_potential(x: torch.Tensor) -> torch.Tensor:
    d = pdist(x)
    return d / d[d > 0].mean()


def _angle_potential(x: torch.Tensor) -> torch.Tensor:
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # e[i, j] = normalise(x_j - x_i)
    return torch.bmm(e, e.transpose(1, 2))  # [i, j, k] = <e_ij, e_ik>


def rkd(
    student: torch.Tensor, teacher: torch.Tensor, *, w_dist: float = 1.0, w_angle: float = 2.0, reduction: str = "sum"
) -> torch.Tensor:
    """RKD-DA between student (B, D) and frozen teacher (B, D) vectors of the same images (B >= 2)."""
    check_pair(student, teacher)
    check_per_sample("rkd", reduction)
    if len(student) < 2:
        raise ValueError("loss 'rkd' needs a batch of at least 2 images")
    teacher = teacher.detach()
    loss_d = F.smooth_l1_loss(_distance_potential(student), _distance_potential(teacher))
    loss_a = F.smooth_l1_loss(_angle_potential(student), _angle_potential(teacher))
    return w_angle * loss_a + w_dist * loss_d
