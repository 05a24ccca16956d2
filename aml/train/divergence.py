"""A run that cannot train is an error, never a saved checkpoint: a NaN / inf loss or weights, or no steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aml.errors import UserError
from aml.losses import LABEL_FREE


def non_finite_weight(model: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter holding NaN or inf, or None (one reduction per step)."""
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not params or torch.stack([p.detach().isfinite().all() for _, p in params]).all():
        return None
    return next(n for n, p in params if not p.detach().isfinite().all())


def diverged(run_dir: Path, lr: float, epoch: int, step: int, cause: str) -> UserError:
    """The one-line error of a diverged run: where, why, and the fix; nothing of this epoch is saved."""
    kept = run_dir / "last.pt"
    keep = f"{kept} (the last good epoch) is kept" if kept.exists() else "no checkpoint was written"
    return UserError(
        f"{run_dir}: training diverged at epoch {epoch + 1}, step {step + 1}: {cause}; lower --lr (now {lr:g}) and "
        f"start again (--overwrite); {keep}"
    )


def no_steps(data: list[str], epoch: int, train: Any, dropped: int) -> UserError:
    """The error of an epoch that formed no training step (too few images per label for tuples)."""
    return UserError(
        f"--data {' --data '.join(data)}: epoch {epoch + 1} has no training steps (no tuples formed from "
        f"{len(train)} images, {train.num_clusters} labels; {dropped} tuples dropped for too few negatives); give "
        f"more images per label and more labels, or use a label-free loss ({', '.join(LABEL_FREE)})"
    )
