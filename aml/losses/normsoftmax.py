"""NormSoftmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning"; docs/REFERENCE.md §8).

Softmax cross-entropy over class proxies, with L2-normalised embeddings x and proxies p, temperature sigma
(0.05), no bias:

    loss(x, y) = -log( exp(<x, p_y> / sigma) / sum_z exp(<x, p_z> / sigma) )

The proxies are an input of the function; their owner, the class objective (aml.train.objective.ClassObjective,
which keeps them as its parameter or buffer), decides how it is used.
- symmetric: trainable proxies (C, D), fitted with the network on class-labelled images (the paper);
- asymmetric: the *teacher's* proxies, frozen: `class_proxies` of the teacher's cached vectors (its L2-normalised
  class means), or `fit_proxies`, the proxies NormSoftmax itself fits to the teacher's vectors (started from the
  class means), so the student's vectors are classified in the teacher's space, without tuples.
Labels are class ids 0..C-1 (the trainer maps a training set's `cluster` ids onto them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from aml.losses.common import check_pair, reduce

TEMPERATURE = 0.05


def normsoftmax(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    *,
    temperature: float = TEMPERATURE,
    reduction: str = "sum",
) -> torch.Tensor:
    """NormSoftmax of embeddings (B, D) with class ids (B,) over proxies (C, D); both sides L2-normalised here."""
    if embeddings.dim() != 2 or proxies.dim() != 2 or proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)} and proxies {tuple(proxies.shape)}: expected (B, D), (C, D)"
        )
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)}: expected one class id per embedding ({embeddings.shape[0]},)")
    logits = F.normalize(embeddings, dim=1) @ F.normalize(proxies.to(embeddings), dim=1).t() / temperature
    return reduce(F.cross_entropy(logits, labels.long(), reduction="none"), reduction)


def normsoftmax_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    temperature: float = TEMPERATURE,
    reduction: str = "sum",
) -> torch.Tensor:
    """The registered batch form: the student's vectors (B, D) of labelled images classified by `proxies` (C, D).

    The teacher's vectors of the batch (B, D) are not read (the teacher enters through its proxies)."""
    check_pair(student, teacher)
    return normsoftmax(student, labels, proxies, temperature=temperature, reduction=reduction)


def class_labels(cluster: np.ndarray) -> tuple[np.ndarray, int]:
    """A training set's cluster ids -> class ids 0..C-1 (in sorted cluster order) and C."""
    classes, labels = np.unique(np.asarray(cluster), return_inverse=True)
    return labels.astype(np.int64), int(classes.size)


@torch.no_grad()
def class_proxies(vectors: np.ndarray | torch.Tensor, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """The frozen proxies of a vector set: each class's mean vector, L2-normalised, (C, D) float32 (no grad).

    `vectors` (N, D) may be a float16 memmap (the teacher cache); rows are summed in float32 blocks."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    dim = vectors.shape[1]
    sums = torch.zeros(num_classes, dim, dtype=torch.float32)
    block = 65536
    for s in range(0, len(labels_t), block):
        rows = vectors[s : s + block]
        rows = rows.detach().float().cpu() if torch.is_tensor(rows) else torch.from_numpy(np.asarray(rows, np.float32))
        sums.index_add_(0, labels_t[s : s + block], rows)
    return F.normalize(sums, dim=1)


FIT_STEPS = 200  # Adam steps of `fit_proxies`
FIT_LR = 0.01
FIT_BATCH = 8192  # rows per step: all of them up to this, else a seeded random batch of this many


def fit_proxies(
    vectors: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    *,
    temperature: float = TEMPERATURE,
    steps: int = FIT_STEPS,
    lr: float = FIT_LR,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Proxies trained by NormSoftmax on fixed vectors (the teacher's cache), then frozen: (C, D) L2N, no grad.

    Starts from `class_proxies` (the class means) and takes `steps` Adam steps on the mean loss over every row
    (a seeded random batch of FIT_BATCH rows per step beyond that, so a step costs at most FIT_BATCH x C x D
    multiply-adds whatever the training set's size), so the proxies are the teacher's own classifier rather than
    its centroids. Runs on `device`; deterministic for a given seed and device. Returns the proxies (on `device`)
    and the mean loss and accuracy of the vectors before and after the fit (what the fit bought)."""
    x = vectors if torch.is_tensor(vectors) else torch.from_numpy(np.asarray(vectors, np.float32))
    x = F.normalize(x.detach().float().to(device), dim=1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=x.device)
    proxies = class_proxies(x, labels, num_classes).to(x.device).requires_grad_()
    opt = torch.optim.Adam([proxies], lr=lr)
    g = torch.Generator().manual_seed(seed)

    def scores(p: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            logits = x @ F.normalize(p, dim=1).t() / temperature
            return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    before = scores(proxies)
    for _ in range(steps):
        rows = torch.randperm(len(y), generator=g)[:FIT_BATCH].to(x.device) if len(y) > FIT_BATCH else slice(None)
        opt.zero_grad(set_to_none=True)
        normsoftmax(x[rows], y[rows], proxies, temperature=temperature, reduction="mean").backward()
        opt.step()
    after = scores(proxies)
    fit = {"loss_before": before[0], "accuracy_before": before[1], "loss_after": after[0], "accuracy_after": after[1]}
    return F.normalize(proxies.detach(), dim=1), fit
