"""Exact search, the one search core: (queries, db) -> (scores, ids), best first, ties by ascending id.

Every search of the project goes through here: the evaluation (`aml.evaluate`), `aml search` on a flat, flat16
or binary index (`aml.index.Index.search` hands its stored vectors over), and binary codes. The database is
(N, D) float32 or float16 rows (scores in float32 on the stored values), or (N, ceil(D/8)) uint8 sign bits
(`aml.binary`) scored against float queries as <q, +-1 code> / sqrt(D), or, with `hamming`, against the
queries' own bits (faiss `IndexBinaryFlat`, score 1 - 2 hamming / D). It may come in parts (the revisitop
images, then a memory-mapped R1M distractor file), searched as their concatenation without a copy.

On the CPU a chunk of queries gets its whole (chunk, N) float32 score row (SCORE_BYTES at most), filled one
database block at a time (BLOCK_BYTES of float32: float16 and bits are converted into one reused buffer), and
`top_k` selects from it exactly: the k-th score per row is found on a sample, then confirmed, and the rows at or
above it are sorted by (score desc, id asc). On a GPU (`device` auto / cuda / cuda:N, `aml.settings`): torch
CUDA fills the same score rows on the GPU (the same `top_k` then), else faiss-gpu (IndexFlatIP per block,
through `aml.faiss_gpu`; topk up to its MAX_K). Binary codes are searched on the CPU.
Measured (benchmarks/eval_speed.py's data, 1M x 2048-d float16, 70 queries, top 10,000, one thread, the
earlier blockwise-merge search in the same process): 6.7 vs 16.6 CPU seconds, the same ranking. What is left
is the float32 GEMM (2.9e11 flops, ~5 s at one core's ~57 GFLOPS); float16 is cast by torch into one reused
buffer (0.65 s per 1M rows; numpy's cast is ~9x slower) and `top_k` costs ~0.3 s. The casts run with torch on
one thread (`_torch_one_thread`): with its OpenMP threads awake between OpenBLAS's products, both pools spun for the
same cores (2 threads on 2 cores: half the wall and CPU time, paired on a loaded machine, the same results).
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from aml.binary import check_codes, pack_bits, unpack_signs
from aml.errors import UserError
from aml.faiss_gpu import faiss_gpus, gpu_count, load_faiss, to_gpu
from aml.settings import parse_device

SCORE_BYTES = 512 << 20  # float32 scores of one query chunk against the whole database
BLOCK_BYTES = 16 << 20  # database rows converted to float32 at a time (one reused buffer)
SAMPLE = 16  # `top_k` estimates each row's k-th score on every SAMPLE-th column first

Database = np.ndarray | Sequence[np.ndarray]


def as_parts(db: Database) -> list[np.ndarray]:
    """The database as a list of (N_i, D) parts searched as their concatenation."""
    return [db] if isinstance(db, np.ndarray) else list(db)


def tie_sorted(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one tie rule: candidates ordered by score descending, ties by id ascending; missing hits (id -1) last."""
    s = np.where(i < 0, -np.inf, s).astype(np.float32)
    by_id = np.argsort(np.where(i < 0, np.iinfo(np.int64).max, i), axis=1, kind="stable")
    s, i = np.take_along_axis(s, by_id, 1), np.take_along_axis(i, by_id, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1).astype(np.int64)


def _candidates(s: np.ndarray, k: int) -> np.ndarray:
    """(Q, N) mask of every score at or above its row's k-th largest, and perhaps a few more: a threshold
    estimated on every SAMPLE-th column, with slack; a row it leaves with fewer than k gets the exact k-th
    largest (np.partition) instead."""
    n, sample = s.shape[1], s[:, ::SAMPLE]
    ks = min(sample.shape[1], k // SAMPLE + 1 + int(2 * math.sqrt(k / SAMPLE) + 8))  # a few sigma of slack
    mask = s >= np.partition(sample, sample.shape[1] - ks, axis=1)[:, sample.shape[1] - ks, None]
    short = np.flatnonzero(mask.sum(1) < k)
    if short.size:
        mask[short] = s[short] >= np.partition(s[short], n - k, axis=1)[:, n - k, None]
    return mask


def top_k(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of a full (Q, N) score matrix: the k best per row, best first, ties by id, exact."""
    q, n = s.shape
    if k >= n:
        order = np.argsort(-s, axis=1, kind="stable")  # exact float32 ties are common: keep id order
        return np.take_along_axis(s, order, 1), order
    ids, vals = np.empty((q, k), np.int64), np.empty((q, k), np.float32)
    for r, row in enumerate(_candidates(s, k)):
        cols = np.flatnonzero(row)  # every top-k score and its ties, in id order
        best = cols[np.argsort(-s[r, cols], kind="stable")[:k]]
        ids[r], vals[r] = best, s[r, best]
    return vals, ids


def _to_float32(dim: int, scale: float | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """How a stored block becomes float32 rows in `buf`: float16 through torch when it is loaded already (its cast
    is ~9x numpy's; the torch-free paths, e.g. `aml search` with an ONNX encoder, never load it for this), uint8
    codes as +-1 (`scale` is then applied to the scores)."""
    if scale is not None:
        return lambda x, buf: unpack_signs(x, dim)
    torch = sys.modules.get("torch")

    def convert(x: np.ndarray, buf: np.ndarray) -> np.ndarray:
        out = buf[: x.shape[0]]
        if x.dtype == np.float32:
            return np.ascontiguousarray(x)
        if torch is not None and x.dtype == np.float16:
            with warnings.catch_warnings():  # read-only cache memmaps: torch only reads them, but warns
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(x)))
            return out
        np.copyto(out, x, casting="unsafe")
        return out

    return convert


@contextlib.contextmanager
def _torch_one_thread() -> Iterator[None]:
    """torch on one thread while a CPU search runs (if torch is loaded), then back to its count: its float16 casts,
    between two OpenBLAS products, otherwise wake torch's OpenMP threads, which spin for the cores OpenBLAS's
    threads need next (2 threads on 2 cores: about twice the wall and CPU time). numpy's product keeps its threads."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else 1
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def _blocks(parts: list[np.ndarray], dim: int, scale: float | None, block: int | None) -> Iterator[tuple[int, Any]]:
    """(offset, float32 rows) blocks of the concatenated parts (one reused buffer)."""
    block = block or max(256, BLOCK_BYTES // (4 * dim))
    convert = _to_float32(dim, scale)
    buf = np.empty((min(block, max(p.shape[0] for p in parts)), dim), np.float32)
    offset = 0
    for part in parts:
        for a in range(0, part.shape[0], block):
            yield offset + a, convert(part[a : a + block], buf)
        offset += part.shape[0]


def _scores(q: np.ndarray, parts: list[np.ndarray], n: int, scale: float | None, block: int | None, dev: str):
    """The (Q, N) float32 scores of queries `q` against the database, on the CPU (dev '') or torch device dev."""
    if dev:
        import torch

        qt, s = torch.from_numpy(q).to(dev), torch.empty((q.shape[0], n), device=dev)
        for off, x in _blocks(parts, q.shape[1], scale, block):
            s[:, off : off + x.shape[0]] = qt @ torch.from_numpy(x).to(dev).T
        return s.cpu().numpy()
    s = np.empty((q.shape[0], n), np.float32)
    with _torch_one_thread():
        for off, x in _blocks(parts, q.shape[1], scale, block):
            s[:, off : off + x.shape[0]] = (x @ q.T).T  # measured faster than q @ x.T (OpenBLAS, M = Q small)
            if scale is not None:
                s[:, off : off + x.shape[0]] *= np.float32(scale)
    return s


def _faiss_gpu(q: np.ndarray, parts: list[np.ndarray], k: int, gpus: list[int], block: int | None):
    """(scores, ids) by faiss-gpu, one IndexFlatIP per database block, the blocks' top-k merged by `tie_sorted`."""
    faiss = load_faiss()
    best_s, best_i = np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64)
    for off, x in _blocks(parts, q.shape[1], None, block):
        index = faiss.IndexFlatIP(x.shape[1])
        index = to_gpu(faiss, index, gpus[:1])  # empty: the block goes straight to the GPU
        index.add(np.ascontiguousarray(x))
        s, i = index.search(q, min(k, x.shape[0]))
        best_s, best_i = tie_sorted(np.concatenate([best_s, s], 1), np.concatenate([best_i, i + off], 1))
        best_s, best_i = best_s[:, :k], best_i[:, :k]
    return best_s, best_i


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def search_device(device: str, k: int) -> tuple[str, list[int] | None]:
    """Where the core searches floats for `device` (auto | cpu | cuda | cuda:N): ('cpu', None), ('torch',
    [gpu]) or ('faiss', [gpu]) (faiss-gpu, when torch sees no GPU). A GPU asked for but unusable: UserError."""
    kind, gpus = parse_device(device)
    if kind == "cpu":
        return "cpu", None
    if _torch_cuda():
        return "torch", list(gpus or (0,))
    n = gpu_count(load_faiss(None))
    if n:
        faiss, _ = faiss_gpus(device, k, n_gpus=n)
        if faiss is not None:
            return "faiss", faiss[:1]
    if kind == "auto":
        return "cpu", None
    raise UserError(f"--device {device}: no CUDA device is visible (torch) and faiss sees no GPU; use --device cpu")


def hamming_search(queries: np.ndarray, index: Any, dim: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the binarised float `queries` against a faiss binary index (IndexBinaryFlat, or its GPU
    copy), score 1 - 2 hamming / D; which of several codes tied at the k-th distance come back, with k below
    the database size, is faiss's choice."""
    h, i = index.search(pack_bits(queries), k)
    return tie_sorted(1 - 2 * h.astype(np.float32) / dim, i.astype(np.int64))


def binary_index(parts: list[np.ndarray]) -> Any:
    """A faiss `IndexBinaryFlat` holding packed codes (parts added in order)."""
    index = load_faiss("install aml with faiss-cpu for Hamming search").IndexBinaryFlat(8 * parts[0].shape[1])
    for part in parts:
        index.add(np.ascontiguousarray(part, dtype=np.uint8))
    return index


def search(
    queries: np.ndarray,
    db: Database,
    k: int | None = None,
    *,
    hamming: bool = False,
    device: str = "auto",
    chunk: int | None = None,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k) float32, ids (Q, k) int64) of float `queries` (Q, D) against `db`, best first, ties by
    ascending id, exact. `db`: (N, D) float32/float16 rows, or (N, ceil(D/8)) uint8 sign bits (`hamming`:
    by the queries' own bits), or a list of such parts; `k=None` ranks the whole database. `device` (floats
    only): auto | cpu | cuda | cuda:N (`search_device`). `chunk` queries (default: SCORE_BYTES of scores) and
    `block` database rows (default: BLOCK_BYTES of float32) are processed at a time."""
    parts = as_parts(db)
    n = sum(p.shape[0] for p in parts)
    k = n if k is None else int(k)
    if not 1 <= k <= n:
        raise ValueError(f"topk={k}: must be between 1 and the database size {n}")
    queries = np.asarray(queries)
    if queries.ndim != 2:
        raise ValueError(f"queries {queries.shape}: expected (Q, D)")
    dim, binary = queries.shape[1], parts[0].dtype == np.uint8
    if binary:
        parts = [check_codes(np.asarray(p), dim, "database codes") for p in parts]
        if hamming:
            return hamming_search(queries, binary_index(parts), dim, k)
    elif hamming:
        raise ValueError("hamming: the database must be packed sign bits (uint8)")
    where, gpus = ("cpu", None) if binary else search_device(device, k)
    scale = 1 / math.sqrt(dim) if binary else None
    chunk = chunk or max(1, SCORE_BYTES // (4 * n))
    out_s, out_i = np.empty((queries.shape[0], k), np.float32), np.empty((queries.shape[0], k), np.int64)
    for a in range(0, queries.shape[0], chunk):
        q = np.ascontiguousarray(queries[a : a + chunk], dtype=np.float32)
        if where == "faiss":
            s, i = _faiss_gpu(q, parts, k, gpus, block)
        else:
            s, i = top_k(_scores(q, parts, n, scale, block, f"cuda:{gpus[0]}" if gpus else ""), k)
        out_s[a : a + q.shape[0]], out_i[a : a + q.shape[0]] = s, i
    return out_s, out_i
