"""The search core (`aml.search`): exact float32 / float16 / binary search against a numpy argsort with ties by id,
chunking and parts, the exact top-k selection, the device choice, and faiss-gpu through its stand-in."""

from __future__ import annotations

import numpy as np
import pytest
from fake_faiss import gpu_faiss

from aml.binary import pack_bits, unpack_signs
from aml.errors import UserError
from aml.search import search, search_device, tie_sorted, top_k


def unit(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def brute(q, db, k):
    """The reference: float32 scores of the stored values, numpy's stable argsort (ties by id)."""
    s = np.asarray(q, np.float32) @ np.asarray(db, np.float32).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return unit(rng, 23, 32), unit(rng, 700, 32)


def assert_same_ranking(got, want, tol=1e-6):
    """Equal ids; or, where float32 rounding of another summation order swaps near-ties, equal scores."""
    (s, i), (ws, wi) = got, want
    np.testing.assert_allclose(s, ws, atol=tol)
    assert (i == wi).mean() > 0.99 and all(len(set(r)) == r.size for r in i)


@pytest.mark.parametrize("k", [1, 17, 300, 700])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_float_search_equals_the_argsort(data, k, dtype):
    q, db = data
    db = db.astype(dtype)
    s, i = search(q, db, k, device="cpu", chunk=5, block=128)
    assert s.dtype == np.float32 and i.dtype == np.int64 and i.shape == (23, k)
    assert_same_ranking((s, i), brute(q, db, k))
    parts = [db[:300], db[300:301], db[301:]]  # searched as one concatenated database
    assert_same_ranking(search(q, parts, k, device="cpu", block=64), brute(q, db, k))


def test_ties_are_broken_by_id_at_every_depth():
    db = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0]], np.float32)
    q = np.array([[1, 0]], np.float32)
    for k in range(1, 6):
        s, i = search(q, db, k, device="cpu")
        np.testing.assert_array_equal(i[0], [0, 2, 4, 3, 1][:k])
        np.testing.assert_allclose(s[0], [1, 1, 1, 0.6, 0][:k], atol=1e-6)


def test_top_k_is_exact_with_many_ties_and_any_depth():
    rng = np.random.default_rng(1)
    for n, k in [(1000, 1), (1000, 999), (5000, 300), (20000, 3000)]:
        s = rng.standard_normal((9, n)).astype(np.float32)
        s[:, ::3] = np.round(s[:, ::3], 1)  # ties everywhere, also across the k-th score
        s[0] = 0.5  # a row of one value: ids in order
        vals, ids = top_k(s, k)
        want = np.argsort(-s, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(vals, np.take_along_axis(s, want, 1))


def test_default_is_full_ranking_and_bad_topk(data):
    q, db = data
    assert search(q, db)[1].shape == (23, 700)
    with pytest.raises(ValueError, match="topk"):
        search(q, db, 701)


@pytest.mark.parametrize("dim", [24, 13])
def test_binary_codes_asymmetric_and_hamming_equal_the_argsort(dim):
    rng = np.random.default_rng(2)
    db, q = rng.standard_normal((300, dim)), rng.standard_normal((4, dim)).astype(np.float32)
    codes = pack_bits(db)
    signs = unpack_signs(codes, dim)
    full = (q @ signs.T) * np.float32(1 / np.sqrt(dim))  # <q, +-1 code> / sqrt(D)
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    s, i = search(q, [codes[:100], codes[100:]], 10, block=32)
    np.testing.assert_array_equal(i, want)
    np.testing.assert_allclose(s, np.take_along_axis(full, want, 1), rtol=1e-6)
    ham = (unpack_signs(pack_bits(q), dim)[:, None, :] != signs[None]).sum(-1)  # Hamming distances
    s, i = search(q, codes, 300, hamming=True)  # the whole ranking: ties by id
    order = np.argsort(ham, axis=1, kind="stable")
    np.testing.assert_array_equal(i, order)
    np.testing.assert_allclose(s, 1 - 2 * np.take_along_axis(ham, order, 1) / dim, rtol=1e-6)
    with pytest.raises(ValueError, match="hamming"):
        search(q, db.astype(np.float32), 5, hamming=True)


def test_tie_sorted_puts_missing_hits_last():
    s, i = tie_sorted(np.array([[0.5, 0.9, 0.5, 0.0]]), np.array([[7, 3, 2, -1]]))
    np.testing.assert_array_equal(i, [[3, 2, 7, -1]])
    assert s[0, -1] == -np.inf


def test_device_choice_and_unusable_gpus(data, monkeypatch):
    import aml.search

    monkeypatch.setattr(aml.search, "_torch_cuda", lambda: False)
    q, db = data
    assert search_device("cpu", 5) == ("cpu", None)
    with pytest.raises(UserError, match="--device tpu: unknown device"):
        search_device("tpu", 5)
    with pytest.raises(UserError, match="--device cuda:all: unknown device"):  # one GPU: cuda:all is search-only
        search_device("cuda:all", 5)
    if aml.search.gpu_count(aml.search.load_faiss(None)) == 0:
        assert search_device("auto", 5) == ("cpu", None)
        with pytest.raises(UserError, match="--device cuda: no CUDA device"):
            search(q, db, 5, device="cuda")
    monkeypatch.setattr(aml.search, "_torch_cuda", lambda: True)
    assert search_device("auto", 5) == ("torch", [0]) and search_device("cuda:1", 5) == ("torch", [1])


def test_faiss_gpu_through_the_one_gpu_helper(data, monkeypatch):
    import aml.search

    monkeypatch.setattr(aml.search, "_torch_cuda", lambda: False)
    q, db = data
    fake = gpu_faiss(monkeypatch, 1)
    assert search_device("auto", 17) == ("faiss", [0]) and search_device("auto", 2049) == ("cpu", None)
    with pytest.raises(UserError, match="top 2049 is beyond faiss-gpu's limit of 2048"):
        search_device("cuda", 2049)
    got = search(q, db, 17, block=300)
    assert_same_ranking(got, brute(q, db, 17), tol=1e-5)
    assert fake.calls == [("one", (0,), None, False, "IndexFlatIP")] * 3  # one per database block, GPU 0


def test_one_device_parser():
    from aml.settings import check_device, parse_device

    assert parse_device("auto") == ("auto", None) and parse_device("cpu") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", (0,)) and parse_device("cuda:3") == ("cuda", (3,))
    assert parse_device("cuda:all", many=True) == ("cuda", None)  # every GPU: only where a command spreads
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:all"):
        with pytest.raises(UserError, match=f"--device {bad}: unknown device; use auto, cpu, cuda or cuda:N$"):
            parse_device(bad)
    assert check_device("cuda:1") == "cuda:1"


def test_cpu_search_runs_torch_on_one_thread_and_restores_it(data, monkeypatch):
    """Between OpenBLAS's products, the float16 casts run with torch on one thread (its OpenMP threads would spin
    for OpenBLAS's cores); the count comes back after the search, and the ranking is the float32 one."""
    torch = pytest.importorskip("torch")
    import aml.search as core

    q, db = data
    seen, convert = [], core._to_float32

    def spy(dim, scale):
        inner = convert(dim, scale)
        return lambda x, buf: (seen.append(torch.get_num_threads()), inner(x, buf))[1]

    monkeypatch.setattr(core, "_to_float32", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = search(q, db.astype(np.float16), 50, device="cpu", block=256)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert_same_ranking(got, brute(q, db.astype(np.float16), 50))
