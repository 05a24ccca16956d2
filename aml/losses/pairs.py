"""The pair losses in Metrix's generic form (docs/REFERENCE.md §8): per anchor, references with soft labels y in [0, 1].

An anchor a (B, D) is scored against M references r_j (B, M, D) with labels y_j (B, M): y = 1 a positive, 0 a
negative, lambda a mixed pair `(f_lambda(x, x'), mix_lambda(y, y'))`. With clean labels each form is exactly its
registered loss (`clean_refs` lays a tuple out as references):

- contrastive (`contr`, `contr+`, `sym`; sigma+- identity):
  `sum_j y_j 1/2 d(a, r_j)^2 + (1 - y_j) 1/2 [m - d(a, r_j)]+^2` (docs/REFERENCE.md §5's cirtorch form, d Euclidean);
- multi-similarity (`ms`; S = <a, r>): `1/alpha log(1 + sum_j y_j e^{-alpha (S_j - lam)}) +
  1/beta log(1 + sum_j (1 - y_j) e^{beta (S_j - lam)})` (docs/REFERENCE.md §8's sigma, rho);
- triplet (`triplet`; this project's soft form, docs/REFERENCE.md names none): over ordered pairs of references with
  y_i > y_j, `sum y_i (1 - y_j) [d(a, r_i)^2 - d(a, r_j)^2 + m]+` (clean: the (positive, negative) triplets).

`mixed` (B, M) bool marks the mixed references V(a) among U(a) u V(a): the value is then the mixed loss alone,
the terms that involve a mixed reference: contrastive and multi-similarity take the generic form over V(a)
(sigma over the mixed pairs, as the paper), the triplet the pairs with one mixed member (its pairs of two mixed
references of one lambda are excluded by y_i > y_j; the clean pairs are the clean loss). Nothing is detached
here: callers decide what is frozen. Values are per anchor, (B,).
"""

from __future__ import annotations

import torch

from aml.losses.common import dist, sqdist
from aml.losses.contrastive import MARGIN
from aml.losses.triplet import MARGIN as TRIPLET_MARGIN


def check_refs(anchor: torch.Tensor, refs: torch.Tensor, labels: torch.Tensor, mixed: torch.Tensor | None) -> None:
    """Shapes of a generic-form input: anchor (B, D), refs (B, M, D), labels and mixed (B, M)."""
    if anchor.dim() != 2 or refs.dim() != 3 or refs.shape[0] != anchor.shape[0] or refs.shape[2] != anchor.shape[1]:
        raise ValueError(f"refs {tuple(refs.shape)} must be (B, M, D) with B, D of anchor {tuple(anchor.shape)}")
    if labels.shape != refs.shape[:2] or (mixed is not None and mixed.shape != refs.shape[:2]):
        raise ValueError(f"labels {tuple(labels.shape)} and mixed must be (B, M) = {tuple(refs.shape[:2])}")


def _counted(labels: torch.Tensor, mixed: torch.Tensor | None) -> torch.Tensor:
    """(B, M) 1 where a reference's terms count: all of them, or the mixed ones."""
    return torch.ones_like(labels) if mixed is None else mixed.to(labels.dtype)


def soft_contrastive(
    anchor: torch.Tensor,
    refs: torch.Tensor,
    labels: torch.Tensor,
    *,
    mixed: torch.Tensor | None = None,
    margin: float = MARGIN,
) -> torch.Tensor:
    """(B,) contrastive generic form: `sum_j y_j 1/2 d^2 + (1 - y_j) 1/2 [m - d]+^2` over the counted refs."""
    check_refs(anchor, refs, labels, mixed)
    pos = 0.5 * sqdist(anchor[:, None, :], refs)
    neg = 0.5 * (margin - dist(anchor[:, None, :], refs)).clamp_min(0).pow(2)
    return (_counted(labels, mixed) * (labels * pos + (1 - labels) * neg)).sum(1)


def _log1p_weighted_sum_exp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_j w_j exp(x_j)) over the last dim, w >= 0; 0 where every w_j is 0 (finite gradients)."""
    some = (w > 0).any(-1, keepdim=True)
    logits = torch.where(w > 0, x + torch.log(w.clamp_min(torch.finfo(w.dtype).tiny)), -torch.inf)
    logits = torch.where(some, logits, torch.zeros_like(x))  # an empty row would give nan gradients
    return torch.where(some[..., 0], torch.nn.functional.softplus(torch.logsumexp(logits, -1)), 0.0)


def soft_ms(
    anchor: torch.Tensor,
    refs: torch.Tensor,
    labels: torch.Tensor,
    *,
    mixed: torch.Tensor | None = None,
    alpha: float = 2.0,
    beta: float = 40.0,
    lam: float = 0.5,
) -> torch.Tensor:
    """(B,) multi-similarity generic form: sigma+(sum y rho+(S)) + sigma-(sum (1 - y) rho-(S)) over the counted refs."""
    check_refs(anchor, refs, labels, mixed)
    s = torch.einsum("bd,bmd->bm", anchor, refs)
    c = _counted(labels, mixed)
    pos = _log1p_weighted_sum_exp(-alpha * (s - lam), c * labels) / alpha
    neg = _log1p_weighted_sum_exp(beta * (s - lam), c * (1 - labels)) / beta
    return pos + neg


def soft_triplet(
    anchor: torch.Tensor,
    refs: torch.Tensor,
    labels: torch.Tensor,
    *,
    mixed: torch.Tensor | None = None,
    margin: float = TRIPLET_MARGIN,
) -> torch.Tensor:
    """(B,) triplet generic form: `sum_{y_i > y_j} y_i (1 - y_j) [d_i^2 - d_j^2 + m]+`; with `mixed`, the pairs
    that involve a mixed reference."""
    check_refs(anchor, refs, labels, mixed)
    d = sqdist(anchor[:, None, :], refs)  # (B, M)
    yi, yj = labels[:, :, None], labels[:, None, :]
    w = yi * (1 - yj) * (yi > yj).to(labels.dtype)
    if mixed is not None:
        w = w * (mixed[:, :, None] | mixed[:, None, :]).to(labels.dtype)
    return (w * (d[:, :, None] - d[:, None, :] + margin).clamp_min(0)).sum((1, 2))


def clean_refs(
    positive: torch.Tensor, negatives: torch.Tensor, anchor_teacher: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A tuple as labelled references U(a): refs (B, M, D) = [positive, (anchor_teacher), negatives...] and
    labels (B, M) = [1, (1), 0...]; `anchor_teacher` (the `contr+` extra positive) only when given."""
    pos = [positive] if anchor_teacher is None else [positive, anchor_teacher]
    refs = torch.cat([torch.stack(pos, 1), negatives], 1)
    labels = torch.zeros(refs.shape[:2], dtype=refs.dtype, device=refs.device)
    labels[:, : len(pos)] = 1
    return refs, labels
