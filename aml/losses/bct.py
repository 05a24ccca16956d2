"""Backward-compatible training (`bct`; Shen et al., CVPR 2020; docs/REFERENCE.md §9): the upgrade's loss.

The new model (the student) must search the database the old model (the frozen teacher) indexed and stay strong
on its own. Three terms on the student's vectors s of class-labelled images, and a fourth off by default, all
weighted:

    bct = weight_own       * NormSoftmax(s, y; own_proxies)   the new model's own classifier (BCT's L(w_new, phi_new))
        + weight_influence * NormSoftmax(s, y; proxies)       the old model's frozen classifier (BCT's influence loss)
        + weight_reg       * 1/2 d(s, t)^2                    the asymmetric term (AML's `reg`) on the same images
        + weight_csd       * CSD(s, t; ref)                   the ranking form of the asymmetric term (`csd`, off by
                                                              default): the new query against the old model's
                                                              neighbours of it among the epoch's pool `ref`

`proxies` are the teacher's (the class objective's `teacher-trained`: NormSoftmax fitted to the old model's
cached vectors, frozen); `own_proxies` the new model's, trained with it (the class objective starts them at the
teacher's). Setting two weights to 0 leaves one term: the influence term alone is `normsoftmax` with trained
proxies, the asymmetric term alone is `reg` on class-balanced batches. The CSD term takes `csd`'s constants (`k`,
`tau_s`, `tau_t`, `label_weight`, its labels the class ids) and is `csd`'s own scalar (the batch's mean), added to
the reduced per-image terms, so that `reduction="none"` refuses it.
"""

from __future__ import annotations

import torch

from aml.losses.common import check_pair, reduce, sqdist
from aml.losses.csd import TAU_S, TAU_T, K, csd
from aml.losses.normsoftmax import TEMPERATURE, normsoftmax


def bct(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    own_proxies: torch.Tensor,
    ref: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    temperature: float = TEMPERATURE,
    weight_own: float = 1.0,
    weight_influence: float = 1.0,
    weight_reg: float = 1.0,
    weight_csd: float = 0.0,
    k: int = K,
    tau_s: float = TAU_S,
    tau_t: float = TAU_T,
    label_weight: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """The weighted sum of the student's own NormSoftmax, the teacher-proxy NormSoftmax and `reg` per image, plus
    the weighted CSD of the batch against the teacher's references `ref` (P, D) when `weight_csd` > 0."""
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
    out = reduce(values, reduction)
    if not weight_csd:
        return out
    if reduction == "none":
        raise ValueError("bct: the csd term (weight_csd > 0) is one value per batch; reduction 'none' refuses it")
    kw = dict(ref=ref, labels=labels, ref_labels=ref_labels, k=k, tau_s=tau_s, tau_t=tau_t, label_weight=label_weight)
    return out + weight_csd * csd(student, teacher, **kw)
