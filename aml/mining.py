"""Epoch tuples (docs/REFERENCE.md §4): sample (query, positive) pairs and a pool, then mine hard negatives from it.

The cirtorch rule, for each query: walk down its ranking of the pool (descending score), skip images of the
query's own cluster and images whose cluster was already taken for this query, stop after `neg_num`.
Asymmetric mining (AML default) ranks teacher pool vectors against student query vectors; symmetric mining
uses student vectors on both sides; random mining walks a uniformly random order instead of a ranking.

Vectorised: the walk's outcome depends only on a prefix of the ranking, so it runs on each query's top-C
candidates at once (C = `candidates`), and only the rows that did not find `neg_num` negatives there are
redone with a 4x longer prefix, up to the whole pool.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_epoch(
    cluster: np.ndarray,
    qidxs: np.ndarray,
    pidxs: np.ndarray,
    query_size: int,
    pool_size: int,
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw `query_size` random (q, p) pairs (distinct pairs, drawn with `weights` when given: one per pair, summing
    to 1) and a random pool of `pool_size` images (all when fewer exist).

    Returns (qsel, psel, pool): int64 image indices; qsel[i], psel[i] is one pair; the pool is drawn from
    every image (as cirtorch does), distinct images, random order.
    """
    qidxs, pidxs = np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64)
    if qidxs.shape != pidxs.shape or qidxs.ndim != 1:
        raise ValueError(f"qidxs {qidxs.shape} and pidxs {pidxs.shape} must be parallel 1-d arrays")
    if weights is None:
        pairs = rng.permutation(len(qidxs))[: max(int(query_size), 0)]
    else:
        pairs = rng.choice(len(qidxs), size=min(max(int(query_size), 0), len(qidxs)), replace=False, p=weights)
    pool = rng.permutation(len(cluster))[: max(int(pool_size), 0)].astype(np.int64)
    return qidxs[pairs], pidxs[pairs], pool


def first_negatives(
    cand: torch.Tensor, cand_cluster: torch.Tensor, q_cluster: torch.Tensor, neg_num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cirtorch walk over ranked candidate lists, for all rows at once.

    cand (Q, C) pool positions in walking order; cand_cluster (Q, C) their clusters; q_cluster (Q,).
    An image is taken iff its cluster differs from the query's and is the first occurrence of that cluster
    in the row (an earlier image of the same cluster would have been taken). Returns (picked (Q, neg_num)
    positions, -1 padded, and enough (Q,): whether the row found `neg_num`).
    """
    Q, C = cand.shape
    order = torch.argsort(cand_cluster, dim=1, stable=True)
    sorted_cl = cand_cluster.gather(1, order)
    first_sorted = torch.ones_like(sorted_cl, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_cl[:, 1:] != sorted_cl[:, :-1]
    first = torch.empty_like(first_sorted).scatter_(1, order, first_sorted)
    valid = first & (cand_cluster != q_cluster[:, None])
    count = valid.cumsum(1)
    take = valid & (count <= neg_num)
    picked = torch.full((Q, neg_num), -1, dtype=torch.int64, device=cand.device)
    rows, cols = take.nonzero(as_tuple=True)
    picked[rows, count[rows, cols] - 1] = cand[rows, cols]
    enough = count[:, -1] >= neg_num if C else torch.zeros(Q, dtype=torch.bool, device=cand.device)
    return picked, enough


def _negatives_from_scores(
    scores: torch.Tensor, q_cluster: torch.Tensor, pool_cluster: torch.Tensor, neg_num: int, candidates: int
) -> torch.Tensor:
    """(q, P) scores -> (q, neg_num) pool positions by the walk; the prefix grows only for unfinished rows."""
    q, P = scores.shape
    out = torch.full((q, neg_num), -1, dtype=torch.int64, device=scores.device)
    todo = torch.arange(q, device=scores.device)
    c = min(max(int(candidates), neg_num, 1), P)
    while len(todo) and P:
        cand = scores[todo].topk(c, dim=1).indices  # sorted, best first
        picked, enough = first_negatives(cand, pool_cluster[cand], q_cluster[todo], neg_num)
        done = enough | (c == P)
        out[todo[done]] = picked[done]
        todo = todo[~done]
        c = min(4 * c, P)
    return out


def _as_long(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return x.to(device=device, dtype=torch.int64)


def mine_negatives(
    q_vecs: torch.Tensor,
    pool_vecs: torch.Tensor,
    q_cluster: np.ndarray | torch.Tensor,
    pool_cluster: np.ndarray | torch.Tensor,
    neg_num: int,
    *,
    candidates: int = 64,
    chunk: int = 1024,
) -> torch.Tensor:
    """Hard negatives: (Q, neg_num) int64 pool positions (CPU); -1 where a query runs out of clusters.

    q_vecs (Q, D) and pool_vecs (P, D) are ranked by dot product (student vs teacher for asymmetric mining,
    student vs student for symmetric). A row holds -1 in its last slots when the pool has fewer than
    `neg_num` clusters other than the query's; callers drop (or pad) those tuples. `candidates` is the first
    prefix length tried (it only affects speed, never the result); queries are scored `chunk` at a time.
    """
    if q_vecs.dim() != 2 or pool_vecs.dim() != 2 or q_vecs.shape[1] != pool_vecs.shape[1]:
        raise ValueError(
            f"q_vecs {tuple(q_vecs.shape)} and pool_vecs {tuple(pool_vecs.shape)} must be (Q, D) and (P, D)"
        )
    device = q_vecs.device
    qc, pc = _as_long(q_cluster, device), _as_long(pool_cluster, device)
    if len(qc) != len(q_vecs) or len(pc) != len(pool_vecs):
        raise ValueError("q_cluster / pool_cluster must have one entry per query / pool vector")
    pool = pool_vecs.to(device=device, dtype=torch.float32)
    parts = [
        _negatives_from_scores(q_vecs[i : i + chunk].float() @ pool.t(), qc[i : i + chunk], pc, neg_num, candidates)
        for i in range(0, len(q_vecs), chunk)
    ]
    out = torch.cat(parts) if parts else torch.empty(0, neg_num, dtype=torch.int64)
    return out.cpu()


def random_negatives(
    q_cluster: np.ndarray,
    pool_cluster: np.ndarray,
    neg_num: int,
    rng: np.random.Generator,
    *,
    candidates: int = 64,
    chunk: int = 512,
) -> np.ndarray:
    """Random negatives: (Q, neg_num) int64 pool positions, other clusters only, at most one per cluster.

    The same walk as `mine_negatives`, over a uniformly random order of the pool per query (-1 as there).
    """
    qc = torch.as_tensor(np.asarray(q_cluster)).long()
    pc = torch.as_tensor(np.asarray(pool_cluster)).long()
    parts = [
        _negatives_from_scores(
            torch.from_numpy(rng.random((len(qc[i : i + chunk]), len(pc)))), qc[i : i + chunk], pc, neg_num, candidates
        )
        for i in range(0, len(qc), chunk)
    ]
    return (torch.cat(parts) if parts else torch.empty(0, neg_num, dtype=torch.int64)).numpy()
