"""Whether an int8 encoder pays on onnxruntime's CPU provider: the kernels of the graph it really runs, and a
paired fp32 / int8 latency with the verdict the export records (torch-free).

onnxruntime rewrites a QDQ model when it loads it (level ALL): a DequantizeLinear -> Conv -> QuantizeLinear
group becomes one int8 QLinearConv only when its pattern and types allow, otherwise the Conv runs in float
between the Q / DQ nodes. `kernel_counts` counts what is left in that optimised graph
(SessionOptions.optimized_model_filepath), so "how many convolutions run as int8 kernels" is measured, not
assumed.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from aml.ort_session import session
from aml.sidecar import INPUT, LATENCY_RUNS, MAX_INT8_RATIO

INT8_CONVS = ("QLinearConv", "ConvInteger")  # onnxruntime's int8 convolution kernels (any domain)
FLOAT_CONVS = ("Conv", "FusedConv", "NhwcFusedConv")  # float ones (incl. com.microsoft.nchwc.Conv)
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")  # the CPU features onnxruntime's int8 kernels use


def optimized_ops(model: str | os.PathLike) -> Counter[str]:
    """Operator types (domain dropped) of the graph onnxruntime's CPU provider runs for `model`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(model, 1, optimized=out)
        return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def kernel_counts(model: str | os.PathLike) -> dict[str, int]:
    """Convolutions running as int8 / float kernels and the Quantize / Dequantize / Transpose nodes left in the
    optimised graph of `model`."""
    ops = optimized_ops(model)
    return {
        "int8_conv": sum(ops[k] for k in INT8_CONVS),
        "float_conv": sum(ops[k] for k in FLOAT_CONVS),
        "quantize": ops["QuantizeLinear"],
        "dequantize": ops["DequantizeLinear"],
        "transpose": ops["Transpose"],
    }


def paired_latency(
    fp32: str | os.PathLike,
    int8: str | os.PathLike,
    size: int,
    runs: int = LATENCY_RUNS,
    threads: int = 1,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Median batch-1 latency (ms) of the two models on one square image of side `size`, runs interleaved
    (fp32, int8, fp32, ...) after `warmup` untimed ones, so that a change of machine load hits both; the
    ratio is int8 / fp32."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs {runs}, warmup {warmup}; expected runs >= 1, warmup >= 0")
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k in range(warmup + runs):
        for name, sess in sessions.items():
            t = clock()
            sess.run(None, {INPUT: x})
            dt = clock() - t
            if k >= warmup:
                times[name].append(dt)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    return {
        "fp32_ms": ms["fp32"],
        "int8_ms": ms["int8"],
        "ratio": ms["int8"] / ms["fp32"],
        "size": int(size),
        "batch": 1,
        "runs": int(runs),
        "threads": int(threads),
        "cpu": cpu_description(),
    }


def int8_verdict(latency: dict[str, Any], max_ratio: float = MAX_INT8_RATIO) -> dict[str, Any]:
    """Recommend int8 when its measured latency is at most `max_ratio` of fp32's, else fp32, with the numbers."""
    pays = bool(latency["ratio"] <= max_ratio)
    nums = (
        f"int8 {latency['int8_ms']:.1f} ms vs fp32 {latency['fp32_ms']:.1f} ms = {latency['ratio']:.2f}x "
        f"(batch 1, {latency['size']} px, {latency['threads']} thread{'s' if latency['threads'] != 1 else ''}, "
        f"median of {latency['runs']})"
    )
    if pays:
        message = f"int8 pays here: {nums} <= {max_ratio:g}x"
    else:
        message = (
            f"int8 does not pay here: {nums} > {max_ratio:g}x; recommend --precision fp32 for this student "
            "on this machine"
        )
    return {"recommend": "int8" if pays else "fp32", "max_ratio": max_ratio, "message": message}


def cpu_description() -> str:
    """CPU model, core count and the int8-relevant instruction sets (Linux /proc/cpuinfo; else the platform)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    isa = " ".join(f for f in INT8_FLAGS if f in flags) or "unknown"
    return f"{model}, {os.cpu_count()} CPU threads, int8 ISA: {isa}"
