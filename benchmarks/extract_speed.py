"""Images/s of `aml.extract.extract` on each backend (torch; onnxruntime on the model's cached fp32 ONNX graph)
against the plain per-image batch-size-1 torch loop, same images and settings, interleaved in one run; medians
of repeats; the vectors of each variant compared with the loop's (max |difference|, must be <= 1e-5). The thread
setting (`--threads`, through `aml.threads`) is printed; the threads each variant ran with are recorded and no
ratio is printed between variants that ran with different counts.

    .venv/bin/python benchmarks/extract_speed.py --model lite2 --image-size 362 --n 100
    .venv/bin/python benchmarks/extract_speed.py --smoke   # random resnet18, 6 synthetic images: a check that it runs

The onnxruntime rows are timed with the graph already exported (the one-off export, printed on its own, is
what a first run on a model pays; the ONNX cache in $AML_HOME/cache/onnx makes it once per model state).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, header, parse, parser
from PIL import Image

from aml import ort_backend
from aml.allocator import keep_freed_memory
from aml.data.images import load_image
from aml.errors import UserError
from aml.extract import ExtractSettings, extract, resolve_device, to_tensor
from aml.registry import create_model
from aml.threads import check_comparable

UKBENCH = REPO.parent / "shared" / "data" / "ukbench" / "jpg"
PARITY = 1e-5
SMOKE = dict(model="resnet18", random_init=True, image_size=48, n=6, repeats=1, batch_size=4, workers=0, device="cpu")


def image_paths(n: int, folder: Path, real: bool = True) -> tuple[list[str], str]:
    """The first n UKBench jpgs (`real` and present), or n synthetic 320x240 / 240x320 jpgs."""
    real = sorted(UKBENCH.glob("*.jpg"))[:n] if real and UKBENCH.is_dir() else []
    if len(real) == n:
        return [str(p) for p in real], f"UKBench {UKBENCH}"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = (240, 320) if i % 4 else (320, 240)
        p = folder / f"synth{i:04d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths, "synthetic 320x240 / 240x320 jpgs"


def per_image_loop(model, paths: list[str], size: int, device: torch.device) -> np.ndarray:
    """The baseline: load, normalise and embed one image at a time (cirtorch's extract_vectors)."""
    out = []
    with torch.inference_mode():
        for p in paths:
            x = to_tensor(load_image(p, size), model.mean, model.std)[None].to(device)
            out.append(model(x)[0].float().cpu().numpy())
    return np.stack(out)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default="lite2")
    ap.add_argument("--weights")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--image-size", type=int, default=362)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=-1, help="-1: extract's automatic choice (torch backend)")
    ap.add_argument("--device", default="auto")
    args = parse(ap, SMOKE)
    keep_freed_memory()  # as the `aml` CLI does; both variants run under it
    setting = header(args)
    device = resolve_device(args.device)
    model = create_model(args.model, weights=args.weights, random_init=args.random_init).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = image_paths(args.n, Path(tmp), real=not args.smoke)
        print(
            f"{args.model} at {args.image_size} px on {device}, {len(paths)} images ({source}), "
            f"batch {args.batch_size}, workers {args.workers}\n{setting}"
        )

        def settings(backend: str, workers: int = args.workers) -> ExtractSettings:
            return ExtractSettings(
                args.image_size, batch_size=args.batch_size, workers=workers, device=str(device), progress=False,
                backend=backend,
            )  # fmt: skip

        backends = ["torch"] + (["onnxruntime"] if device.type == "cpu" and ort_backend.available() else [])
        # warm-up (first-call kernel selection) and, for onnxruntime, the one-off export, timed on its own
        extract(model, paths[:8], settings("torch", workers=0))
        if "onnxruntime" in backends:
            digest = ort_backend.model_digest(model)
            (ort_backend.cache_dir() / f"{digest}.onnx").unlink(missing_ok=True)  # time a real export
            ort_backend._memo.clear()
            t = time.perf_counter()
            fwd = ort_backend.ort_forward(model.eval().to(memory_format=torch.channels_last), required=True)
            total = time.perf_counter() - t
            print(f"  onnxruntime one-off: export {fwd.export_s:.1f} s, with session and probe check {total:.1f} s")
            extract(model, paths[:8], settings("onnxruntime"))
        rates: dict[str, list[float]] = {"per-image bs=1": [], **{f"extract {b}": [] for b in backends}}
        diffs: dict[str, float] = {}
        threads: dict[str, set[int]] = {k: set() for k in rates}  # the threads each variant ran with
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref = per_image_loop(model, paths, args.image_size, device)
            rates["per-image bs=1"].append(len(paths) / (time.perf_counter() - t))
            threads["per-image bs=1"].add(torch.get_num_threads())
            for b in backends:
                t = time.perf_counter()
                got = extract(model, paths, settings(b))
                rates[f"extract {b}"].append(len(paths) / (time.perf_counter() - t))
                threads[f"extract {b}"].add(torch.get_num_threads() if b == "torch" else ort_backend.ort_threads())
                diffs[b] = max(diffs.get(b, 0.0), float(np.abs(got - ref).max()))
        med = {k: statistics.median(v) for k, v in rates.items()}
        base = med["per-image bs=1"]
        for k, v in rates.items():
            print(f"  {k:20s} median {med[k]:7.1f} img/s   runs {', '.join(f'{r:.1f}' for r in v)}")
        try:
            if any(len(v) > 1 for v in threads.values()):
                raise UserError(f"the thread count changed between repeats ({threads}); no ratio is printed")
            check_comparable({k: min(v) for k, v in threads.items()})
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
        for k in rates:
            if k != "per-image bs=1":
                print(f"  ratio {k} / per-image: {med[k] / base:.2f}x")
        for b, d in diffs.items():
            verdict = "ok" if d <= PARITY else "ABOVE"
            print(f"  extract {b}: max |difference| to the loop {d:.2e} ({verdict}: <= {PARITY:g})")


if __name__ == "__main__":
    main()
