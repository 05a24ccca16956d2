"""Core ML export: the traced encoder converted by coremltools to an ML program (.mlpackage, a folder), fp16 by
default (compute precision; inputs and outputs stay float32), fp32 on request.

Conversion runs on Linux; running a Core ML model needs macOS (coremltools' `libcoremlpython`). Here the written
package is checked for its input / output names and shapes and its embedded metadata (`check_mlpackage`); on
macOS `runner` exists and the export applies the same numeric gates as ONNX. The input is flexible: batch
1..MAX_BATCH, height and width MIN_SIDE..image size (`ct.RangeDim`). coremltools is optional: imported where used.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aml.export.formats import Calibration, FormatExporter
from aml.export.friendly import TFSamePad
from aml.export.onnx_export import INPUT, OUTPUT
from aml.export.verify import Runner, VerificationError, probe_batch
from aml.io import json_text
from aml.pte_embed import MAX_BATCH, MIN_SIDE
from aml.sidecar import preprocessing

META_KEY = "aml"  # user-defined metadata key holding the JSON of what the encoder expects
NUMERIC_CHECK = (
    "on macOS: pip install 'coremltools==9.0' and rerun the same `aml export --format coreml ...` command; "
    "the export then runs the Core ML model and applies the equivalence (fp32) or retrieval (fp16) gate"
)


class PadByAxis(nn.Module):
    """A TFSamePad as a static pad and a dynamic crop: coremltools converts no dynamic pad of 4-d maps, so each
    axis gets the largest padding any size needs (r = s - 1) and is then cropped to the padding of its size."""

    def __init__(self, same: TFSamePad) -> None:
        super().__init__()
        self.same = same
        most = [max(same._total(i, a) for i in range(same.s[a])) for a in range(2)]  # r runs over 0..s-1
        self.left = [m // 2 for m in most]
        self.pads = [self.left[1], most[1] - self.left[1], self.left[0], most[0] - self.left[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        th, tw = self.same._total(h, 0), self.same._total(w, 1)
        y = F.pad(x, self.pads)
        top, left = self.left[0] - th // 2, self.left[1] - tw // 2
        return y[..., top : top + h + th, left : left + w + tw]


class FixedPad(nn.Module):
    """The constant zero padding a TF "same" pad gives at one input size (a static-shape package)."""

    def __init__(self, pads: list[int]) -> None:
        super().__init__()
        self.pads = [int(p) for p in pads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads) if any(self.pads) else x


def _fixed_pads(module: nn.Module, size: int) -> dict[str, list[int]]:
    """Each TF "same" pad's [left, right, top, bottom] when `module` runs on a size x size image."""
    pads: dict[str, list[int]] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, TFSamePad):

            def record(mod: TFSamePad, args: tuple, name: str = name) -> None:
                th, tw = mod._total(int(args[0].shape[-2]), 0), mod._total(int(args[0].shape[-1]), 1)
                pads[name] = [tw // 2, tw - tw // 2, th // 2, th - th // 2]

            hooks.append(m.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return pads


def coreml_friendly(module: nn.Module, static_size: int | None = None) -> nn.Module:
    """A copy of `module` whose TF "same" pads (`aml.export.friendly.TFSamePad`) pad one axis at a time, or, with
    `static_size`, are the constant pads of that input size (coremltools folds the dynamic ones' arithmetic into
    shapes it cannot cast)."""
    module = copy.deepcopy(module)
    fixed = _fixed_pads(module, static_size) if static_size is not None else {}
    for parent_name, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TFSamePad):
                full = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, FixedPad(fixed[full]) if static_size is not None else PadByAxis(child))
    return module


def _meta(module: nn.Module, image_size: int, dim: int, static_shape: bool = False) -> dict[str, Any]:
    net = getattr(module, "net", None)
    mean, std = list(getattr(net, "mean", [])), list(getattr(net, "std", []))
    whitened = getattr(module, "lw", None) is not None
    bounds = {"batch": [1, MAX_BATCH], "side": side_range(image_size, static_shape)}
    full = preprocessing(image_size, mean, std, dim, static_shape=static_shape, whitened=whitened, bounds=bounds)
    return {
        "preprocessing": full,  # the sidecar's block (aml.sidecar.preprocessing), for an app that reads the model
        "input": INPUT,
        "output": OUTPUT,
        "layout": "NCHW RGB, normalised with mean / std",
        "mean": list(getattr(net, "mean", [])),
        "std": list(getattr(net, "std", [])),
        "image_size": int(image_size),
        "dim": int(dim),
    }


def side_range(image_size: int, static_shape: bool = False) -> list[int]:
    """[shortest, longest] image side the package takes."""
    return [int(image_size)] * 2 if static_shape else [MIN_SIDE, max(int(image_size), MIN_SIDE + 1)]


def export_mlpackage(
    module: nn.Module, image_size: int, precision: str, calibration: Calibration, path: Path, static_shape: bool = False
) -> dict:
    """Write `module` as a Core ML ML program at `path` (a .mlpackage folder; `static_shape`: height and width fixed
    to `image_size`); returns the sidecar's export fields."""
    import coremltools as ct

    module = coreml_friendly(module, int(image_size) if static_shape else None).eval()
    example = torch.from_numpy(probe_batch(image_size, image_size, seed=99, batch=1))
    low, high = side_range(image_size, static_shape)
    side = int(image_size) if static_shape else ct.RangeDim(lower_bound=low, upper_bound=high, default=int(image_size))
    shape = ct.Shape((ct.RangeDim(1, MAX_BATCH, default=1), 3, side, side))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        dim = int(module(example).shape[1])
        model = ct.convert(
            traced,
            inputs=[ct.TensorType(name=INPUT, shape=shape, dtype=np.float32)],
            outputs=[ct.TensorType(name=OUTPUT, dtype=np.float32)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            minimum_deployment_target=ct.target.iOS16,
        )
    model.user_defined_metadata[META_KEY] = json_text(_meta(module, image_size, dim, static_shape))
    model.short_description = "aml query encoder: normalised images -> L2-normalised vectors"
    model.save(str(path))
    return {"exporter": "torch.jit.trace -> coremltools.convert(mlprogram)", "coremltools": ct.__version__}


def check_mlpackage(path: Path, image_size: int, dim: int, static_shape: bool = False) -> dict[str, Any]:
    """Names, shapes and metadata of a written .mlpackage (what Linux can check); VerificationError when wrong."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    desc = spec.description
    inputs, outputs = [i.name for i in desc.input], [o.name for o in desc.output]
    ranges = [(r.lowerBound, r.upperBound) for r in desc.input[0].type.multiArrayType.shapeRange.sizeRanges]
    meta = json.loads(desc.metadata.userDefined.get(META_KEY, "{}"))
    want_ranges = [(1, MAX_BATCH), (3, 3)] + [tuple(side_range(image_size, static_shape))] * 2
    found = {"inputs": inputs, "outputs": outputs, "input_ranges": ranges, "metadata": meta}
    problems = [
        what
        for what, ok in (
            (f"inputs {inputs} (want ['{INPUT}'])", inputs == [INPUT]),
            (f"outputs {outputs} (want ['{OUTPUT}'])", outputs == [OUTPUT]),
            (f"input ranges {ranges} (want {want_ranges})", ranges == want_ranges),
            (f"metadata image_size / dim {meta.get('image_size')} / {meta.get('dim')}", meta.get("dim") == dim),
            ("ML program", spec.WhichOneof("Type") == "mlProgram"),
        )
        if not ok
    ]
    if problems:
        raise VerificationError(f"{path.name}: Core ML package check failed: {'; '.join(problems)}; nothing written")
    return found | {"passed": True}


def mlpackage_runner(path: Path) -> Runner | None:
    """numpy batch -> numpy vectors through Core ML (macOS only); None where Core ML cannot run (Linux)."""
    import coremltools as ct

    try:
        model = ct.models.MLModel(str(path))
        side = int(model.get_spec().description.input[0].type.multiArrayType.shapeRange.sizeRanges[2].lowerBound)
        model.predict({INPUT: probe_batch(side, side, seed=0, batch=1)})
    except Exception:  # noqa: BLE001 - off macOS coremltools raises on predict (no libcoremlpython)
        return None
    return lambda x: np.concatenate([model.predict({INPUT: x[i : i + 1]})[OUTPUT] for i in range(len(x))])


COREML = FormatExporter(
    name="coreml",
    precisions=("fp16", "fp32"),
    package="coremltools",
    pip="coremltools==9.0",
    export=export_mlpackage,
    runner=mlpackage_runner,
    check=check_mlpackage,
    numeric_check=NUMERIC_CHECK,
)
