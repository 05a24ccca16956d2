"""Teacher feature cache: the frozen teacher's vectors of an image list, extracted once, memory-mapped.

Files in the cache directory, named from a hash of the key (so teachers, sizes and lists coexist):
- `<name>.npy`          the (n, dim) array (float16 or float32), a plain .npy readable with `np.load`;
- `<name>.json`         the sidecar, written atomically and last: the key, shape, dtype and byte size.
  Only a matching sidecar plus a data file of the right header and size count as complete;
- `<name>.npy.partial`  + `<name>.progress.json`: an extraction in progress. The progress record (rows
  done) is replaced atomically after each chunk has been flushed, so a killed build resumes after the last
  flushed chunk.
A stale (other key / shape / dtype), half-written or truncated cache is never used: it is rebuilt.
`complete()` needs nothing but the key and the files, so the trainer can skip building the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aml.errors import UserError
from aml.io import sha256_lines, write_json
from aml.progress import Progress

FORMAT = "aml-feature-cache"
VERSION = 1
DTYPES = ("float16", "float32")
# The one default cache dtype, shared by `aml distill` (TrainConfig.cache_dtype) and `aml evaluate`, so an
# evaluation after training reads the teacher vectors training cached.
DEFAULT_DTYPE = "float16"


def cache_key(identity: dict, image_size: int, scales: Sequence[float], paths: Sequence[str]) -> dict:
    """What the cached vectors depend on: teacher identity, image size, scales, the image list."""
    return {
        "teacher": identity,
        "image_size": int(image_size),
        "scales": [float(s) for s in scales],
        "images": sha256_lines(list(paths)),
        "n_images": len(paths),
        "whiten": None,  # whitening is applied after the cache; the field keeps existing cache files valid
    }


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _npy_ok(path: Path, shape: tuple[int, int], dtype: str) -> bool:
    """Whether `path` is a .npy of this exact shape and dtype, as long as its header says (not truncated)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                return False
            got_shape, fortran, got_dtype = readers[version](f)
            offset = f.tell()
    except (OSError, ValueError, EOFError):
        return False
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (
        tuple(got_shape) == tuple(shape)
        and not fortran
        and got_dtype == np.dtype(dtype)
        and path.stat().st_size == expected
    )


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


class FeatureCache:
    """One cached (n, dim) array of teacher vectors, identified by `key` (see `cache_key`)."""

    def __init__(self, directory: str | os.PathLike, key: dict, n: int, dim: int, dtype: str = DEFAULT_DTYPE) -> None:
        if dtype not in DTYPES:
            raise UserError(f"cache dtype {dtype!r}: unsupported; use float16 or float32")
        if n < 0 or dim <= 0:
            raise ValueError(f"cache shape ({n}, {dim}) is invalid")
        self.directory = Path(directory)
        self.key = json.loads(_canonical(key))  # JSON-normalised (tuples -> lists), fails early if not JSON
        self.shape = (int(n), int(dim))
        self.dtype = dtype
        digest = hashlib.sha256(_canonical({"key": self.key, "shape": self.shape, "dtype": dtype}).encode())
        teacher = self.key.get("teacher") if isinstance(self.key.get("teacher"), dict) else {}
        prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", str(teacher.get("name", "features")))[:40]
        self.name = f"{prefix}-{digest.hexdigest()[:20]}"
        self.path = self.directory / f"{self.name}.npy"
        self.sidecar = self.directory / f"{self.name}.json"
        self.partial = self.directory / f"{self.name}.npy.partial"
        self.progress_path = self.directory / f"{self.name}.progress.json"

    # ------------------------------------------------------------------------------------- state
    def _record(self, **extra: Any) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            **extra,
        }

    def _matches(self, obj: dict | None) -> bool:
        return (
            obj is not None
            and obj.get("format") == FORMAT
            and obj.get("version") == VERSION
            and _canonical(obj.get("key")) == _canonical(self.key)
            and obj.get("shape") == list(self.shape)
            and obj.get("dtype") == self.dtype
        )

    def complete(self) -> bool:
        """True iff a finished cache for exactly this key, shape and dtype is on disk (checks files only)."""
        side = _read_json(self.sidecar)
        return (
            self._matches(side)
            and side.get("complete") is True
            and self.path.exists()
            and side.get("bytes") == self.path.stat().st_size
            and _npy_ok(self.path, self.shape, self.dtype)
        )

    def rows_done(self) -> int:
        """Rows of an interrupted build that can be reused (0 when there is none, or it does not match)."""
        prog = _read_json(self.progress_path)
        if not self._matches(prog) or not _npy_ok(self.partial, self.shape, self.dtype):
            return 0
        done = prog.get("rows_done")
        return done if isinstance(done, int) and 0 <= done <= self.shape[0] else 0

    def load(self) -> np.ndarray:
        """The cached (n, dim) array as a read-only memmap; raises if the cache is not complete."""
        if not self.complete():
            raise RuntimeError(
                f"feature cache {self.path} is not complete (missing, stale or truncated); build() it first"
            )
        if self.shape[0] == 0:
            return np.load(self.path)
        return np.load(self.path, mmap_mode="r")

    # ------------------------------------------------------------------------------------- build
    def build(
        self, extract_rows: Callable[[np.ndarray], np.ndarray], *, chunk: int = 1024, progress: bool = True
    ) -> np.ndarray:
        """Fill the cache by calling `extract_rows(idx)` -> (len(idx), dim) for consecutive row chunks.

        Resumes an interrupted build from its last flushed chunk; a complete cache is returned as is.
        """
        if self.complete():
            return self.load()
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in (self.path, self.sidecar):  # never leave a mismatching final file beside a new build
            stale.unlink(missing_ok=True)
        n, dim = self.shape
        start = self.rows_done()
        if start == 0:
            self.progress_path.unlink(missing_ok=True)
            self.partial.unlink(missing_ok=True)
            with open(self.partial, "wb") as f:  # header + zeros, without holding the whole array in memory
                np.lib.format.write_array_header_1_0(
                    f,
                    np.lib.format.header_data_from_array_1_0(np.empty((0, dim), dtype=self.dtype))
                    | {"shape": self.shape},
                )
                f.truncate(f.tell() + n * dim * np.dtype(self.dtype).itemsize)
            write_json(self.progress_path, self._record(rows_done=0))
        out = np.lib.format.open_memmap(self.partial, mode="r+") if n else None
        bar = Progress(n, f"teacher cache {self.name}", "img", progress)
        bar.update(start)
        try:
            for lo in range(start, n, max(int(chunk), 1)):
                idx = np.arange(lo, min(lo + chunk, n), dtype=np.int64)
                rows = np.asarray(extract_rows(idx))
                if rows.shape != (len(idx), dim):
                    raise ValueError(
                        f"extract_rows returned shape {rows.shape} for {len(idx)} rows; expected ({len(idx)}, {dim})"
                    )
                out[lo : lo + len(idx)] = rows.astype(self.dtype, copy=False)
                out.flush()
                write_json(self.progress_path, self._record(rows_done=int(idx[-1]) + 1))
                bar.update(len(idx))
        finally:
            bar.close()
            del out
        with open(self.partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.partial, self.path)
        write_json(self.sidecar, self._record(complete=True, bytes=self.path.stat().st_size, file=self.path.name))
        self.progress_path.unlink(missing_ok=True)
        return self.load()
