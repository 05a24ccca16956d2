"""ONNX Runtime Mobile format (.ort): the ONNX encoder (fp32 / fp16 / int8, as `--format onnx` writes it) converted
as onnxruntime's own converter does (`python -m onnxruntime.tools.convert_onnx_models_to_ort`, its default "Fixed"
style): every graph optimisation applied but the x86-only NCHWc layout, saved as an ORT flatbuffer that the
reduced mobile runtime loads. The .ort itself is loaded back and verified (not the ONNX it came from)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from aml.export.formats import Calibration, FormatExporter
from aml.export.onnx_export import OPSET, check_onnx, export_onnx
from aml.export.verify import Runner, probe_batch
from aml.onnx_embed import session

DISABLED = ["NchwcTransformer"]  # x86-specific layout: an .ort with it does not run on ARM (as the converter does)


def onnx_to_ort(onnx_path: Path, ort_path: Path) -> None:
    """Optimise `onnx_path` as the ORT converter's Fixed style does and save it in ORT format at `ort_path`."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(ort_path)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED)


def export_ort(
    module: nn.Module, image_size: int, precision: str, calibration: Calibration, path: Path, static_shape: bool = False
) -> dict:
    """Write `module` as ONNX (int8: quantised by `aml.export.quantize`) beside `path`, then the .ort at `path`
    (`static_shape`: height and width fixed to `image_size`)."""
    example = torch.from_numpy(probe_batch(image_size, image_size, seed=99, batch=1))
    fp32 = path.with_name(f"{path.stem}-fp32.onnx")
    model = path.with_suffix(".onnx") if precision == "int8" else fp32
    export_onnx(module, fp32, example, static_shape=static_shape)
    if precision == "int8":
        from aml.export.quantize import quantize_int8

        quantize_int8(fp32, model, calibration())
    check_onnx(model)
    onnx_to_ort(model, path)
    return {
        "exporter": "torch.onnx.export(dynamo=False) -> onnxruntime ORT format (optimisations: all but NCHWc)",
        "opset": OPSET,
        "onnxruntime": ort.__version__,
    }


def ort_file_runner(path: Path) -> Runner:
    """numpy batch -> numpy vectors through an .ort file on onnxruntime (CPU)."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


ORT = FormatExporter(
    name="ort",
    precisions=("fp32", "fp16", "int8"),
    package="onnxruntime",
    pip="onnxruntime",
    export=export_ort,
    runner=ort_file_runner,
)
