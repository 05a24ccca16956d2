"""Binary codes, the one place of their format: sign bits at zero packed 8 per byte.

A vector x (D,) becomes D bits, bit j = x_j > THRESHOLD (2^-25, about 3e-8; zero, negative and tinier values
give 0), compared in float32, packed with `numpy.packbits` (component 0 is the most significant bit of byte 0; a
D that is not a multiple of 8 pads the last byte with 0 bits): 2048-d float32 (8 KiB) -> 256 bytes. THRESHOLD is
float16's rounding boundary at zero (half its smallest positive value): a float16 copy of a vector (the teacher
cache's default storage) rounds exactly the values at or below it to 0, so float16 and float32 copies give the
same codes (with the threshold at 0 the tiny positives of GeM's clamp, about 1e-8, set bits in float32 that
float16 clears). The bits only carry information when the vectors are zero-centred (whitened vectors, or a
LayerNorm head, `aml distill --head-norm layernorm`); raw GeM vectors of ReLU maps are non-negative and give
codes almost all ones (`balance_warning` says so, and when every vector gives the same code).

Their two searches are the search core's (`aml.search.search` with a uint8 database), both exact and ordered
best first with ties by ascending id:
- asymmetric: float queries scored against the codes read as +-1 vectors (`unpack_signs`), `<q, sign(x)> /
  sqrt(D)` (the cosine with the unit +-1/sqrt(D) vector), blockwise (the database is never expanded whole);
- Hamming (`hamming=True`): binarised queries against the codes by faiss `IndexBinaryFlat`, score `1 - 2
  hamming / D` (the cosine of the two +-1 vectors); `hamming_distances` is the plain numpy transcription.
Torch-free and faiss-free.
"""

from __future__ import annotations

import math

import numpy as np

from aml.errors import UserError

THRESHOLD = 2.0**-25  # bit = value > THRESHOLD: float16's rounding boundary at zero (see above)
BALANCE = (0.05, 0.95)  # a fraction of set bits outside this range: the vectors were not zero-centred
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int64)


def code_bytes(dim: int) -> int:
    """Bytes of one packed code of a `dim`-d vector."""
    return math.ceil(int(dim) / 8)


def pack_bits(x: np.ndarray, block: int = 65536) -> np.ndarray:
    """(N, D) float rows -> (N, ceil(D/8)) uint8 sign bits (bit set where the value is > THRESHOLD, compared in
    float32: the same codes from float16 and float32 copies), `block` rows at a time (a memory-mapped database is
    never read whole)."""
    if x.ndim != 2:
        raise ValueError(f"pack_bits: expected (N, D) rows, got shape {x.shape}")
    out = np.empty((x.shape[0], code_bytes(x.shape[1])), np.uint8)
    for s in range(0, x.shape[0], block):
        rows = np.asarray(x[s : s + block]).astype(np.float32, copy=False)
        out[s : s + block] = np.packbits(rows > np.float32(THRESHOLD), axis=1)
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


def same_codes(codes: np.ndarray) -> bool:
    """Whether two or more codes are all the same (every search scores every hit alike: ranks are by id)."""
    codes = np.asarray(codes, dtype=np.uint8)
    return codes.shape[0] > 1 and bool((codes == codes[:1]).all())


def balance_warning(codes: np.ndarray, dim: int, what: str) -> str | None:
    """A one-line warning when almost every bit is 1 (or 0), or every code is the same: the vectors were not
    centred at zero, so the bits carry little or nothing."""
    frac = bits_set(codes, dim)
    same = same_codes(codes)
    if BALANCE[0] <= frac <= BALANCE[1] and not same:
        return None
    what_is = "the codes carry little"
    if same:
        what_is = f"all {codes.shape[0]} codes are the same, so every hit scores alike"
    return (
        f"warning: {what}: {100 * frac:.1f}% of the bits are set and {what_is}: the vectors are not zero-centred "
        "(e.g. raw GeM vectors of ReLU maps); binarise whitened vectors (--whiten) or a model trained with a "
        "LayerNorm head (aml distill --head-norm layernorm)"
    )


def check_codes(codes: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`codes` as (N, ceil(dim/8)) uint8, or a one-line UserError naming `what`."""
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != code_bytes(dim):
        raise UserError(
            f"{what}: {codes.dtype} {codes.shape}; expected (N, {code_bytes(dim)}) uint8 packed sign bits of "
            f"{dim}-d vectors (aml extract --binary)"
        )
    return codes


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Na, Nb) int64 Hamming distances between packed codes, in numpy (popcount of the XOR by table)."""
    a, b = np.asarray(a, dtype=np.uint8), np.asarray(b, dtype=np.uint8)
    return _POPCOUNT[a[:, None, :] ^ b[None, :, :]].sum(-1)
