"""The extraction path: batched, multi-worker extraction equals a plain batch-size-1 loop; image loading and
size prediction agree with PIL; multi-scale and Lw follow docs/REFERENCE.md §3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aml.data.images import load_image, loaded_size, thumbnail_size
from aml.errors import UserError
from aml.extract import ExtractSettings, embed, extract, size_batches, to_tensor
from aml.registry import create_model
from aml.whiten import Lw

SIZES = [(64, 48), (48, 64), (37, 53), (64, 48), (53, 37), (64, 48), (20, 90), (48, 64)]
BBXS = [None, (4, 6, 40, 50), None, (10.4, 3.6, 50.2, 40.9), None, None, (2, 10, 18, 70), (0, 0, 48, 64)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        p = d / f"im{i}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def net():
    return create_model("resnet18", role="student", dim=24, random_init=True).eval()


def _one_by_one(net, paths, size, scales=(1.0,), bbxs=None) -> np.ndarray:
    """The plain loop: one image, batch size 1, cirtorch's multi-scale formula written out."""
    out = []
    with torch.no_grad():
        for i, p in enumerate(paths):
            x = to_tensor(load_image(p, size, None if bbxs is None else bbxs[i]), net.mean, net.std)[None]
            vs = [
                net(
                    torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                    if s != 1
                    else x
                )[0]
                for s in scales
            ]
            if len(scales) == 1:
                v = vs[0]
            else:
                v = torch.stack(vs).pow(net.msp).mean(0).pow(1 / net.msp)
                v = v / v.norm()
            out.append(v.numpy())
    return np.stack(out)


@pytest.mark.parametrize("workers", [0, 1])
def test_batched_equals_one_by_one_mixed_sizes_and_crops(net, images, workers):
    ref = _one_by_one(net, images, 40, bbxs=BBXS)
    got = extract(
        net, images, ExtractSettings(40, batch_size=3, workers=workers, device="cpu", progress=False), bbxs=BBXS
    )
    assert got.shape == (len(images), 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_multiscale_equals_one_by_one(net, images):
    scales = (1.0, 2**-0.5, 0.5)
    ref = _one_by_one(net, images, 48, scales=scales)
    got = extract(
        net, images, ExtractSettings(48, scales=scales, batch_size=4, workers=0, device="cpu", progress=False)
    )
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_input_order_and_empty_list(net, images):
    perm = [5, 0, 7, 2, 2, 1]
    a = extract(net, images, ExtractSettings(32, workers=0, progress=False))
    b = extract(net, [images[i] for i in perm], ExtractSettings(32, batch_size=2, workers=0, progress=False))
    np.testing.assert_allclose(b, a[perm], atol=1e-5)
    assert extract(net, [], ExtractSettings(32, progress=False)).shape == (0, 24)


def test_lw_applied_after_combination(net, images):
    rng = np.random.default_rng(3)
    lw = {"m": rng.normal(size=(24, 1)), "P": rng.normal(size=(24, 24))}
    plain = extract(net, images, ExtractSettings(32, workers=0, progress=False)).astype(np.float64)
    got = extract(net, images, ExtractSettings(32, workers=0, progress=False), lw=Lw(lw["m"], lw["P"], "test"))
    want = (plain - lw["m"][:, 0]) @ lw["P"].T
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_embed_keeps_grad_and_mode_is_restored(images):
    student = create_model("resnet18", role="student", dim=8, random_init=True)
    assert student.training and student.proj[0].weight.requires_grad
    x = torch.randn(2, 3, 40, 30)
    v = embed(student, x, (1.0, 0.5))
    v.sum().backward()
    assert student.proj[0].weight.grad is not None
    extract(student, images[:2], ExtractSettings(32, workers=0, progress=False))
    assert student.training


def test_load_image_thumbnail_and_crop(images):
    full = Image.open(images[1]).convert("RGB")  # 48 x 64
    img = load_image(images[1], 32)
    assert img.mode == "RGB" and img.size == (24, 32)
    assert load_image(images[1], 500).size == (48, 64)  # never upscales
    box = (4, 6, 40, 50)  # crop 36 x 44: scaled by 32 / 64 like the full image -> 22 longest
    crop = load_image(images[1], 32, box)
    assert max(crop.size) == 22
    want = full.crop(box)
    want.thumbnail((32 * 44 / 64,) * 2, Image.LANCZOS)
    assert np.array_equal(np.asarray(crop), np.asarray(want))


def test_to_tensor_normalises():
    img = Image.fromarray(np.array([[[255, 0, 51]]], dtype=np.uint8))
    x = to_tensor(img, [0.5, 0.5, 0.2], [0.5, 0.25, 0.1])
    assert x.shape == (3, 1, 1)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [1.0, -2.0, 0.0], atol=1e-6)


def test_size_prediction_matches_pil():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        s = float(rng.uniform(1, 420)) if rng.random() < 0.5 else int(rng.integers(1, 420))
        im = Image.new("L", (w, h))
        im.thumbnail((s, s))
        assert thumbnail_size(w, h, s) == im.size, (w, h, s)
    for _ in range(100):
        w, h = (int(v) for v in rng.integers(20, 200, 2))
        x1, y1 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        box = (x1, y1, rng.uniform(x1 + 2, w), rng.uniform(y1 + 2, h))
        im = Image.new("L", (w, h)).crop(box)
        s = 64 * max(im.size) / max(w, h)
        im.thumbnail((s, s))
        assert loaded_size(w, h, 64, box) == im.size


def test_size_batches_cover_each_index_once_with_one_size():
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 3, (50, 2))
    batches = size_batches(sizes, 4)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(50))
    assert all(len(b) <= 4 and (sizes[b] == sizes[b[0]]).all() for b in batches)
    assert [int(b[0]) for b in batches] == sorted(int(b[0]) for b in batches)


def test_unreadable_image_names_the_file(net, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg"):
        extract(net, [images[0], str(bad)], ExtractSettings(32, workers=0, progress=False))
    with pytest.raises(UserError, match="missing.jpg"):
        extract(net, [str(tmp_path / "missing.jpg")], ExtractSettings(32, workers=0, progress=False))


def test_lw_from_meta_errors():
    with pytest.raises(UserError, match="no learned whitening"):
        Lw.from_meta({"architecture": "resnet18"}, False)
    lw = {"a": {"ss": {"m": 0, "P": 1}}}
    with pytest.raises(UserError, match="'ms'"):
        Lw.from_meta({"Lw": lw}, True)
    with pytest.raises(UserError, match="available: a"):
        Lw.from_meta({"Lw": lw}, False, "b")


def test_lw_of_the_wrong_dimension_is_a_user_error(net, images):
    with pytest.raises(UserError, match="whitens 5-d vectors"):
        extract(net, images[:1], ExtractSettings(32, workers=0, progress=False), lw=Lw(np.zeros(5), np.eye(5), "x"))


def test_resolve_device_errors_are_user_errors():
    from aml.extract import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device tpu: unknown device"):
        resolve_device("tpu")
