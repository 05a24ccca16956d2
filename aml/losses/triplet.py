"""Asymmetric triplet (docs/REFERENCE.md §5), squared distances: sum_i max(0, d(s(q),t(p))^2 - d(s(q),t(n_i))^2 + m).

Default margin 0.7, the value the AML reference code trains with: budnikm/aml `main.py` passes its
`--loss-margin` default 0.7 to `TripletLoss(margin=args.loss_margin)`, so the class default 0.1
(lib/layers/loss.py) never applies; `margin=0.1` (`--margin 0.1`, `--loss-arg margin=0.1`) gives that variant.
docs/REFERENCE.md §5 names no triplet margin (its 0.7 is the contrastive one).
"""

from __future__ import annotations

import torch

from aml.losses.common import check_tuples, reduce, sqdist

MARGIN = 0.7  # budnikm/aml main.py --loss-margin default


def triplet(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    margin: float = MARGIN,
    reduction: str = "sum",
) -> torch.Tensor:
    """Student anchors (B, D) vs frozen teacher positives (B, D), negatives (B, K, D); one triplet per n_i."""
    check_tuples(anchor, positive, negatives)
    d_pos = sqdist(anchor, positive.detach())  # (B,)
    d_neg = sqdist(anchor[:, None, :], negatives.detach())  # (B, K)
    return reduce((d_pos[:, None] - d_neg + margin).clamp_min(0).sum(1), reduction)
