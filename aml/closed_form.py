"""Closed-form maps from student vectors S (N, Ds) to teacher vectors T (N, Dt): the student's start.

All three fit `T ~ S W` with W (Ds, Dt) from the cross-covariance `S^T T` (and `S^T S`), which
`CrossCovariance` accumulates over batches, so any number of pairs fits in memory:

- orthogonal Procrustes (Schönemann 1966): `W = U V^T` for `S^T T = U Sigma V^T`, the rotation (semi-orthogonal
  when Ds != Dt) that best aligns the rows. It keeps the student's own geometry: distances between student
  vectors are unchanged (for Ds <= Dt), which is why it generalises to unseen images better than regression;
- ridge regression: `W = (S^T S + lam I)^-1 S^T T`;
- least squares: ridge with lam -> 0 (a tiny lam keeps it defined when N < Ds).

`residual(S, T, W)` is the mean `1 - cos(S W, T)` of the fitted pairs and `CrossCovariance.relative_error(W)`
is `||S W - T||^2 / ||T||^2` over every pair added: 0 for a perfect fit.
"""

from __future__ import annotations

import numpy as np

LSTSQ_LAMBDA = 1e-6  # "least squares": ridge with a vanishing penalty, relative to the mean of diag(S^T S)


class CrossCovariance:
    """Running sums `S^T T`, `S^T S`, `||T||^2` (float64) and the pair count over batches of (B, Ds), (B, Dt):
    O(Ds (Ds + Dt)) memory whatever the number of pairs. `second_moment=False` keeps `S^T T` alone (all that
    Procrustes needs: half the work per batch); ridge, lstsq and relative_error then refuse."""

    def __init__(self, ds: int, dt: int, *, second_moment: bool = True) -> None:
        self.st = np.zeros((ds, dt), dtype=np.float64)
        self.ss = np.zeros((ds, ds), dtype=np.float64) if second_moment else None
        self.tt = 0.0
        self.n = 0

    def add(self, s: np.ndarray, t: np.ndarray) -> None:
        """Add B pairs: rows of `s` (B, Ds) matched with rows of `t` (B, Dt)."""
        s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
        if s.ndim != 2 or t.ndim != 2 or len(s) != len(t):
            raise ValueError(f"pairs must be (B, Ds) and (B, Dt) with the same B, got {s.shape} and {t.shape}")
        self.st += s.T @ t
        if self.ss is not None:
            self.ss += s.T @ s
        self.tt += float((t * t).sum())
        self.n += len(s)

    def procrustes(self) -> np.ndarray:
        """The orthogonal Procrustes map W (Ds, Dt): `U V^T` of the SVD of `S^T T`."""
        self._check()
        u, _, vt = np.linalg.svd(self.st, full_matrices=False)
        return (u @ vt).astype(np.float32)

    def ridge(self, lam: float) -> np.ndarray:
        """Ridge regression W (Ds, Dt) = (S^T S + lam * mean(diag(S^T S)) I)^-1 S^T T (lam relative to the scale)."""
        ss = self._second_moment()
        scale = float(np.trace(ss)) / len(self.ss) or 1.0
        a = ss + lam * scale * np.eye(len(ss))
        return np.linalg.solve(a, self.st).astype(np.float32)

    def lstsq(self) -> np.ndarray:
        """Least squares W (Ds, Dt) (ridge with a vanishing penalty, defined for any number of pairs)."""
        return self.ridge(LSTSQ_LAMBDA)

    def relative_error(self, w: np.ndarray) -> float:
        """`||S W - T||^2 / ||T||^2` over every pair added, from the sums alone (0: a perfect fit)."""
        ss = self._second_moment()
        w = np.asarray(w, dtype=np.float64)
        err = float(np.sum(w * (ss @ w))) - 2.0 * float(np.sum(w * self.st)) + self.tt
        return max(err, 0.0) / max(self.tt, 1e-300)

    def _check(self) -> None:
        if self.n == 0:
            raise ValueError("no pairs were added; the fit needs at least one (student, teacher) pair")

    def _second_moment(self) -> np.ndarray:
        self._check()
        if self.ss is None:
            raise ValueError("S^T S was not accumulated (second_moment=False); ridge and lstsq need it")
        return self.ss


def procrustes(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Orthogonal Procrustes W (Ds, Dt) aligning rows of `s` (N, Ds) with rows of `t` (N, Dt)."""
    acc = CrossCovariance(s.shape[1], t.shape[1])
    acc.add(s, t)
    return acc.procrustes()


def ridge(s: np.ndarray, t: np.ndarray, lam: float = 0.1) -> np.ndarray:
    """Ridge regression W (Ds, Dt) from `s` (N, Ds) to `t` (N, Dt); `lam` relative to the mean of diag(S^T S)."""
    acc = CrossCovariance(s.shape[1], t.shape[1])
    acc.add(s, t)
    return acc.ridge(lam)


def residual(s: np.ndarray, t: np.ndarray, w: np.ndarray) -> float:
    """Mean `1 - cos(s W, t)` over the rows: how far the mapped student vectors are from the teacher's."""
    a = np.asarray(s, dtype=np.float64) @ np.asarray(w, dtype=np.float64)
    b = np.asarray(t, dtype=np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.mean(1.0 - cos))
