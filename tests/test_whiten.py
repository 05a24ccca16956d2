"""aml.whiten.Lw: one learned whitening, the same on numpy, torch and as a folded Linear; files round-trip;
`--whiten [KEY|FILE]` means the same in every command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aml.errors import UserError
from aml.nn import l2n
from aml.whiten import FIRST, Lw


def _lw(seed: int, d: int = 16, out: int | None = None, key: str = "sfm", variant: str = "ss") -> Lw:
    rng = np.random.default_rng(seed)
    m = rng.normal(0, 0.1, (d, 1))  # cirtorch stores m as (D, 1) float64
    P = rng.normal(0, 1, (out or d, d)) / np.sqrt(d) + np.eye(out or d, d)
    return Lw(m, P, "test", key, variant)


def _rows(n: int = 9, d: int = 16) -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_value_is_float32_and_shaped():
    lw = _lw(0, 16, out=8)
    assert lw.m.shape == (16,) and lw.P.shape == (8, 16) and lw.m.dtype == lw.P.dtype == np.float32
    assert lw.in_dim == 16 and lw.dim == 8 and lw.name == "sfm/ss"
    with pytest.raises(UserError, match="P must be"):
        Lw(np.zeros(3), np.zeros((2, 4)), "bad")


def test_numpy_torch_and_linear_agree_with_the_formula():
    lw, x = _lw(0, 16, out=8), _rows()
    y = (x.astype(np.float64) - lw.m) @ lw.P.T.astype(np.float64)
    want = y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6)
    got_np = lw.apply_np(x)
    got_torch = lw.apply_torch(torch.from_numpy(x)).numpy()
    with torch.no_grad():
        got_linear = l2n(lw.as_linear()(torch.from_numpy(x))).numpy()
    assert got_np.shape == (9, 8) and got_np.dtype == np.float32
    for got in (got_np, got_torch, got_linear):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert lw.apply_np(x.astype(np.float16), dtype=np.float16).dtype == np.float16
    np.testing.assert_allclose(lw.apply_np(x, block=2), got_np, atol=1e-6)  # blocks: same up to BLAS rounding
    with pytest.raises(UserError, match="whitens 16-d vectors"):
        lw.apply_np(_rows(3, 5))


def test_from_meta_picks_dataset_and_variant():
    ss, ms, other = _lw(0), _lw(1), _lw(2)
    meta = {
        "architecture": "resnet101",
        "Lw": {
            "sfm": {"ss": {"m": ss.m, "P": torch.from_numpy(ss.P)}, "ms": {"m": ms.m, "P": ms.P}},
            "gl18": {"ss": {"m": other.m, "P": other.P}},
        },
    }
    first = Lw.from_meta(meta, False)
    assert first.key == "sfm" and first.variant == "ss" and np.array_equal(first.P, ss.P)
    assert "model 'resnet101'" in first.source and "['sfm']['ss']" in first.source
    assert np.array_equal(Lw.from_meta(meta, True).P, ms.P)
    assert np.array_equal(Lw.from_meta(meta, False, "gl18").P, other.P)
    assert Lw.from_meta(meta, False, FIRST).key == "sfm"
    with pytest.raises(UserError, match="'ms'"):
        Lw.from_meta(meta, True, "gl18")


def test_save_load_round_trip_and_from_spec(tmp_path):
    ss, ms = _lw(0, variant="ss"), _lw(1, variant="ms")
    path = ss.save(tmp_path / "lw.pt", ms)
    raw = torch.load(path, weights_only=True)  # a plain tensor tree, safe to load
    assert set(raw["Lw"]["sfm"]) == {"ss", "ms"}
    for lw, multiscale in ((ss, False), (ms, True)):
        got = Lw.load(path, multiscale)
        assert np.array_equal(got.m, lw.m) and np.array_equal(got.P, lw.P) and got.name == lw.name
        assert str(path) in got.source
        # --whiten FILE reads the file and never asks for the model's meta
        spec = Lw.from_spec(str(path), multiscale, lambda: pytest.fail("meta read for a file"))
        assert np.array_equal(spec.P, lw.P)
    meta = {"Lw": {"k": {"ss": {"m": ms.m, "P": ms.P}}}}
    assert np.array_equal(Lw.from_spec(FIRST, False, lambda: meta).P, ms.P)
    assert np.array_equal(Lw.from_spec("k", False, lambda: meta).P, ms.P)
    with pytest.raises(UserError, match="no 'nope'; available: k"):
        Lw.from_spec("nope", False, lambda: meta)
    with pytest.raises(UserError, match="whitening file not found"):
        Lw.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable whitening file"):
        Lw.load(tmp_path / "junk.pt")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_cli_whiten_file_equals_the_same_lw_in_meta(tmp_path, capsys):
    """`aml extract --whiten FILE` and `--whiten KEY` on a checkpoint with that Lw give the same vectors."""
    import cli
    from aml.registry import create_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("# one image\na.png\n")
    net = create_model("resnet18", random_init=True)
    lw = _lw(3, net.dim, key="mine")
    lw.save(tmp_path / "lw.pt")
    ckpt = tmp_path / "net.pth"
    torch.save(
        {"state_dict": net.state_dict(), "meta": {**net.meta, "Lw": {"mine": {"ss": {"m": lw.m, "P": lw.P}}}}}, ckpt
    )
    base = ["extract", "--images", tmp_path / "list.txt", "--image-size", 32, "--workers", 0, "--device", "cpu"]

    def run(*args):
        try:
            cli.main([str(a) for a in [*base, *args]])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr()

    code, out = run("--model", ckpt, "--out", tmp_path / "key.npy", "--whiten", "mine")
    assert code == 0, out.err
    assert "Lw mine/ss" in out.out
    code, out = run("--model", ckpt, "--out", tmp_path / "file.npy", "--whiten", tmp_path / "lw.pt")
    assert code == 0, out.err
    code, out = run("--model", ckpt, "--out", tmp_path / "plain.npy")
    assert code == 0, out.err
    key, file, plain = (np.load(tmp_path / f"{n}.npy") for n in ("key", "file", "plain"))
    np.testing.assert_array_equal(key, file)
    np.testing.assert_allclose(key, lw.apply_np(plain), atol=1e-5)
    code, out = run("--model", "resnet18", "--random-init", "--out", tmp_path / "x.npy", "--whiten")
    assert code == 2 and "no learned whitening" in out.err
