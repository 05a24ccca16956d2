"""Multi-similarity loss (Wang et al., CVPR 2019), anchor row only, asymmetric (docs/REFERENCE.md §5).

With S = <s(q), t(.)> (cosine similarity of L2-normalised vectors), per tuple:

    1/alpha log(1 + sum_p exp(-alpha (S_p - lambda))) + 1/beta log(1 + sum_n exp(beta (S_n - lambda)))

positives = the tuple's positive, negatives = its K negatives; alpha 2, beta 40, lambda 0.5.
No pair mining (as docs/REFERENCE.md §5 and the AML reference code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aml.losses.common import check_tuples, reduce


def _log1p_sum_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_j exp(x_j)) over the last dim, computed stably as softplus(logsumexp)."""
    return F.softplus(torch.logsumexp(x, dim=-1))


def ms(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 40.0,
    lam: float = 0.5,
    reduction: str = "sum",
) -> torch.Tensor:
    """Student anchors (B, D) vs frozen teacher positives (B, D) and negatives (B, K, D)."""
    check_tuples(anchor, positive, negatives)
    s_pos = (anchor * positive.detach()).sum(-1, keepdim=True)  # (B, 1)
    s_neg = torch.einsum("bd,bkd->bk", anchor, negatives.detach())  # (B, K)
    values = _log1p_sum_exp(-alpha * (s_pos - lam)) / alpha + _log1p_sum_exp(beta * (s_neg - lam)) / beta
    return reduce(values, reduction)
