"""Exact nearest-neighbour search by inner product: the (Q, topk) ranking that scoring consumes.

The database may be float16 (half the memory; scores are computed in float32 on its float16 values) and may
be given in parts (e.g. the revisitop images, then a memory-mapped R1M distractor file) that are searched as
one concatenated database without copying. Memory stays bounded: queries go in chunks of `chunk` rows and
the database in blocks of `block` rows, each block's top-k merged into a running top-k.

Backends, all exact: faiss-gpu (IndexFlatIP on the first GPU through `aml.faiss_gpu.to_gpu`, when faiss-gpu
and a GPU are present and topk <= 2048), torch-cuda, numpy (BLAS matmul + argpartition), faiss (CPU
IndexFlatIP, on request: no faster than numpy on this project's 2-core machine, 100k x 2048-d full ranking
1.76 vs 1.63 s; benchmarks/eval_speed.py). The result is sorted by descending score, ties broken by ascending
database index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from aml.errors import UserError
from aml.faiss_gpu import MAX_K, gpu_count, to_gpu

BLOCK_BYTES = 64 << 20  # database rows converted to float32 at a time


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


BACKENDS = ("faiss-gpu", "faiss", "torch-cuda", "torch", "numpy")


def pick_backend(backend: str = "auto", device: str = "auto", topk: int = 1) -> str:
    """Which backend `search` uses: `backend` when given (one of BACKENDS), else one for the torch `device`
    (auto: faiss-gpu or torch-cuda when a GPU is present, else numpy; cpu: numpy; cuda[:N]: torch-cuda).
    An unknown or unavailable choice is a UserError."""
    faiss = _faiss()
    if backend != "auto":
        if backend not in BACKENDS:
            raise UserError(f"search backend '{backend}': expected auto or one of {', '.join(BACKENDS)}")
        if backend.startswith("faiss") and faiss is None:
            raise UserError(f"search backend '{backend}': faiss is not installed; use backend numpy")
        if backend == "faiss-gpu" and gpu_count(faiss) == 0:
            raise UserError(f"search backend '{backend}': faiss sees no GPU (needs faiss-gpu); use backend numpy")
        if backend == "faiss-gpu" and topk > MAX_K:
            raise UserError(f"search backend '{backend}': topk {topk} > {MAX_K}, its limit; use numpy")
        if backend == "torch-cuda" and not _torch_cuda():
            raise UserError(f"search backend '{backend}': no CUDA device is available; use backend numpy")
        return backend
    if device == "auto":
        if gpu_count(faiss) > 0 and topk <= MAX_K:
            return "faiss-gpu"
        return "torch-cuda" if _torch_cuda() else "numpy"
    if device == "cpu":
        return "numpy"
    if device.startswith("cuda"):
        if not _torch_cuda():
            raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
        return "torch-cuda"
    raise UserError(f"--device {device}: expected auto, cpu or cuda[:N]")


def _as_float32(x: np.ndarray) -> np.ndarray:
    """Contiguous float32 rows; float16 goes through torch, whose conversion is several times numpy's."""
    if x.dtype == np.float16:
        try:
            import torch
        except ImportError:
            pass
        else:
            import warnings

            with warnings.catch_warnings():  # read-only cache memmaps: torch only reads them, but warns
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _blocks(parts: Sequence[np.ndarray], block: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, float32 rows) blocks of the concatenated parts."""
    offset = 0
    for part in parts:
        for s in range(0, part.shape[0], block):
            yield offset + s, _as_float32(part[s : s + block])
        offset += part.shape[0]


def _merge(
    best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best (score, index) pairs per row of two candidate sets (unordered)."""
    s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
    if s.shape[1] > k:
        keep = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return s, i


def _sorted(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order candidates by score descending, ties by database index ascending (index sort, then stable)."""
    by_index = np.argsort(i, axis=1)
    s, i = np.take_along_axis(s, by_index, 1), np.take_along_axis(i, by_index, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _block_topk_numpy(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    if k < s.shape[1]:
        idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
        return np.take_along_axis(s, idx, 1), idx
    return s, np.broadcast_to(np.arange(s.shape[1]), s.shape)


def _block_topk_faiss(q: np.ndarray, x: np.ndarray, k: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss()
    index = faiss.IndexFlatIP(x.shape[1])
    if gpu:
        index = to_gpu(faiss, index, [0])  # empty: the block goes straight to the GPU
    index.add(x)
    s, i = index.search(q, min(k, x.shape[0]))
    return s, i.astype(np.int64)


def _search_torch(
    q: np.ndarray, parts: Sequence[np.ndarray], k: int, block: int, device: str
) -> tuple[np.ndarray, np.ndarray]:
    import torch

    qt = torch.from_numpy(q).to(device)
    best_s = torch.empty(q.shape[0], 0, device=device)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=device)
    for off, x in _blocks(parts, block):
        s = qt @ torch.from_numpy(x).to(device).T
        s, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i + off], 1)
        best_s, sel = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_i = torch.gather(i, 1, sel)
    return _sorted(best_s.cpu().numpy(), best_i.cpu().numpy())  # deterministic tie order


def _search_cpu(
    q: np.ndarray, parts: Sequence[np.ndarray], k: int, n: int, block: int, backend: str
) -> tuple[np.ndarray, np.ndarray]:
    if k == n:  # the whole ranking: every score into one matrix, one sort
        s = np.empty((q.shape[0], n), np.float32)
        for off, x in _blocks(parts, block):
            s[:, off : off + x.shape[0]] = q @ x.T
        order = np.argsort(-s, axis=1, kind="stable")  # exact float32 ties are common: keep index order
        return np.take_along_axis(s, order, 1), order
    s, i = np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64)
    for off, x in _blocks(parts, block):
        if backend == "numpy" or k >= x.shape[0]:  # nothing to select in this block: plain matmul
            bs, bi = _block_topk_numpy(q, x, k)
        else:
            bs, bi = _block_topk_faiss(q, x, k, gpu=backend == "faiss-gpu")
        s, i = _merge(s, i, bs, bi + off, k)
    return _sorted(s, i)


def search(
    db: np.ndarray | Sequence[np.ndarray],
    queries: np.ndarray,
    topk: int | None = None,
    *,
    chunk: int = 256,
    block: int | None = None,
    device: str = "auto",
    backend: str = "auto",
    return_scores: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Top-`topk` database indices (Q, topk) int64 per query by descending inner product, exact.

    `device` is a torch device (auto | cpu | cuda[:N]) and `backend` an explicit backend (see `pick_backend`).
    `db`: (N, D) float32/float16 array, or a list of such arrays searched as their concatenation;
    `topk=None` ranks the whole database. `chunk` queries and `block` database rows (default: 64 MiB of
    float32) are processed at a time; the full ranking keeps a (chunk, N) float32 score matrix.
    """
    parts = [db] if isinstance(db, np.ndarray) else list(db)
    n = sum(p.shape[0] for p in parts)
    k = n if topk is None else int(topk)
    if not 1 <= k <= n:
        raise ValueError(f"topk={topk}: must be between 1 and the database size {n}")
    queries = np.asarray(queries)
    block = block or max(1024, BLOCK_BYTES // (4 * queries.shape[1]))
    backend = pick_backend(backend, device, k)
    out_s = np.empty((queries.shape[0], k), np.float32)
    out_i = np.empty((queries.shape[0], k), np.int64)
    for a in range(0, queries.shape[0], chunk):
        q = np.ascontiguousarray(queries[a : a + chunk], dtype=np.float32)
        if backend.startswith("torch"):
            dev = "cuda" if backend == "torch-cuda" else "cpu"
            s, i = _search_torch(q, parts, k, block, device if device.startswith("cuda") else dev)
        else:
            s, i = _search_cpu(q, parts, k, n, block, backend)
        out_s[a : a + q.shape[0]], out_i[a : a + q.shape[0]] = s, i
    return (out_i, out_s) if return_scores else out_i
