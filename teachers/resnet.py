"""ResNet-50/101/152 teachers: torchvision ResNet children without avgpool and fc (cirtorch layout)."""

from __future__ import annotations

import torchvision
from torch import nn

from aml.registry import load_into, read_state_dict, register

# torchvision ResNet attribute -> position in cirtorch's `features` Sequential
_RESNET_KEYS = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"
TORCHVISION = "https://download.pytorch.org/models"


def backbone_keys(sd: dict, renames: dict[str, int] | None = None, drop: tuple[str, ...] = ()) -> dict:
    """Keys of a backbone file, as the `features` Sequential names them.

    Accepts a torchvision ImageNet state dict (attributes renamed by `renames`, heads in `drop` removed),
    cirtorch `features.N.*` keys, or a bare features state dict (`N.*`, cirtorch's imagenet files).
    """
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in drop:
            continue
        if renames and head in renames:
            k = f"{renames[head]}.{rest}"
        elif head == "features":
            k = rest
        out[k] = v
    return out


def resnet_features(arch: str, weights: str | None) -> tuple[nn.Module, int, dict]:
    """cirtorch's ResNet backbone (conv1 .. layer4) with weights from a torchvision or cirtorch file."""
    net = getattr(torchvision.models, arch)(weights=None)
    channels = net.fc.in_features
    features = nn.Sequential(*list(net.children())[:-2])
    if weights is not None:
        sd = backbone_keys(read_state_dict(weights), _RESNET_KEYS, drop=("fc", "pool", "whiten", "proj"))
        load_into(features, sd, weights)
    return features, channels, {"architecture": arch}


def _help(tv_file: str, cirtorch_file: str | None = None) -> str:
    s = f"ImageNet {TORCHVISION}/{tv_file}"
    if cirtorch_file:
        s += f", or the cirtorch retrieval net {CIRTORCH}/retrieval-SfM-120k/{cirtorch_file}"
    return s


@register(
    "rn50",
    feature_dim=2048,
    architecture="resnet50",
    weights_help=_help("resnet50-0676ba61.pth", "rSfM120k-tl-resnet50-gem-w-97bf910.pth"),
    description="ResNet-50 GeM (torchvision layout)",
)
def rn50(weights: str | None, random_init: bool) -> tuple[nn.Module, int, dict]:
    return resnet_features("resnet50", weights)


@register(
    "rn101",
    feature_dim=2048,
    architecture="resnet101",
    weights_help=_help("resnet101-63fe2227.pth", "retrievalSfM120k-resnet101-gem-b80fb85.pth"),
    description="ResNet-101 GeM, the AML teacher (cirtorch retrievalSfM120k-resnet101-gem)",
)
def rn101(weights: str | None, random_init: bool) -> tuple[nn.Module, int, dict]:
    return resnet_features("resnet101", weights)


@register(
    "rn152",
    feature_dim=2048,
    architecture="resnet152",
    weights_help=_help("resnet152-394f9c45.pth", "rSfM120k-tl-resnet152-gem-w-f39cada.pth"),
    description="ResNet-152 GeM",
)
def rn152(weights: str | None, random_init: bool) -> tuple[nn.Module, int, dict]:
    return resnet_features("resnet152", weights)
