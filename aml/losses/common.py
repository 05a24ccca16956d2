"""Shared pieces of the losses: reductions and Euclidean distances on (..., D) vectors."""

from __future__ import annotations

import torch

REDUCTIONS = ("sum", "mean", "none")
DIST_EPS = 1e-12  # squared distances are clamped here before sqrt (no inf gradient at d = 0)


def check_reduction(reduction: str) -> None:
    """Fail loudly on an unknown reduction name."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-tuple (or per-image) values (B,) -> their sum, mean, or themselves (`none`)."""
    check_reduction(reduction)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    return values


def check_per_sample(name: str, reduction: str) -> None:
    """A whole-batch loss has no per-sample values: refuse `reduction="none"` instead of ignoring it."""
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError(
            f"loss '{name}' is defined over the whole batch (per_sample=False): reduction='none' has no "
            "per-sample values; use 'sum' or 'mean'"
        )


def sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance over the last dimension (broadcasting)."""
    return (a - b).pow(2).sum(-1)


def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance over the last dimension (broadcasting)."""
    return sqdist(a, b).clamp_min(DIST_EPS).sqrt()


def pdist(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) pairwise Euclidean distances, exact zeros on the diagonal."""
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(DIST_EPS)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return torch.where(eye, torch.zeros_like(d2), d2.sqrt())


def check_tuples(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor) -> None:
    """Shapes of a tuple batch: anchor and positive (B, D), negatives (B, K, D)."""
    if anchor.dim() != 2 or positive.shape != anchor.shape:
        raise ValueError(f"anchor {tuple(anchor.shape)} and positive {tuple(positive.shape)} must both be (B, D)")
    if negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0] or negatives.shape[2] != anchor.shape[1]:
        raise ValueError(
            f"negatives {tuple(negatives.shape)} must be (B, K, D) with B, D of anchor {tuple(anchor.shape)}"
        )


def check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Shapes of a batch loss input: student and teacher both (B, D)."""
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be (B, D)")
