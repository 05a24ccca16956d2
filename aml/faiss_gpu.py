"""faiss on GPUs: how many faiss can use here, and the one function that moves a faiss index onto them.

faiss-gpu (the `gpu` extra) is present when the faiss module has `StandardGpuResources`, usable when
`faiss.get_num_gpus() > 0`. `aml search` (`aml.index.Index.search`) and the evaluation search (`aml.search`,
backend faiss-gpu) both move their indexes with `to_gpu`. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aml.errors import UserError

MAX_K = 2048  # faiss-gpu's k-selection limit (GPU_MAX_SELECTION_K)
_RESOURCES: dict[int, Any] = {}  # one StandardGpuResources per GPU for the process (each reserves scratch memory)


def gpu_count(faiss: Any) -> int:
    """GPUs faiss can search on: 0 without faiss-gpu (a CPU build) or without a visible GPU."""
    if faiss is None or not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def parse_device(device: str, option: str = "--search-device") -> int | None | str:
    """'auto', 'cpu', None (cuda: every GPU) or N (cuda:N: that GPU) from a device string; else a UserError."""
    if device in ("auto", "cpu"):
        return device
    if device == "cuda":
        return None
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise UserError(f"{option} {device}: expected auto, cpu, cuda (every GPU) or cuda:N")


def resources(faiss: Any, gpu: int) -> Any:
    """The process's StandardGpuResources of GPU `gpu` (created once: it reserves scratch memory)."""
    if gpu not in _RESOURCES:
        _RESOURCES[gpu] = faiss.StandardGpuResources()
    return _RESOURCES[gpu]


def to_gpu(faiss: Any, index: Any, gpus: Sequence[int], *, float16: bool = False) -> Any:
    """A GPU copy of CPU faiss `index` on `gpus`: one GPU with `index_cpu_to_gpu`; several with
    `index_cpu_to_gpu_multiple_py`, `shard=True` (each GPU holds a contiguous slice of the vectors, IVF lists
    split across them; faiss merges the results). `float16`: float16 vectors (flat; queries are rounded to
    float16 too) or float16 lookup tables (IVFPQ: needed for many sub-quantizers). A binary flat index goes to
    the first GPU (`GpuIndexBinaryFlat`). What faiss-gpu cannot hold raises faiss's RuntimeError."""
    if not gpus:
        raise ValueError("to_gpu: no GPU given")
    if isinstance(index, faiss.IndexBinary):
        return faiss.GpuIndexBinaryFlat(resources(faiss, gpus[0]), index)
    if len(gpus) == 1:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = float16
        return faiss.index_cpu_to_gpu(resources(faiss, gpus[0]), gpus[0], index, co)
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = float16
    co.shard = True
    return faiss.index_cpu_to_gpu_multiple_py([resources(faiss, g) for g in gpus], index, co, list(gpus))
