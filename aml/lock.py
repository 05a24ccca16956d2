"""One writer per output: an exclusive `flock` on a lock file beside what a command writes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from aml.errors import UserError

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)


@contextlib.contextmanager
def exclusive(
    lock_path: str | os.PathLike, wait: bool = True, what: str = "", fix: str = "", quiet: bool = False
) -> Iterator[bool]:
    """Hold an exclusive lock on `lock_path` (created without following a link) while the block runs.

    A second holder waits (`wait=True`, with one line on stderr naming `what`) or is refused with a one-line
    UserError naming `lock_path`, `what` and `fix` (`wait=False`). Yields False where the file system has no
    locks (the block then runs unlocked). The lock file is removed on release; a waiter that finds it replaced
    locks the current one, so two waiters never both hold it.
    """
    lock_path = Path(lock_path)
    what = what or str(lock_path)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{lock_path}: is a symbolic link; remove it (aml writes through no link)") from None
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise UserError(
                        f"{lock_path}: another aml process is writing {what}; "
                        + (fix or "wait for it to finish, or choose another output")
                    ) from None
                if not quiet:
                    print(f"waiting for another process writing {what} ...", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            if e.errno in _UNSUPPORTED:
                yield False
                return
            raise
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we waited on: lock the current one
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)
