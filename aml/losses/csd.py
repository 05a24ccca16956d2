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

Label-refined target (`label_weight` w > 0; this project's addition, not in the CSD paper): when the training
images' labels are known (their cluster ids: `labels` (B,) of the batch, `ref_labels` (P,) of `ref`), the
context puts the query's same-label references first (then the teacher's nearest others, up to K), and the
target mixes the teacher's distribution with the uniform one over those same-label references:

    target(q) = (1 - w) softmax_j(<t(q), t(r_j)> / tau_t) + w [c(r_j) = c(q)] / #{j: c(r_j) = c(q)}

so the student query is pulled to the teacher's whole cluster of q (the images of its landmark), not only to
t(q). A query's own teacher vector always counts as same-label; a negative label matches nothing else.
With one image per cluster (`images:DIR`) the label term is extra weight on t(q). w = 0 is CSD itself.

Defaults k = 256, tau_s = 1.0 (query/student), tau_t = 0.01 (gallery/teacher): the CSD settings of the
public re-implementation in the D3still code base (SCY-X/D3still, AIR_Distiller/distillers/CSD.py and
Training_Configs/*/CSD.yaml: TOPK 256, TEMPERATURE_QUERY 1, TEMPERATURE_GALLERY 0.01, KL summed over the
neighbours and averaged over queries). The original paper's text and code were not available to check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aml.losses.common import check_pair, check_per_sample

K, TAU_S, TAU_T = 256, 1.0, 0.01  # the defaults above: context size, student and teacher temperatures


def csd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    ref: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    k: int = K,
    tau_s: float = TAU_S,
    tau_t: float = TAU_T,
    label_weight: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """CSD between student (B, D) and frozen teacher (B, D) vectors; optional extra teacher context (P, D); with
    `label_weight` > 0, the label-refined target over the cluster ids `labels` (B,) and `ref_labels` (P,)."""
    check_pair(student, teacher)
    check_per_sample("csd", reduction)
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"csd: label_weight {label_weight} must be in [0, 1]")
    refs = teacher.detach()
    if ref is not None:
        if ref.dim() != 2 or ref.shape[1] != teacher.shape[1]:
            raise ValueError(f"ref {tuple(ref.shape)} must be (P, {teacher.shape[1]})")
        refs = torch.cat([refs, ref.detach().to(refs)], dim=0)
    k = min(int(k), len(refs))
    sim = teacher.detach() @ refs.t()  # (B, R)
    if label_weight == 0:
        t_sim, idx = sim.topk(k, dim=1)  # (B, K) teacher's neighbours, best first
        same = None
    else:
        same = same_label(labels, ref_labels, len(refs), ref is not None).to(sim.device)  # (B, R)
        idx = (sim + 3.0 * same).topk(k, dim=1).indices  # same-label references first (|sim| <= 1)
        t_sim = sim.gather(1, idx)
    s_sim = torch.einsum("bd,bkd->bk", student, refs[idx])  # (B, K) student query vs the same references
    log_p_s = F.log_softmax(s_sim / tau_s, dim=1)
    log_p_t = F.log_softmax(t_sim / tau_t, dim=1)
    if same is None:
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()
    in_context = same.gather(1, idx).to(t_sim.dtype)
    target = (1 - label_weight) * log_p_t.exp() + label_weight * in_context / in_context.sum(1, keepdim=True)
    return (torch.special.xlogy(target, target) - target * log_p_s).sum(1).mean()


def same_label(
    labels: torch.Tensor | None, ref_labels: torch.Tensor | None, n_refs: int, has_ref: bool
) -> torch.Tensor:
    """(B, R) bool: reference j (the batch, then `ref`) has query b's label; a query always has its own."""
    if labels is None or (has_ref and ref_labels is None):
        raise ValueError("csd: label_weight > 0 needs the cluster ids of the batch and of ref (labels, ref_labels)")
    ids = torch.cat([labels, ref_labels.to(labels)]) if has_ref else labels
    if ids.dim() != 1 or len(ids) != n_refs:
        raise ValueError(f"csd: {len(ids)} cluster ids for {n_refs} references")
    B = len(labels)
    same = (ids[None, :] == labels[:, None]) & (labels[:, None] >= 0)
    same[:, :B] |= torch.eye(B, dtype=torch.bool, device=same.device)
    return same
