"""Batch-1 query-encoding latency of each student: PyTorch eager, TorchScript, onnxruntime fp32 / fp16 / int8.

Random weights (latency does not depend on them), square inputs at each size, median of `--runs` timed runs
after `--warmup` untimed ones, every backend on the same intra-op thread count (`--threads`, through
`aml.threads`; printed in the header). The count each backend actually ran with is recorded, and no
"best vs eager" ratio is printed between two that differ. Run by hand:

    .venv/bin/python benchmarks/export_latency.py --runs 20 --sizes 362 512 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aml.errors import UserError  # noqa: E402
from aml.export.encoder import export_encoder  # noqa: E402
from aml.export.onnx_export import export_onnx  # noqa: E402
from aml.export.quantize import quantize_int8  # noqa: E402
from aml.export.torchscript_export import export_torchscript, load_torchscript  # noqa: E402
from aml.export.verify import probe_batch  # noqa: E402
from aml.onnx_embed import session  # noqa: E402
from aml.registry import create_model  # noqa: E402
from aml.threads import HELP, benchmark_threads, check_comparable  # noqa: E402

STUDENTS = ("effnet-b3", "mobilenetv2", "lite0", "resnet18")
BACKENDS = ("eager", "torchscript", "ort-fp32", "ort-fp16", "ort-int8")


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    """Median wall time of `fn()` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench_student(
    name: str, sizes: list[int], dim: int, runs: int, warmup: int, tmp: Path
) -> tuple[dict[tuple[int, str], float], dict[str, int]]:
    """Latency (ms) per (size, backend) of one student, and the intra-op threads each backend ran with."""
    net = create_model(name, role="student", dim=dim, random_init=True).eval()
    out: dict[tuple[int, str], float] = {}
    threads = {"eager": torch.get_num_threads(), "torchscript": torch.get_num_threads()}
    for size in sizes:
        x = probe_batch(size, size, seed=0, batch=1)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            out[size, "eager"] = median_ms(partial(net, xt), runs, warmup)
        enc32, _ = export_encoder(net)
        export_torchscript(enc32, tmp / f"{name}.pt", xt)
        ts = load_torchscript(tmp / f"{name}.pt")
        with torch.inference_mode():
            out[size, "torchscript"] = median_ms(partial(ts, xt), runs, warmup)
        export_onnx(enc32, tmp / f"{name}-fp32.onnx", xt)
        enc16, _ = export_encoder(net, precision="fp16")
        export_onnx(enc16, tmp / f"{name}-fp16.onnx", xt)
        calib = [probe_batch(size, size, seed=s, batch=1) for s in range(1, 5)]
        quantize_int8(tmp / f"{name}-fp32.onnx", tmp / f"{name}-int8.onnx", calib)
        for prec in ("fp32", "fp16", "int8"):
            sess = session(tmp / f"{name}-{prec}.onnx")
            threads[f"ort-{prec}"] = sess.get_session_options().intra_op_num_threads
            feed = {sess.get_inputs()[0].name: x}
            out[size, f"ort-{prec}"] = median_ms(partial(sess.run, None, feed), runs, warmup)
        print(f"  {name} {size}px done", file=sys.stderr, flush=True)
    return out, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", nargs="+", default=list(STUDENTS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[362, 512])
    ap.add_argument("--dim", type=int, default=2048, help="projection dimension (the teacher's; AML: 2048)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, help=HELP)
    args = ap.parse_args()
    setting = benchmark_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.students:
            rows[name] = bench_student(name, args.sizes, args.dim, args.runs, args.warmup, Path(tmp))
    print(f"batch-1 latency, median of {args.runs} runs (ms); D = {args.dim}; torch {torch.__version__}")
    print(setting)
    head = f"{'student':<12} {'size':>5} " + " ".join(f"{b:>12}" for b in BACKENDS) + "   best vs eager"
    print(head)
    for name, (res, threads) in rows.items():
        for size in args.sizes:
            ms = [res[size, b] for b in BACKENDS]
            best = BACKENDS[int(np.argmin(ms))]
            row = f"{name:<12} {size:>5} " + " ".join(f"{m:>12.1f}" for m in ms)
            try:
                check_comparable({"eager": threads["eager"], best: threads[best]})
            except UserError as e:
                print(row, flush=True)
                raise SystemExit(f"error: {name} {size}px: {e}") from None
            print(f"{row}   {best} x{res[size, 'eager'] / res[size, best]:.2f}")


if __name__ == "__main__":
    main()
