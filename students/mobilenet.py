"""MobileNetV2 student: torchvision `features` (ends with the 1x1 conv to 1280 channels + ReLU6)."""

from __future__ import annotations

import torchvision
from torch import nn

from aml.registry import load_into, read_state_dict, register
from teachers.resnet import TORCHVISION, backbone_keys


@register(
    "mobilenetv2",
    feature_dim=1280,
    architecture="mobilenet_v2",
    weights_help=f"ImageNet {TORCHVISION}/mobilenet_v2-b0353104.pth",
    description="MobileNetV2, the AML paper's second student (torchvision)",
)
def mobilenetv2(weights: str | None, random_init: bool) -> tuple[nn.Module, int, dict]:
    features = torchvision.models.mobilenet_v2(weights=None).features
    if weights is not None:
        load_into(
            features, backbone_keys(read_state_dict(weights), drop=("classifier", "pool", "whiten", "proj")), weights
        )
    return features, 1280, {"architecture": "mobilenet_v2"}
