"""Learned whitening (cirtorch's Lw, SPEC §3) in one place: x -> l2n(P (x - m)), as cirtorch `whitenapply`.

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

from aml.errors import UserError

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
            raise UserError(f"{p}: not a readable whitening file ({type(e).__name__}); rewrite it with Lw.save") from e
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

        from aml.io import atomic_path

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
