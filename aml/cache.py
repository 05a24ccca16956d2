"""Teacher feature cache: the frozen teacher's vectors of an image list, extracted once, memory-mapped.

Files in the cache directory, named from a hash of the key (so teachers, sizes and lists coexist):
- `<name>.npy`          the (n, dim) array (float16 or float32), a plain .npy readable with `np.load`;
- `<name>.json`         the sidecar, written atomically and last: the key, shape, dtype and byte size.
  Only a matching sidecar plus a regular (not symlinked) data file of the right header and size count as
  complete, and `load()` refuses one with non-finite rows (naming the file; `build()` rebuilds it);
- `<name>.lock`         held (`fcntl.flock`, exclusive) by the one process building the cache: a second
  builder waits, then finds it complete. The holder removes it when done (waiters re-check the inode);
- `<name>.npy.partial-HOST-PID-RANDOM` + `<name>.progress.json`: the build in progress, in the builder's own
  file, allocated in full before it is mapped (a full disk is one UserError naming the folder, not SIGBUS).
  After each flushed chunk the progress record (rows done, a digest of each chunk as written) is replaced
  atomically, so a killed build resumes after its last flushed chunk: the next builder takes the file over.
  Before the file is renamed into place every chunk is read back and compared with its digest, so a file
  is marked complete only with every row written by the extractor (never a zero-filled or foreign file).
Where `flock` is not supported the build runs unlocked in its private file, without resuming.

Content identity: the key holds each image's size and modification time (ns), besides its path (`cache_key`
with `files=`). That catches replaced or re-encoded images; it misses a rewrite in place that keeps both the
size and the mtime (e.g. `touch -r` after editing, or a copy that preserves times): delete the cache then.
`complete()` needs nothing but the key and the files, so the trainer can skip building the teacher.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aml.errors import UserError
from aml.io import host_tag, sha256_lines, write_json
from aml.lock import exclusive
from aml.progress import progress_bar

FORMAT = "aml-feature-cache"
VERSION = 2  # 2: content identity in the key, per-chunk digests, per-writer partial files
DTYPES = ("float16", "float32")
# The one default cache dtype, shared by `aml distill` (TrainConfig.cache_dtype) and `aml evaluate`, so an
# evaluation after training reads the teacher vectors training cached.
DEFAULT_DTYPE = "float16"
_VERIFY_BLOCK = 65536  # rows read at a time when checking a file


def content_identity(files: Sequence[str]) -> str:
    """Hex sha256 over each file's size and mtime_ns, in order (a missing file counts as 'missing')."""
    lines = []
    for f in files:
        try:
            st = os.stat(f)
            lines.append(f"{st.st_size} {st.st_mtime_ns}")
        except OSError:
            lines.append("missing")
    return sha256_lines(lines)


def cache_key(
    identity: dict,
    image_size: int,
    scales: Sequence[float],
    paths: Sequence[str],
    *,
    files: Sequence[str] | None = None,
) -> dict:
    """What the cached vectors depend on: teacher identity, image size, scales, the image list, and
    (with `files`, the image files of `paths`) their sizes and modification times."""
    key = {
        "teacher": identity,
        "image_size": int(image_size),
        "scales": [float(s) for s in scales],
        "images": sha256_lines(list(paths)),
        "n_images": len(paths),
        "whiten": None,  # whitening is applied after the cache; the field keeps existing cache files valid
    }
    if files is not None:
        key["content"] = content_identity(files)
    return key


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def _regular(path: Path) -> bool:
    """A regular file, not a symlink (a link in a shared cache folder could point anywhere)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _npy_ok(path: Path, shape: tuple[int, int], dtype: str) -> bool:
    """Whether `path` is a .npy of this exact shape and dtype, as long as its header says (not truncated)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if not _regular(path):
        return False
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
    if not _regular(path):
        return None
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def _digest(rows: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=16).hexdigest()


def allocate(f: Any, size: int) -> None:
    """Give the open file `f` all of its `size` bytes on disk now (so writing through a memmap cannot SIGBUS)."""
    fd = f.fileno()
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    f.seek(0, os.SEEK_END)
    left = size - f.tell()
    block = b"\0" * (1 << 20)
    while left > 0:
        left -= f.write(block[: min(left, len(block))])
    f.flush()


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
        self.lock_path = self.directory / f"{self.name}.lock"
        self.progress_path = self.directory / f"{self.name}.progress.json"
        self._partial_prefix = f"{self.name}.npy.partial-"
        self.partial = self._new_partial()  # this builder's own file (a new name for each build)

    def _new_partial(self) -> Path:
        return self.directory / f"{self._partial_prefix}{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"

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

    def _check_version(self) -> None:
        """Refuse to touch a cache written by a newer aml (rebuilding it would destroy that aml's cache)."""
        side = _read_json(self.sidecar)
        version = side.get("version") if side is not None and side.get("format") == FORMAT else None
        if isinstance(version, int) and version > VERSION:
            raise UserError(
                f"{self.sidecar}: written by a newer aml (cache format {version}; this aml reads {VERSION}); "
                "upgrade aml, or use another cache folder"
            )

    def complete(self) -> bool:
        """True iff a finished cache for exactly this key, shape and dtype is on disk (checks files only)."""
        side = _read_json(self.sidecar)
        return (
            self._matches(side)
            and side.get("complete") is True
            and _regular(self.path)
            and side.get("bytes") == self.path.stat().st_size
            and _npy_ok(self.path, self.shape, self.dtype)
        )

    def _progress(self) -> dict | None:
        """The progress record of an interrupted build and its partial file, when both can be reused."""
        prog = _read_json(self.progress_path)
        if not self._matches(prog):
            return None
        name, done, chunks = prog.get("partial"), prog.get("rows_done"), prog.get("chunks")
        if not (isinstance(name, str) and name.startswith(self._partial_prefix) and "/" not in name):
            return None
        if not (isinstance(done, int) and 0 <= done <= self.shape[0] and isinstance(chunks, list)):
            return None
        spans = [c for c in chunks if isinstance(c, list) and len(c) == 3]
        if len(spans) != len(chunks) or [c[0] for c in spans] != [0, *[c[1] for c in spans[:-1]]]:
            return None
        if (spans[-1][1] if spans else 0) != done:
            return None
        partial = self.directory / name
        try:
            st = os.lstat(partial)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.getuid():
            return None  # a link could make us write into someone else's file
        if not _npy_ok(partial, self.shape, self.dtype):
            return None
        return {**prog, "partial": partial}

    def rows_done(self) -> int:
        """Rows of an interrupted build that can be reused (0 when there is none, or it does not match)."""
        prog = self._progress()
        return prog["rows_done"] if prog is not None else 0

    def _open(self) -> np.ndarray:
        if self.shape[0] == 0:
            return np.load(self.path, allow_pickle=False)
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def _first_bad_row(self, x: np.ndarray) -> int | None:
        for s in range(0, x.shape[0], _VERIFY_BLOCK):
            ok = np.isfinite(np.asarray(x[s : s + _VERIFY_BLOCK])).all(axis=1)
            if not ok.all():
                return s + int(np.flatnonzero(~ok)[0])
        return None

    def load(self) -> np.ndarray:
        """The cached (n, dim) array as a read-only memmap; raises if the cache is not complete or not finite."""
        if not self.complete():
            raise RuntimeError(
                f"feature cache {self.path} is not complete (missing, stale or truncated); build() it first"
            )
        x = self._open()
        bad = self._first_bad_row(x)
        if bad is not None:
            raise UserError(
                f"{self.path}: row {bad} of the teacher feature cache is NaN or inf: the file is corrupt; delete "
                f"{self.path} and {self.sidecar.name} (the next run rebuilds it)"
            )
        return x

    # ------------------------------------------------------------------------------------- build
    @contextlib.contextmanager
    def _disk(self) -> Iterator[None]:
        """Turn a failed file operation (full disk, read-only or unwritable folder) into one UserError."""
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                n, dim = self.shape
                need = n * dim * np.dtype(self.dtype).itemsize
                raise UserError(
                    f"{self.directory}: no space left on the device for the teacher cache ({need / 2**20:.1f} MiB "
                    f"for {self.path.name}); free some space or use another cache folder"
                ) from None
            raise UserError(
                f"{self.directory}: cannot write the teacher cache ({e.strerror or e}: {e.filename or ''}); "
                "make the folder writable or use another cache folder"
            ) from None

    @contextlib.contextmanager
    def _locked(self, progress: bool) -> Iterator[bool]:
        """Hold the build lock (waiting for another builder); yields False where file locks are unsupported."""
        with contextlib.ExitStack() as stack:
            with self._disk():
                locked = stack.enter_context(exclusive(self.lock_path, what=f"{self.path}", quiet=not progress))
            yield locked

    def build(
        self, extract_rows: Callable[[np.ndarray], np.ndarray], *, chunk: int = 1024, progress: bool = True
    ) -> np.ndarray:
        """Fill the cache by calling `extract_rows(idx)` -> (len(idx), dim) for consecutive row chunks.

        Resumes an interrupted build from its last flushed chunk; a complete cache is returned as is (one with
        NaN rows is rebuilt). A second process building the same cache waits for the first, then reads it.
        """
        self._check_version()
        if self.complete() and (x := self._valid(warn=False)) is not None:
            return x
        with self._disk():
            self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked(progress) as locked:
            self._check_version()
            if self.complete() and (x := self._valid(warn=True)) is not None:
                return x  # another process built it while we waited
            with self._disk():
                for stale in (self.path, self.sidecar):  # never leave a mismatching final file beside a new build
                    stale.unlink(missing_ok=True)
            self._fill(extract_rows, max(int(chunk), 1), progress, resume=locked)
        return self.load()

    def _valid(self, warn: bool = True) -> np.ndarray | None:
        """The complete cache, or None (with a one-line warning) when it holds NaN or inf rows."""
        x = self._open()
        bad = self._first_bad_row(x)
        if bad is None:
            return x
        if warn:
            print(f"warning: {self.path}: row {bad} is NaN or inf (a corrupt cache); rebuilding it", file=sys.stderr)
        return None

    def _start(self, resume: bool) -> tuple[int, list]:
        """Take over an interrupted build's partial file (when `resume`) or allocate a new one: (rows, chunks)."""
        n, dim = self.shape
        self.partial = self._new_partial()
        prog = self._progress() if resume else None
        if resume:
            self._remove_orphans(keep=prog["partial"] if prog else None)
        if prog is not None:
            os.replace(prog["partial"], self.partial)
            write_json(self.progress_path, self._record(partial=self.partial.name, **self._counts(prog["chunks"])))
            return prog["rows_done"], prog["chunks"]
        if resume:
            self.progress_path.unlink(missing_ok=True)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            with os.fdopen(fd, "wb") as f:  # header, then every data byte allocated (a sparse file can SIGBUS)
                np.lib.format.write_array_header_1_0(
                    f,
                    np.lib.format.header_data_from_array_1_0(np.empty((0, dim), dtype=self.dtype))
                    | {"shape": self.shape},
                )
                f.flush()
                allocate(f, f.tell() + n * dim * np.dtype(self.dtype).itemsize)
        except BaseException:
            self.partial.unlink(missing_ok=True)
            raise
        if resume:
            write_json(self.progress_path, self._record(partial=self.partial.name, **self._counts([])))
        return 0, []

    @staticmethod
    def _counts(chunks: list) -> dict:
        return {"rows_done": chunks[-1][1] if chunks else 0, "chunks": chunks}

    def _remove_orphans(self, keep: Path | None) -> None:
        """Under the lock: delete this cache's partial files that no build will resume (killed writers' files)."""
        for p in self.directory.glob(f"{glob.escape(self._partial_prefix)}*"):
            if p != keep and not p.is_dir():
                p.unlink(missing_ok=True)

    def _fill(self, extract_rows: Callable[[np.ndarray], np.ndarray], chunk: int, progress: bool, resume: bool) -> None:
        n, dim = self.shape
        with self._disk():
            start, chunks = self._start(resume)
        bar = progress_bar(n, f"teacher cache {self.name}", "img", enabled=progress, initial=start)
        out = np.lib.format.open_memmap(self.partial, mode="r+") if n else None
        try:
            for lo in range(start, n, chunk):
                idx = np.arange(lo, min(lo + chunk, n), dtype=np.int64)
                rows = np.asarray(extract_rows(idx))
                if rows.shape != (len(idx), dim):
                    raise ValueError(
                        f"extract_rows returned shape {rows.shape} for {len(idx)} rows; expected ({len(idx)}, {dim})"
                    )
                rows = rows.astype(self.dtype, copy=False)
                finite = np.isfinite(rows).all(axis=1)
                if not finite.all():
                    row = lo + int(np.flatnonzero(~finite)[0])
                    raise UserError(
                        f"{self.path.name}: the extractor returned NaN or inf for row {row} (it is not cached); "
                        "check the teacher's weights and that image"
                    )
                with self._disk():
                    out[lo : lo + len(idx)] = rows
                    out.flush()
                    chunks.append([lo, lo + len(idx), _digest(rows)])
                    if resume:
                        write_json(self.progress_path, self._record(partial=self.partial.name, **self._counts(chunks)))
                bar.update(len(idx))
        except BaseException:
            del out
            if not resume:  # nobody can take an unlocked build over
                self.partial.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        del out
        with self._disk():
            self._verify(chunks)
            with open(self.partial, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.partial, self.path)
            write_json(self.sidecar, self._record(complete=True, bytes=self.path.stat().st_size, file=self.path.name))
            if resume:
                self.progress_path.unlink(missing_ok=True)

    def _verify(self, chunks: list) -> None:
        """Read the partial file back: every row written, each chunk exactly the rows the extractor returned."""
        n = self.shape[0]
        ends = [0, *[hi for _, hi, _ in chunks]]
        if [lo for lo, _, _ in chunks] != ends[:-1] or ends[-1] != n:
            self._discard()
            raise UserError(
                f"{self.partial}: the rows written do not cover 0..{n - 1}; it was discarded: run again to rebuild"
            )
        x = np.load(self.partial, mmap_mode="r", allow_pickle=False) if n else None
        for lo, hi, digest in chunks:
            if _digest(x[lo:hi]) != digest:
                del x
                self._discard()
                raise UserError(
                    f"{self.partial}: rows {lo}..{hi - 1} differ from what was extracted (another process wrote "
                    "into the file, or the disk is failing); it was discarded: run again to rebuild the cache"
                )
        del x

    def _discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)
