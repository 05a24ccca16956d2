"""On-device export formats behind one interface: ExecuTorch (.pte), Core ML (.mlpackage), ONNX Runtime Mobile (.ort).

A `FormatExporter` turns the export-ready encoder (`aml.export.encoder.export_encoder`: eval mode, the static /
shape-arithmetic TF "same" padding of `aml.export.friendly` swapped in, head and whitening included) into one
model file or folder, and gives a runner of what it wrote, so the caller verifies it (`verify_format`: the same
equivalence gate as ONNX, `aml.export.verify`) before anything reaches the user's path (`install`). Each
format's package is optional: `missing_package` says which one to install, and the format's tests skip on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from aml.errors import UserError
from aml.export import verify
from aml.io import atomic_path, sha256_file
from aml.sidecar import FORMATS

Calibration = Callable[[], list[np.ndarray]]  # the int8 calibration batches, (1, 3, H, W) normalised, on demand
# (module, image size, precision, calibration, path, static shape) -> what the sidecar's `export` records of the format
ExportFn = Callable[[nn.Module, int, str, Calibration, Path, bool], dict[str, Any]]


@dataclass(frozen=True)
class FormatExporter:
    """One on-device format: its precisions, the package it needs and its export / load functions (its file
    suffix is `aml.sidecar.FORMATS`', the one table of suffixes)."""

    name: str
    precisions: tuple[str, ...]
    package: str  # the importable module the format needs (pip name in `pip`)
    pip: str
    export: ExportFn
    # a runner of a written model, or None where this machine cannot run it (Core ML off macOS)
    runner: Callable[[Path], verify.Runner | None]
    # structural check (path, image size, dim, static shape) where it cannot run here
    check: Callable[[Path, int, int, bool], dict[str, Any]] | None = None
    numeric_check: str = ""  # how to run the numeric check where `runner` gives None

    @property
    def suffix(self) -> str:
        return FORMATS[self.name]


def missing_package(fmt: FormatExporter) -> str | None:
    """A one-line fix when the format's package is not installed, else None."""
    if importlib.util.find_spec(fmt.package) is not None:
        return None
    return f"--format {fmt.name} needs the '{fmt.pip}' package, which is not installed; pip install '{fmt.pip}'"


def require(fmt: FormatExporter) -> None:
    """A UserError naming the package to install when `fmt` cannot be exported here."""
    fix = missing_package(fmt)
    if fix:
        raise UserError(fix)


def check_precision(fmt: FormatExporter, precision: str) -> None:
    """A UserError when `fmt` does not export `precision`."""
    if precision not in fmt.precisions:
        raise UserError(f"--format {fmt.name} --precision {precision}: expected one of {', '.join(fmt.precisions)}")


def verify_format(
    fmt: FormatExporter,
    path: Path,
    reference: verify.Runner,
    image_size: int,
    *,
    gate: bool,
    dim: int,
    mean: Sequence[float],
    std: Sequence[float],
    static_shape: bool = False,
) -> tuple[dict[str, Any], verify.Runner | None]:
    """The equivalence result of a written model against `reference` (torch) on the probe images, and its runner.

    A format this machine cannot run gets its structural check instead (raises VerificationError when it fails)
    and the record of how to run the numeric one; the runner is then None."""
    run = fmt.runner(path)
    if run is not None:
        eq = verify.equivalence(reference, run, image_size, gate=gate, mean=mean, std=std, static_shape=static_shape)
        return eq, run
    structure = fmt.check(path, image_size, dim, static_shape) if fmt.check is not None else {}
    return {"probes": [], "gated": False, "structure": structure, "numeric_check": fmt.numeric_check}, None


def sha256_path(path: str | os.PathLike) -> str:
    """Hex sha256 of a model file, or of a model folder (.mlpackage): its relative paths and bytes, sorted."""
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def install(model: Path, out: Path) -> None:
    """Move a verified model into place: a file by one atomic rename; a folder renamed beside `out`, then swapped
    with the old one (removed after), so `out` is always a whole model, old or new."""
    if not model.is_dir():
        with atomic_path(out) as final:
            os.replace(model, final)
        return
    staged = out.with_name(f".{out.name}.aml-new")
    old = out.with_name(f".{out.name}.aml-old")
    for leftover in (staged, old):
        shutil.rmtree(leftover, ignore_errors=True)
    os.replace(model, staged)
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)
