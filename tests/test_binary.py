"""Binary codes: packing against a bit-by-bit transcription, both searches (the search core) against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from aml.binary import (
    balance_warning,
    bits_set,
    check_codes,
    code_bytes,
    hamming_distances,
    pack_bits,
    unpack_signs,
)
from aml.errors import UserError
from aml.search import search


def transcribed_pack(x: np.ndarray) -> np.ndarray:
    """Bit j of row i is x[i, j] > 0; component 8b + t is bit 7 - t of byte b (zero padding at the end)."""
    n, d = x.shape
    out = np.zeros((n, (d + 7) // 8), np.uint8)
    for i in range(n):
        for j in range(d):
            if x[i, j] > 0:
                out[i, j // 8] |= 1 << (7 - j % 8)
    return out


@pytest.mark.parametrize("dim", [16, 13])
def test_pack_bits_is_the_sign_at_zero_and_unpacks_to_plus_minus_one(dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, dim)).astype(np.float32)
    x[0, :3] = 0.0  # zero is not > 0: bit 0
    codes = pack_bits(x)
    assert codes.dtype == np.uint8 and codes.shape == (7, code_bytes(dim))
    np.testing.assert_array_equal(codes, transcribed_pack(x))
    np.testing.assert_array_equal(unpack_signs(codes, dim), np.where(x > 0, 1.0, -1.0))
    assert pack_bits(np.zeros((1, 2048))).shape == (1, 256)  # 2048 bits = 256 bytes


def test_hamming_distances_and_search_match_a_numpy_transcription():
    rng = np.random.default_rng(1)
    dim = 64
    db, q = rng.standard_normal((50, dim)), rng.standard_normal((5, dim))
    a, b = pack_bits(q), pack_bits(db)
    direct = np.array([[int(np.sum((qi > 0) != (xi > 0))) for xi in db] for qi in q])
    np.testing.assert_array_equal(hamming_distances(a, b), direct)
    scores, ids = search(q, b, 50, hamming=True)  # the whole ranking: ties broken by id
    order = np.array([np.lexsort((np.arange(50), row)) for row in direct])
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, 1 - 2 * np.take_along_axis(direct, order, 1) / dim)
    # the same ranking given in parts (database + distractors)
    np.testing.assert_array_equal(search(q, [b[:20], b[20:]], 50, hamming=True)[1], order)


def test_asymmetric_search_scores_float_queries_against_signs_blockwise():
    rng = np.random.default_rng(2)
    dim = 24
    db, q = rng.standard_normal((300, dim)), rng.standard_normal((4, dim)).astype(np.float32)
    codes = pack_bits(db)
    full = q @ np.where(db > 0, 1.0, -1.0).T / np.sqrt(dim)
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    s, i = search(q, [codes[:100], codes[100:]], 10, block=32)
    np.testing.assert_array_equal(i, want)
    np.testing.assert_allclose(s, np.take_along_axis(full, want, 1), rtol=1e-5)


def test_bit_balance_warns_on_non_centred_vectors_and_codes_are_checked():
    rng = np.random.default_rng(3)
    centred = pack_bits(rng.standard_normal((100, 64)))
    assert 0.4 < bits_set(centred, 64) < 0.6 and balance_warning(centred, 64, "db") is None
    positive = pack_bits(np.abs(rng.standard_normal((100, 64))))  # raw GeM vectors are non-negative
    assert bits_set(positive, 64) == 1.0
    assert "not zero-centred" in balance_warning(positive, 64, "db")
    with pytest.raises(UserError, match=r"expected \(N, 8\) uint8"):
        check_codes(np.zeros((3, 64), np.float32), 64, "db.npy")
