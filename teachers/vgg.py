"""The VGG family: torchvision VGG16 `features` without the last max-pool (cirtorch layout, 512-d)."""

from __future__ import annotations

import torchvision
from torch import nn

from aml.registry import CIRTORCH_URL, TORCHVISION_URL, backbone_keys, load_into, read_state_dict, register


@register(
    "vgg16",
    feature_dim=512,
    architecture="vgg16",
    default_role="teacher",
    weights_help=f"ImageNet {TORCHVISION_URL}/vgg16-397923af.pth, or the cirtorch retrieval net "
    f"{CIRTORCH_URL}/retrieval-SfM-120k/retrievalSfM120k-vgg16-gem-b4dcdc6.pth",
    description="VGG16 GeM (cirtorch retrievalSfM120k-vgg16-gem)",
)
def vgg16(weights: str | None) -> nn.Module:
    features = nn.Sequential(*list(torchvision.models.vgg16(weights=None).features.children())[:-1])
    if weights is not None:
        sd = backbone_keys(read_state_dict(weights), drop=("classifier", "avgpool", "pool", "whiten", "proj"))
        load_into(features, sd, weights)
    return features
