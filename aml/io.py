"""Atomic file writing and small file helpers shared by caches, checkpoints, exports and results."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from aml.errors import UserError

TMP_TAG = ".aml-tmp-"  # temp files are `.NAME.aml-tmp-HOST-PID-RANDOM` beside NAME


def host_tag() -> str:
    """This machine's name as temp and partial file names carry it (letters and digits, at most 16)."""
    return re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:16] or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a permission error means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _check_creatable(target: Path, option: str, shown: Path) -> None:
    """UserError unless `target` (a folder) exists and is writable, or can be created under a writable folder."""
    p = target
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise UserError(f"{shown}: {option}: {p} is a file, not a folder; choose another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{shown}: {option}: folder {p} is not writable; choose another path")


def check_writable_file(path: str | os.PathLike, option: str) -> None:
    """Before the work: `path` can be written (its folder exists or can be made, and is writable), or a one-line
    UserError naming the path and the option."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: {option}: is a folder; give a file path")
    _check_creatable(path.parent, option, path)


def check_writable_dir(path: str | os.PathLike, option: str) -> None:
    """Before the work: folder `path` exists and is writable, or can be created; else a one-line UserError."""
    _check_creatable(Path(path), option, Path(path))


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of `path` left by killed writers on this host (their PID no longer runs)."""
    path = Path(path)
    prefix = f".{path.name}{TMP_TAG}{host_tag()}-"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].partition("-")[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
            elif entry.is_dir(follow_symlinks=False):  # a temp folder (`temp_dir`)
                shutil.rmtree(entry.path)
            else:
                continue
            removed.append(Path(entry.path))
    return removed


def temp_dir(path: str | os.PathLike) -> Path:
    """A new hidden temp folder beside `path` (`.NAME.aml-tmp-HOST-PID-RANDOM`) to build `path` in and rename;
    those a killed builder of the same `path` left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_TAG}{host_tag()}-{os.getpid()}-", dir=path.parent))


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A `temp_dir` beside `path` for the intermediate files that build it, removed with its contents when the
    block ends (a killed builder's is removed by the next build of `path`)."""
    tmp = temp_dir(path)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temp file is `.NAME.aml-tmp-HOST-PID-RANDOM`; those a killed writer of the same `path` left behind (its
    PID gone) are removed first, so a killed write costs disk space only until the next write of the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}{host_tag()}-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # e.g. ENOSPC from a write: name the file the user asked for
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; it replaces `path` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf: a score with no positives to rank) as None, so that it
    serialises as strict JSON (`null`) that any parser, a phone's `JSON.parse` included, reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any, **kw: Any) -> str:
    """The one JSON writer of files and outputs: strict JSON (non-finite floats as null, `finite`), sorted keys."""
    return json.dumps(finite(obj), sort_keys=True, allow_nan=False, **kw)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented strict JSON."""
    with atomic_write(path) as f:
        f.write(json_text(obj, indent=2) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_lines(lines: list[str]) -> str:
    """Hex sha256 of a list of strings (e.g. an image list), order-sensitive."""
    h = hashlib.sha256()
    for s in lines:
        h.update(s.encode())
        h.update(b"\n")
    return h.hexdigest()


def aml_home() -> Path:
    """The user's aml folder for generated data, caches and default runs: `$AML_HOME`, default ~/.cache/aml."""
    return Path(os.environ.get("AML_HOME") or Path.home() / ".cache" / "aml").expanduser()
