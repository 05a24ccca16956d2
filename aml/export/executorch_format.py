"""ExecuTorch export: the encoder through torch.export to a .pte program delegated to XNNPACK (fp32 / int8).

Shapes: batch 1..MAX_BATCH and height / width MIN_SIDE..image size are dynamic (torch.export `Dim`s; ExecuTorch
plans memory for the upper bounds). The example batch is 2 because torch.export specialises a size of 0 or 1.
MIN_SIDE is 64: torch.export must prove that no map of a stride-32 backbone is 1 wide, and the TF "same" padding
of `aml.export.friendly` makes each stride-2 size ceil(i / 2) = (i + (-i mod 2)) // 2, whose lower bound
interval arithmetic takes as i // 2 (the mod as 0): five halvings keep it >= 2 only from 64.

int8: PT2E static quantisation with ExecuTorch's XNNPACKQuantizer (symmetric int8, per-channel weights) on the
backbone and the student head (`QUANTIZED_MODULES`); GeM, L2N and a folded whitening stay float32, as in the ONNX
int8 recipe (`aml.export.quantize`). Calibration runs the prepared graph on the real images the caller passes.

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

QUANTIZED_MODULES = ("net.features", "net.glam", "net.proj")  # Encoder submodules quantised for int8


def dynamic_shapes(image_size: int) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes of the encoder's one input: batch, height and width."""
    side = max(int(image_size), MIN_SIDE + 1)
    h = torch.export.Dim("height", min=MIN_SIDE, max=side)
    w = torch.export.Dim("width", min=MIN_SIDE, max=side)
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH), 2: h, 3: w},)


def _in_scope(node: Any, scope: tuple[str, ...]) -> bool:
    """Whether a graph node comes from one of the modules named in `scope` (its nn_module_stack); a node without
    one (a weight, the input) is in scope: the quantiser asks about every node of an operator's pattern."""
    stack = node.meta.get("nn_module_stack")
    if not stack or node.op != "call_function":
        return True
    return any(fqn == name or fqn.startswith(name + ".") for fqn, _ in stack.values() for name in scope)


def _quantizer(module: nn.Module) -> Any:
    """XNNPACKQuantizer for the backbone and head of `module` (everything when it has none of QUANTIZED_MODULES)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    names = dict(module.named_modules())
    scope = tuple(n for n in QUANTIZED_MODULES if names.get(n) is not None)
    # set_module_name left the convolutions float here (executorch 1.5.1): a node filter on the module stack
    return q.set_filter_function(lambda node: _in_scope(node, scope)) if scope else q


def quantize_pt2e(
    module: nn.Module, example: torch.Tensor, image_size: int, calibration: Calibration
) -> torch.export.ExportedProgram:
    """The int8 ExportedProgram of `module`: prepared, calibrated on `calibration()` batches, converted."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    shapes = dynamic_shapes(image_size)
    graph = torch.export.export(module, (example,), dynamic_shapes=shapes).module()
    prepared = prepare_pt2e(graph, _quantizer(module))
    with torch.no_grad():
        for batch in calibration():
            prepared(torch.from_numpy(batch))
    return torch.export.export(convert_pt2e(prepared), (example,), dynamic_shapes=shapes)


def export_pte(module: nn.Module, image_size: int, precision: str, calibration: Calibration, path: Path) -> dict:
    """Write `module` as an XNNPACK-delegated .pte at `path` (atomically); returns the sidecar's export fields."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.version import __version__ as et_version

    module.eval()
    example = torch.from_numpy(probe_batch(image_size, image_size, seed=99, batch=2))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        if precision == "int8":
            program = quantize_pt2e(module, example, image_size, calibration)
        else:
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes(image_size))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    with atomic_write(path, "wb") as f:
        lowered.write_to_file(f)
    delegated = sum(1 for d in lowered.executorch_program.execution_plan[0].delegates if d.id == "XnnpackBackend")
    return {
        "exporter": "torch.export + executorch.exir.to_edge_transform_and_lower(XnnpackPartitioner)",
        "executorch": et_version,
        "delegate": "XnnpackBackend",
        "delegated_subgraphs": delegated,
        "quantizer": "XNNPACKQuantizer symmetric int8, per-channel weights (PT2E)" if precision == "int8" else None,
        "dynamic": {"batch": [1, MAX_BATCH], "side": [MIN_SIDE, max(int(image_size), MIN_SIDE + 1)]},
    }


EXECUTORCH = FormatExporter(
    name="executorch",
    precisions=("fp32", "int8"),
    package="executorch",
    pip="executorch==1.5.1",
    export=export_pte,
    runner=pte_runner,
)
