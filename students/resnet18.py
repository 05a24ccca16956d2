"""ResNet-18 student: torchvision ResNet-18 children without avgpool and fc (512-d)."""

from __future__ import annotations

from torch import nn

from aml.registry import register
from teachers.resnet import TORCHVISION, resnet_features


@register(
    "resnet18",
    feature_dim=512,
    architecture="resnet18",
    weights_help=f"ImageNet {TORCHVISION}/resnet18-f37072fd.pth",
    description="ResNet-18 GeM (small, fast)",
)
def resnet18(weights: str | None, random_init: bool) -> tuple[nn.Module, int, dict]:
    return resnet_features("resnet18", weights)
