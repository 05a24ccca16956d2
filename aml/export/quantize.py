"""int8 static quantisation of an exported float32 ONNX encoder (onnxruntime.quantization, QDQ, per-channel).

The recipe (`Int8Recipe`) follows what onnxruntime's CPU provider runs as int8 kernels (count them with
`aml.export.quant_report.kernel_counts`):

- uint8 activations, int8 weights. On x86 onnxruntime fuses DequantizeLinear -> Conv -> QuantizeLinear into an
  int8 QLinearConv only for uint8 activations (`QDQIsInt8Allowed()` is true on ARM only); with int8
  activations every convolution whose input tensor has several consumers (residual adds, Swish
  `x * sigmoid(x)`, squeeze-excitation) stays a float Conv between Q / DQ pairs and NHWC transposes.
- The whole backbone is quantised, not only its convolutions: Clip / Relu (folded into the quantisation
  range), the residual Add, Swish and SE (Sigmoid, Mul, GlobalAveragePool), and the Pad / Slice of TF
  "same" padding (strided convolutions only: `aml.export.friendly` gives stride-1 ones no Pad), so tensors
  stay uint8 from one convolution to the next (QLinearAdd, QLinearMul, QLinearSigmoid, ...); a float op
  between them would cost a dequantise, a float pass and a quantise.
- The head stays float32: everything after the last convolution (GeM's x^p, L2N, a folded Lw), so outputs
  stay unit vectors and the whitening keeps full precision. So does the stem (the first convolution, which
  reads the normalised image, with its padding and activation up to the second convolution's input), whose
  float vectors track the fp32 student's most closely, but for a stem that ends in a max-pool (ResNet;
  `STEM_POOLS`). Weights use all 8 bits: 7-bit weights (`reduce_range`) lose accuracy and are only for x86
  CPUs without VNNI.
- onnxruntime has no quantised Pad fusion: a `DequantizeLinear -> Pad -> QuantizeLinear` with one set of
  quantisation parameters is rewritten as a Pad of the uint8 tensor with the zero point as its value
  (`fold_qdq_pads`; exact), and a Shape that read a dequantised tensor reads the uint8 one.

Calibration runs the float32 graph on real, normalised images (MinMax ranges): calibrate on images like the
ones the encoder will embed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from aml.io import scratch_dir
from aml.sidecar import INPUT

# The operator types quantised inside the backbone (onnxruntime fuses each with its Q / DQ neighbours).
QUANTIZED_OPS = ("Conv", "Clip", "Relu", "Add", "Mul", "Sigmoid", "GlobalAveragePool", "Pad", "Slice")
# A stem ending in one of these is quantised too: onnxruntime moves the first QuantizeLinear above a max-pool
# (they commute) and then runs the pool on uint8 in NCHW, far slower than the float pool, unless the int8 stem
# convolution before it puts the pool into the NHWC int8 chain.
STEM_POOLS = ("MaxPool",)


@dataclass(frozen=True)
class Int8Recipe:
    """The quantisation choices (the defaults are the export's; the others are for measuring alternatives)."""

    activations: str = "uint8"  # "uint8" | "int8"
    ops: tuple[str, ...] = QUANTIZED_OPS
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: for x86 without VNNI, where u8 x s8 products can saturate
    float_stem: bool = True
    fold_pads: bool = True


class _Batches(CalibrationDataReader):
    """Feeds (1, 3, H, W) float32 calibration inputs to the calibrator, one at a time."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {INPUT: np.ascontiguousarray(x, dtype=np.float32)}


def _ancestors(graph: onnx.GraphProto, node: onnx.NodeProto) -> set[str]:
    """Names of `node` and of every node it depends on."""
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack += [producer[i] for i in n.input if i in producer]
    return seen


def float_nodes(graph: onnx.GraphProto, float_stem: bool = True) -> list[str]:
    """Nodes the quantiser must leave float32: the head (after the last Conv) and, with `float_stem`, the stem
    (the first Conv, what comes before it and what follows it up to the second Conv's input) unless the stem
    ends in a MaxPool (see STEM_POOLS)."""
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if not convs:
        return []
    body = _ancestors(graph, convs[-1])
    if float_stem and len(convs) > 1:
        producer = {o: n for n in graph.node for o in n.output}
        stem_out = producer.get(convs[1].input[0])
        stem = _ancestors(graph, stem_out if stem_out is not None else convs[0])
        if not any(n.op_type in STEM_POOLS for n in graph.node if n.name in stem):
            body -= stem
    return [n.name for n in graph.node if n.name not in body]


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Give every consumer of a float initializer its own copy (the exporter merges equal constants, e.g. the
    zero biases of a random-init net; quantising one consumer must not turn another's input into a
    DequantizeLinear output, nor requantise a bias on another layer's scale); returns the copies made."""
    g = model.graph
    floats = {t.name: t for t in g.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    seen: set[str] = set()
    made = 0
    for node in g.node:
        for k, name in enumerate(node.input):
            if name not in floats:
                continue
            if name in seen:
                made += 1
                copy = onnx.TensorProto()
                copy.CopyFrom(floats[name])
                copy.name = f"{name}_aml_copy{made}"
                g.initializer.append(copy)
                node.input[k] = copy.name
            seen.add(name)
    return made


def _initializer(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    found = next((t for t in graph.initializer if t.name == name), None)
    return None if found is None else numpy_helper.to_array(found)


def _same_params(graph: onnx.GraphProto, dq: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """Whether a DequantizeLinear and a QuantizeLinear use one (per-tensor) scale and zero point."""
    if len(dq.input) < 3 or len(q.input) < 3:
        return False
    a = [_initializer(graph, n) for n in dq.input[1:3]]
    b = [_initializer(graph, n) for n in q.input[1:3]]
    if any(v is None for v in a + b):
        return False
    return all(x.size == 1 and x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def fold_qdq_pads(model: onnx.ModelProto) -> int:
    """Rewrite `DQ(x_q) -> Pad(constant 0) -> Q` with equal parameters as `Pad(x_q, value=zero point)` and point
    Shape nodes at the quantised tensor instead of its dequantised copy; returns the number of rewrites."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gone: set[int] = set()  # ids of the nodes to remove
    done = 0
    for pad in [n for n in nodes if n.op_type == "Pad"]:
        dq = producer.get(pad.input[0])
        outs = consumers.get(pad.output[0], [])
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = _initializer(g, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or len(outs) != 1
            or outs[0].op_type != "QuantizeLinear"
            or mode != b"constant"
            or value is None
            or np.any(value != 0)
            or not _same_params(g, dq, outs[0])
        ):
            continue
        q = outs[0]
        pad.input[:] = [dq.input[0], pad.input[1], dq.input[2], *pad.input[3:4]]  # [3]: axes (opset >= 18)
        pad.output[0] = q.output[0]
        gone.add(id(q))
        done += 1
    for shape in [n for n in nodes if n.op_type == "Shape"]:
        dq = producer.get(shape.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            shape.input[0] = dq.input[0]
            done += 1
    used = {i for n in nodes if id(n) not in gone for i in n.input} | {o.name for o in g.output}
    gone |= {id(n) for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] not in used}
    keep = [n for n in nodes if id(n) not in gone]
    del g.node[:]
    g.node.extend(keep)
    return done


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    batches: Iterable[np.ndarray],
    recipe: Int8Recipe = Int8Recipe(),
) -> None:
    """Write a static int8 QDQ model of the backbone (uint8 activations, per-channel int8 weights; stem and
    head float32) calibrated on `batches`."""
    if recipe.activations not in ("uint8", "int8"):
        raise ValueError(f"activations {recipe.activations!r}; expected 'uint8' or 'int8'")
    with scratch_dir(out_path) as tmp:
        prepped, quantized = tmp / "prepped.onnx", tmp / "quantized.onnx"
        # shape inference + graph optimisation first, as onnxruntime recommends before static quantisation
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
        model = onnx.load(str(prepped))
        if unshare_initializers(model):
            onnx.save(model, str(prepped))
        quantize_static(
            str(prepped),
            str(quantized),
            _Batches(batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.ops),
            nodes_to_exclude=float_nodes(model.graph, recipe.float_stem),
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        model = onnx.load(str(quantized))
        if recipe.fold_pads:
            fold_qdq_pads(model)
        onnx.save(model, str(out_path))
