"""`aml embed`: torch-free ONNX embedding that reproduces `aml extract` of the checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from test_export import save_student

from aml import onnx_embed
from aml.data import images
from aml.export import pipeline
from aml.extract import MULTISCALE, ExtractSettings, extract, to_tensor
from aml.nn import rescale
from aml.registry import create_model

SIZE = 48


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A few images of assorted sizes and aspect ratios (some smaller than SIZE: never upscaled)."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(120, 90), (75, 130), (30, 20), (97, 97), (200, 61)]):
        base = rng.uniform(0, 255, (h // 10 + 1, w // 10 + 1, 3))
        img = np.kron(base, np.ones((10, 10, 1)))[:h, :w] + rng.normal(0, 15, (h, w, 3))
        p = d / f"im{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    ckpt = save_student(d / "student.pt", "lite0", config={"image_size": SIZE})
    pipeline.export_checkpoint(ckpt, out=d / "enc.onnx")
    return ckpt, d / "enc.onnx"


@pytest.mark.parametrize("bbx", [None, (10.4, 5.0, 70.6, 80.2)])
def test_loader_is_aml_data_images(photos, bbx):
    assert onnx_embed.load_image is images.load_image and onnx_embed.to_array is images.to_array
    for p in photos[:2]:
        a = onnx_embed.load_image(p, SIZE, bbx)
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        assert np.array_equal(onnx_embed.to_array(a, mean, std), to_tensor(a, mean, std).numpy())
    small = onnx_embed.load_image(photos[2], SIZE)
    assert small.size == (30, 20)  # never upscaled


@pytest.mark.parametrize("h,w", [(37, 53), (64, 48), (25, 25)])
def test_onnx_rescale_matches_torch_bilinear(h, w):
    x = torch.randn(2, 3, h, w)
    r = onnx_embed.Rescaler()
    for s in MULTISCALE:
        want = rescale(x, s).numpy()
        got = r(x.numpy(), s)
        assert got.shape == want.shape
        # ONNX takes the scale as float32, torch as a double: source coordinates differ by ~1e-7 of the
        # index; another coordinate convention (align_corners, asymmetric) would differ by ~0.1 or more
        assert np.abs(got - want).max() <= 1e-4


def _run_embed_torch_free(args: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom cli import main\nmain(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported on the embed path'\nprint('TORCH-FREE')"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("multiscale", [False, True])
def test_embed_cli_is_torch_free_and_matches_extract(exported, photos, tmp_path, multiscale):
    ckpt, model = exported
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(photos) + "\n")
    out = tmp_path / "v.npy"
    args = ["embed", "--model", str(model), "--images", str(lst), "--out", str(out)]
    if multiscale:
        args.append("--multiscale")
    p = _run_embed_torch_free(args)
    assert p.returncode == 0, p.stderr
    assert "TORCH-FREE" in p.stdout
    got = np.load(out)
    want = extract(
        create_model(ckpt),
        photos,
        ExtractSettings(SIZE, scales=MULTISCALE if multiscale else (1.0,), workers=0, device="cpu", progress=False),
    )
    assert got.shape == want.shape == (len(photos), 32)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999 and np.abs(got - want).max() <= 1e-4
    assert np.std(want, axis=0).max() > 1e-3  # vectors depend on the image


def test_embed_image_size_override_and_bbx(exported, photos, tmp_path):
    ckpt, model = exported
    enc = onnx_embed.OnnxEncoder(model)
    bbxs = [None, (5, 10, 60, 100), None, None, (0, 0, 150, 61)]
    got = enc.embed(photos, image_size=48, bbxs=bbxs)
    want = extract(create_model(ckpt), photos, ExtractSettings(48, workers=0, device="cpu", progress=False), bbxs=bbxs)
    assert np.abs(got - want).max() <= 1e-4


def test_embed_errors_are_one_line(exported, tmp_path, run_cli):
    _, model = exported
    lst = tmp_path / "l.txt"
    lst.write_text("missing.jpg\n")
    args = ("--images", str(lst), "--out", str(tmp_path / "o.npy"))
    code, _, err = run_cli("embed", "--model", str(model), *args)
    assert code == 2 and err.startswith("error: ") and "missing.jpg" in err and "Traceback" not in err
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(model.read_bytes())
    code, _, err = run_cli("embed", "--model", str(lone), *args)
    assert code == 2 and "sidecar not found" in err


@pytest.mark.parametrize(("name", "runtime"), [("m.onnx", "onnx"), ("m.ORT", "onnx"), ("m.pte", "pte")])
def test_exported_encoders_open_by_suffix_in_one_place(name, runtime, monkeypatch):
    """`aml.exported.open_exported`, used by embed, evaluate and search: a .pte runs in ExecuTorch's runtime, the
    others in onnxruntime; a checkpoint or registry name is not an exported encoder."""
    from aml import exported, pte_embed

    opened = []
    monkeypatch.setattr(onnx_embed, "OnnxEncoder", lambda path, threads=None: opened.append(("onnx", path)))
    monkeypatch.setattr(pte_embed, "PteEncoder", lambda path, threads=None: opened.append(("pte", path)))
    assert exported.is_exported(name) and not exported.is_exported("run/last.pt")
    exported.open_exported(name)
    assert opened == [(runtime, name)]
