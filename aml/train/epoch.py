"""What one epoch trains on: tuples mined for tuple losses, image batches for batch losses, class-balanced
batches (C classes x K images) for classification losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from aml.data.sources import draw_by_source, source_weights
from aml.data.trainset import TrainSet
from aml.errors import UserError
from aml.mining import mine_negatives, random_negatives, sample_epoch
from aml.train.config import TrainConfig


@dataclass(frozen=True)
class EpochPlan:
    """Image indices of the epoch: anchors (B,), positives (B,) and negatives (B, K); pool for context.

    `batches`: the steps' positions into `anchors` when the plan fixes them (class-balanced batches), else
    None (the trainer shuffles and groups by image size)."""

    anchors: np.ndarray
    positives: np.ndarray | None
    negatives: np.ndarray | None
    pool: np.ndarray
    dropped: int = 0  # tuples without enough negatives (too few clusters in the pool)
    batches: list[np.ndarray] | None = None


def by_source(cfg: TrainConfig, sources: tuple[tuple[int, int], ...]) -> bool:
    """Whether an epoch draws every source an equal share (`--sampling sources`, several sources)."""
    return cfg.sampling == "sources" and len(sources) > 1


def plan_tuples(
    cfg: TrainConfig,
    train: TrainSet,
    rng: np.random.Generator,
    teacher: np.ndarray,
    student_vectors: Callable[[np.ndarray], np.ndarray],
    mode: str,
    sources: tuple[tuple[int, int], ...] = (),
) -> EpochPlan:
    """Sample (q, p) pairs (`--sampling sources`: every labelled source of `sources`, their [start, stop) image
    ranges, an equal share) and a pool, then mine `neg_num` negatives per query (docs/REFERENCE.md §4), `mode`
    asymmetric | symmetric | random (aml.train.recipe.mining).

    `student_vectors(idx)` embeds training images with the current student (no grad); the teacher's
    vectors come from its cache, so asymmetric mining never runs the teacher.
    """
    weights = source_weights(sources, train.qidxs) if by_source(cfg, sources) and train.num_pairs else None
    qsel, psel, pool = sample_epoch(
        train.cluster, train.qidxs, train.pidxs, cfg.query_size, cfg.pool_size, rng, weights
    )
    if mode == "random":
        neg = random_negatives(train.cluster[qsel], train.cluster[pool], cfg.neg_num, rng)
    else:
        q = torch.from_numpy(np.asarray(student_vectors(qsel), dtype=np.float32))
        if mode == "asymmetric":
            p = torch.from_numpy(np.asarray(teacher[pool], dtype=np.float32))
        elif mode == "symmetric":
            p = torch.from_numpy(np.asarray(student_vectors(pool), dtype=np.float32))
        else:
            raise ValueError(f"unknown mining mode {mode!r}")
        neg = mine_negatives(q, p, train.cluster[qsel], train.cluster[pool], cfg.neg_num).numpy()
    ok = (neg >= 0).all(axis=1)
    return EpochPlan(qsel[ok], psel[ok], pool[neg[ok]], pool, dropped=int((~ok).sum()))


def plan_images(
    cfg: TrainConfig, train: TrainSet, rng: np.random.Generator, sources: tuple[tuple[int, int], ...] = ()
) -> EpochPlan:
    """Images for batch (label-free) losses: `query_size` random images (`--sampling sources`: every source of
    `sources`, its [start, stop) image range, an equal share), and a random context pool."""
    n = len(train.paths)
    if by_source(cfg, sources):
        anchors = draw_by_source(sources, np.arange(n), cfg.query_size, rng)
    else:
        anchors = rng.choice(n, size=min(cfg.query_size, n), replace=False)
    pool = rng.choice(n, size=min(cfg.pool_size, n), replace=False)
    return EpochPlan(anchors, None, None, pool)


def check_classes(labels: np.ndarray, classes: int, per_class: int) -> np.ndarray:
    """The class ids (non-negative labels) with at least `per_class` images; a one-line UserError when fewer than
    `classes` have."""
    eligible = np.flatnonzero(np.bincount(labels) >= per_class)
    if eligible.size < classes:
        raise UserError(
            f"class-balanced batches: {eligible.size} classes have at least --per-class {per_class} images, a "
            f"batch needs {classes} (batch-size // per-class); lower --per-class or --batch-size"
        )
    return eligible


def class_balanced_batches(
    labels: np.ndarray,
    n_batches: int,
    classes: int,
    per_class: int,
    rng: np.random.Generator,
    sources: tuple[tuple[int, int], ...] = (),
) -> list[np.ndarray]:
    """`n_batches` batches of image indices, each `classes` distinct classes x `per_class` distinct images of each
    (classes drawn uniformly among those with at least `per_class` images, class by class in the batch; with
    `sources`, the [start, stop) image ranges of several sources, every source an equal share of the classes).
    `labels` are non-negative class ids."""
    order = np.argsort(labels, kind="stable")  # images of class c: order[starts[c] : starts[c] + counts[c]]
    counts = np.bincount(labels)
    starts = np.cumsum(counts) - counts
    eligible = check_classes(labels, classes, per_class)
    weights = source_weights(sources, order[starts[eligible]]) if len(sources) > 1 else None
    out = []
    for _ in range(n_batches):
        chosen = rng.choice(eligible, size=classes, replace=False, p=weights)
        out.append(
            np.concatenate([order[starts[c] + rng.choice(counts[c], size=per_class, replace=False)] for c in chosen])
        )
    return out


def plan_classes(
    cfg: TrainConfig,
    train: TrainSet,
    labels: np.ndarray,
    rng: np.random.Generator,
    sources: tuple[tuple[int, int], ...] = (),
) -> EpochPlan:
    """Class-balanced batches for classification losses: `query_size // batch_size` batches (at least one) of
    `batch_size // per_class` classes x `per_class` images (`--sampling sources`: every labelled source of
    `sources` an equal share of the classes); a random context pool as `plan_images`."""
    classes = max(cfg.batch_size // cfg.per_class, 1)
    n_batches = max(cfg.query_size // cfg.batch_size, 1)
    own = sources if by_source(cfg, sources) else ()
    batches = class_balanced_batches(labels, n_batches, classes, cfg.per_class, rng, own)
    pool = rng.choice(len(train.paths), size=min(cfg.pool_size, len(train.paths)), replace=False)
    size = classes * cfg.per_class
    steps = [np.arange(i * size, (i + 1) * size) for i in range(len(batches))]
    return EpochPlan(np.concatenate(batches), None, None, pool, batches=steps)
