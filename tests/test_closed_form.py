"""Closed-form maps: on features with a known linear relation they recover it."""

from __future__ import annotations

import numpy as np
import pytest

from aml.closed_form import CrossCovariance, procrustes, residual, ridge


def _orthogonal(rng: np.random.Generator, ds: int, dt: int) -> np.ndarray:
    """A random (ds, dt) matrix with orthonormal rows (ds <= dt) or columns (ds > dt)."""
    q, _ = np.linalg.qr(rng.standard_normal((max(ds, dt), max(ds, dt))))
    return q[:ds, :dt]


@pytest.mark.parametrize("ds,dt", [(16, 16), (12, 20)])
def test_procrustes_recovers_a_rotation(ds, dt):
    rng = np.random.default_rng(0)
    q = _orthogonal(rng, ds, dt)
    s = rng.standard_normal((200, ds))
    w = procrustes(s, s @ q)
    np.testing.assert_allclose(w, q, atol=1e-5)
    assert residual(s, s @ q, w) < 1e-10


def test_procrustes_is_the_best_rotation_under_noise():
    rng = np.random.default_rng(1)
    q = _orthogonal(rng, 10, 10)
    s = rng.standard_normal((500, 10))
    t = s @ q + 0.05 * rng.standard_normal((500, 10))
    w = procrustes(s, t)
    np.testing.assert_allclose(w @ w.T, np.eye(10), atol=1e-5)  # still a rotation
    other = q  # the generating rotation fits the noisy pairs no better
    assert np.linalg.norm(s @ w - t) <= np.linalg.norm(s @ other - t) + 1e-9


def test_ridge_and_lstsq_recover_a_linear_map():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 6))
    s = rng.standard_normal((300, 8))
    acc = CrossCovariance(8, 6)
    acc.add(s, s @ a)
    np.testing.assert_allclose(acc.lstsq(), a, atol=1e-4)
    assert acc.relative_error(acc.lstsq()) < 1e-8
    assert acc.relative_error(np.zeros((8, 6))) == pytest.approx(1.0)
    shrunk = ridge(s, s @ a, lam=10.0)
    assert np.linalg.norm(shrunk) < np.linalg.norm(a)  # the penalty shrinks the map


def test_cross_covariance_batches_equal_one_pass():
    rng = np.random.default_rng(4)
    s, t = rng.standard_normal((90, 7)), rng.standard_normal((90, 5))
    whole, parts = CrossCovariance(7, 5), CrossCovariance(7, 5)
    whole.add(s, t)
    for i in range(0, 90, 25):
        parts.add(s[i : i + 25], t[i : i + 25])
    np.testing.assert_allclose(parts.st, whole.st)
    np.testing.assert_allclose(parts.procrustes(), whole.procrustes(), atol=1e-6)
    assert parts.n == whole.n == 90


def test_fit_without_pairs_is_an_error():
    with pytest.raises(ValueError, match="no pairs"):
        CrossCovariance(3, 3).procrustes()
    with pytest.raises(ValueError, match="same B"):
        CrossCovariance(3, 3).add(np.zeros((2, 3)), np.zeros((3, 3)))


def test_procrustes_alone_needs_no_second_moment():
    """`second_moment=False` keeps S^T T alone (all Procrustes reads): the same rotation, and the solves that need
    S^T S refuse instead of answering wrongly."""
    rng = np.random.default_rng(5)
    s, t = rng.standard_normal((60, 6)), rng.standard_normal((60, 4))
    full, light = CrossCovariance(6, 4), CrossCovariance(6, 4, second_moment=False)
    full.add(s, t)
    light.add(s, t)
    assert light.ss is None
    np.testing.assert_array_equal(light.procrustes(), full.procrustes())
    for solve in (light.lstsq, lambda: light.ridge(0.1), lambda: light.relative_error(np.zeros((6, 4)))):
        with pytest.raises(ValueError, match="second_moment=False"):
            solve()
