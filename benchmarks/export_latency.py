"""Batch-1 query-encoding latency of each student: PyTorch eager, TorchScript, onnxruntime fp32 / fp16 / int8.

Random weights (latency does not depend on them), square inputs at each size, median of `--runs` timed runs
after `--warmup` untimed ones, every backend limited to the same number of threads. onnxruntime fp32 and int8
are timed interleaved (fp32, int8, fp32, ...: `aml.export.quant_report.paired_latency`, the export's own
check) and give the int8 / fp32 column; `int8 convs` is how many of the convolutions onnxruntime runs as int8
kernels in the optimised graph (`kernel_counts`), and `int8?` applies the export's verdict (int8 when at most
MAX_INT8_RATIO of fp32). int8 is the export's recipe, calibrated on 4 probe images. Run by hand on an idle
machine:

    .venv/bin/python benchmarks/export_latency.py --students effnet-b3 mobilenetv2 lite0 --sizes 362 512
    .venv/bin/python benchmarks/export_latency.py --smoke      # resnet18 at 64 px, D = 32: a check that it runs

The thread setting (`--threads`, through `aml.threads`) is printed in the header; the count each backend ran
with is recorded, and the table is refused when two differ.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from common import header, parse, parser, timed

from aml.errors import UserError
from aml.export.encoder import export_encoder
from aml.export.onnx_export import export_onnx
from aml.export.quant_report import cpu_description, int8_verdict, kernel_counts, paired_latency
from aml.export.quantize import quantize_int8
from aml.export.torchscript_export import export_torchscript, load_torchscript
from aml.ort_session import session
from aml.probe import probe_batch
from aml.registry import create_model
from aml.sidecar import MAX_INT8_RATIO
from aml.threads import check_comparable, intra_op_threads

STUDENTS = ("effnet-b3", "mobilenetv2", "lite0", "resnet18")
BACKENDS = ("eager", "torchscript", "ort-fp32", "ort-fp16", "ort-int8")
SMOKE = dict(students=["resnet18"], sizes=[64], dim=32, runs=2, warmup=1)


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median wall time of `fn()` in milliseconds."""
    return 1000 * timed(fn, runs, warmup)[0]


def bench_student(
    name: str, sizes: list[int], dim: int, runs: int, warmup: int, threads: int, tmp: Path
) -> dict[int, dict[str, Any]]:
    """Per size: latency (ms) per backend, the int8 / fp32 ratio and the int8 kernel counts of one student."""
    net = create_model(name, role="student", dim=dim, random_init=True).eval()
    out: dict[int, dict[str, Any]] = {}
    for size in sizes:
        x = probe_batch(size, size, seed=0, batch=1)
        xt = torch.from_numpy(x)
        row: dict[str, Any] = {}
        with torch.inference_mode():
            row["eager"] = median_ms(partial(net, xt), runs, warmup)
        enc32, _ = export_encoder(net)
        export_torchscript(enc32, tmp / f"{name}.pt", xt)
        ts = load_torchscript(tmp / f"{name}.pt")
        with torch.inference_mode():
            row["torchscript"] = median_ms(partial(ts, xt), runs, warmup)
        fp32, int8 = tmp / f"{name}-fp32.onnx", tmp / f"{name}-int8.onnx"
        export_onnx(enc32, fp32, xt)
        enc16, _ = export_encoder(net, precision="fp16")
        export_onnx(enc16, tmp / f"{name}-fp16.onnx", xt)
        quantize_int8(fp32, int8, [probe_batch(size, size, seed=s, batch=1) for s in range(1, 5)])
        sess = session(tmp / f"{name}-fp16.onnx", threads)
        row["ort-fp16"] = median_ms(partial(sess.run, None, {sess.get_inputs()[0].name: x}), runs, warmup)
        pair = paired_latency(fp32, int8, size, runs, threads, warmup)
        row["ort-fp32"], row["ort-int8"], row["ratio"] = pair["fp32_ms"], pair["int8_ms"], pair["ratio"]
        row["verdict"] = int8_verdict(pair)["recommend"]
        row["kernels"] = kernel_counts(int8)
        row["convs"] = kernel_counts(fp32)["float_conv"]
        out[size] = row
        print(f"  {name} {size}px done", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--students", nargs="+", default=list(STUDENTS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[362, 512])
    ap.add_argument("--dim", type=int, default=2048, help="projection dimension (the teacher's; AML: 2048)")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = parse(ap, SMOKE)
    setting = header(args)
    threads = intra_op_threads()
    ran = {"eager": torch.get_num_threads(), "torchscript": torch.get_num_threads(), "onnxruntime": threads}
    try:
        check_comparable(ran)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.students:
            rows[name] = bench_student(name, args.sizes, args.dim, args.runs, args.warmup, threads, Path(tmp))
    print(
        f"batch-1 latency, median of {args.runs} runs (ms); {threads} threads; D = {args.dim}; "
        f"{cpu_description()}; torch {torch.__version__}, onnxruntime {ort.__version__}\n{setting}"
    )
    head = (
        f"{'student':<12} {'size':>5} "
        + " ".join(f"{b:>12}" for b in BACKENDS)
        + f" {'int8/fp32':>10} {'int8?':>6} {'int8 convs':>11} {'Q/DQ left':>10}   best vs eager"
    )
    print(head)
    for name, res in rows.items():
        for size in args.sizes:
            r = res[size]
            ms = [r[b] for b in BACKENDS]
            best = int(np.argmin(ms))
            k = r["kernels"]
            print(
                f"{name:<12} {size:>5} "
                + " ".join(f"{m:>12.1f}" for m in ms)
                + f" {r['ratio']:>10.2f} {r['verdict']:>6} {k['int8_conv']:>5}/{r['convs']:<5}"
                + f" {k['quantize']:>4}/{k['dequantize']:<5}   {BACKENDS[best]} x{ms[0] / ms[best]:.2f}"
            )
    print(f"int8? = int8 when int8/fp32 <= {MAX_INT8_RATIO:g} (the export's recommendation), else fp32")


if __name__ == "__main__":
    main()
