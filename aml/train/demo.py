"""The embedded default: distil lite2 -> lite0 on synthetic landmarks, plus the no-teacher baseline, one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aml.data.sources import parse_data_specs
from aml.train.checkpoint import load_checkpoint
from aml.train.config import DEMO_BASELINE, TrainConfig
from aml.train.loop import Trainer
from aml.train.run_dir import default_run_dir, run_lock


def run_with_baseline(cfg: TrainConfig, *, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train `cfg` and the same student with the symmetric no-teacher loss; return the rows of the table.

    Rows: the teacher on itself, the closed-form start alone (the student before epoch 1, asymmetric), the
    distilled student asymmetric and symmetric, and the baseline student (trained without the teacher) queried
    against the teacher's database and on its own.
    """
    cfg = cfg.replace(out=cfg.out or str(default_run_dir(cfg)))
    with run_lock(Path(cfg.out)):
        main = Trainer(cfg, progress=progress, overwrite=overwrite)
        run_dir = main.fit()
        base_cfg = cfg.replace(**DEMO_BASELINE, eval_every=DEMO_BASELINE["epochs"], out=str(run_dir / "baseline-sym"))
        with run_lock(Path(base_cfg.out)):
            base_dir = Trainer(base_cfg, progress=progress, overwrite=overwrite).fit()
    rows: dict[str, Any] = {}
    if main.evaluator is not None:
        rows[f"teacher {cfg.teacher} (symmetric)"] = main.evaluator.teacher()
    start = json.loads((Path(run_dir) / "log.jsonl").read_text().splitlines()[0])
    ev = load_checkpoint(Path(run_dir) / "last.pt")["metrics"].get("eval")
    bev = load_checkpoint(Path(base_dir) / "last.pt")["metrics"].get("eval")
    budget = f"{cfg.epochs} ep x {cfg.query_size}"
    base_budget = f"{base_cfg.epochs} ep x {base_cfg.query_size}"
    if start.get("epoch") == 0 and "eval" in start:
        rows[f"student {cfg.student} {start['init']['method']} start, 0 ep (asymmetric)"] = start["eval"]["asymmetric"]
    if ev:
        rows[f"student {cfg.student} {cfg.loss}, {budget} (asymmetric)"] = ev["asymmetric"]
        rows[f"student {cfg.student} {cfg.loss}, {budget} (symmetric)"] = ev["student"]
    if bev:
        rows[f"student {cfg.student} sym, no teacher, {base_budget} (asymmetric)"] = bev["asymmetric"]
        rows[f"student {cfg.student} sym, no teacher, {base_budget} (symmetric)"] = bev["student"]
    return {
        "run_dir": str(run_dir),
        "baseline_dir": str(base_dir),
        "rows": rows,
        "dataset": parse_data_specs(cfg.data, cfg.test_data).test,
    }
