"""The frozen teacher's vectors of image lists, through the feature cache: one path for training, evaluation
and export checks. The teacher network is built only when a list is not cached yet, at most once.

`aml.registry` and `aml.extract` (torch) are imported where a network is identified, built or run, so that a
command that only reads cached lists (`aml evaluate` on vectors, `aml index`) does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aml.cache import DEFAULT_DTYPE, FeatureCache, cache_key
from aml.data.images import Bbx
from aml.settings import ExtractSettings


def image_list_key(paths: Sequence[str], bbxs: Sequence[Bbx] | None = None) -> list[str]:
    """The strings that identify an image list in a cache key (query crops included)."""
    if bbxs is None:
        return list(paths)
    return [p if b is None else f"{p}#bbx={','.join(f'{v:g}' for v in b)}" for p, b in zip(paths, bbxs, strict=True)]


class TeacherVectors:
    """Teacher vectors at one image size and scale set (`settings`), cached under `cache_dir` (keyed by the
    teacher's identity) as `dtype`.

    `teacher` is a registry name or a checkpoint file. With `dist` (a torchrun job), rank 0 extracts a missing
    list and the others wait and read it. `built` tells whether the network had to be built (tests check that
    a complete cache never builds it). `settings.progress` shows the cache's progress bar.
    """

    def __init__(
        self,
        teacher: str,
        settings: ExtractSettings,
        *,
        cache_dir: str | os.PathLike,
        weights: str | None = None,
        random_init: bool = False,
        dtype: str = DEFAULT_DTYPE,
        dist: Any = None,
    ) -> None:
        from aml.registry import model_identity

        self.teacher, self.weights = teacher, weights
        self.random_init = random_init and not os.path.isfile(teacher)
        self.identity = model_identity(teacher, weights=weights, random_init=self.random_init)
        self.settings = settings
        self.cache_dir, self.dtype = Path(cache_dir), dtype
        self.dist = dist
        self.built = False
        self._net = None

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def net(self):
        """The teacher network (frozen, eval mode), built on first use."""
        if self._net is None:
            from aml.registry import create_model

            self._net = create_model(self.teacher, role="teacher", weights=self.weights, random_init=self.random_init)
            self.built = True
        return self._net

    def get(
        self, paths: Sequence[str], bbxs: Sequence[Bbx] | None = None, *, list_size: int | None = None
    ) -> np.ndarray:
        """(N, D) teacher vectors of `paths` (query crops `bbxs`), a read-only memmap in list order; `list_size`:
        the whole list's length when `paths` is one shard of it (the backend is chosen for the whole list)."""
        from aml.extract import extract

        paths = list(paths)
        st = self.settings
        key = cache_key(self.identity, st.image_size, st.scales, image_list_key(paths, bbxs), files=paths)
        cache = FeatureCache(self.cache_dir, key, len(paths), self.dim, self.dtype)
        main = self.dist is None or self.dist.main
        if main:  # returns at once when complete; waits when another process builds it; rebuilds a corrupt one
            cache.build(
                lambda idx: extract(
                    self.net(),
                    [paths[i] for i in idx],
                    st.replace(progress=False),
                    bbxs=None if bbxs is None else [bbxs[i] for i in idx],
                    list_size=len(paths) if list_size is None else list_size,  # one backend for the list
                ),
                progress=st.progress,
            )
        if self.dist is not None:
            self.dist.barrier()
        return cache.load()

    def release(self) -> None:
        """Drop the network once every list it serves is cached (frees its memory for training)."""
        self._net = None
