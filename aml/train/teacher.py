"""The frozen teacher's vectors, from the feature cache: the network is built only when a cache is missing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from aml.cache import FeatureCache, cache_key
from aml.extract import extract
from aml.registry import create_model
from aml.train.distributed import Dist

Bbx = tuple[float, float, float, float] | None


def image_list_key(paths: Sequence[str], bbxs: Sequence[Bbx] | None = None) -> list[str]:
    """The strings that identify an image list in a cache key (query crops included)."""
    if bbxs is None:
        return list(paths)
    return [p if b is None else f"{p}#bbx={','.join(f'{v:g}' for v in b)}" for p, b in zip(paths, bbxs, strict=True)]


class TeacherVectors:
    """Teacher vectors for image lists, through the cache; builds the teacher lazily, at most once."""

    def __init__(self, identity: dict, *, weights: str | None, random_init: bool, image_size: int,
                 cache_dir: Path, dtype: str, device: str, dist: Dist, progress: bool = True) -> None:
        self.identity, self.weights, self.random_init = identity, weights, random_init
        self.image_size, self.cache_dir, self.dtype = image_size, cache_dir, dtype
        self.device, self.dist, self.progress = device, dist, progress
        self.built_teacher = False  # tests check that a complete cache never builds the network
        self._teacher = None

    def _model(self):
        if self._teacher is None:
            self._teacher = create_model(self.identity["name"], role="teacher", weights=self.weights,
                                         random_init=self.random_init)
            self.built_teacher = True
        return self._teacher

    def get(self, paths: Sequence[str], bbxs: Sequence[Bbx] | None = None) -> np.ndarray:
        """(N, D) teacher vectors for `paths` (read-only memmap), extracted once and cached."""
        key = cache_key(self.identity, self.image_size, (1.0,), image_list_key(paths, bbxs))
        cache = FeatureCache(self.cache_dir, key, len(paths), self.identity["dim"], self.dtype)
        if not cache.complete() and self.dist.main:
            rows: Callable[[np.ndarray], np.ndarray] = lambda idx: extract(  # noqa: E731
                self._model(), [paths[i] for i in idx], image_size=self.image_size,
                bbxs=None if bbxs is None else [bbxs[i] for i in idx], device=self.device, progress=False)
            cache.build(rows, progress=self.progress)
        self.dist.barrier()
        return cache.load()

    def release(self) -> None:
        """Drop the teacher network once every list is cached."""
        self._teacher = None
