"""Training throughput (tuples/s), three ways on the same mined tuples, side by side in one run:

  (a) aml: the trainer's own step (its tuple objective): teacher vectors from the feature cache, student anchors
      batched by image size;
  (b) the teacher re-embedding every positive and negative at every step (student batched as in (a));
  (c) a per-image student forward (batch size 1), as the reference implementation does (teacher cached).

Same data, model, tuples and loss (`contr+`) for all three; each step is forward + backward + Adam step,
image loading included. Medians over the timed steps (after warm-up steps) and the ratios are printed.

    .venv/bin/python benchmarks/train_speed.py [--teacher lite2 --student lite0 --image-size 224 --steps 12]
    .venv/bin/python benchmarks/train_speed.py --smoke     # seconds: random resnet18s on a tiny synthetic set
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aml.data.synth import SynthConfig, generate_synth
from aml.threads import HELP, benchmark_threads
from aml.train.batches import ImageTensors, forward_by_size
from aml.train.batchnorm import set_train_mode
from aml.train.config import PRESETS, TrainConfig
from aml.train.loop import Trainer
from aml.train.objective import Step

# --smoke: random resnet18s on a synthetic set of a few dozen 48-pixel images
SMOKE_DATA = SynthConfig(landmarks=6, views=3, val_landmarks=1, test_landmarks=2, queries=2, db_views=4,
                         distractors=1, distractor_views=2, size=48, seed=3)  # fmt: skip
SMOKE = dict(teacher="resnet18", student="resnet18", random_init=True, image_size=40, batch_size=2, neg_num=2,
             steps=2, warmup=1, pool_size=12)  # fmt: skip


def config(args: argparse.Namespace, work: Path) -> TrainConfig:
    """The demo's recipe with the loss `contr+` on random negatives (no mining pass), `steps + warmup` steps."""
    return (
        TrainConfig()
        .replace(**PRESETS["demo"])
        .replace(
            teacher=args.teacher,
            student=args.student,
            random_init=args.random_init,
            data=args.data,
            loss="contr+",
            loss_args={},
            image_size=args.image_size,
            batch_size=args.batch_size,
            neg_num=args.neg_num,
            eval_every=None,
            query_size=args.batch_size * (args.steps + args.warmup),
            pool_size=args.pool_size,
            mining="random",
            workers=0,
            device=args.device,
            out=str(work / "run"),
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="lite2")
    ap.add_argument("--student", default="lite0")
    ap.add_argument("--random-init", action="store_true", help="Random weights (e.g. rn101 / effnet-b3).")
    ap.add_argument("--data", default="synth")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=5, help="Tuples per step (AML: 5).")
    ap.add_argument("--neg-num", type=int, default=5)
    ap.add_argument("--pool-size", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=12, help="Timed steps per variant.")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="Work folder of the run (default: a temporary folder, removed after)")
    ap.add_argument("--smoke", action="store_true", help="Seconds: random resnet18s on a tiny synthetic set.")
    ap.add_argument("--threads", type=int, help=HELP)
    args = ap.parse_args()
    setting = benchmark_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="aml-train-speed-") as tmp:
        work = Path(args.out or tmp)
        if args.smoke:
            generate_synth(work / "synth", SMOKE_DATA)
            vars(args).update(SMOKE, data=f"synth:{work / 'synth'}")
            os.environ["AML_HOME"] = str(work / "home")  # the tiny teacher's cache stays in the work folder
        run(config(args, work), args, setting)


def run(cfg: TrainConfig, args: argparse.Namespace, setting: str) -> None:
    """Time the three variants step by step on the same tuples and print the report."""
    tr = Trainer(cfg, progress=False, overwrite=True)
    objective, device, net = tr.objective, tr.device, tr.student
    epoch = objective.epoch(np.random.default_rng(0), tr._student_vectors)
    s_images = ImageTensors(tr.train.paths, cfg.image_size, net.mean, net.std)
    teacher = tr.teacher.net().to(device).eval()
    t_images = ImageTensors(tr.train.paths, cfg.image_size, teacher.mean, teacher.std)

    def teacher_rows(idx: np.ndarray) -> torch.Tensor:  # (b): re-embed with the frozen teacher
        with torch.inference_mode():
            return forward_by_size(teacher, [t_images[i] for i in idx], device).clone()

    def per_image(images: list[torch.Tensor]) -> torch.Tensor:  # (c): one student forward per image
        return torch.cat([net(x[None].to(device)) for x in images])

    def reembedding(b: np.ndarray, images: list[torch.Tensor]) -> torch.Tensor:  # (b)'s loss
        step, s = Step(epoch, b), tr.embed(images)
        pos = teacher_rows(epoch.plan.positives[b])
        neg = teacher_rows(epoch.plan.negatives[b].reshape(-1)).reshape(len(b), -1, s.shape[1])
        return objective.spec.fn(s, pos, neg, **step.read(objective.spec.inputs), **objective.constants)

    variants: dict[str, Callable[[np.ndarray, list[torch.Tensor]], torch.Tensor]] = {
        "(a) aml: cache + batched": lambda b, images: objective(Step(epoch, b), images, tr.embed),
        "(b) teacher re-embeds each step": reembedding,
        "(c) per-image student": lambda b, images: objective(Step(epoch, b), images, per_image),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    set_train_mode(net)
    # interleave the variants step by step, so machine noise hits all three alike
    for i, b in enumerate(epoch.batches):
        for name, loss_of in variants.items():
            t0 = time.perf_counter()
            loss_of(b, [s_images[j] for j in objective.images(epoch, b)]).backward()
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
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
