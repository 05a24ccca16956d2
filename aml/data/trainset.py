"""The one in-memory training set every format reads into: image paths, clusters, (query, positive) pairs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from aml.errors import UserError


class RevisitopRef(NamedTuple):
    """Where a revisitop-layout test set lives: `data_root/dataset_name/{jpg/, gnd_<dataset_name>.pkl}`."""

    data_root: str
    dataset_name: str


def _int64_vector(x: object) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    return a.astype(np.int64, copy=False) if a.dtype.kind in "iu" else a


@dataclass(frozen=True, eq=False)
class TrainSet:
    """Training images (`paths`), one cluster id per image (images of one landmark / object share it) and
    parallel `qidxs` / `pidxs`: query / positive indices (docs/REFERENCE.md §4). Images are indexed by position."""

    paths: list[str]
    cluster: np.ndarray
    qidxs: np.ndarray
    pidxs: np.ndarray
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", list(self.paths))
        for f in ("cluster", "qidxs", "pidxs"):
            object.__setattr__(self, f, _int64_vector(getattr(self, f)))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_pairs(self) -> int:
        return int(self.qidxs.shape[0])

    @property
    def num_clusters(self) -> int:
        return int(np.unique(self.cluster).size)

    def validate(self, source: str | None = None) -> TrainSet:
        """Check shapes, integer types and index ranges; raise a UserError naming the field and the entry."""
        src = source or self.name
        n = len(self.paths)
        for f in ("cluster", "qidxs", "pidxs"):
            a = getattr(self, f)
            if a.ndim != 1:
                raise UserError(
                    f"{src}: {f}: expected a flat list of integers, got shape {a.shape}; "
                    "fix the file that defines this set"
                )
            if a.size and a.dtype.kind not in "iu":
                bad = next(i for i, v in enumerate(a.tolist()) if not isinstance(v, (int, np.integer)))
                raise UserError(
                    f"{src}: {f}[{bad}] = {a[bad]!r} is not an integer; cluster ids and image indices must be integers"
                )
        if self.cluster.shape[0] != n:
            raise UserError(
                f"{src}: cluster: has {self.cluster.shape[0]} entries but there are {n} images "
                "(cids); there must be one cluster id per image"
            )
        if self.qidxs.shape[0] != self.pidxs.shape[0]:
            raise UserError(
                f"{src}: qidxs / pidxs: {self.qidxs.shape[0]} queries but "
                f"{self.pidxs.shape[0]} positives; they are parallel lists and must have equal length"
            )
        for f in ("qidxs", "pidxs"):
            a = getattr(self, f)
            bad = np.flatnonzero((a < 0) | (a >= n))
            if bad.size:
                i = int(bad[0])
                raise UserError(
                    f"{src}: {f}[{i}] = {int(a[i])} is out of range [0, {n}) "
                    f"({bad.size} bad entries); indices are 0-based positions in cids"
                )
        return self

    def check_images(self, source: str | None = None, show: int = 5) -> TrainSet:
        """Fail up front (not mid-epoch) when images are missing: the count and the first few paths."""
        missing = missing_files(self.paths)
        if missing:
            src = source or self.name
            first = ", ".join(missing[:show])
            raise UserError(
                f"{src}: {len(missing)} of {len(self.paths)} images are missing, first: {first}; "
                "check the data root (or extract the image archive there)"
            )
        return self


def missing_files(paths: list[str]) -> list[str]:
    """The paths (in order) that are not existing files."""
    return [p for p in paths if not os.path.isfile(p)]


@dataclass(frozen=True)
class SourceInfo:
    """One `--data` source of a run: its spec, its images at [start, stop) of the run's training set, the
    labelled (query, positive) pairs and labels it brings (0: unlabelled), what it held out as its test set
    (text, "" when nothing) and that test set."""

    spec: str
    name: str
    start: int
    stop: int
    pairs: int
    labels: int
    held_out: str = ""
    test: RevisitopRef | None = None


@dataclass(frozen=True)
class DataBundle:
    """What a data spec resolves to: a training set, an optional validation set, an optional test set;
    `held_out` says what a labelled source kept out of training for its test set; `sources` (set by
    `aml.data.sources.parse_data_specs`) what each `--data` source contributes."""

    train: TrainSet
    val: TrainSet | None
    test: RevisitopRef | None
    held_out: str = ""
    sources: tuple[SourceInfo, ...] = ()
