"""What one epoch trains on: tuples mined for tuple losses, image batches for batch losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from aml.data.trainset import TrainSet
from aml.mining import mine_negatives, random_negatives, sample_epoch
from aml.train.config import TrainConfig


@dataclass(frozen=True)
class EpochPlan:
    """Image indices of the epoch: anchors (B,), positives (B,) and negatives (B, K); pool for context."""

    anchors: np.ndarray
    positives: np.ndarray | None
    negatives: np.ndarray | None
    pool: np.ndarray
    dropped: int = 0  # tuples without enough negatives (too few clusters in the pool)


def plan_tuples(
    cfg: TrainConfig,
    train: TrainSet,
    rng: np.random.Generator,
    teacher: np.ndarray,
    student_vectors: Callable[[np.ndarray], np.ndarray],
) -> EpochPlan:
    """Sample (q, p) pairs and a pool, then mine `neg_num` negatives per query (SPEC §4).

    `student_vectors(idx)` embeds training images with the current student (no grad); the teacher's
    vectors come from its cache, so asymmetric mining never runs the teacher.
    """
    qsel, psel, pool = sample_epoch(train.cluster, train.qidxs, train.pidxs, cfg.query_size, cfg.pool_size, rng)
    mode = cfg.resolved_mining()
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


def plan_images(cfg: TrainConfig, train: TrainSet, rng: np.random.Generator) -> EpochPlan:
    """Images for batch (label-free) losses: `query_size` random images, and a random context pool."""
    n = len(train.paths)
    anchors = rng.choice(n, size=min(cfg.query_size, n), replace=False)
    pool = rng.choice(n, size=min(cfg.pool_size, n), replace=False)
    return EpochPlan(anchors, None, None, pool)
