"""The on-device formats `aml export` writes besides ONNX / TorchScript: --format value -> its FormatExporter."""

from __future__ import annotations

from aml.export.coreml_format import COREML
from aml.export.executorch_format import EXECUTORCH
from aml.export.formats import FormatExporter
from aml.export.ort_format import ORT

MOBILE_FORMATS: dict[str, FormatExporter] = {f.name: f for f in (EXECUTORCH, COREML, ORT)}
