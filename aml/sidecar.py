"""The JSON sidecar beside an exported encoder: what the graph expects and what verification measured.

Torch-free, bottom layer: written by `aml.export`, read by `aml.onnx_embed` (`aml embed`).
`FILE.onnx` -> `FILE.onnx.json`. The export formats, precisions, the int8 calibration count and latency check
are named here once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from aml.errors import UserError
from aml.io import write_json

# export format -> file suffix (the on-device ones: aml.export.mobile.MOBILE_FORMATS)
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "executorch": ".pte", "coreml": ".mlpackage", "ort": ".ort"}
PRECISIONS = ("fp32", "fp16", "int8")
INPUT, OUTPUT = "images", "vectors"  # the exported graph's input and output names (the sidecar records them)
CALIB_COUNT = 32  # int8 calibration images drawn (seeded) from the calibration list
LATENCY_RUNS = 7  # paired fp32 / int8 runs an int8 export times (batch 1, its image size, 1 thread)
MAP_TOLERANCE = 1.0  # points of asymmetric mAP the fp16 / int8 retrieval gate accepts by default (--map-tolerance)
MAX_INT8_RATIO = 0.6  # int8 is recommended when it runs in at most this share of the fp32 time
SIDECAR_VERSION = 1
# `aml export --binary`: the sidecar's output.binary says the encoder's float vectors are to be binarised by the
# consumer (`aml embed` writes the codes; `aml search` keeps the float queries, scored against a binary index
# asymmetrically). The graph itself stays float: its equivalence gate, multi-scale and asymmetric use need that.
BINARY_RULE = (
    "bit = value > 2^-25 (compared in float32); numpy.packbits order: component 0 is the most significant bit of "
    "byte 0 (aml.binary)"
)
REQUIRED = ("format", "precision", "mean", "std", "image_size", "dim", "msp", "whiten", "teacher", "verification")


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """Where the sidecar of an exported model lives: the model's path + '.json'."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


def write_sidecar(model_path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Atomically write the sidecar of `model_path`; `info` must carry every REQUIRED field."""
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise ValueError(f"sidecar fields missing: {missing}")
    path = sidecar_path(model_path)
    write_json(path, {"sidecar_version": SIDECAR_VERSION, **info})
    return path


# How `aml.data.images` loads an image (the rule an app must repeat), recorded in every sidecar's `preprocessing`
COLOUR = "sRGB as stored: 8-bit RGB (PIL Image.convert('RGB')); no EXIF orientation applied, no ICC conversion"
RESIZE = "longest side to image_size, aspect ratio kept, never upscaled (PIL thumbnail, Lanczos)"
STATIC_PAD = "then padded at the bottom and right to image_size x image_size with 0 after normalisation (mean colour)"


def is_static(info: dict[str, Any]) -> bool:
    """Whether a sidecar's model takes only image_size x image_size inputs (`aml export --static-shape`)."""
    pre = info.get("preprocessing")
    return isinstance(pre, dict) and pre.get("static_shape") is True


def pad_static(x: np.ndarray, size: int, where: str = "model") -> np.ndarray:
    """A normalised (B, 3, h, w) batch padded at the bottom and right with 0 to (B, 3, size, size): the input of a
    static-shape model (STATIC_PAD); a UserError when a side is larger than `size`."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise UserError(
            f"{where}: an image of {h}x{w} px; this static-shape model takes {size}x{size}: embed at --image-size "
            f"{size} or less, or re-export with a larger --image-size"
        )
    return np.pad(x, ((0, 0), (0, 0), (0, size - h), (0, size - w))) if (h, w) != (size, size) else x


def preprocessing(
    image_size: int,
    mean: list[float],
    std: list[float],
    dim: int,
    *,
    static_shape: bool,
    whitened: bool,
    bounds: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The sidecar's `preprocessing`: everything an app needs to turn an image into the model's input and read
    its output (the same block for every format); `bounds` are a format's batch / side limits, if any."""
    size = int(image_size)
    shape: list[Any] = ["batch", 3, size, size] if static_shape else ["batch", 3, "height", "width"]
    return {
        "colour_space": COLOUR,
        "channel_order": "RGB",
        "resize": f"{RESIZE}; {STATIC_PAD}" if static_shape else RESIZE,
        "image_size": size,
        "value_range": [0.0, 1.0],
        "scale": "pixel / 255",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "normalise": "(pixel / 255 - mean[c]) / std[c] per RGB channel c",
        "layout": "NCHW",
        "static_shape": bool(static_shape),
        "input": {"name": INPUT, "dtype": "float32", "shape": shape, "bounds": bounds},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", int(dim)], "l2_normalised": True},
        "whitening_included": bool(whitened),
    }


def binary_output(dim: int) -> dict[str, Any]:
    """The sidecar's `output.binary` of a `dim`-d encoder exported with --binary."""
    return {"bits": int(dim), "bytes": (int(dim) + 7) // 8, "dtype": "uint8", "rule": BINARY_RULE}


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of an exported model, validated; a UserError names the file and the missing field."""
    path = sidecar_path(model_path)
    if not path.is_file():
        raise UserError(
            f"{path}: sidecar not found; `aml export` writes it beside {Path(model_path).name} "
            "(copy both files together)"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); re-export the model") from e
    if not isinstance(info, dict):
        raise UserError(f"{path}: not a JSON object ({type(info).__name__}); re-export the model with `aml export`")
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise UserError(f"{path}: field '{missing[0]}' missing; re-export the model with `aml export`")
    for field, problem in _problems(info):
        raise UserError(f"{path}: field '{field}': {problem}; re-export the model with `aml export`")
    return info


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _problems(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The fields of a sidecar whose values a reader cannot use: (field, what is wrong), in REQUIRED order."""
    bad = []
    if info["format"] not in FORMATS:
        bad.append(("format", f"{info['format']!r} is not one of {', '.join(FORMATS)}"))
    if info["precision"] not in PRECISIONS:
        bad.append(("precision", f"{info['precision']!r} is not one of {', '.join(PRECISIONS)}"))
    for key in ("mean", "std"):
        v = info[key]
        if not (isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)):
            bad.append((key, f"{v!r} is not 3 finite numbers (one per RGB channel)"))
        elif key == "std" and min(v) <= 0:
            bad.append((key, f"{v!r} holds a value <= 0"))
    for key in ("image_size", "dim"):
        v = info[key]
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            bad.append((key, f"{v!r} is not a positive whole number"))
    if not (_number(info["msp"]) and info["msp"] > 0):
        bad.append(("msp", f"{info['msp']!r} is not a finite number > 0"))
    w = info["whiten"]
    if w is not None and not (isinstance(w, dict) and all(isinstance(w.get(k), str) for k in ("dataset", "variant"))):
        bad.append(("whiten", f"{w!r} is neither null nor an object with string 'dataset' and 'variant'"))
    for key in ("teacher", "verification", "output"):
        v = info.get(key)
        if v is not None and not isinstance(v, dict):
            bad.append((key, f"{v!r} is neither null nor an object"))
    binary = (info.get("output") or {}).get("binary") if isinstance(info.get("output"), dict) else None
    if binary and not (isinstance(binary, dict) and binary.get("bits") == info["dim"]):
        bad.append(("output.binary", f"{binary!r} does not record {info['dim']} bits (the 'dim')"))
    if "sha256" in info and not (isinstance(info["sha256"], str) and len(info["sha256"]) == 64):
        bad.append(("sha256", f"{info['sha256']!r} is not a hex sha256"))
    return bad
