"""faiss, the one place: its loader, how many GPUs it can use here, which of them a search goes to, and the one
function that moves a faiss index onto them.

faiss-gpu (the `gpu` extra) is present when the faiss module has `StandardGpuResources`, usable when
`faiss.get_num_gpus() > 0`. `aml search` (`aml.index.Index.search`) and the search core (`aml.search`, when
faiss-gpu is its GPU) both pick their GPUs with `faiss_gpus` and move their indexes with `to_gpu`. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aml.errors import UserError
from aml.settings import parse_device

MAX_K = 2048  # faiss-gpu's k-selection limit (GPU_MAX_SELECTION_K)
_RESOURCES: dict[int, Any] = {}  # one StandardGpuResources per GPU for the process (each reserves scratch memory)


def gpu_count(faiss: Any) -> int:
    """GPUs faiss can search on: 0 without faiss-gpu (a CPU build) or without a visible GPU."""
    if faiss is None or not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def load_faiss(fix: str | None = "install aml with faiss-cpu (or the gpu extra)") -> Any:
    """The faiss module; without it, None when `fix` is None, else a one-line UserError ending in `fix`."""
    try:
        import faiss
    except ImportError:
        if fix is None:
            return None
        raise UserError(f"faiss is not installed; {fix}") from None
    return faiss


def faiss_gpus(device: str, topk: int, *, n_gpus: int, cpu_only: str = "") -> tuple[list[int] | None, str]:
    """The one GPU rule of a faiss search: which GPUs it runs on (None: the CPU) and, when auto stays on the CPU
    for a reason worth saying, that reason. `device` (`aml.settings.parse_device`, option --search-device):
    cpu; auto (every GPU faiss sees, else the CPU); cuda / cuda:N (that GPU); cuda:all (every GPU); a GPU
    device faiss cannot serve is a UserError. `cpu_only`: why this search cannot go to a GPU (''); a `topk`
    beyond faiss-gpu's MAX_K stays on the CPU too."""
    kind, want = parse_device(device, "--search-device", many=True)
    if kind == "cpu":
        return None, ""
    auto, where = kind == "auto", f"--search-device {device}"
    if n_gpus == 0:
        if auto:
            return None, ""
        raise UserError(f"{where}: faiss sees no GPU (needs faiss-gpu, the gpu extra); use --search-device cpu")
    why = cpu_only or (f"top {topk} is beyond faiss-gpu's limit of {MAX_K}" if topk > MAX_K else "")
    if why:
        if auto:
            return None, f"{why}: searching on the CPU"
        raise UserError(f"{where}: {why}; use --search-device cpu")
    if want is not None and want[0] >= n_gpus:
        raise UserError(f"{where}: faiss sees {n_gpus} GPU(s) (0..{n_gpus - 1}); pick one of them or cuda:all")
    return list(want) if want is not None else list(range(n_gpus)), ""


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
