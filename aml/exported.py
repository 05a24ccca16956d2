"""Exported query encoders (`aml export`'s .onnx / .ort / .pte files), opened by their suffix: the one place."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aml.onnx_embed import OnnxEncoder

EXPORTED = (".onnx", ".ort", ".pte")  # what `evaluate`, `search` and `embed` take as an exported encoder


def is_exported(path: str | os.PathLike) -> bool:
    """Whether `path` names an exported encoder (EXPORTED) rather than a checkpoint or a registry name."""
    return str(path).lower().endswith(EXPORTED)


def open_exported(path: str | os.PathLike, threads: int | None = None) -> OnnxEncoder:
    """The encoder of an exported file, its sidecar checked: ExecuTorch's runtime for a .pte (`aml.pte_embed`),
    onnxruntime for .onnx / .ort (torch-free)."""
    if str(path).lower().endswith(".pte"):
        from aml.pte_embed import PteEncoder

        return PteEncoder(path, threads)
    from aml.onnx_embed import OnnxEncoder

    return OnnxEncoder(path, threads)
