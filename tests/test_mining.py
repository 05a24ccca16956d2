"""Epoch sampling and negative mining against a per-query reference walk (cirtorch semantics, docs/REFERENCE.md §4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aml.mining import first_negatives, mine_negatives, random_negatives, sample_epoch


def reference_walk(scores: np.ndarray, q_cluster: np.ndarray, pool_cluster: np.ndarray, neg_num: int) -> np.ndarray:
    """cirtorch's loop: walk each query's ranking, skip own cluster and clusters already taken; -1 pads."""
    out = np.full((len(scores), neg_num), -1, dtype=np.int64)
    for q in range(len(scores)):
        taken = {int(q_cluster[q])}
        k = 0
        for pos in np.argsort(-scores[q], kind="stable"):
            if k == neg_num:
                break
            c = int(pool_cluster[pos])
            if c not in taken:
                out[q, k] = pos
                taken.add(c)
                k += 1
    return out


def data(Q: int, P: int, D: int, n_clusters: int, seed: int, structured: bool = False):
    g = torch.Generator().manual_seed(seed)
    pool_cluster = torch.randint(n_clusters, (P,), generator=g).numpy()
    q_cluster = torch.randint(n_clusters, (Q,), generator=g).numpy()
    if structured:  # a cluster's images lie close: a query's top ranks are its own or repeated clusters
        centres = torch.randn(n_clusters, D, generator=g)
        pool = centres[pool_cluster] + 0.3 * torch.randn(P, D, generator=g)
        q = centres[q_cluster] + 0.3 * torch.randn(Q, D, generator=g)
    else:
        pool, q = torch.randn(P, D, generator=g), torch.randn(Q, D, generator=g)
    return F.normalize(q, dim=1), F.normalize(pool, dim=1), q_cluster, pool_cluster


@pytest.mark.parametrize(
    "n_clusters,structured,candidates",
    [
        (300, False, 64),  # many clusters: the short list always suffices
        (300, True, 8),  # neighbours share clusters: fallback to longer lists
        (12, True, 4),  # few clusters: long fallbacks, up to the whole pool
    ],
)
def test_mine_matches_reference_walk(n_clusters, structured, candidates):
    q, pool, qc, pc = data(60, 500, 16, n_clusters, seed=n_clusters + structured, structured=structured)
    got = mine_negatives(q, pool, qc, pc, 5, candidates=candidates, chunk=17)
    assert got.dtype == torch.int64 and got.shape == (60, 5)
    want = reference_walk((q @ pool.t()).numpy(), qc, pc, 5)
    np.testing.assert_array_equal(got.numpy(), want)
    assert (want >= 0).all()


def test_fallback_actually_needed():
    """With structured data many rows cannot finish within 8 candidates (the test above covers fallback)."""
    q, pool, qc, pc = data(60, 500, 16, 300, seed=301, structured=True)
    top8 = (q @ pool.t()).topk(8, dim=1).indices
    _, enough = first_negatives(top8, torch.from_numpy(pc)[top8], torch.from_numpy(qc), 5)
    assert 0 < int((~enough).sum()) < 60


def test_first_negatives_on_a_hand_made_row():
    cand = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    clusters = torch.tensor([[7, 3, 3, 5, 7, 9, 5]])  # query cluster 7
    picked, enough = first_negatives(cand, clusters, torch.tensor([7]), 3)
    assert picked.tolist() == [[11, 13, 15]] and enough.tolist() == [True]
    picked, enough = first_negatives(cand, clusters, torch.tensor([7]), 4)
    assert picked.tolist() == [[11, 13, 15, -1]] and enough.tolist() == [False]


def test_too_few_clusters_pads_with_minus_one():
    q, pool, qc, pc = data(30, 200, 8, 4, seed=5)  # at most 3 other clusters for neg_num = 5
    got = mine_negatives(q, pool, qc, pc, 5, candidates=2).numpy()
    want = reference_walk((q @ pool.t()).numpy(), qc, pc, 5)
    np.testing.assert_array_equal(got, want)
    assert (got[:, 3:] == -1).all() and (got[:, :3] >= 0).all()


def test_mine_rules_and_inputs():
    q, pool, qc, pc = data(40, 300, 8, 25, seed=9, structured=True)
    got = mine_negatives(q, pool, torch.from_numpy(qc), torch.from_numpy(pc), 7).numpy()
    for row, c in zip(got, qc, strict=True):
        assert (pc[row] != c).all()
        assert len(set(pc[row].tolist())) == len(row)
    with pytest.raises(ValueError, match="one entry"):
        mine_negatives(q, pool, qc[:-1], pc, 5)
    assert mine_negatives(q[:0], pool, qc[:0], pc, 5).shape == (0, 5)


def test_float16_pool_gives_same_walk_as_its_float32_copy():
    q, pool, qc, pc = data(20, 150, 16, 40, seed=11)
    pool16 = pool.half()
    got = mine_negatives(q, pool16, qc, pc, 5).numpy()
    np.testing.assert_array_equal(got, reference_walk((q @ pool16.float().t()).numpy(), qc, pc, 5))


def test_random_negatives_rules_and_determinism():
    g = np.random.default_rng(0)
    pc = g.integers(0, 50, size=400)
    qc = g.integers(0, 50, size=80)
    a = random_negatives(qc, pc, 5, np.random.default_rng(1))
    b = random_negatives(qc, pc, 5, np.random.default_rng(1))
    c = random_negatives(qc, pc, 5, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.shape == (80, 5) and a.dtype == np.int64 and (a >= 0).all()
    for row, cl in zip(a, qc, strict=True):
        assert (pc[row] != cl).all() and len(set(pc[row].tolist())) == 5
    assert len(np.unique(a)) > 200  # spread over the pool, not a fixed few
    few = random_negatives(np.zeros(10, np.int64), np.arange(400) % 3, 5, np.random.default_rng(3))
    assert (few[:, 2:] == -1).all() and (few[:, :2] >= 0).all()


def test_sample_epoch():
    n = 100
    cluster = np.arange(n) // 10
    qidxs = np.arange(0, 60, dtype=np.int64)
    pidxs = qidxs + 1
    qsel, psel, pool = sample_epoch(cluster, qidxs, pidxs, 20, 30, np.random.default_rng(0))
    assert len(qsel) == 20 and len(pool) == 30 and pool.dtype == np.int64
    np.testing.assert_array_equal(psel, qsel + 1)  # pairs stay pairs
    assert len(set(qsel.tolist())) == 20 and len(set(pool.tolist())) == 30
    assert pool.min() >= 0 and pool.max() < n
    again = sample_epoch(cluster, qidxs, pidxs, 20, 30, np.random.default_rng(0))
    for x, y in zip((qsel, psel, pool), again, strict=True):
        np.testing.assert_array_equal(x, y)
    qsel, psel, pool = sample_epoch(cluster, qidxs, pidxs, 1000, 10_000, np.random.default_rng(1))
    assert sorted(qsel.tolist()) == qidxs.tolist() and sorted(pool.tolist()) == list(range(n))
    with pytest.raises(ValueError, match="parallel"):
        sample_epoch(cluster, qidxs, pidxs[:-1], 5, 5, np.random.default_rng(0))
