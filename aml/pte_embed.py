"""Embedding with an exported ExecuTorch program (.pte, XNNPACK delegate) in ExecuTorch's Python runtime.

`aml embed --model FILE.pte` loads the program with `executorch.runtime.Runtime` (the portable runtime with the
XNNPACK backend compiled in: the kernels an app links), its threadpool set to `aml.threads.intra_op_threads()`;
images load and combine exactly as for ONNX (`aml.onnx_embed.embed_images`). The runtime takes torch tensors, so
this path imports torch (the ONNX one does not). executorch is optional: imported where used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aml.errors import UserError
from aml.onnx_embed import OnnxEncoder, Runner, check_pair
from aml.sidecar import is_static, pad_static, read_sidecar
from aml.threads import intra_op_threads

MAX_BATCH = 4  # the largest batch a .pte takes (ExecuTorch plans its memory for the upper bound)
MIN_SIDE = 64  # the shortest image side a .pte takes (see aml.export.executorch_format)


def pte_runner(path: str | os.PathLike, threads: int | None = None) -> Runner:
    """numpy batch -> numpy vectors through a .pte's `forward` (batches above MAX_BATCH run in slices)."""
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(threads or intra_op_threads())
    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [method.execute([torch.from_numpy(x[i : i + MAX_BATCH])])[0] for i in range(0, len(x), MAX_BATCH)]
        return torch.cat(parts).numpy()

    return run


class PteEncoder(OnnxEncoder):
    """An exported .pte and its sidecar: `enc(x)` runs a normalised (B, 3, H, W) float32 batch."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: model not found; pass the .pte file written by `aml export --format executorch`")
        self.path = path
        self.info = read_sidecar(path)
        check_pair(path, self.info)
        if self.info["format"] != "executorch":
            raise UserError(f"{path}: sidecar format is '{self.info['format']}', expected 'executorch'; re-export")
        try:
            self.run = pte_runner(path, threads)
        except ImportError as e:
            raise UserError(f"{path}: running a .pte needs the 'executorch' package; pip install executorch") from e
        except RuntimeError as e:
            raise UserError(f"{path}: ExecuTorch cannot load it ({e}); re-export the model") from e

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if is_static(self.info):  # `aml export --static-shape`: padded to the one size it takes
            return self.run(pad_static(x, int(self.info["image_size"]), str(self.path)))
        side = max(x.shape[-2:])
        top = int(self.info["image_size"])
        if side > max(top, MIN_SIDE + 1) or min(x.shape[-2:]) < MIN_SIDE:
            raise UserError(
                f"{self.path}: an image of {x.shape[-2]}x{x.shape[-1]} px; this .pte takes sides {MIN_SIDE} to "
                f"{top}: embed at --image-size {top} or less, or re-export with a larger --image-size"
            )
        return self.run(x)
