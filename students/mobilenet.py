"""The MobileNetV2 family: torchvision `features` (ends with the 1x1 conv to 1280 channels + ReLU6)."""

from __future__ import annotations

import torchvision
from torch import nn

from aml.registry import TORCHVISION_URL, backbone_keys, load_into, read_state_dict, register


@register(
    "mobilenetv2",
    feature_dim=1280,
    architecture="mobilenet_v2",
    default_role="student",
    weights_help=f"ImageNet {TORCHVISION_URL}/mobilenet_v2-b0353104.pth",
    description="MobileNetV2, the AML paper's second student (torchvision)",
)
def mobilenetv2(weights: str | None) -> nn.Module:
    features = torchvision.models.mobilenet_v2(weights=None).features
    if weights is not None:
        load_into(
            features, backbone_keys(read_state_dict(weights), drop=("classifier", "pool", "whiten", "proj")), weights
        )
    return features
