"""ExecuTorch export: the encoder through torch.export to a .pte program delegated to XNNPACK (fp32 / int8).

Shapes: batch 1..MAX_BATCH and height / width MIN_SIDE..image size are dynamic (torch.export `Dim`s; ExecuTorch
plans memory for the upper bounds). The example batch is 2 because torch.export specialises a size of 0 or 1.
MIN_SIDE is 64: torch.export must prove that no map of a stride-32 backbone is 1 wide, and the TF "same" padding
of `aml.export.friendly` makes each stride-2 size ceil(i / 2) = (i + (-i mod 2)) // 2, whose lower bound
interval arithmetic takes as i // 2 (the mod as 0): five halvings keep it >= 2 only from 64.

int8: PT2E static quantisation with ExecuTorch's XNNPACKQuantizer (symmetric int8, per-channel weights) on the
backbone and the student's 1x1 projection, with the float32 nodes of the ONNX int8 recipe (`aml.export.quantize`):
the stem (the first convolution, which reads the normalised image, up to the second convolution's input; unless
it ends in a max-pool, `STEM_POOLS`) and the head after the last convolution (GeM, L2N, a folded whitening), by
a node filter over the exported graph (`float_node_names`). Calibration runs the prepared graph on the real
images the caller passes.

The packages (executorch, torchao) are optional: they are imported where used, never at import time.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aml.export.formats import Calibration, FormatExporter
from aml.export.verify import probe_batch
from aml.io import atomic_write
from aml.pte_embed import MAX_BATCH, MIN_SIDE, pte_runner


def dynamic_shapes(image_size: int, static_shape: bool = False) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes of the encoder's one input: batch, height and width (`static_shape`: batch
    only; height and width are the example's)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if static_shape:
        return ({0: batch},)
    side = max(int(image_size), MIN_SIDE + 1)
    h = torch.export.Dim("height", min=MIN_SIDE, max=side)
    w = torch.export.Dim("width", min=MIN_SIDE, max=side)
    return ({0: batch, 2: h, 3: w},)


def side_bounds(image_size: int, static_shape: bool = False) -> list[int]:
    """[shortest, longest] image side a .pte takes."""
    return [int(image_size)] * 2 if static_shape else [MIN_SIDE, max(int(image_size), MIN_SIDE + 1)]


CONVS = ("conv1d", "conv2d", "convolution")  # aten operators the stem / head rule counts as convolutions
STEM_POOLS = ("max_pool2d", "max_pool2d_with_indices")  # a stem ending in one is quantised (as in ONNX int8)
# what XNNPACKQuantizer fuses into a convolution's pattern (it annotates a conv followed by a ReLU only as conv + ReLU)
FUSED = ("batch_norm", "_native_batch_norm_legit_no_training", "relu", "relu_", "hardtanh", "hardtanh_")


def _op(node: Any) -> str:
    """The aten operator name of a call_function node ("conv2d" for torch.ops.aten.conv2d.default), else ""."""
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return name.split(".")[0]


def _ancestors(node: Any) -> set[Any]:
    """`node` and every node it depends on."""
    seen: set[Any] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += n.all_input_nodes
    return seen


def float_node_names(graph: torch.fx.Graph, float_stem: bool = True) -> set[str]:
    """Operator nodes the quantiser must leave float32: the head (after the last convolution and the BatchNorm /
    activation fused with it, `FUSED`) and, with
    `float_stem`, the stem (the first convolution and what follows it up to the second one's input) unless the
    stem holds a max-pool; the rule of `aml.export.quantize.float_nodes`, on a torch.export graph."""
    ops = [n for n in graph.nodes if n.op == "call_function"]
    convs = [n for n in ops if _op(n) in CONVS]
    if not convs:
        return set()
    body, last = _ancestors(convs[-1]), convs[-1]
    while len(last.users) == 1 and _op(next(iter(last.users))) in FUSED:  # the last conv's BN / activation
        last = next(iter(last.users))
        body.add(last)
    if float_stem and len(convs) > 1:
        first_input = convs[1].all_input_nodes[0]
        stem = _ancestors(first_input) & {n for n in ops}
        if not any(_op(n) in STEM_POOLS for n in stem):
            body -= stem
    return {n.name for n in ops if n not in body}


def _quantizer(excluded: set[str]) -> Any:
    """XNNPACKQuantizer (symmetric int8, per-channel weights) for every operator node not named in `excluded`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    # set_module_name left the convolutions float here (executorch 1.5.1): a node filter instead; the quantiser
    # asks about every node of an operator's pattern, weights and the input (no call_function) included
    return q.set_filter_function(lambda node: node.op != "call_function" or node.name not in excluded)


def quantize_pt2e(
    module: nn.Module,
    example: torch.Tensor,
    image_size: int,
    calibration: Calibration,
    float_stem: bool = True,
    static_shape: bool = False,
) -> torch.export.ExportedProgram:
    """The int8 ExportedProgram of `module` (stem and head float32, `float_node_names`): prepared, calibrated on
    `calibration()` batches, converted."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    shapes = dynamic_shapes(image_size, static_shape)
    graph = torch.export.export(module, (example,), dynamic_shapes=shapes).module()
    prepared = prepare_pt2e(graph, _quantizer(float_node_names(graph.graph, float_stem)))
    with torch.no_grad():
        for batch in calibration():
            prepared(torch.from_numpy(batch))
    return torch.export.export(convert_pt2e(prepared), (example,), dynamic_shapes=shapes)


def export_pte(
    module: nn.Module, image_size: int, precision: str, calibration: Calibration, path: Path, static_shape: bool = False
) -> dict:
    """Write `module` as an XNNPACK-delegated .pte at `path` (atomically; `static_shape`: height and width fixed
    to `image_size`); returns the sidecar's export fields."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.version import __version__ as et_version

    module.eval()
    example = torch.from_numpy(probe_batch(image_size, image_size, seed=99, batch=2))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        if precision == "int8":
            program = quantize_pt2e(module, example, image_size, calibration, static_shape=static_shape)
        else:
            shapes = dynamic_shapes(image_size, static_shape)
            program = torch.export.export(module, (example,), dynamic_shapes=shapes)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with atomic_write(path, "wb") as f:
        lowered.write_to_file(f)
    delegated = sum(1 for d in lowered.executorch_program.execution_plan[0].delegates if d.id == "XnnpackBackend")
    return {
        "exporter": "torch.export + executorch.exir.to_edge_transform_and_lower(XnnpackPartitioner)",
        "executorch": et_version,
        "delegate": "XnnpackBackend",
        "delegated_subgraphs": delegated,
        "quantizer": (
            "XNNPACKQuantizer symmetric int8, per-channel weights (PT2E); stem and head float32"
            if precision == "int8"
            else None
        ),
        "dynamic": {"batch": [1, MAX_BATCH], "side": side_bounds(image_size, static_shape)},
    }


EXECUTORCH = FormatExporter(
    name="executorch",
    precisions=("fp32", "int8"),
    package="executorch",
    pip="executorch==1.5.1",
    export=export_pte,
    runner=pte_runner,
)
