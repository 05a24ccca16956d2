"""Exact search against a brute-force argsort: every CPU backend, chunking, float16, split databases."""

from __future__ import annotations

import numpy as np
import pytest
from fake_faiss import gpu_faiss

from aml.errors import UserError
from aml.search import pick_backend, search

BACKENDS = ["numpy", "torch", "faiss"]


def unit(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def brute(db, q, k):
    s = q.astype(np.float64) @ db.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return unit(rng, 700, 32), unit(rng, 23, 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 17, 700])
def test_matches_brute_force(data, backend, k):
    db, q = data
    got = search(db, q, k, backend=backend, chunk=5, block=128)
    assert got.dtype == np.int64 and got.shape == (23, k)
    np.testing.assert_array_equal(got, brute(db, q, k))


def assert_same_ranking(got, db, q, k):
    """Equal to the float64 brute force up to float32 rounding: the score at every rank matches to 1e-6."""
    want = brute(db, q, k)
    s64 = q.astype(np.float64) @ db.astype(np.float64).T
    np.testing.assert_allclose(np.take_along_axis(s64, got, 1), np.take_along_axis(s64, want, 1), atol=1e-6)
    assert (got == want).mean() > 0.99  # only near-ties may swap
    assert all(len(set(r)) == k for r in got.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_database_and_parts(data, backend):
    db, q = data
    db16 = db.astype(np.float16)  # float16 storage: exact search on the stored values
    assert_same_ranking(search(db16, q, 50, backend=backend, block=100), db16, q, 50)
    parts = [db16[:300], db16[300:301], db16[301:]]  # searched as one concatenated database
    assert_same_ranking(search(parts, q, 50, backend=backend, block=64), db16, q, 50)
    q16 = q.astype(np.float16)
    assert_same_ranking(search(db16, q16, 700, backend=backend, chunk=7), db16, q16, 700)


def test_scores_sorted_and_ties_by_index():
    db = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], np.float32)
    q = np.array([[1, 0]], np.float32)
    for backend in BACKENDS:
        idx, s = search(db, q, 4, backend=backend, return_scores=True)
        np.testing.assert_array_equal(idx[0], [0, 2, 3, 1])
        np.testing.assert_allclose(s[0], [1, 1, 0.6, 0], atol=1e-6)


def test_default_is_full_ranking_and_bad_topk(data):
    db, q = data
    assert search(db, q).shape == (23, 700)
    with pytest.raises(ValueError, match="topk"):
        search(db, q, 701)


def test_backend_choice_on_cpu():
    assert pick_backend(device="cpu") == "numpy"
    assert pick_backend() in ("numpy", "faiss-gpu", "torch-cuda")
    assert pick_backend("faiss") == "faiss"
    with pytest.raises(UserError, match="tpu"):
        pick_backend("tpu")
    with pytest.raises(UserError, match="--device tpu"):
        pick_backend(device="tpu")


def test_unavailable_cuda_is_a_user_error(data, monkeypatch):
    import aml.search

    monkeypatch.setattr(aml.search, "_torch_cuda", lambda: False)
    db, q = data
    with pytest.raises(UserError, match="--device cuda: no CUDA device"):
        search(db, q, 5, device="cuda")
    with pytest.raises(UserError, match="torch-cuda"):
        search(db, q, 5, backend="torch-cuda")


def test_faiss_gpu_backend_through_the_one_gpu_helper(data, monkeypatch):
    import aml.search

    monkeypatch.setattr(aml.search, "_torch_cuda", lambda: False)
    db, q = data
    with pytest.raises(UserError, match="faiss-gpu.*sees no GPU"):
        pick_backend("faiss-gpu")
    fake = gpu_faiss(monkeypatch, 1)
    assert pick_backend() == "faiss-gpu" and pick_backend(topk=2049) == "numpy"
    with pytest.raises(UserError, match="topk 2049 > 2048"):
        pick_backend("faiss-gpu", topk=2049)
    got = search(db, q, 17, block=300)
    np.testing.assert_array_equal(got, brute(db, q, 17))
    assert fake.calls == [("one", (0,), None, False, "IndexFlatIP")] * 3  # one per database block, GPU 0
