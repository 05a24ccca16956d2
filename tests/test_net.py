"""RetrievalNet: cirtorch key layout, the forward formula, msp / dim / mean / std."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aml.net import IMAGENET_MEAN, IMAGENET_STD, RetrievalNet


def _features() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2))


def _gem_l2n(f: torch.Tensor, p: float) -> torch.Tensor:
    v = f.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
    return v / (v.norm(dim=1, keepdim=True) + 1e-6)


def test_teacher_forward_and_keys():
    net = RetrievalNet(_features(), 5).eval()
    with torch.no_grad():
        net.pool.p.fill_(2.0)
    x = torch.randn(3, 3, 17, 11)
    with torch.no_grad():
        want = _gem_l2n(net.features(x), 2.0)
        got = net(x)
    torch.testing.assert_close(got, want)
    assert got.shape == (3, 5) and net.dim == 5 and net.msp == pytest.approx(2.0)
    assert {"features.0.weight", "features.1.running_mean", "pool.p"} <= set(net.state_dict())
    assert net.mean == IMAGENET_MEAN and net.std == IMAGENET_STD
    assert net.meta["outputdim"] == 5 and net.meta["pooling"] == "gem" and net.meta["whitening"] is False


def test_whitening_layer_and_msp():
    net = RetrievalNet(_features(), 5, whiten=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        v = _gem_l2n(net.features(x), 3.0)
        w = v @ net.whiten.weight.T + net.whiten.bias
        torch.testing.assert_close(net(x), w / (w.norm(dim=1, keepdim=True) + 1e-6))
    assert {"whiten.weight", "whiten.bias"} <= set(net.state_dict())
    assert net.msp == 1.0 and net.meta["whitening"] is True


def test_student_projection_head():
    net = RetrievalNet(_features(), 5, dim=7).eval()
    x = torch.randn(2, 3, 15, 9)
    with torch.no_grad():
        f = torch.relu(nn.functional.conv2d(net.features(x), net.state_dict()["proj.0.weight"]))
        torch.testing.assert_close(net(x), _gem_l2n(f, 3.0))
    assert net.state_dict()["proj.0.weight"].shape == (7, 5, 1, 1) and "proj.0.bias" not in net.state_dict()
    assert net.dim == 7 and net.meta["outputdim"] == 7


def test_mean_std_from_meta():
    meta = {"architecture": "x", "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}
    net = RetrievalNet(_features(), 5, meta=meta)
    assert net.mean == [0.1, 0.2, 0.3] and net.std == [1.0, 1.0, 1.0]
    assert meta.get("outputdim") is None  # the caller's dict is not modified


@pytest.mark.parametrize("head", ["aml", "linear", None])
def test_layernorm_before_the_last_l2n_centres_the_embedding(head):
    """No affine parameters (the state dict is unchanged), every vector zero-mean, msp 1, recorded in meta."""
    dim = None if head is None else 7
    plain = RetrievalNet(_features(), 5, dim=dim, head=head or "aml").eval()
    net = RetrievalNet(_features(), 5, dim=dim, head=head or "aml", layernorm=True).eval()
    net.load_state_dict(plain.state_dict())
    assert set(net.state_dict()) == set(plain.state_dict()) and net.meta["layernorm"] is True
    assert "layernorm" not in plain.meta and net.msp == 1.0
    x = torch.randn(3, 3, 16, 12)
    with torch.no_grad():
        v = net(x)
        pre = net.pool(net.maps(x))
        if net.fc is not None:
            pre = net.fc(pre / (pre.norm(dim=1, keepdim=True) + 1e-6))
    c = (pre - pre.mean(1, keepdim=True)) / torch.sqrt(pre.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(v, c / (c.norm(dim=1, keepdim=True) + 1e-6))
    assert v.mean(1).abs().max() < 1e-6 and v.shape == (3, net.dim)
    assert RetrievalNet(_features(), 5, meta=dict(net.meta)).norm is not None  # a checkpoint's meta keeps it
