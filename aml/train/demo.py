"""The embedded default: distil lite2 -> lite0 on synthetic landmarks, plus the no-teacher baseline, one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aml.data.spec import parse_data_spec
from aml.train.checkpoint import load_checkpoint
from aml.train.config import TrainConfig
from aml.train.loop import Trainer


def run_with_baseline(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train `cfg` and the same student with the symmetric no-teacher loss; return the rows of the table.

    Rows: the teacher on itself, the distilled student asymmetric and symmetric, and the baseline
    student (trained without the teacher) queried against the teacher's database.
    """
    main = Trainer(cfg, progress=progress)
    run_dir = main.fit()
    baseline_cfg = cfg.replace(loss="sym", out=str(Path(run_dir) / "baseline-sym"))
    base_dir = Trainer(baseline_cfg, progress=progress).fit()
    rows: dict[str, Any] = {}
    if main.evaluator is not None:
        rows[f"teacher {cfg.teacher} (symmetric)"] = main.evaluator.teacher()
    ev = load_checkpoint(Path(run_dir) / "last.pt")["metrics"].get("eval")
    bev = load_checkpoint(Path(base_dir) / "last.pt")["metrics"].get("eval")
    if ev:
        rows[f"student {cfg.student} {cfg.loss} (asymmetric)"] = ev["asymmetric"]
        rows[f"student {cfg.student} {cfg.loss} (symmetric)"] = ev["student"]
    if bev:
        rows[f"student {cfg.student} sym, no teacher (asymmetric)"] = bev["asymmetric"]
        rows[f"student {cfg.student} sym, no teacher (symmetric)"] = bev["student"]
    return {"run_dir": str(run_dir), "baseline_dir": str(base_dir), "rows": rows,
            "dataset": parse_data_spec(cfg.data).test}
