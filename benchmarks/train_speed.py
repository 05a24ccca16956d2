"""Training throughput (tuples/s), three ways on the same mined tuples, side by side in one run:

  (a) aml: teacher vectors from the feature cache, student anchors batched by image size;
  (b) the teacher re-embedding every positive and negative at every step (student batched as in (a));
  (c) a per-image student forward (batch size 1), as the reference implementation does (teacher cached).

Same data, model, tuples and loss (`contr+`) for all three; each step is forward + backward + Adam step,
image loading included. Medians over the timed steps (after warm-up steps) and the ratios are printed.

    .venv/bin/python benchmarks/train_speed.py [--teacher lite2 --student lite0 --image-size 224 --steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from aml.threads import HELP, benchmark_threads
from aml.train.batches import ImageTensors, forward_by_size
from aml.train.batchnorm import set_train_mode
from aml.train.config import PRESETS, TrainConfig
from aml.train.loop import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="lite2")
    ap.add_argument("--student", default="lite0")
    ap.add_argument("--random-init", action="store_true", help="Random weights (e.g. rn101 / effnet-b3).")
    ap.add_argument("--data", default="synth")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=5, help="Tuples per step (AML: 5).")
    ap.add_argument("--neg-num", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12, help="Timed steps per variant.")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="/tmp/aml-train-speed")
    ap.add_argument("--threads", type=int, help=HELP)
    args = ap.parse_args()
    setting = benchmark_threads(args.threads)

    cfg = (
        TrainConfig()
        .replace(**PRESETS["demo"])
        .replace(
            teacher=args.teacher,
            student=args.student,
            random_init=args.random_init,
            data=args.data,
            image_size=args.image_size,
            batch_size=args.batch_size,
            neg_num=args.neg_num,
            eval_every=0,
            query_size=args.batch_size * (args.steps + args.warmup),
            pool_size=2000,
            mining="random",
            workers=0,
            device=args.device,
            out=args.out,
        )
    )
    tr = Trainer(cfg, progress=False)
    plan = tr._plan(0, np.random.default_rng(0))
    device, net = tr.device, tr.student
    batches = [
        np.arange(i, i + cfg.batch_size) for i in range(0, len(plan.anchors) - cfg.batch_size + 1, cfg.batch_size)
    ]
    s_images = ImageTensors(tr.train.paths, cfg.image_size, net.mean, net.std)
    teacher = tr.teacher.net().to(device).eval()
    t_images = ImageTensors(tr.train.paths, cfg.image_size, teacher.mean, teacher.std)

    def teacher_rows(idx: np.ndarray) -> torch.Tensor:  # (b): re-embed with the frozen teacher
        with torch.inference_mode():
            return forward_by_size(teacher, [t_images[i] for i in idx], device).clone()

    def step(b: np.ndarray, per_image: bool, reembed: bool) -> None:
        anchors = [s_images[i] for i in plan.anchors[b]]
        if per_image:
            s = torch.cat([net(x[None].to(device)) for x in anchors])
        else:
            s = forward_by_size(net, anchors, device)
        rows = teacher_rows if reembed else tr._teacher_rows
        pos = rows(plan.positives[b])
        neg = rows(plan.negatives[b].reshape(-1)).reshape(len(b), -1, s.shape[1])
        loss = tr.loss_fn(s, pos, neg, tr._teacher_rows(plan.anchors[b]), **tr.loss_kwargs)
        loss.backward()
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)

    variants = {
        "(a) aml: cache + batched": (False, False),
        "(b) teacher re-embeds each step": (False, True),
        "(c) per-image student": (True, False),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    set_train_mode(net)
    # interleave the variants step by step, so machine noise hits all three alike
    for i, b in enumerate(batches):
        for name, (per_image, reembed) in variants.items():
            t0 = time.perf_counter()
            step(b, per_image, reembed)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    print(
        f"teacher {cfg.teacher}, student {cfg.student}, image size {cfg.image_size}, {cfg.batch_size} tuples "
        f"x (1 + 1 + {cfg.neg_num}) images per step, {len(times[next(iter(times))])} timed steps, "
        f"device {device}\n{setting}"
    )
    base = statistics.median(times["(a) aml: cache + batched"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:<34} {cfg.batch_size / med:8.2f} tuples/s   median step {med * 1000:8.1f} ms   "
            f"aml speed-up x{med / base:.2f}"
        )


if __name__ == "__main__":
    main()
