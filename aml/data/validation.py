"""Validation data carved out of the training sources: what a recipe's constants are chosen on.

A test split is scored once, with constants already chosen; choosing on it is selection, not
generalisation. `validation_split(train, fraction, seed)` holds out part of a training set's *labelled*
images (unlabelled images have no positives to score): with many labels (>= `MIN_LABELS_BY_LABEL`, UKBench's
objects) whole labels, else (a few landmarks or classes) images within every label that keeps at least
`MIN_LEFT` images for training. It returns the reduced training set and the held-out images with their
labels, which `aml.data.spec.cached_test_split` writes as a revisitop-layout set (every image a query
against the others, positives the same label), scored like a test set."""

from __future__ import annotations

import numpy as np

from aml.data.trainset import TrainSet
from aml.errors import UserError

MIN_LABELS_BY_LABEL = 20  # hold out whole labels from sets with at least this many, else images within labels
MIN_LEFT = 2  # images of a label kept for training when holding out images within it


def _held_out(cluster: np.ndarray, labelled: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the held-out images."""
    labels = np.unique(cluster[labelled])
    out = np.zeros(cluster.size, dtype=bool)
    if labels.size >= MIN_LABELS_BY_LABEL:
        take = rng.permutation(labels)[: max(1, round(fraction * labels.size))]
        out[labelled] = np.isin(cluster[labelled], take)
        return out
    for lab in labels:
        members = np.flatnonzero(labelled & (cluster == lab))
        k = min(round(fraction * members.size), members.size - MIN_LEFT)
        if k >= 2:  # one held-out image alone has no positive to be scored against
            out[rng.permutation(members)[:k]] = True
    return out


def validation_split(train: TrainSet, fraction: float = 0.2, seed: int = 0) -> tuple[TrainSet, list[str], np.ndarray]:
    """(training set without the held-out images, held-out paths, their labels); seeded, so repeatable."""
    if not 0 < fraction < 1:
        raise UserError(f"validation fraction {fraction}: must be in (0, 1); e.g. 0.2")
    labelled = np.zeros(len(train), dtype=bool)
    labelled[train.qidxs] = True
    labelled[train.pidxs] = True
    out = _held_out(train.cluster, labelled, fraction, np.random.default_rng(seed))
    if not out.any():
        raise UserError(
            f"{train.name}: nothing to hold out for validation (needs labelled images: at least "
            f"{MIN_LEFT + 2} per label, or {MIN_LABELS_BY_LABEL}+ labels); add a labelled source"
        )
    keep = np.flatnonzero(~out)
    new = np.full(len(train), -1, dtype=np.int64)
    new[keep] = np.arange(keep.size)
    pairs = ~out[train.qidxs] & ~out[train.pidxs]  # the given pairs whose both images stay
    q, p = new[train.qidxs[pairs]], new[train.pidxs[pairs]]
    reduced = TrainSet([train.paths[i] for i in keep], train.cluster[keep], q, p, train.name).validate()
    held = np.flatnonzero(out)
    return reduced, [train.paths[i] for i in held], train.cluster[held]
