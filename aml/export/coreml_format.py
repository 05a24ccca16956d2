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
from aml.pte_embed import MAX_BATCH, MIN_SIDE

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


def coreml_friendly(module: nn.Module) -> nn.Module:
    """A copy of `module` whose TF "same" pads (`aml.export.friendly.TFSamePad`) pad one axis at a time."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TFSamePad):
                setattr(parent, name, PadByAxis(child))
    return module


def _meta(module: nn.Module, image_size: int, dim: int) -> dict[str, Any]:
    net = getattr(module, "net", None)
    return {
        "input": INPUT,
        "output": OUTPUT,
        "layout": "NCHW RGB, normalised with mean / std",
        "mean": list(getattr(net, "mean", [])),
        "std": list(getattr(net, "std", [])),
        "image_size": int(image_size),
        "dim": int(dim),
    }


def export_mlpackage(module: nn.Module, image_size: int, precision: str, calibration: Calibration, path: Path) -> dict:
    """Write `module` as a Core ML ML program at `path` (a .mlpackage folder); returns the sidecar's export fields."""
    import coremltools as ct

    module = coreml_friendly(module).eval()
    example = torch.from_numpy(probe_batch(image_size, image_size, seed=99, batch=1))
    side = ct.RangeDim(lower_bound=MIN_SIDE, upper_bound=max(int(image_size), MIN_SIDE + 1), default=int(image_size))
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
    model.user_defined_metadata[META_KEY] = json.dumps(_meta(module, image_size, dim), sort_keys=True)
    model.short_description = "aml query encoder: normalised images -> L2-normalised vectors"
    model.save(str(path))
    return {"exporter": "torch.jit.trace -> coremltools.convert(mlprogram)", "coremltools": ct.__version__}


def check_mlpackage(path: Path, image_size: int, dim: int) -> dict[str, Any]:
    """Names, shapes and metadata of a written .mlpackage (what Linux can check); VerificationError when wrong."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    desc = spec.description
    inputs, outputs = [i.name for i in desc.input], [o.name for o in desc.output]
    ranges = [(r.lowerBound, r.upperBound) for r in desc.input[0].type.multiArrayType.shapeRange.sizeRanges]
    meta = json.loads(desc.metadata.userDefined.get(META_KEY, "{}"))
    want_ranges = [(1, MAX_BATCH), (3, 3)] + [(MIN_SIDE, max(int(image_size), MIN_SIDE + 1))] * 2
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
        model.predict({INPUT: probe_batch(MIN_SIDE, MIN_SIDE, seed=0, batch=1)})
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
