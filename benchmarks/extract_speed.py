"""Images/s of `aml.extract.extract` (size-bucketed batches, DataLoader workers) against the plain
per-image batch-size-1 loop, same images and settings, side by side in one run; medians of repeats. The thread
setting (`--threads`, through `aml.threads`) is printed; the torch threads each variant ran with are recorded and
no ratio is printed between variants that ran with different counts.

    .venv/bin/python benchmarks/extract_speed.py --model lite2 --image-size 362 --n 100
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aml.allocator import keep_freed_memory
from aml.data.images import load_image
from aml.errors import UserError
from aml.extract import ExtractSettings, extract, resolve_device, to_tensor
from aml.registry import create_model
from aml.threads import HELP, benchmark_threads, check_comparable

UKBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "ukbench" / "jpg"


def image_paths(n: int, folder: Path) -> tuple[list[str], str]:
    """The first n UKBench jpgs, or n synthetic 320x240 / 240x320 jpgs when the real data is absent."""
    real = sorted(UKBENCH.glob("*.jpg"))[:n] if UKBENCH.is_dir() else []
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lite2")
    ap.add_argument("--weights")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--image-size", type=int, default=362)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=-1, help="-1: extract's automatic choice")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help=HELP)
    args = ap.parse_args()
    keep_freed_memory()  # as the `aml` CLI does; both variants run under it
    setting = benchmark_threads(args.threads)
    device = resolve_device(args.device)
    model = create_model(args.model, weights=args.weights, random_init=args.random_init).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        paths, source = image_paths(args.n, Path(tmp))
        print(
            f"{args.model} at {args.image_size} px on {device}, {len(paths)} images ({source}), "
            f"batch {args.batch_size}, workers {args.workers}\n{setting}"
        )
        # warm-up (first-call kernel selection)
        extract(model, paths[:8], ExtractSettings(args.image_size, workers=0, device=str(device), progress=False))
        rates: dict[str, list[float]] = {"per-image bs=1": [], "extract": []}
        threads: dict[str, set[int]] = {k: set() for k in rates}  # torch threads each variant ran with
        for _ in range(args.repeats):
            t = time.perf_counter()
            ref = per_image_loop(model, paths, args.image_size, device)
            rates["per-image bs=1"].append(len(paths) / (time.perf_counter() - t))
            threads["per-image bs=1"].add(torch.get_num_threads())
            t = time.perf_counter()
            got = extract(
                model,
                paths,
                ExtractSettings(
                    args.image_size,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    device=str(device),
                    progress=False,
                ),
            )
            rates["extract"].append(len(paths) / (time.perf_counter() - t))
            threads["extract"].add(torch.get_num_threads())
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in rates.items():
            print(f"  {k:16s} median {med[k]:8.1f} img/s   runs {', '.join(f'{r:.1f}' for r in v)}")
        try:
            if any(len(v) > 1 for v in threads.values()):
                raise UserError(f"the torch thread count changed between repeats ({threads}); no ratio is printed")
            check_comparable({k: min(v) for k, v in threads.items()})
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
        print(
            f"  ratio extract / per-image: {med['extract'] / med['per-image bs=1']:.2f}x   "
            f"max |difference| {np.abs(got - ref).max():.2e}"
        )


if __name__ == "__main__":
    main()
