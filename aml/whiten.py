"""Learned whitening (cirtorch's Lw, docs/REFERENCE.md §2) in one place: x -> l2n(P (x - m)), as cirtorch `whitenapply`.

An `Lw` is a frozen value: the mean `m` (D,), the projection `P` (d, D), where it came from (`source`), its
dataset key and its variant ('ss' single-scale, 'ms' multi-scale). It is found in a network's `meta['Lw']`
(`Lw.from_meta`) or in a standalone whitening file in the same layout (`Lw.load` / `Lw.save`:
`{'Lw': {dataset: {'ss': {'m', 'P'}, 'ms': {'m', 'P'}}}}`), and applied to numpy rows (`apply_np`), to torch
rows (`apply_torch`) or folded into an export graph (`as_linear`).

The asymmetric protocol whitens both sides with **the teacher's** Lw: `aml evaluate` and `aml export` pick it
with `teacher_lw(spec, multiscale, teacher_meta)` and apply that one value to the teacher database and to
the student queries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aml.errors import UserError, first_line
from aml.io import atomic_path

if TYPE_CHECKING:
    import torch
    from torch import nn

EPS = 1e-6
# `--whiten` given alone: the model's own meta['Lw'], its first dataset.
FIRST = "first"
VARIANTS = ("ss", "ms")


@dataclass(frozen=True, eq=False)
class Lw:
    """Learned whitening x -> l2n(P (x - m)) for (N, D) rows: `m` (D,), `P` (d, D) float32."""

    m: np.ndarray
    P: np.ndarray
    source: str
    key: str = ""
    variant: str = "ss"

    def __post_init__(self) -> None:
        m = np.asarray(self.m, dtype=np.float32).reshape(-1)
        P = np.asarray(self.P, dtype=np.float32)
        if P.ndim != 2 or P.shape[1] != m.size:
            raise UserError(f"{self.source}: Lw with m of {m.size} values and P {P.shape}; P must be (d, {m.size})")
        if self.variant not in VARIANTS:
            raise ValueError(f"Lw variant {self.variant!r}; expected one of {VARIANTS}")
        for field, a in (("m", m), ("P", P)):
            bad = int(a.size - np.isfinite(a).sum())
            if bad:
                raise UserError(
                    f"{self.source}: {field}: {bad} of {a.size} values are NaN or inf; the whitening is damaged, "
                    "learn it again (aml whiten) or drop --whiten"
                )
        zero = np.flatnonzero(~P.any(axis=1))
        if zero.size:
            raise UserError(
                f"{self.source}: P: {zero.size} of {P.shape[0]} rows are all zero (a singular whitening: whitened "
                "vectors would be zero); learn it again (aml whiten) or drop --whiten"
            )
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "P", P)

    @property
    def in_dim(self) -> int:
        """D, the dimension of the vectors it whitens."""
        return int(self.m.size)

    @property
    def dim(self) -> int:
        """d, the dimension of the whitened vectors."""
        return int(self.P.shape[0])

    @property
    def name(self) -> str:
        """`key/variant`, e.g. 'retrieval-SfM-120k/ss' (how tables and sidecars name it)."""
        return f"{self.key}/{self.variant}"

    # ------------------------------------------------------------------------------------------ finding it
    @classmethod
    def from_meta(
        cls, meta: Mapping[str, Any], multiscale: bool, dataset: str | None = None, *, where: str | None = None
    ) -> Lw:
        """`meta['Lw'][dataset]['ms' if multiscale else 'ss']` of a cirtorch/aml network (first dataset by default)."""
        lws = meta.get("Lw") if isinstance(meta, Mapping) else None
        if where is None:
            aml_meta = meta.get("aml") if isinstance(meta, Mapping) else None
            name = (aml_meta or {}).get("name") or (meta.get("architecture") if isinstance(meta, Mapping) else None)
            where = f"model '{name}'"
        if not isinstance(lws, Mapping) or not lws:
            raise UserError(f"{where}: no learned whitening (meta['Lw']) in its checkpoint; drop --whiten")
        if dataset is None or dataset == FIRST:
            dataset = next(iter(lws))
        if dataset not in lws:
            raise UserError(f"{where}: meta['Lw'] has no '{dataset}'; available: {', '.join(map(str, lws))}")
        variant = "ms" if multiscale else "ss"
        lw = lws[dataset].get(variant) if isinstance(lws[dataset], Mapping) else None
        if not isinstance(lw, Mapping) or "m" not in lw or "P" not in lw:
            raise UserError(f"{where}: meta['Lw']['{dataset}']['{variant}'] with 'm' and 'P' missing")
        source = f"{where} meta['Lw']['{dataset}']['{variant}']"
        return cls(_numpy(lw["m"]), _numpy(lw["P"]), source, str(dataset), variant)

    @classmethod
    def load(cls, path: str | os.PathLike, multiscale: bool = False, dataset: str | None = None) -> Lw:
        """An Lw from a whitening file as `save` writes it (torch file {'Lw': {dataset: {'ss', 'ms'}}})."""
        import torch

        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: whitening file not found; give a file written by Lw.save (or a meta['Lw'] key)")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise UserError(f"{p}: not a readable whitening file ({first_line(e)}); rewrite it with Lw.save") from e
        return cls.from_meta(obj if isinstance(obj, Mapping) else {}, multiscale, dataset, where=str(p))

    @classmethod
    def from_spec(
        cls, spec: str, multiscale: bool, meta: Callable[[], Mapping[str, Any]], *, where: str | None = None
    ) -> Lw:
        """What `--whiten [KEY|FILE]` names: FIRST (given alone) -> the first dataset of `meta()['Lw']`, an
        existing FILE -> `Lw.load(FILE)`, else the dataset KEY of `meta()['Lw']`. `meta` is only called when
        needed (for a teacher it may read a checkpoint); `where` names it in errors."""
        if is_file_spec(spec):
            return cls.load(spec, multiscale)
        return cls.from_meta(meta(), multiscale, spec, where=where)

    def save(self, path: str | os.PathLike, *more: Lw) -> Path:
        """Atomically write this Lw (and `more`) as a whitening file: {'Lw': {key: {variant: {'m', 'P'}}}}."""
        import torch

        tree: dict[str, dict[str, dict[str, Any]]] = {}
        for lw in (self, *more):
            tree.setdefault(lw.key or "custom", {})[lw.variant] = {
                "m": torch.from_numpy(lw.m.reshape(-1, 1).copy()),
                "P": torch.from_numpy(lw.P.copy()),
            }
        with atomic_path(path) as tmp:
            torch.save({"Lw": tree}, tmp)
        return Path(path)

    # ------------------------------------------------------------------------------------------ using it
    def check(self, dim: int, what: str = "the model") -> None:
        """UserError unless this Lw whitens `dim`-d vectors."""
        if dim != self.in_dim:
            raise UserError(f"{self.source}: whitens {self.in_dim}-d vectors (P {self.P.shape}), {what} gives {dim}-d")

    def apply_np(self, x: np.ndarray, *, dtype: Any = np.float32, block: int = 65536) -> np.ndarray:
        """l2n(P (x - m)) of (N, D) numpy rows, block by block (memory-mapped inputs welcome), as `dtype`."""
        self.check(x.shape[1], "the vectors")
        out = np.empty((x.shape[0], self.dim), dtype=dtype)
        for s in range(0, x.shape[0], block):
            y = (np.asarray(x[s : s + block], np.float32) - self.m) @ self.P.T
            out[s : s + block] = y / (np.linalg.norm(y, axis=-1, keepdims=True) + EPS)
        return out

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        """l2n(P (x - m)) of a (B, D) tensor, on its device."""
        import torch

        from aml.nn import l2n

        m = torch.from_numpy(self.m).to(x.device)
        P = torch.from_numpy(self.P).to(x.device)
        return l2n((x.float() - m) @ P.T)

    def as_linear(self) -> nn.Linear:
        """The affine part folded into one Linear layer (x -> P x - P m; L2N after it), for export."""
        import torch
        from torch import nn

        P = torch.from_numpy(self.P)
        lin = nn.Linear(self.in_dim, self.dim, bias=True)
        with torch.no_grad():
            lin.weight.copy_(P)
            lin.bias.copy_(-(P @ torch.from_numpy(self.m)))
        return lin


# ---------------------------------------------------------------------------------------------- learning it
CHOLESKY_ALPHA = 1e-10  # cirtorch's first diagonal loading when S is not positive definite (then x10 until it is)
LEARN_METHODS = ("lw", "pca")


def _cholesky(s: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of `s`, adding alpha I (1e-10, x10 each try) until `s` is positive definite."""
    alpha = 0.0
    while True:
        try:
            return np.linalg.cholesky(s + alpha * np.eye(len(s)))
        except np.linalg.LinAlgError:
            alpha = CHOLESKY_ALPHA if alpha == 0 else alpha * 10


def _by_eigenvalue(y: np.ndarray) -> np.ndarray:
    """Eigenvectors (as columns) of the symmetric `y`, by decreasing eigenvalue; each column's sign fixed so that
    its largest-magnitude entry is positive (the basis is then a function of `y` alone)."""
    val, vec = np.linalg.eigh(y)
    vec = vec[:, np.argsort(val)[::-1]]
    flip = np.sign(vec[np.abs(vec).argmax(axis=0), np.arange(vec.shape[1])])
    return vec * np.where(flip == 0, 1.0, flip)


def learn_lw(
    x: np.ndarray, qidxs: np.ndarray, pidxs: np.ndarray, *, source: str, key: str = "custom", variant: str = "ss"
) -> Lw:
    """cirtorch `whitenlearn` (docs/REFERENCE.md §2) on (N, D) rows `x` and matching pairs (qidxs, pidxs):

        m = mean_i x[q_i];  S = 1/n sum_i (x[q_i] - x[p_i])(x[q_i] - x[p_i])^T;  P1 = chol(S)^-1
        E = eigenvectors of P1 (X - m)(X - m)^T P1^T, by decreasing eigenvalue;  P = E^T P1

    computed in float64."""
    xd = np.asarray(x, dtype=np.float64)
    q, p = np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64)
    if len(q) == 0 or len(q) != len(p):
        raise UserError(f"{source}: learned whitening needs matching (query, positive) pairs; got {len(q)}/{len(p)}")
    m = xd[q].mean(axis=0)
    df = xd[q] - xd[p]
    p1 = np.linalg.inv(_cholesky(df.T @ df / len(df)))
    y = (xd - m) @ p1.T
    P = _by_eigenvalue(y.T @ y).T @ p1
    return Lw(m.astype(np.float32), P.astype(np.float32), source, key, variant)


def learn_pca(x: np.ndarray, *, source: str, key: str = "custom", variant: str = "ss") -> Lw:
    """cirtorch `pcawhitenlearn` (label-free): PCA whitening P = diag(eigval)^-1/2 E^T of the rows' covariance."""
    xd = np.asarray(x, dtype=np.float64)
    m = xd.mean(axis=0)
    xc = xd - m
    c = xc.T @ xc / len(xd)
    val, _ = np.linalg.eigh(c)
    vec = _by_eigenvalue(c)
    val = np.sort(val)[::-1]
    P = np.diag(np.maximum(val, 1e-12) ** -0.5) @ vec.T
    return Lw(m.astype(np.float32), P.astype(np.float32), source, key, variant)


def learn_teacher_lw(vectors: np.ndarray, train: Any, method: str, *, key: str, variant: str = "ss") -> Lw:
    """The teacher's Lw learned on its (N, D) `vectors` of a TrainSet's images: `lw` on its (qidxs, pidxs)
    pairs (cirtorch whitenlearn), `pca` on all images (pcawhitenlearn)."""
    source = f"{method} on {train.name} ({variant})"
    if method == "pca":
        return learn_pca(vectors, source=source, key=key, variant=variant)
    if method != "lw":
        raise ValueError(f"whitening method {method!r}; expected one of {LEARN_METHODS}")
    if len(train.qidxs) == 0:
        raise UserError(f"{train.name}: no (query, positive) pairs to learn Lw from; use --method pca (label-free)")
    return learn_lw(vectors, train.qidxs, train.pidxs, source=source, key=key, variant=variant)


def teacher_lw(
    spec: str | None, multiscale: bool, teacher_meta: Callable[[], Mapping[str, Any]], *, where: str | None = None
) -> Lw | None:
    """The asymmetric protocol's whitening, the one function `aml evaluate` and `aml export` use: the teacher's
    Lw named by a `--whiten` value (see `Lw.from_spec`), to apply to the teacher database *and* the student
    queries; None without `spec`. `teacher_meta` gives the teacher's meta (called only when needed)."""
    return None if spec is None else Lw.from_spec(spec, multiscale, teacher_meta, where=where)


def is_file_spec(spec: str | None) -> bool:
    """Whether a `--whiten` value names a whitening file (an existing file) rather than a meta['Lw'] key."""
    return spec is not None and spec != FIRST and os.path.isfile(spec)


def _numpy(x: Any) -> np.ndarray:
    """A stored m / P (numpy array, torch tensor or nested list) as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
