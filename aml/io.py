"""Atomic file writing and small file helpers shared by caches, checkpoints, exports and results."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from aml.errors import UserError, first_line

TMP_TAG = ".aml-tmp-"  # temp files are `.NAME.aml-tmp-HOST-PID-RANDOM` beside NAME
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full device or an exhausted quota: "no space left on the device"
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's `tofile` on a short write (no errno)
_TORCH_WRITE = ("file write failed", "unexpected pos")  # torch.save's writer when the device fills up


def umask() -> int:
    """This process's umask, read at each call (a program may change it): from /proc where it is, else by setting
    and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_open_gives(path: Path, folder: bool = False, like: Path | None = None) -> None:
    """Give `path` (made 0600 / 0700 by mkstemp / mkdtemp) the mode `open()` / `mkdir()` would: that of the
    file `like` it replaces, else 0666 (folders 0777) less the umask."""
    try:
        mode = stat.S_IMODE(like.stat().st_mode) if like is not None and like.is_file() else None
    except OSError:
        mode = None
    with contextlib.suppress(OSError):  # a file system without modes (some network mounts) keeps its own
        os.chmod(path, mode if mode is not None else (0o777 if folder else 0o666) & ~umask())


def no_space(e: BaseException) -> bool:
    """Whether a failed write means the device (or the user's quota) is full: ENOSPC / EDQUOT, numpy's short
    write, torch's failed file write."""
    if isinstance(e, OSError):
        return e.errno in NO_SPACE or (e.errno is None and bool(_SHORT_WRITE.search(str(e))))
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE)


class NoSpaceError(UserError, OSError):
    """A write that failed on a full device: a UserError (one line, `error: PATH: no space left on the device`)
    and an OSError with errno ENOSPC / EDQUOT and the user's path as `filename`, for callers that clean up on it."""

    def __init__(self, path: str | os.PathLike, cause: BaseException) -> None:
        code = cause.errno if isinstance(cause, OSError) and cause.errno in NO_SPACE else errno.ENOSPC
        OSError.__init__(self, code, os.strerror(code), str(path))
        self.message = f"{path}: no space left on the device ({first_line(cause)}); free some space or write elsewhere"

    def __str__(self) -> str:
        return self.message


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
    """Delete the temp files and folders in `path`'s folder left by killed writers on this host (their PID no
    longer runs): those of `path` and of any other name there (a killed export of `-int8.onnx` is cleaned by the
    next write into the folder, whatever it writes). A temp is never resumed, so a dead writer's is garbage."""
    path = Path(path)
    marker = f"{TMP_TAG}{host_tag()}-"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        at = entry.name.rfind(marker)
        if not entry.name.startswith(".") or at <= 1:
            continue
        pid = entry.name[at + len(marker) :].partition("-")[0]
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
    the temps killed writers left in that folder are removed first (`remove_stale_temps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_TAG}{host_tag()}-{os.getpid()}-", dir=path.parent))
    _as_open_gives(tmp, folder=True)  # mkdtemp's 0700 -> what mkdir gives (it may become the built folder)
    return tmp


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

    The temp file is `.NAME.aml-tmp-HOST-PID-RANDOM`; those killed writers left in the folder (their PID gone)
    are removed first, so a killed write costs disk space only until the next write into the folder. It
    gets the mode `open()` would give (the replaced file's, else 0666 less the umask), not mkstemp's 0600. A full
    device (ENOSPC, EDQUOT, a short write, torch's failed write) is one UserError naming `path`, never the temp.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}{host_tag()}-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        _as_open_gives(tmp, like=path)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if no_space(e):
            raise NoSpaceError(path, e) from e
        if isinstance(e, OSError) and (e.filename is None or str(e.filename) == str(tmp)):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e  # name the user's file, not the temp
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


def read_npz(path: str | os.PathLike | IO[bytes], keys: tuple[str, ...], name: str = "") -> dict[str, Any]:
    """The arrays `keys` of an .npz file (a path or an open binary file called `name`), never unpickled
    (`allow_pickle=False`); a file that is not a plain .npz, lacks a key or holds object (pickled) arrays is one
    UserError naming the file."""
    import zipfile

    import numpy as np

    name = name or str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise UserError(f"{name}: array '{missing[0]}' missing; rewrite the file with aml")
            return {k: z[k] for k in keys}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # pickled arrays: ValueError
        why = "it holds pickled objects, not plain arrays (refused: loading them could run code)"
        why = why if "allow_pickle" in str(e) else f"not a readable .npz ({first_line(e)})"
        raise UserError(f"{name}: {why}; rewrite the file with aml") from e


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
