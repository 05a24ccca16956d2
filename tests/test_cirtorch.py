"""A cirtorch-layout checkpoint (built here from a seeded torchvision ResNet-18) loads through create_model
and gives the vectors of an independent reference: PIL thumbnail -> torchvision layers -> GeM -> L2N -> FC
whitening -> L2N, multi-scale and Lw whitening as cirtorch computes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.nn import functional as F

from aml.extract import ExtractSettings, extract
from aml.registry import create_model, model_identity
from aml.whiten import Lw

RESNET_POS = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.26, 0.27]  # not ImageNet's: must come from meta
P_GEM = 2.5
SIZE = 40
MS = [1, 1 / 2**0.5, 1 / 2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchvision_resnet18() -> nn.Module:
    g = torch.Generator().manual_seed(123)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in tv.modules():  # non-trivial BN statistics so that eval-mode BN matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return tv.eval()


def _lw(rng: np.random.Generator, d: int) -> dict:
    return {"m": rng.normal(size=(d, 1)) * 0.01, "P": rng.normal(size=(d, d)) / np.sqrt(d)}


@pytest.fixture(scope="module")
def tv() -> nn.Module:
    return _torchvision_resnet18()


def _make_ckpt(tv, folder, whiten: bool):
    """A cirtorch checkpoint as users download it: features.N.*, pool.p, (whiten.*), meta with Lw, legacy
    serialisation, and no num_batches_tracked buffers (old files)."""
    sd = {}
    for k, v in tv.state_dict().items():
        head, rest = k.split(".", 1)
        if head == "fc" or k.endswith("num_batches_tracked"):
            continue
        sd[f"features.{RESNET_POS[head]}.{rest}"] = v.clone()
    sd["pool.p"] = torch.tensor([P_GEM])
    g = torch.Generator().manual_seed(7)
    W = torch.eye(512) + 0.05 * torch.randn(512, 512, generator=g)
    b = 0.01 * torch.randn(512, generator=g)
    if whiten:
        sd["whiten.weight"], sd["whiten.bias"] = W, b
    rng = np.random.default_rng(0)
    meta = {
        "architecture": "resnet18",
        "local_whitening": False,
        "pooling": "gem",
        "regional": False,
        "whitening": whiten,
        "mean": MEAN,
        "std": STD,
        "outputdim": 512,
        "Lw": {"retrieval-SfM-120k": {"ss": _lw(rng, 512), "ms": _lw(rng, 512)}},
    }
    path = folder / f"retrievalSfM120k-resnet18-gem{'-w' if whiten else ''}.pth"
    torch.save(
        {"state_dict": sd, "meta": meta, "epoch": 30, "min_loss": 0.5}, path, _use_new_zipfile_serialization=False
    )
    return path, (W, b) if whiten else None, meta


@pytest.fixture(scope="module", params=[False, True], ids=["gem", "gem-w"])
def ckpt(request, tv, tmp_path_factory):
    return _make_ckpt(tv, tmp_path_factory.mktemp("ckpt"), request.param)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 48), (90, 30)]):
        yy, xx = np.mgrid[:h, :w]
        base = np.stack([np.sin(xx / (3 + i)), np.cos(yy / (4 + i)), np.sin((xx + yy) / 5)], -1)
        arr = np.clip(127 + 80 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        p = d / f"im{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


BBXS = [(3, 4, 50, 44), (5.0, 8.0, 40.0, 50.5), None, (0, 0, 45, 30)]


def _reference(tv, paths, *, whiten=None, scales=(1,), bbxs=None, lw=None) -> np.ndarray:
    """cirtorch's extract_vectors, written out: one image at a time."""
    out = []
    for i, path in enumerate(paths):
        img = Image.open(path).convert("RGB")
        s = SIZE
        if bbxs is not None and bbxs[i] is not None:
            full = max(img.size)
            img = img.crop(bbxs[i])
            s = SIZE * max(img.size) / full
        img.thumbnail((s, s), Image.LANCZOS)
        x = TF.normalize(TF.to_tensor(img), MEAN, STD)[None]
        vs = []
        with torch.no_grad():
            for sc in scales:
                xs = x if sc == 1 else F.interpolate(x, scale_factor=sc, mode="bilinear", align_corners=False)
                f = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(xs))))))))
                v = f.clamp(min=1e-6).pow(P_GEM).mean(dim=(2, 3)).pow(1 / P_GEM)[0]
                v = v / (v.norm() + 1e-6)
                if whiten is not None:
                    v = whiten[0] @ v + whiten[1]
                    v = v / (v.norm() + 1e-6)
                vs.append(v)
        if len(scales) > 1:
            msp = 1.0 if whiten is not None else P_GEM
            v = torch.stack(vs).pow(msp).mean(0).pow(1 / msp)
            v = v / v.norm()
        else:
            v = vs[0]
        v = v.double().numpy()
        if lw is not None:
            v = lw["P"] @ (v - lw["m"][:, 0])
            v = v / np.linalg.norm(v)
        out.append(v)
    return np.stack(out)


def test_checkpoint_loads_with_its_meta(ckpt):
    path, whiten, meta = ckpt
    net = create_model(path)
    assert net.meta["aml"]["name"] == "resnet18" and net.meta["aml"]["role"] == "teacher"
    assert net.mean == MEAN and net.std == STD
    assert set(net.meta["Lw"]["retrieval-SfM-120k"]) == {"ss", "ms"}
    assert (net.whiten is not None) == (whiten is not None)
    assert net.msp == (1.0 if whiten is not None else pytest.approx(P_GEM))
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    ident = model_identity(path)
    assert ident["name"] == "resnet18" and ident["dim"] == 512 and len(ident["sha256"]) == 64


@pytest.mark.parametrize("scales,boxes", [((1,), False), (MS, True)], ids=["ss-full", "ms-bbx"])
def test_vectors_match_reference(ckpt, tv, images, scales, boxes):
    path, whiten, _ = ckpt
    bbxs = BBXS if boxes else None
    got = extract(
        create_model(path),
        images,
        ExtractSettings(SIZE, scales=scales, batch_size=2, workers=0, device="cpu", progress=False),
        bbxs=bbxs,
    )
    ref = _reference(tv, images, whiten=whiten, scales=scales, bbxs=bbxs)
    assert got.shape == (len(images), 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_learned_whitening_matches_reference(ckpt, tv, images):
    path, whiten, meta = ckpt
    net = create_model(path)
    scales = MS
    ss = Lw.from_meta(net.meta, False)
    want_P = np.asarray(net.meta["Lw"]["retrieval-SfM-120k"]["ss"]["P"], np.float32)
    assert np.array_equal(ss.P, want_P) and ss.name == "retrieval-SfM-120k/ss"
    lw = Lw.from_meta(net.meta, True)
    got = extract(
        net, images, ExtractSettings(SIZE, scales=scales, batch_size=4, workers=0, device="cpu", progress=False), lw=lw
    )
    want_lw = meta["Lw"]["retrieval-SfM-120k"]["ms" if len(scales) > 1 else "ss"]
    ref = _reference(tv, images, whiten=whiten, scales=scales, lw=want_lw)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_cli_extract_multiscale_whiten_bbx(tv, images, tmp_path, run_cli):
    path, whiten, meta = _make_ckpt(tv, tmp_path, whiten=True)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(images) + "\n")
    bbx = tmp_path / "bbx.txt"
    bbx.write_text("".join(("" if b is None else " ".join(map(str, b))) + "\n" for b in BBXS))
    out = tmp_path / "q.npy"
    code, stdout, stderr = run_cli(
        "extract",
        "--model",
        path,
        "--images",
        lst,
        "--image-size",
        SIZE,
        "--multiscale",
        "1,0.7071,0.5",
        "--whiten",
        "--bbx",
        bbx,
        "--out",
        out,
        "--workers",
        "0",
        "--device",
        "cpu",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert code == 0, stderr
    lw = meta["Lw"]["retrieval-SfM-120k"]["ms"]
    ref = _reference(tv, images, whiten=whiten, scales=MS, bbxs=BBXS, lw=lw)
    np.testing.assert_allclose(np.load(out), ref, atol=1e-5)
