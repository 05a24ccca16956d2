"""Binary codes, the one place: sign bits at zero packed 8 per byte, and the two ways to search them.

A vector x (D,) becomes D bits, bit j = x_j > 0 (zero and negative values give 0), packed with
`numpy.packbits` (component 0 is the most significant bit of byte 0; a D that is not a multiple of 8 pads the
last byte with 0 bits): 2048-d float32 (8 KiB) -> 256 bytes. The bits only carry information when the vectors
are zero-centred (whitened vectors, or a LayerNorm head, `aml distill --head-norm layernorm`); raw GeM vectors
of ReLU maps are non-negative and give all-ones codes (`balance_warning` says so).

Search, both exact and ordered best first with ties by ascending id (id -1: no hit):
- asymmetric: float queries scored against the codes read as +-1 vectors, `<q, sign(x)> / sqrt(D)` (the
  cosine with the unit +-1/sqrt(D) vector), blockwise (the database is never expanded whole);
- Hamming: binarised queries against the codes by faiss `IndexBinaryFlat`, score `1 - 2 hamming / D` (the
  cosine of the two +-1 vectors); `hamming_distances` is the plain numpy transcription.
Torch-free; faiss only for the Hamming search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from aml.errors import UserError

BLOCK_BYTES = 64 << 20  # float32 bytes of +-1 rows expanded at a time by the asymmetric search
BALANCE = (0.05, 0.95)  # a fraction of set bits outside this range: the vectors were not zero-centred
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)


def code_bytes(dim: int) -> int:
    """Bytes of one packed code of a `dim`-d vector."""
    return math.ceil(int(dim) / 8)


def pack_bits(x: np.ndarray, block: int = 65536) -> np.ndarray:
    """(N, D) float rows -> (N, ceil(D/8)) uint8 sign bits (bit set where the value is > 0), `block` rows at a
    time (a memory-mapped database is never read whole)."""
    if x.ndim != 2:
        raise ValueError(f"pack_bits: expected (N, D) rows, got shape {x.shape}")
    out = np.empty((x.shape[0], code_bytes(x.shape[1])), np.uint8)
    for s in range(0, x.shape[0], block):
        out[s : s + block] = np.packbits(np.asarray(x[s : s + block]) > 0, axis=1)
    return out


def unpack_signs(codes: np.ndarray, dim: int) -> np.ndarray:
    """(N, ceil(D/8)) uint8 codes -> (N, D) float32 +-1 (bit 1 -> +1, bit 0 -> -1)."""
    return np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1, count=int(dim)).astype(np.float32) * 2 - 1


def bits_set(codes: np.ndarray, dim: int) -> float:
    """Fraction of the `dim` bits per code that are 1, over all codes."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size == 0:
        return 0.0
    return float(_POPCOUNT[codes].sum()) / (codes.shape[0] * int(dim))


def balance_warning(codes: np.ndarray, dim: int, what: str) -> str | None:
    """A one-line warning when almost every bit is 1 (or 0): the vectors were not centred at zero."""
    frac = bits_set(codes, dim)
    if BALANCE[0] <= frac <= BALANCE[1]:
        return None
    return (
        f"warning: {what}: {100 * frac:.1f}% of the bits are set: the vectors are not zero-centred (e.g. raw "
        "GeM vectors of ReLU maps), so the codes carry little; binarise whitened vectors (--whiten) or a "
        "model trained with a LayerNorm head (aml distill --head-norm layernorm)"
    )


def check_codes(codes: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`codes` as (N, ceil(dim/8)) uint8, or a one-line UserError naming `what`."""
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != code_bytes(dim):
        raise UserError(
            f"{what}: {codes.dtype} {codes.shape}; expected (N, {code_bytes(dim)}) uint8 packed sign bits of "
            f"{dim}-d vectors (aml extract --binary)"
        )
    return codes


def tie_sorted(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order candidates by score descending, ties by id ascending; missing hits (id -1) last."""
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    by_id = np.argsort(np.where(i < 0, np.iinfo(np.int64).max, i), axis=1, kind="stable")
    s, i = np.take_along_axis(s, by_id, 1), np.take_along_axis(i, by_id, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _parts(db: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    return [db] if isinstance(db, np.ndarray) else list(db)


def asymmetric_search(
    queries: np.ndarray, db: np.ndarray | Sequence[np.ndarray], dim: int, k: int, *, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), (Q, k): float queries (Q, D) against packed codes (a (N, B) array, or parts searched as
    their concatenation), score <q, +-1 code> / sqrt(D), exact; `block` codes are expanded at a time."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries {q.shape}: expected (Q, {dim})")
    block = block or max(1024, BLOCK_BYTES // (4 * dim))
    scale = np.float32(1 / math.sqrt(dim))
    best_s, best_i = np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64)
    offset = 0
    for part in _parts(db):
        for s in range(0, part.shape[0], block):
            sc = (q @ unpack_signs(part[s : s + block], dim).T) * scale
            kk = min(k, sc.shape[1])
            top = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
            best_s = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], 1)
            best_i = np.concatenate([best_i, top + offset + s], 1)
            if best_s.shape[1] > k:  # keep the running top-k small
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
        offset += part.shape[0]
    s, i = tie_sorted(best_s, best_i)
    return s[:, :k], i[:, :k]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise UserError("faiss is not installed; install aml with faiss-cpu for Hamming search") from None
    return faiss


def binary_index(db: np.ndarray | Sequence[np.ndarray], dim: int) -> Any:
    """A faiss `IndexBinaryFlat` holding the packed codes (parts added in order)."""
    index = _faiss().IndexBinaryFlat(8 * code_bytes(dim))
    for part in _parts(db):
        index.add(np.ascontiguousarray(part, dtype=np.uint8))
    return index


def hamming_search(query_codes: np.ndarray, db: Any, dim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), (Q, k): packed query codes against packed codes (an array, parts, or a faiss binary index)
    by Hamming distance (faiss `IndexBinaryFlat`), score 1 - 2 hamming / D. With k below the database size,
    which of several codes tied at the k-th distance come back is faiss's choice."""
    index = db if hasattr(db, "ntotal") else binary_index(db, dim)
    h, i = index.search(np.ascontiguousarray(query_codes, dtype=np.uint8), min(int(k), index.ntotal))
    return tie_sorted(1 - 2 * h.astype(np.float32) / dim, i.astype(np.int64))


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) int64 Hamming distances between packed codes, in numpy (popcount of the XOR by table)."""
    a, b = np.asarray(a, dtype=np.uint8), np.asarray(b, dtype=np.uint8)
    return _POPCOUNT[a[:, None, :] ^ b[None, :, :]].sum(-1)
