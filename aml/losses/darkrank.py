"""DarkRank, hard (list-wise, Plackett-Luce) version (Chen et al., AAAI 2018), over a batch (docs/REFERENCE.md §5).

Scores S(i, j) = -alpha * d(x_i, x_j)^beta (alpha 3, beta 3). For each anchor i, pi = the teacher's top-L
neighbours (self excluded, L = 4) in teacher order; the loss is the negative log Plackett-Luce likelihood of
pi under the student's scores, averaged over anchors:

    -log P(pi | s) = -sum_{r < L} [ S_s(i, pi_r) - log sum_{j in C_r} exp S_s(i, j) ]

`denominator="list"` (default): C_r = {pi_r, ..., pi_{L-1}} only, as the AML reference code trains it
(budnikm/aml `HardDarkRank`; also lenscloth/RKD `HardDarkRank`, the MXNet `DarkRankLoss` hard mode), which
orders the teacher's top-L among themselves and ignores the rest of the batch.
`denominator="all"`: C_r = every non-self batch item not yet placed (pi_0..pi_{r-1} removed), i.e. the
top-L Plackett-Luce (top-k ListMLE) likelihood of the paper's permutation probability over all candidates:
the teacher's top-L must also outrank the rest of the batch.
The value is defined for the whole batch: "sum" and "mean" give the same scalar, "none" is refused.
"""

from __future__ import annotations

import torch

from aml.losses.common import check_pair, check_per_sample, pdist


def darkrank(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    alpha: float = 3.0,
    beta: float = 3.0,
    list_len: int = 4,
    denominator: str = "list",
    reduction: str = "sum",
) -> torch.Tensor:
    """Hard DarkRank between student (B, D) and frozen teacher (B, D) vectors of the same images (B >= 2)."""
    check_pair(student, teacher)
    check_per_sample("darkrank", reduction)
    if denominator not in ("all", "list"):
        raise ValueError(f"denominator {denominator!r}: use 'all' or 'list'")
    B = len(student)
    if B < 2:
        raise ValueError("loss 'darkrank' needs a batch of at least 2 images")
    L = min(list_len, B - 1)
    eye = torch.eye(B, dtype=torch.bool, device=student.device)
    s_t = (-alpha * pdist(teacher.detach()).pow(beta)).masked_fill(eye, float("-inf"))
    s_s = -alpha * pdist(student).pow(beta)
    perm = s_t.topk(L, dim=1).indices  # (B, L) teacher order, self never among them
    chosen = s_s.gather(1, perm)  # (B, L)
    if denominator == "list":
        # log sum over pi_r..pi_{L-1}: reversed cumulative logsumexp
        denom = torch.logcumsumexp(chosen.flip(1), dim=1).flip(1)
    else:
        placed = torch.zeros(B, L, B, dtype=torch.bool, device=student.device)
        placed.scatter_(2, perm[:, :, None], True)
        removed = (placed.cumsum(1) - placed.long()) > 0  # [i, r, j]: j in pi_0..pi_{r-1}
        removed |= eye[:, None, :]
        denom = torch.logsumexp(s_s[:, None, :].masked_fill(removed, float("-inf")), dim=2)
    return -(chosen - denom).sum(1).mean()
