"""Training checkpoints: atomic per-epoch files plus `last.pt`, enough to rebuild the student alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aml.errors import UserError, first_line
from aml.io import atomic_path
from aml.registry import load_into
from aml.trust import torch_load

FORMAT = 1  # bumped when the checkpoint layout changes


def save_checkpoint(run_dir: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Write `epoch_NNN.pt` atomically, then point `last.pt` at the same bytes (atomic rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"epoch_{epoch:03d}.pt"
    with atomic_path(path) as tmp:
        torch.save({**state, "epoch": epoch, "aml_format": FORMAT}, tmp)
    with atomic_path(run_dir / "last.pt") as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by `save_checkpoint`, with a clear error when it is not one."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; pass --out of an earlier run to --resume")
    ck = torch_load(path)  # weights-only: a checkpoint holds tensors, numbers, strings and numpy arrays
    if not isinstance(ck, dict):
        raise UserError(f"{path}: a {type(ck).__name__}, not an aml training checkpoint (a dict); delete it")
    for key in ("state_dict", "meta", "optimizer", "config", "epoch"):
        if key not in ck:
            raise UserError(f"{path}: field '{key}' missing; this is not an aml training checkpoint")
    if not isinstance(ck["config"], dict):
        raise UserError(
            f"{path}: config: a {type(ck['config']).__name__}, not a dict of options; the checkpoint is damaged, "
            "start a new run"
        )
    return ck


def restore(
    checkpoint: dict[str, Any],
    path: Path,
    *,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    objective: Any,
) -> int:
    """A resumed run's state from its checkpoint: the student, the objective (`Objective.restore`), the optimizer
    and the scheduler; returns the epoch to start from. A part that does not fit is a one-line UserError."""
    sd = checkpoint["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: state_dict: not a dict of tensors; the checkpoint is damaged, start a new run")
    load_into(student, sd, path)
    objective.restore(checkpoint, path)
    for key, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        try:
            target.load_state_dict(checkpoint[key])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise UserError(
                f"{path}: {key}: state does not fit this run ({first_line(e)}); the checkpoint is damaged or "
                "from another version, start a new run"
            ) from None
    try:
        return int(checkpoint["epoch"])
    except (TypeError, ValueError):
        raise UserError(f"{path}: epoch: {checkpoint['epoch']!r} is not a number; start a new run") from None
