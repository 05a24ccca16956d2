"""Contrastive losses (AML, docs/REFERENCE.md §5): asymmetric `contr`, `contr+`; the symmetric baseline `sym`.

Per tuple (q, p, n_1..n_k), summed over its pairs, with d the Euclidean distance:

    1/2 d(s(q), x(p))^2 + sum_i 1/2 max(0, m - d(s(q), x(n_i)))^2

`contr`: x = t, the frozen teacher (detached here). `contr+`: `contr` plus 1/2 d(s(q), t(q))^2, the
teacher's own vector of the query as an extra positive. `sym`: x = s, every tuple image through the
student (no teacher; nothing detached). Margin 0.7 (AML).
"""

from __future__ import annotations

import torch

from aml.losses.common import check_tuples, dist, reduce, sqdist

MARGIN = 0.7


def contrastive_terms(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float
) -> torch.Tensor:
    """(B,) contrastive value of each tuple; no detaching (callers decide what is frozen)."""
    check_tuples(anchor, positive, negatives)
    pos = 0.5 * sqdist(anchor, positive)
    neg = 0.5 * (margin - dist(anchor[:, None, :], negatives)).clamp_min(0).pow(2).sum(1)
    return pos + neg


def contr(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    margin: float = MARGIN,
    reduction: str = "sum",
) -> torch.Tensor:
    """Asymmetric contrastive: student anchors (B, D) vs teacher positives (B, D) and negatives (B, K, D)."""
    return reduce(contrastive_terms(anchor, positive.detach(), negatives.detach(), margin), reduction)


def contr_plus(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    anchor_teacher: torch.Tensor | None = None,
    margin: float = MARGIN,
    reduction: str = "sum",
) -> torch.Tensor:
    """`contr` plus 1/2 d(s(q), t(q))^2, with `anchor_teacher` (B, D) the teacher's vectors of the anchors."""
    if anchor_teacher is None:
        raise ValueError("loss 'contr+' needs anchor_teacher, the teacher's (B, D) vectors of the anchor images")
    if anchor_teacher.shape != anchor.shape:
        raise ValueError(f"anchor_teacher {tuple(anchor_teacher.shape)} must match anchor {tuple(anchor.shape)}")
    values = contrastive_terms(anchor, positive.detach(), negatives.detach(), margin)
    return reduce(values + 0.5 * sqdist(anchor, anchor_teacher.detach()), reduction)


def sym(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    margin: float = MARGIN,
    reduction: str = "sum",
) -> torch.Tensor:
    """Symmetric (no-teacher) contrastive: all inputs are student vectors."""
    return reduce(contrastive_terms(anchor, positive, negatives, margin), reduction)
