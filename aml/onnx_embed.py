"""Embedding with an exported ONNX encoder on onnxruntime alone: no torch anywhere on this path.

Images load through `aml.data.images` (torch-free: PIL RGB, crop to bbx, Lanczos thumbnail to the longest
side, never upscaling), the loader the torch path uses too. Multi-scale (docs/REFERENCE.md §3) rescales the normalised
batch with a one-node ONNX `Resize` graph (linear, half_pixel, no antialias, scale given) — the ONNX
spelling of torch's
`interpolate(scale_factor=s, mode="bilinear", align_corners=False)` — and combines the per-scale vectors as
`l2n(mean_s(v_s^msp)^(1/msp))` with the `msp` the sidecar records.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from aml.data.images import Bbx, check_bbxs, load_image, same_shape_groups, to_array
from aml.errors import UserError, first_line
from aml.io import sha256_file
from aml.ort_session import session
from aml.sidecar import is_static, pad_static, read_sidecar, sidecar_path
from aml.threads import intra_op_threads

EPS = 1e-6
Runner = Callable[[np.ndarray], np.ndarray]  # normalised (B, 3, H, W) float32 -> (B, D) float32


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows divided by (L2 norm + 1e-6), as aml.nn.l2n."""
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


def resize_graph() -> bytes:
    """One ONNX Resize node: (B, C, H, W) float32 and scales (4,) -> bilinear rescale, torch semantics."""
    node = helper.make_node(
        "Resize",
        ["x", "", "scales"],
        ["y"],
        mode="linear",
        coordinate_transformation_mode="half_pixel",
        nearest_mode="floor",
    )
    graph = helper.make_graph(
        [node],
        "rescale",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "c", "h", "w"]),
            helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "c", "oh", "ow"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Rescaler:
    """Bilinear rescale of a normalised batch by a factor (the ONNX twin of aml.nn.rescale)."""

    def __init__(self, threads: int | None = None) -> None:
        self.sess = session(resize_graph(), threads)

    def __call__(self, x: np.ndarray, scale: float) -> np.ndarray:
        if scale == 1:
            return x
        scales = np.array([1, 1, scale, scale], dtype=np.float32)
        return self.sess.run(None, {"x": x, "scales": scales})[0]


def embed_batch(
    run: Runner, x: np.ndarray, scales: Sequence[float] = (1.0,), msp: float = 1.0, rescaler: Rescaler | None = None
) -> np.ndarray:
    """(B, D) vectors of a normalised batch; several scales combine as l2n(mean_s(v_s^msp)^(1/msp))."""
    scales = tuple(scales)
    if len(scales) == 1 and scales[0] == 1:
        return run(x)
    rescaler = rescaler or Rescaler()
    if len(scales) == 1:
        return run(rescaler(x, scales[0]))
    v = np.stack([run(rescaler(x, s)) for s in scales]).astype(np.float64)
    return l2n(np.power(np.power(v, msp).mean(axis=0), 1.0 / msp)).astype(np.float32)


def embed_images(
    run: Runner,
    paths: Sequence[str | os.PathLike],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scales: Sequence[float] = (1.0,),
    msp: float = 1.0,
    bbxs: Sequence[Bbx] | None = None,
    chunk: int = 32,
) -> np.ndarray:
    """(N, D) float32 vectors of images in list order; images of equal loaded size are run as one batch."""
    n = len(paths)
    check_bbxs(bbxs, n)
    rescaler = Rescaler() if tuple(scales) != (1.0,) else None
    out: np.ndarray | None = None

    def load(i: int) -> np.ndarray:
        return to_array(load_image(paths[i], image_size, bbxs[i] if bbxs is not None else None), mean, std)

    with ThreadPoolExecutor(max_workers=min(4, intra_op_threads())) as pool:
        for start in range(0, n, chunk):
            idx = list(range(start, min(n, start + chunk)))
            for members, x in same_shape_groups(zip(idx, pool.map(load, idx), strict=True)):
                v = embed_batch(run, x, scales, msp, rescaler)
                if out is None:
                    out = np.empty((n, v.shape[1]), dtype=np.float32)
                out[members] = v
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def check_pair(path: Path, info: dict[str, Any]) -> None:
    """The model file is the one its sidecar describes (the sha256 it records), or a one-line UserError."""
    want = info.get("sha256")
    if not want:
        raise UserError(f"{sidecar_path(path)}: field 'sha256' missing; re-export the model with `aml export`")
    if sha256_file(path) != want:
        raise UserError(
            f"{path}: does not match its sidecar {sidecar_path(path).name} (sha256 differs: an interrupted "
            "export or a file copied without its pair); re-export the model with `aml export`"
        )


class OnnxEncoder:
    """An exported encoder and its sidecar: `enc(x)` runs a normalised (B, 3, H, W) float32 batch."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: model not found; pass the .onnx file written by `aml export`")
        self.path = path
        self.info: dict[str, Any] = read_sidecar(path)
        check_pair(path, self.info)
        if self.info["format"] not in ("onnx", "ort"):
            raise UserError(f"{path}: sidecar format is '{self.info['format']}'; `aml embed` runs ONNX / ORT / .pte")
        try:
            self.sess = session(path, threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"{path}: onnxruntime cannot load it ({first_line(e)}); re-export the model") from e
        self.input = self.sess.get_inputs()[0].name

    @property
    def binary(self) -> bool:
        """Exported with --binary: the vectors are to be binarised (`aml.binary.pack_bits`) by the consumer."""
        return bool((self.info.get("output") or {}).get("binary"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if is_static(self.info):  # `aml export --static-shape`: padded to the one size it takes
            x = pad_static(x, int(self.info["image_size"]), str(self.path))
        return self.sess.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def embed(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        image_size: int | None = None,
        scales: Sequence[float] = (1.0,),
        bbxs: Sequence[Bbx] | None = None,
    ) -> np.ndarray:
        """(N, D) vectors of image files at the sidecar's image size (or `image_size`)."""
        info = self.info
        if tuple(scales) != (1.0,) and info["whiten"]:
            raise UserError(
                f"{self.path}: exported with the teacher's single-scale Lw folded in; "
                "multi-scale needs Lw after the scale combination: embed single-scale, or "
                "re-export without --whiten and whiten the combined vectors"
            )
        return embed_images(
            self,
            paths,
            image_size=image_size or int(info["image_size"]),
            mean=info["mean"],
            std=info["std"],
            scales=scales,
            msp=float(info["msp"]),
            bbxs=bbxs,
        )
