"""On-device formats side by side: onnxruntime fp32 / int8 and ExecuTorch (XNNPACK) fp32 / int8, per student.

For each student, the export-ready encoder (`aml.export.encoder.export_encoder`) is written four ways by the
exporters `aml export` uses (ONNX + `aml.export.quantize`, `aml.export.executorch_format`), int8 calibrated on CALIB
real training images (UKBench objects 0-149). Then, at each thread count, batch-1 latency at `--size` (square), the
four models timed interleaved (one run of each in turn, so a change of machine load hits them alike), the median of
`--runs` after `--warmup`; onnxruntime sessions and the ExecuTorch threadpool get the same count. That timing is
repeated `--repeats` times with fresh sessions (two-thread figures vary from one run to the next on this VM:
mobilenetv2's onnxruntime int8 / fp32 has read 0.46 and 0.77 in two runs of the same command); each figure is the
median over the repeats, each ratio the median of the repeats' ratios to their own onnxruntime fp32. Last, the fp32
gate (probe vectors vs torch) and the asymmetric mAP of every format on a real test set (UKBench objects 150-249:
400 queries, each against the other 399) against a fixed database: the float32 torch student's own vectors, since no
distilled checkpoint ships with the project (`--checkpoint`-free); the mAP column is what the export's retrieval
gate compares (within 1 point of the torch fp32 student).

Students: lite0 from its bundled ImageNet weights, mobilenetv2 and effnet-b3 from random weights (none installable
offline) with BatchNorm statistics re-estimated on the calibration images, so vectors depend on the input.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mobile_latency.py            # writes results/mobile_latency.txt
    .venv/bin/python benchmarks/mobile_latency.py --smoke      # tiny: resnet18, static 64 px, 1 run
    .venv/bin/python benchmarks/mobile_latency.py --students lite0 --formats pte-int8 --threads 1 --runs 1 \
        --out /tmp/m.txt                                                      # one format's mAP (and ort-fp32's)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aml.export import verify  # noqa: E402
from aml.export.encoder import export_encoder, reference_encoder  # noqa: E402
from aml.export.executorch_format import export_pte  # noqa: E402
from aml.export.onnx_export import export_onnx  # noqa: E402
from aml.export.pipeline import calibration_batches, torch_runner  # noqa: E402
from aml.export.quant_report import cpu_description  # noqa: E402
from aml.export.quantize import quantize_int8  # noqa: E402
from aml.io import atomic_write  # noqa: E402
from aml.onnx_embed import embed_images, session  # noqa: E402
from aml.pte_embed import pte_runner  # noqa: E402
from aml.registry import create_model  # noqa: E402
from aml.sidecar import pad_static  # noqa: E402
from aml.threads import benchmark_threads  # noqa: E402
from aml.train.batchnorm import estimate_batchnorm  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "mobile_latency.txt"
UKBENCH = REPO.parent / "shared" / "data" / "ukbench" / "groups.csv"
STUDENTS = ("lite0", "mobilenetv2", "effnet-b3")
RANDOM = {"lite0": False, "mobilenetv2": True, "effnet-b3": True}  # random weights where none are bundled
FORMATS = ("ort-fp32", "ort-int8", "pte-fp32", "pte-int8")
CALIB = 32


def interleaved_ms(runners: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, float]:
    """Median wall time (ms) of each callable, run in turn (a, b, c, a, b, c, ...) after `warmup` rounds."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for k in range(warmup + runs):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn()
            if k >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def test_set(smoke: bool, tmp: Path) -> tuple[Any, list[str]]:
    """(revisitop-layout test set, calibration image paths): UKBench, or a tiny synthetic set with --smoke."""
    from aml.data.revisitop import load_revisitop
    from aml.data.spec import parse_data_spec

    if smoke or not UKBENCH.is_file():
        from aml.data.synth import SynthConfig, generate_synth

        cfg = SynthConfig(landmarks=4, views=2, val_landmarks=1, test_landmarks=3, db_views=2, distractors=0, size=96)
        root = generate_synth(tmp / "synth", cfg)
        bundle = parse_data_spec(f"synth:{root}")
    else:
        bundle = parse_data_spec(f"groups:{UKBENCH}")
    return load_revisitop(*bundle.test), list(bundle.train.paths)


def build(name: str, dim: int, calib: list[np.ndarray]) -> torch.nn.Module:
    """The student network, eval mode; random-weight ones get BatchNorm statistics from the calibration images."""
    net = create_model(name, role="student", dim=dim, random_init=RANDOM.get(name, True))
    if RANDOM.get(name, True):
        chunks = [[torch.from_numpy(c[0]) for c in calib[i : i + 8]] for i in range(0, min(len(calib), 16), 8)]
        estimate_batchnorm(net, chunks, torch.device("cpu"))
    return net.eval().requires_grad_(False)


def export_all(
    net: torch.nn.Module,
    size: int,
    calib: list[np.ndarray],
    tmp: Path,
    formats: tuple[str, ...] = FORMATS,
    static_shape: bool = False,
) -> dict[str, Path]:
    """The models of `net` in `tmp` named in `formats` (ort-fp32 always: the ratios' base): ONNX fp32 / int8
    (aml export's recipe) and .pte fp32 / int8."""
    enc, _ = export_encoder(net)
    if static_shape:  # the calibration images as the static graph takes every input (aml.sidecar.pad_static)
        calib = [pad_static(c, size) for c in calib]
    formats = tuple(f for f in FORMATS if f in formats or f == "ort-fp32")
    paths = {f: tmp / f"{f}{'.onnx' if f.startswith('ort') else '.pte'}" for f in formats}
    example = torch.from_numpy(verify.probe_batch(size, size, seed=99, batch=1))
    export_onnx(enc, paths["ort-fp32"], example, static_shape=static_shape)
    if "ort-int8" in paths:
        quantize_int8(paths["ort-fp32"], paths["ort-int8"], calib)
    for precision in ("fp32", "int8"):
        if f"pte-{precision}" in paths:
            export_pte(enc, size, precision, lambda: calib, paths[f"pte-{precision}"], static_shape)
    return paths


def summarise(repeats: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(median ms over the repeats, each repeat's ratio to ort-fp32) of one student at one thread count."""
    ms = {f: statistics.median(r[f] for r in repeats) for f in repeats[0]}
    ratios = {f: [r[f] / r["ort-fp32"] for r in repeats] for f in repeats[0]}
    return ms, ratios


def padded(run: verify.Runner, size: int) -> verify.Runner:
    """`run` on batches padded to size x size (`aml.sidecar.pad_static`), as a static-shape model takes them."""
    return lambda x: run(pad_static(x, size))


def runner(fmt: str, path: Path, threads: int) -> verify.Runner:
    if fmt.startswith("pte"):
        return pte_runner(path, threads)
    sess = session(path, threads)
    return lambda x: sess.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})[0]


def bench_student(name: str, args: argparse.Namespace, ds: Any, calib_paths: list[str], tmp: Path) -> dict:
    """Latency per thread count, the fp32 gates and the mAP of every format of one student."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    calib = calibration_batches(calib_paths, args.size, mean, std, CALIB)
    net = build(name, args.dim, calib)
    paths = export_all(net, args.size, calib, tmp, tuple(args.formats), args.static_shape)
    x = verify.probe_batch(args.size, args.size, seed=0, batch=1)
    row: dict[str, Any] = {"latency": {}, "size_mb": {f: p.stat().st_size / 2**20 for f, p in paths.items()}}
    for threads in args.threads:
        repeats = []
        for _ in range(args.repeats):  # fresh sessions each time: one run's thread placement is not the figure
            runs = {f: runner(f, p, threads) for f, p in paths.items()}
            repeats.append(interleaved_ms({f: (lambda r=r: r(x)) for f, r in runs.items()}, args.runs, args.warmup))
            del runs
        row["latency"][threads] = repeats
    ref = torch_runner(reference_encoder(net))
    runs = {f: runner(f, p, args.threads[0]) for f, p in paths.items()}
    if args.static_shape:  # every runner, torch included, sees the padded input a static model takes
        ref, runs = padded(ref, args.size), {f: padded(r, args.size) for f, r in runs.items()}
    row["gate"] = {
        f: verify.equivalence(ref, runs[f], args.size, gate=True, static_shape=args.static_shape)["passed"]
        for f in paths
        if "32" in f
    }
    kw = dict(image_size=args.size, mean=mean, std=std, bbxs=ds.bbxs)
    q_ref = embed_images(ref, ds.query_paths(), **kw)
    same = ds.db_paths() == ds.query_paths()  # UKBench: every image a query against the others
    db = q_ref if same else embed_images(ref, ds.db_paths(), image_size=args.size, mean=mean, std=std)
    row["map"] = {f: verify.retrieval(ds, db, q_ref, embed_images(r, ds.query_paths(), **kw)) for f, r in runs.items()}
    print(f"  {name} done", file=sys.stderr, flush=True)
    return row


def report(rows: dict[str, dict], args: argparse.Namespace, ds: Any) -> str:
    """The results table: ms and ratio to onnxruntime fp32 per thread count, size, gate, mAP M."""
    lines = [
        f"batch-1 latency at {args.size}x{args.size}{' (static shape)' if args.static_shape else ''}, median of "
        f"{args.runs} interleaved runs, {args.repeats} repeats with fresh sessions (ms: median over the repeats), "
        f"D = {args.dim}; {cpu_description()}; torch {torch.__version__}",
        "ratios: the median over the repeats of each repeat's ratio to its own ort-fp32; fastest: by that ratio, "
        "[its lowest - highest repeat]",
        f"asymmetric mAP (M) on {ds.name}: {len(ds.qimlist)} queries against the torch fp32 student's database",
        f"{'student':<12} {'thr':>3} " + " ".join(f"{f:>9}" for f in FORMATS) + "   " + " ".join(
            f"{f + '/fp32':>13}" for f in FORMATS[1:]
        ) + "   fastest",
    ]  # fmt: skip
    for name, row in rows.items():
        for threads, repeats in row["latency"].items():
            ms, each = summarise(repeats)
            ratio = {f: statistics.median(v) for f, v in each.items()}
            best = min(ratio, key=ratio.get)
            ratios = " ".join(f"{ratio[f]:>13.2f}" if f in ms else f"{'-':>13}" for f in FORMATS[1:])
            lines.append(
                f"{name:<12} {threads:>3} " + " ".join(f"{ms[f]:>9.1f}" if f in ms else f"{'-':>9}" for f in FORMATS)
                + f"   {ratios}   {best} x{ratio[best]:.2f} [{min(each[best]):.2f}-{max(each[best]):.2f}]"
            )  # fmt: skip
        maps = row["map"]
        ref = next(iter(maps.values()))["student_fp32_mAP"]["M"]
        lines.append(
            f"{name:<12}     size MB " + " ".join(f"{f} {mb:.1f}" for f, mb in row["size_mb"].items())
            + f"; fp32 gates {'passed' if all(row['gate'].values()) else 'FAILED'} ({', '.join(row['gate'])})"
        )  # fmt: skip
        lines.append(
            f"{name:<12}     mAP M torch fp32 {ref:.2f}; "
            + ", ".join(f"{f} {m['exported_mAP']['M']:.2f} ({m['max_mAP_difference']:.2f})" for f, m in maps.items())
            + " (max |diff| over E/M/H)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", nargs="+", default=list(STUDENTS))
    ap.add_argument("--size", type=int, default=362)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts, each measured")
    ap.add_argument("--dim", type=int, default=2048, help="projection dimension (the teacher's; AML: 2048)")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="ort-fp32 is always run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    ap.add_argument("--repeats", type=int, default=5, help="timings with fresh sessions (2-thread ones vary)")
    ap.add_argument("--static-shape", action="store_true", help="height and width fixed to --size (aml export's)")
    ap.add_argument(
        "--smoke", action="store_true", help="resnet18 at 64 px, static shape, D 32, 1 run, synthetic test set"
    )
    ap.add_argument("--out", type=Path, help=f"results file (default {RESULTS.relative_to(REPO)}; none with --smoke)")
    args = ap.parse_args()
    if args.smoke:
        args.students, args.size, args.dim, args.runs, args.warmup, args.repeats = ["resnet18"], 64, 32, 1, 0, 1
        # ExecuTorch lowers a static graph in about 2/3 of the dynamic one's time, and resnet18's short graph (random
        # weights) in about half of mobilenetv2's (tests/test_mobile.py lowers the three students themselves)
        args.static_shape = True
    setting = benchmark_threads(None)  # the process's own; each measurement sets its thread count explicitly
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        ds, calib_paths = test_set(args.smoke, Path(tmp))
        for name in args.students:
            d = Path(tmp) / name
            d.mkdir()
            rows[name] = bench_student(name, args, ds, calib_paths, d)
    text = setting + "\n" + report(rows, args, ds)
    print(text, end="")
    out = args.out or (None if args.smoke else RESULTS)
    if out is not None:
        with atomic_write(out) as f:
            f.write(text)


if __name__ == "__main__":
    main()
