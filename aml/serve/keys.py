"""API keys of `aml serve`: `new_key` appends a key's salted PBKDF2 hash to a keys file (the key is shown once,
never stored); `KeyRing` checks `Authorization: Bearer KEY` against that file (constant-time compare, the file
re-read when it changes, so a removed line revokes its key).

A key is `aml_ID_SECRET` (ID: 8 hex digits naming its line, SECRET: 32 random bytes, urlsafe base64). A keys file
line: `ID pbkdf2_sha256 ITERATIONS SALT_HEX HASH_HEX LABEL...`; lines starting with '#' are comments.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from aml.errors import UserError
from aml.io import atomic_write

ALGO = "pbkdf2_sha256"
ITERATIONS = 200_000
PREFIX = "aml_"


def _hash(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


def new_key(path: str | os.PathLike, label: str = "") -> str:
    """A new API key; its hash (never the key) is appended to keys file `path` (created 0600 when absent)."""
    p = Path(path)
    old = p.read_text() if p.is_file() else ""
    records = parse_keys(old, p)
    key_id = secrets.token_hex(4)
    while key_id in records:
        key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    line = f"{key_id} {ALGO} {ITERATIONS} {salt.hex()} {_hash(secret, salt, ITERATIONS).hex()} {label}".rstrip()
    with atomic_write(p) as f:
        f.write(old + ("" if not old or old.endswith("\n") else "\n") + line + "\n")
    os.chmod(p, 0o600)
    return f"{PREFIX}{key_id}_{secret}"


def parse_keys(text: str, where: Path) -> dict[str, tuple[int, bytes, bytes, str]]:
    """The records of a keys file's text: ID -> (iterations, salt, hash, label); a bad line is a UserError."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=5)
        try:
            key_id, algo, iters, salt, digest = parts[:5]
            if algo != ALGO:
                raise ValueError(algo)
            out[key_id] = (int(iters), bytes.fromhex(salt), bytes.fromhex(digest), parts[5] if len(parts) > 5 else "")
        except ValueError:
            raise UserError(f"{where}: line {n}: not a key record; write keys with `aml keys new {where}`") from None
    return out


class KeyRing:
    """The keys of a keys file; `check(header)` says whether an Authorization header carries one of them."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: keys file not found; create a key with `aml keys new {self.path}`")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, tuple[int, bytes, bytes, str]] = {}
        self._good: set[bytes] = set()  # sha256 of keys already verified (PBKDF2 runs once per key)
        self._reload()
        if not self._records:
            raise UserError(f"{self.path}: holds no key; create one with `aml keys new {self.path}`")

    def _reload(self) -> None:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._records = parse_keys(self.path.read_text(), self.path)
            self._good, self._stamp = set(), stamp

    def check(self, header: str | None) -> str:
        """'' when `header` is `Bearer KEY` with a key of the file; else why not (one line)."""
        scheme, _, key = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "missing API key: send `Authorization: Bearer KEY` (a key from `aml keys new`)"
        key = key.strip()
        memo = hashlib.sha256(key.encode()).digest()
        with self._lock:
            try:
                self._reload()
            except (OSError, UserError):
                return "the server's keys file is unreadable; ask its operator"
            if memo in self._good:
                return ""
            key_id, _, secret = key[len(PREFIX) :].partition("_")
            rec = self._records.get(key_id) if key.startswith(PREFIX) else None
        if rec is None or not hmac.compare_digest(_hash(secret, rec[1], rec[0]), rec[2]):  # PBKDF2 off the lock
            return "invalid API key"
        with self._lock:
            self._good.add(memo)
        return ""
