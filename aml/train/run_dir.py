"""A run's folder: which files are a run's, when a new run may write there, resuming its config, its log."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from aml.errors import UserError
from aml.io import TMP_TAG, atomic_write, check_writable_dir, json_text
from aml.lock import exclusive
from aml.progress import write_line
from aml.train.config import TrainConfig

# Fields a resumed run may change; anything else must match the checkpoint's config.
RESUMABLE_CHANGES = {"epochs", "device", "workers", "out", "eval_every"}
# The files a run writes into its folder (what `overwrite=True` removes; anything else there is kept).
RUN_FILES = ("last.pt", "start.pt", "best.pt", "best.json", "log.jsonl", "config.json", "epoch_[0-9][0-9][0-9]*.pt")
LOCK = ".aml-run.lock"  # held (aml.lock.exclusive) by the one process that writes a run folder


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """While the block runs, `run_dir` is this process's alone: a second `aml distill` into it is refused with
    one line (never waits: two runs would interleave their checkpoints and log). Under torchrun only rank 0 (the
    one writer) holds it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    check_writable_dir(run_dir, "--out")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(run_dir / LOCK, wait=False, what=f"the run folder {run_dir}",
                       fix="wait for that run to finish, or choose another --out"):  # fmt: skip
            yield
    finally:
        if created:  # a run refused before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Before any work: a new run never mixes with a finished one in `run_dir` (refused unless `overwrite`, which
    removes aml's own run files first); the folder must be writable."""
    existing = [p for p in (run_dir / "last.pt", run_dir / "log.jsonl") if p.exists()]
    if existing and not resume:
        if not overwrite:
            raise UserError(
                f"{run_dir}: holds a run ({existing[0].name}); pass --resume to continue it, a new --out, or "
                "--overwrite to delete its checkpoints and log first"
            )
        for pattern in RUN_FILES:
            for f in run_dir.glob(pattern):
                f.unlink(missing_ok=True)  # DDP: every rank runs this check
            for f in run_dir.glob(f".{pattern}{TMP_TAG}*"):
                f.unlink(missing_ok=True)  # DDP: every rank runs this check
    if resume and overwrite:
        raise UserError("--resume and --overwrite both given; pass one of them")
    check_writable_dir(run_dir, "--out")


def default_run_dir(cfg: TrainConfig) -> Path:
    """runs/<date>-<teacher>-<student>-<loss>, the folder of a run without --out."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.teacher}-{cfg.student}-{cfg.loss}".replace("/", "_")


def merge_resumed(given: TrainConfig, saved: TrainConfig, names: frozenset[str] | None = None) -> TrainConfig:
    """The checkpoint's config with the resumable options; `names` (the options the user gave, None: all)
    are the only ones compared, and must equal the saved values unless in RESUMABLE_CHANGES."""
    compared = set(given.to_dict()) if names is None else set(names) | {"out"}
    diff = sorted(k for k in compared if k not in RESUMABLE_CHANGES and getattr(given, k) != getattr(saved, k))
    if diff:
        k = diff[0]
        raise UserError(
            f"--resume: option '{k}' differs from the checkpoint's config "
            f"({getattr(given, k)!r} vs {getattr(saved, k)!r}); only {sorted(RESUMABLE_CHANGES)} "
            "may change when resuming"
        )
    return saved.replace(**{k: getattr(given, k) for k in RESUMABLE_CHANGES & compared})


def log_line(stats: dict[str, Any]) -> str:
    """The terminal line of one log record (an epoch, or epoch 0's start)."""
    ev = stats.get("eval")
    if "loss" in stats:
        line = f"epoch {stats['epoch']}: loss {stats['loss']:.4f}, {stats['images_per_s']:.1f} img/s"
    else:
        init = stats.get("init") or {}
        line = f"epoch 0: head init {init.get('method')}"
        if "residual" in init:
            line += (
                f" on {init['images']} images ({init['pairs']} pairs), residual {init['residual']:.4f},"
                f" {init['seconds']:.1f} s"
            )
    if ev:
        line += f", asym mAP M {ev['asymmetric']['mAP']['M']:.2f}, sym mAP M {ev['student']['mAP']['M']:.2f}"
    if stats.get("val"):
        line += f", validation asym mAP M {stats['val']['asymmetric']['mAP']['M']:.2f}"
    return line


def append_log(run_dir: Path, stats: dict[str, Any], *, show: bool) -> None:
    """Append `stats` to the run's log.jsonl (atomically); `show`: print its line too."""
    path = run_dir / "log.jsonl"
    old = path.read_text() if path.exists() else ""
    with atomic_write(path) as f:
        f.write(old + json_text(stats) + "\n")
    if show:
        write_line(log_line(stats))
