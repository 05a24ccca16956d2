"""A stand-in for faiss-gpu on a machine without one: the real (CPU) faiss plus the GPU API, whose cloners record
how they were called and return CPU copies, so a GPU search gives the CPU's results."""

from __future__ import annotations

import sys

import faiss
import pytest


class FakeGpuFaiss:
    """faiss with `n` fake GPUs; `calls` lists (cloner, gpus, shard, float16, index type); `fail` (a message)
    makes every cloner raise faiss's RuntimeError."""

    def __init__(self, n: int, fail: str | None = None) -> None:
        self.n, self.fail, self.calls = n, fail, []

    def __getattr__(self, name: str):
        return getattr(faiss, name)

    def get_num_gpus(self) -> int:
        return self.n

    class StandardGpuResources:
        pass

    class GpuClonerOptions:
        useFloat16 = False

    class GpuMultipleClonerOptions(GpuClonerOptions):
        shard = False

    def _record(self, *call) -> None:
        if self.fail:
            raise RuntimeError(
                "Error in void faiss::gpu::GpuIndexIVFPQ::verifyPQSettings_() const at "
                f"/faiss/gpu/GpuIndexIVFPQ.cu:574: Error: 'bitsPerCode_ == 8' failed: {self.fail}"
            )
        self.calls.append(call)

    def index_cpu_to_gpu(self, res, gpu, index, co):
        assert isinstance(res, self.StandardGpuResources) and not hasattr(co, "shard")
        self._record("one", (gpu,), None, co.useFloat16, type(index).__name__)
        return faiss.clone_index(index)

    def index_cpu_to_gpu_multiple_py(self, resources, index, co, gpus):
        assert len(resources) == len(gpus) and all(isinstance(r, self.StandardGpuResources) for r in resources)
        self._record("multi", tuple(gpus), co.shard, co.useFloat16, type(index).__name__)
        return faiss.clone_index(index)

    def GpuIndexBinaryFlat(self, res, index):  # noqa: N802 (faiss's name)
        self._record("binary", None, None, None, type(index).__name__)
        return faiss.clone_binary_index(index)


def gpu_faiss(monkeypatch: pytest.MonkeyPatch, n: int, fail: str | None = None) -> FakeGpuFaiss:
    """Install a FakeGpuFaiss for the test: `import faiss` then finds it (and no GPU resources are cached)."""
    import aml.faiss_gpu

    monkeypatch.setattr(aml.faiss_gpu, "_RESOURCES", {})
    fake = FakeGpuFaiss(n, fail)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    return fake
