"""The ResNet family: torchvision ResNet children without avgpool and fc (cirtorch layout).

ResNet-50/101/152 are teachers (101 is the AML teacher); ResNet-18 is a small, fast student.
"""

from __future__ import annotations

import torchvision
from torch import nn

from aml.registry import CIRTORCH_URL, TORCHVISION_URL, backbone_keys, load_into, read_state_dict, register

# torchvision ResNet attribute -> position in cirtorch's `features` Sequential
_RESNET_KEYS = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def resnet_features(arch: str, weights: str | None) -> nn.Module:
    """cirtorch's ResNet backbone (conv1 .. layer4) with weights from a torchvision or cirtorch file."""
    features = nn.Sequential(*list(getattr(torchvision.models, arch)(weights=None).children())[:-2])
    if weights is not None:
        sd = backbone_keys(read_state_dict(weights), _RESNET_KEYS, drop=("fc", "pool", "whiten", "proj"))
        load_into(features, sd, weights)
    return features


def _help(tv_file: str, cirtorch_file: str | None = None) -> str:
    s = f"ImageNet {TORCHVISION_URL}/{tv_file}"
    if cirtorch_file:
        s += f", or the cirtorch retrieval net {CIRTORCH_URL}/retrieval-SfM-120k/{cirtorch_file}"
    return s


@register(
    "rn50",
    feature_dim=2048,
    architecture="resnet50",
    default_role="teacher",
    weights_help=_help("resnet50-0676ba61.pth", "rSfM120k-tl-resnet50-gem-w-97bf910.pth"),
    description="ResNet-50 GeM (torchvision layout)",
)
def rn50(weights: str | None) -> nn.Module:
    return resnet_features("resnet50", weights)


@register(
    "rn101",
    feature_dim=2048,
    architecture="resnet101",
    default_role="teacher",
    weights_help=_help("resnet101-63fe2227.pth", "retrievalSfM120k-resnet101-gem-b80fb85.pth"),
    description="ResNet-101 GeM, the AML teacher (cirtorch retrievalSfM120k-resnet101-gem)",
)
def rn101(weights: str | None) -> nn.Module:
    return resnet_features("resnet101", weights)


@register(
    "rn152",
    feature_dim=2048,
    architecture="resnet152",
    default_role="teacher",
    weights_help=_help("resnet152-394f9c45.pth", "rSfM120k-tl-resnet152-gem-w-f39cada.pth"),
    description="ResNet-152 GeM",
)
def rn152(weights: str | None) -> nn.Module:
    return resnet_features("resnet152", weights)


@register(
    "resnet18",
    feature_dim=512,
    architecture="resnet18",
    default_role="student",
    weights_help=_help("resnet18-f37072fd.pth"),
    description="ResNet-18 GeM (small, fast)",
)
def resnet18(weights: str | None) -> nn.Module:
    return resnet_features("resnet18", weights)
