"""Contextual similarity distillation (Wu, Wang, Zhou, Li, Tian, CVPR 2022), label-free, over a batch.

For each query image q the context is the teacher's top-K neighbours r_1..r_K of t(q) among the reference
teacher vectors R; the student reproduces the teacher's similarity distribution over that context:

    loss(q) = KL( softmax_j(<t(q), t(r_j)> / tau_t) || softmax_j(<s(q), t(r_j)> / tau_s) )

and the loss is the mean over the batch's queries ("sum" and "mean" give that scalar, "none" is refused). The
student side is asymmetric: student query against *teacher* references, the pairing used at test time.

R = the batch's own teacher vectors, followed by the reference set `ref` (P, D) when given: teacher vectors
(the asymmetric case; the trainer passes the teacher vectors of the epoch's pool, a large cached context).
Each query's own teacher vector is thus always in its context and is its first neighbour, which gives the
paper's "first-order feature vector preserving" term; the other neighbours give its "second-order ranking list
preserving" term. K is capped at |R|.

Defaults k = 256, tau_s = 1.0 (query/student), tau_t = 0.01 (gallery/teacher): the CSD settings of the
public re-implementation in the D3still code base (SCY-X/D3still, AIR_Distiller/distillers/CSD.py and
Training_Configs/*/CSD.yaml: TOPK 256, TEMPERATURE_QUERY 1, TEMPERATURE_GALLERY 0.01, KL summed over the
neighbours and averaged over queries). The original paper's text and code were not available to check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aml.losses.common import check_pair, check_per_sample


def csd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    ref: torch.Tensor | None = None,
    k: int = 256,
    tau_s: float = 1.0,
    tau_t: float = 0.01,
    reduction: str = "sum",
) -> torch.Tensor:
    """CSD between student (B, D) and frozen teacher (B, D) vectors; optional extra teacher context (P, D)."""
    check_pair(student, teacher)
    check_per_sample("csd", reduction)
    refs = teacher.detach()
    if ref is not None:
        if ref.dim() != 2 or ref.shape[1] != teacher.shape[1]:
            raise ValueError(f"ref {tuple(ref.shape)} must be (P, {teacher.shape[1]})")
        refs = torch.cat([refs, ref.detach().to(refs)], dim=0)
    k = min(int(k), len(refs))
    t_sim, idx = (teacher.detach() @ refs.t()).topk(k, dim=1)  # (B, K) teacher's neighbours, best first
    s_sim = torch.einsum("bd,bkd->bk", student, refs[idx])  # (B, K) student query vs the same references
    log_p_s = F.log_softmax(s_sim / tau_s, dim=1)
    log_p_t = F.log_softmax(t_sim / tau_t, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
