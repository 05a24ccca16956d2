"""The demo's recipe at its own budget, over seeds, next to the recipes it is compared with (issue 12's target:
asymmetric mAP M >= 45 on the synthetic test set at the demo's budget).

Each variant is the demo preset (`aml distill` with no --data: lite2 -> lite0, closed-form start, 3 epochs x 400
images, 224 px), without the no-teacher baseline, with some fields changed; the run's `log.jsonl` gives the
asymmetric and symmetric mAP after every epoch. Writes `benchmarks/results/demo_recipe.txt`. Runs are resumable:
a finished run folder is read, not trained again.

    .venv/bin/python benchmarks/demo_recipe.py                   # 3 variants x 3 seeds, about 25 min on 2 cores
    .venv/bin/python benchmarks/demo_recipe.py --seeds 0 --variants demo
    .venv/bin/python benchmarks/demo_recipe.py --smoke   # the demo variant x 2 seeds, tiny random networks
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    RESULTS,
    command,
    header,
    names_of,
    parse,
    parser,
    smoke_budget,
    synth_test_set,
    work_dir,
    write_results,
)

from aml.allocator import keep_freed_memory
from aml.train.config import PRESETS

RESULT = RESULTS / "demo_recipe.txt"
# Variant name -> (what it is, in words; TrainConfig fields changed from the demo preset).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": (f"the demo: csd label_weight 0.5, tau_s 0.03, k 256, lr {PRESETS['demo']['lr']:g}", {}),
    "no-labels": ("the same without the label term (label_weight 0)", {"loss_args": {"tau_s": 0.03}}),
    "former": ("the former demo: csd k 64, tau_s 0.05, lr 1e-5", {"loss_args": {"k": 64, "tau_s": 0.05}, "lr": 1e-5}),
}


def run_one(work: Path, budget: dict[str, Any], variant: str, seed: int) -> list[dict[str, Any]]:
    """Train one (variant, seed) at `budget` (TrainConfig fields) unless its run folder holds a finished run; its
    log.jsonl lines with scores."""
    from aml.train.config import TrainConfig
    from aml.train.loop import Trainer

    run_dir = work / variant / f"seed{seed}"
    cfg = TrainConfig().replace(**budget).replace(**VARIANTS[variant][1], seed=seed, out=str(run_dir))
    log = run_dir / "log.jsonl"
    done = log.is_file() and any(json.loads(x).get("epoch") == cfg.epochs for x in log.read_text().splitlines())
    if not done:
        Trainer(cfg, resume=(run_dir / "last.pt").is_file(), progress=False).fit()
    return [r for r in map(json.loads, log.read_text().splitlines()) if "eval" in r]


def table(results: dict[str, dict[int, list[dict[str, Any]]]], epochs: int) -> list[str]:
    """One line per (variant, seed): asymmetric mAP M after each epoch, symmetric M at the end; then the means."""
    head = f"{'variant':<10} {'seed':>4} " + " ".join(f"{f'asym M ep {e}':>11}" for e in range(epochs + 1))
    lines = [head + f" {'sym M':>7}", "-" * (len(head) + 8)]
    for variant, by_seed in results.items():
        finals = []
        for seed, rows in sorted(by_seed.items()):
            asym = [r["eval"]["asymmetric"]["mAP"]["M"] for r in rows]
            finals.append((asym[-1], rows[-1]["eval"]["student"]["mAP"]["M"]))
            lines.append(
                f"{variant:<10} {seed:>4} "
                + " ".join(f"{a:>11.2f}" for a in asym)
                + f" {rows[-1]['eval']['student']['mAP']['M']:>7.2f}"
            )
        a, s = [f[0] for f in finals], [f[1] for f in finals]
        sd = f" ± {statistics.stdev(a):.2f}" if len(a) > 1 else ""
        lines.append(f"{variant:<10} mean of {len(a)} seeds: asymmetric M {statistics.mean(a):.2f}{sd}, symmetric M "
                     f"{statistics.mean(s):.2f}")  # fmt: skip
    return lines


def main() -> None:
    ap = parser(__doc__, results=RESULT)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", type=Path, help="Run folders, resumable (default: runs/demo-recipe; smoke: scratch).")
    args = parse(ap, dict(variants="demo", seeds="0,1"))
    keep_freed_memory()
    import torch  # noqa: F401  (loaded before the thread setting, so that it is set on torch itself)

    setting = header(args)
    print(setting, flush=True)
    variants = names_of(args.variants, VARIANTS, "--variants", "variant")
    seeds = [int(s) for s in args.seeds.split(",")]
    # a smoke run: the demo preset at the tiny budget, on the tiny synthetic set
    budget = smoke_budget(PRESETS["demo"]) if args.smoke else PRESETS["demo"]
    work = work_dir(args, REPO / "runs" / "demo-recipe")
    t0 = time.perf_counter()
    results = {v: {s: run_one(work, budget, v, s) for s in seeds} for v in variants}
    start = "random weights" if budget.get("random_init") else "ImageNet weights"
    lines = [
        f"demo budget: {budget['teacher']} -> {budget['student']} ({start}), closed-form start, {budget['epochs']} "
        f"epochs x {budget['query_size']} images, {budget['image_size']} px; "
        f"{synth_test_set(args.smoke)};",
        "the teacher's row: benchmarks/results/demo.txt; mAP M x100 after each epoch (ep 0: the closed form alone)",
        *(f"{v}: {VARIANTS[v][0]}" for v in variants),
        "",
        *table(results, budget["epochs"]),
        "",
        f"{setting}; {(time.perf_counter() - t0) / 60:.1f} min (runs already finished are read, not timed). Command: "
        + command(),
    ]
    write_results(args, RESULT, lines)


if __name__ == "__main__":
    main()
