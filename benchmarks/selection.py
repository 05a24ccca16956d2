"""The demo recipe's constants chosen on validation data only, then the choice scored once on the test split
(issue 25's selection protocol).

Every candidate is the demo preset (lite2 -> lite0, closed-form start, 3 epochs x 400 images, 224 px) with some
recipe constants changed (CSD's tau_s and label_weight, the learning rate). Each is trained on the synthetic set's
training split and scored on its validation split (its own landmarks, every image a query against the others):
asymmetric mAP M over the teacher's symmetric mAP M there. The selection (`select`) is given the training data
and the validation set only: it trains on a view of the synthetic set that holds no test split (`selection_view`:
the training pickle and images, no test folder), so it cannot read one. The best validation score is the choice;
only then are the choice and the demo preset trained and scored once on the synthetic test split. Writes
`benchmarks/results/selection.txt`. Runs are resumable: a finished run folder is read, not trained again.

    .venv/bin/python benchmarks/selection.py --threads 1     # 6 candidates + 1-2 test runs, ~1.5 min a run idle
    .venv/bin/python benchmarks/selection.py --smoke         # 2 candidates, tiny random networks, the tiny set
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from common import (
    REPO,
    RESULTS,
    command,
    header,
    names_of,
    parse,
    parser,
    smoke_budget,
    smoke_data,
    synth_test_set,
    work_dir,
    write_results,
)

from aml.allocator import keep_freed_memory
from aml.data.synth import SYNTH_NAME, SYNTH_PICKLE
from aml.data.trainset import RevisitopRef

RESULT = RESULTS / "selection.txt"
TARGET = 0.95  # issue 25: asymmetric mAP M >= 0.95 x the teacher's symmetric mAP M on the test split
# The grid's base: the demo preset as it was when this selection ran (lr 2e-5; the preset has since taken the
# validation's choice, lr 4e-5), pinned so that the grid stays the one measured.
BASE = {"lr": 2e-5}
# Candidate name -> (what it is, in words; TrainConfig fields changed from BASE). "demo" is BASE itself.
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": ("the demo preset: csd tau_s 0.03, label_weight 0.5, lr 2e-5", {}),
    "lw0": ("label_weight 0 (plain CSD)", {"loss_args": {"tau_s": 0.03}}),
    "lw0.25": ("label_weight 0.25", {"loss_args": {"tau_s": 0.03, "label_weight": 0.25}}),
    "lw0.75": ("label_weight 0.75", {"loss_args": {"tau_s": 0.03, "label_weight": 0.75}}),
    "tau0.05": ("tau_s 0.05", {"loss_args": {"tau_s": 0.05, "label_weight": 0.5}}),
    "lr4e-5": ("lr 4e-5", {"lr": 4e-5}),
}
SMOKE_CANDIDATES = "demo,lw0"


class Score(NamedTuple):
    """One trained run's scores on its evaluation set (mAP M x100) and its ratio to the teacher."""

    asym: float
    sym: float
    teacher: float

    @property
    def ratio(self) -> float:
        return self.asym / self.teacher if self.teacher > 0 else 0.0


def selection_view(root: Path, out: Path) -> str:
    """A `synth:DIR` spec of the synthetic set at `root` without its test split: `out` holds links to the
    training pickle (train and val splits) and the images, and no test folder."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (SYNTH_PICKLE, "ims"):
        link = out / name
        if not link.is_symlink():
            os.symlink((root / name).resolve(), link)
    if (out / SYNTH_NAME).exists():
        raise SystemExit(f"{out / SYNTH_NAME}: a test split in the selection view; remove {out}")
    return f"synth:{out}"


def validation_set(data: str) -> RevisitopRef:
    """The synthetic set's validation split of `data` (a `synth:DIR` spec) as a revisitop-layout set in the
    cache: every validation image a query against the others, positives the same landmark."""
    from aml.data.spec import cached_test_split, parse_data_spec

    val = parse_data_spec(data).val
    if val is None or len(val) == 0:
        raise SystemExit(f"{data}: no validation split; generate the set with --val-landmarks > 0")
    return cached_test_split("synth-val", val.paths, val.cluster)


def train_and_score(run_dir: Path, budget: Mapping[str, Any], changes: Mapping[str, Any], data: str,
                    evaluation: RevisitopRef) -> Score:  # fmt: skip
    """Train the demo preset `budget` with `changes` on `data`, evaluated on `evaluation` after the last epoch,
    unless `run_dir` holds its finished score; the score (also written to run_dir/score.json)."""
    from aml.train.config import TrainConfig
    from aml.train.loop import Trainer

    done = run_dir / "score.json"
    if done.is_file():
        return Score(**json.loads(done.read_text()))
    cfg = TrainConfig().replace(**budget).replace(**changes)
    cfg = cfg.replace(data=[data], test_data=f"revisitop:{Path(evaluation.data_root) / evaluation.dataset_name}",
                      eval_every=cfg.epochs, out=str(run_dir))  # fmt: skip
    trainer = Trainer(cfg, resume=(run_dir / "last.pt").is_file(), progress=False)
    trainer.fit()
    last = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()][-1]["eval"]
    score = Score(last["asymmetric"]["mAP"]["M"], last["student"]["mAP"]["M"], trainer.evaluator.teacher()["mAP"]["M"])
    done.write_text(json.dumps(score._asdict()) + "\n")
    return score


def select(train: str, val: RevisitopRef, budget: Mapping[str, Any], candidates: Mapping[str, dict[str, Any]],
           work: Path) -> tuple[dict[str, Score], str]:  # fmt: skip
    """Train every candidate (TrainConfig changes to `budget`) on the training data `train` and score it on the
    validation set `val`, the only data it is given; (scores by candidate, the best validation ratio's name)."""
    scores = {name: train_and_score(work / "val" / name, budget, changes, train, val)
              for name, changes in candidates.items()}  # fmt: skip
    return scores, max(scores, key=lambda n: scores[n].ratio)


def row(name: str, split: str, s: Score) -> str:
    """One line of the report's table."""
    return f"{name:<10} {split:<10} {s.asym:>7.2f} {s.sym:>7.2f} {s.teacher:>8.2f} {s.ratio:>6.3f}"


def main() -> None:
    ap = parser(__doc__, results=RESULT)
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help=f"Some of {', '.join(CANDIDATES)}.")
    ap.add_argument("--work", type=Path, help="Run folders, resumable (default: runs/selection; smoke: scratch).")
    args = parse(ap, dict(candidates=SMOKE_CANDIDATES))
    keep_freed_memory()
    import torch  # noqa: F401  (loaded before the thread setting, so that it is set on torch itself)

    from aml.data.spec import parse_data_spec
    from aml.data.synth import ensure_default_synth
    from aml.train.config import PRESETS

    setting = header(args)
    print(setting, flush=True)
    names = names_of(args.candidates, CANDIDATES, "--candidates", "candidate")
    base = {**PRESETS["demo"], **BASE}
    budget = smoke_budget(base) if args.smoke else base
    root = Path(smoke_data().partition(":")[2]) if args.smoke else ensure_default_synth()
    work = work_dir(args, REPO / "runs" / "selection")
    t0 = time.perf_counter()
    train = selection_view(root, work / "data")
    val = validation_set(train)
    n_val = len(parse_data_spec(train).val)
    scores, chosen = select(train, val, budget, {n: CANDIDATES[n][1] for n in names}, work)
    t_select = time.perf_counter() - t0
    test = RevisitopRef(str(root), SYNTH_NAME)  # read only now, after the choice
    tested = {n: train_and_score(work / "test" / n, budget, CANDIDATES[n][1], train, test)
              for n in dict.fromkeys([chosen, "demo"])}  # fmt: skip
    start = "random weights" if budget.get("random_init") else "ImageNet weights"
    lines = [
        f"demo budget: {budget['teacher']} -> {budget['student']} ({start}), closed-form start, {budget['epochs']} "
        f"epochs x {budget['query_size']} images, {budget['image_size']} px, seed 0; trained on the synthetic "
        f"training split;",
        f"chosen on the validation split ({n_val} images, each a query against the others), scored once on the "
        f"{synth_test_set(args.smoke)}; mAP M x100, ratio = asymmetric / teacher (symmetric)",
        *(f"{n}: {CANDIDATES[n][0]}" for n in names),
        "",
        f"{'candidate':<10} {'split':<10} {'asym M':>7} {'sym M':>7} {'teacher':>8} {'ratio':>6}",
        "-" * 53,
        *(row(n, "val", s) for n, s in scores.items()),
        *(row(n, "test", s) for n, s in tested.items()),
        "",
        f"chosen on validation: {chosen} ({CANDIDATES[chosen][0]})"
        + ("; the demo preset's own constants" if chosen == "demo" else "; differs from the demo preset"),
        f"test: chosen {tested[chosen].asym:.2f} = {tested[chosen].ratio:.3f} x teacher {tested[chosen].teacher:.2f}"
        f" (demo preset {tested['demo'].asym:.2f} = {tested['demo'].ratio:.3f} x teacher); >= {TARGET} x teacher: "
        + ("met" if tested[chosen].ratio >= TARGET else "not met"),
        "",
        f"{setting}; selection {t_select / 60:.1f} min, total {(time.perf_counter() - t0) / 60:.1f} min (runs "
        f"already finished are read, not timed). Command: " + command(),
    ]
    write_results(args, RESULT, lines)


if __name__ == "__main__":
    main()
