"""Training checkpoints: atomic per-epoch files plus `last.pt`, enough to rebuild the student alone; `start.pt`
(epoch 0, the closed-form start) and `best.pt` (the best epoch on the validation data), kept by `Keeper`.

`best.pt` is chosen on the run's validation data (`aml.train.quick_eval.validation_eval`), never on its test set:
a run without validation data keeps no `best.pt`. The scores behind the choice are in `best.json`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aml.errors import UserError, first_line
from aml.io import atomic_path, write_json
from aml.registry import load_into
from aml.trust import torch_load

FORMAT = 1  # bumped when the checkpoint layout changes
SCORE = ("asymmetric", "mAP", "M")  # the validation score best.pt is chosen on: asymmetric mAP, protocol M


def _write(path: Path, epoch: int, state: dict[str, Any]) -> Path:
    """`state` as checkpoint `path`, atomically."""
    with atomic_path(path) as tmp:
        torch.save({**state, "epoch": epoch, "aml_format": FORMAT}, tmp)
    return path


def _same_bytes(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s bytes (a hard link, else a copy), replacing it atomically."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_checkpoint(run_dir: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Write `epoch_NNN.pt` atomically, then point `last.pt` at the same bytes (atomic rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = _write(run_dir / f"epoch_{epoch:03d}.pt", epoch, state)
    _same_bytes(path, run_dir / "last.pt")
    return path


def validation_score(metrics: dict[str, Any]) -> float | None:
    """The validation score of an epoch's metrics (`metrics['val']`, SCORE), None when it was not measured."""
    value: Any = metrics.get("val")
    for key in SCORE:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, (int, float)) else None


class Keeper:
    """The checkpoints a user can trust: `start.pt` (epoch 0), `best.pt` (the best validation score so far, the
    start included) and, at the end, a warning when the last validation score is below the start's. The scores
    live in `best.json`, so a resumed run keeps comparing with its own start and best."""

    def __init__(self, run_dir: Path, *, resume: bool) -> None:
        self.run_dir, self.path = run_dir, run_dir / "best.json"
        self.record: dict[str, Any] = dict.fromkeys(("start", "best", "best_epoch", "last", "last_epoch"))
        if resume and self.path.is_file():
            try:
                self.record.update(json.loads(self.path.read_text()))
            except (OSError, ValueError):  # unreadable: best.pt is chosen again from here on
                pass

    def start(self, state: dict[str, Any]) -> Path:
        """Write `start.pt` (the student before epoch 1; `state['metrics']` its scores); it is best.pt so far."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = _write(self.run_dir / "start.pt", 0, state)
        score = validation_score(state.get("metrics") or {})
        self.record.update(start=score, best=None, best_epoch=None, last=score, last_epoch=0)
        self.update(0, path, state.get("metrics") or {})
        return path

    def update(self, epoch: int, path: Path, metrics: dict[str, Any]) -> None:
        """After checkpoint `path` of `epoch`: point best.pt at it when its validation score is the best so far."""
        score = validation_score(metrics)
        if score is None:
            return
        self.record.update(last=score, last_epoch=epoch)
        if self.record["best"] is None or score > self.record["best"]:
            _same_bytes(path, self.run_dir / "best.pt")
            self.record.update(best=score, best_epoch=epoch)
        write_json(self.path, self.record)

    def warning(self) -> str | None:
        """The end-of-run line when the last validation score is below the start's (None otherwise)."""
        r = self.record
        if r["start"] is None or r["last"] is None or not r["last"] < r["start"]:
            return None
        return (
            f"warning: the student after epoch {r['last_epoch']} scores {r['last']:.2f} on the validation data "
            f"(asymmetric mAP M), below the start's {r['start']:.2f}; {self.run_dir / 'best.pt'} keeps the best "
            f"(epoch {r['best_epoch']}, {r['best']:.2f})"
        )

    def finish(self) -> None:
        """Print `warning()` on stderr, if any."""
        line = self.warning()
        if line:
            print(line, file=sys.stderr)


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
