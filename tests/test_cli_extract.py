"""`aml extract` and `aml models` end to end: output file, list/bbx parsing, and one-line errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from aml.extract import ExtractSettings, extract
from aml.registry import create_model

ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def listed(tmp_path):
    """Three images in a subfolder, listed with paths relative to the list file."""
    (tmp_path / "jpg").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (40, 30)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "jpg" / f"{i}.png")
        names.append(f"jpg/{i}.png")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(names) + "\n")
    return lst, [str(tmp_path / n) for n in names]


def _fails(result, *needles):
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def test_extract_writes_rows_in_list_order(listed, tmp_path, run_cli):
    lst, paths = listed
    out = tmp_path / "out" / "v.npy"
    bbx = tmp_path / "bbx.txt"
    bbx.write_text("\n2 3 30 25\n\n")
    code, stdout, stderr = run_cli(
        "extract",
        "--model",
        "resnet18",
        "--random-init",
        "--images",
        lst,
        "--image-size",
        32,
        "--bbx",
        bbx,
        "--out",
        out,
        "--device",
        "cpu",
        env=ENV,
    )
    assert code == 0, stderr
    assert "3 x 512" in stdout
    got = np.load(out)
    want = extract(
        create_model("resnet18", random_init=True),
        paths,
        ExtractSettings(32, workers=0, progress=False),
        bbxs=[None, (2, 3, 30, 25), None],
    )
    assert got.dtype == np.float32 and got.shape == (3, 512)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [p.name for p in out.parent.iterdir()] == ["v.npy"]  # no temporary left behind


def test_models_table(run_cli):
    code, out, err = run_cli("models")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["name", "role", "dim", "weights"]
    rows = {ln.split()[0]: ln.split()[1:3] for ln in lines[1:] if ln.strip()}
    assert rows["rn101"] == ["teacher", "2048"] and rows["effnet-b3"] == ["student", "1536"]


def test_console_entry_point_in_its_own_process(listed, tmp_path):
    """The one real subprocess: `cli.py` as a fresh process lists the models, and a user error is one line, exit 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "cli.py"), "models"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.split()[:4] == ["name", "role", "dim", "weights"], p.stderr
    lst, _ = listed
    args = ["extract", "--model", str(tmp_path / "missing.pth"), "--images", str(lst), "--image-size", "32"]
    args += ["--out", str(tmp_path / "o.npy")]
    p = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, env=env)
    _fails((p.returncode, p.stdout, p.stderr), "missing.pth", "not found")


def test_errors_are_one_line(listed, tmp_path, run_cli):
    lst, _ = listed
    out = tmp_path / "o.npy"
    base = ("--images", lst, "--image-size", 32, "--out", out, "--workers", 0)
    _fails(run_cli("extract", "--model", tmp_path / "missing.pth", *base, env=ENV), "missing.pth", "not found")
    ck = tmp_path / "nometa.pth"
    torch.save({"state_dict": {}}, ck)
    _fails(run_cli("extract", "--model", ck, *base), "nometa.pth", "'meta'")
    _fails(run_cli("extract", "--model", "resnet-18", *base), "unknown model 'resnet-18'", "resnet18")
    _fails(run_cli("extract", "--model", "rn101", *base), "resnet101-63fe2227.pth")
    bad = tmp_path / "bad.txt"
    (tmp_path / "jpg" / "broken.jpg").write_bytes(b"nope")
    bad.write_text("jpg/0.png\njpg/broken.jpg\n")
    _fails(
        run_cli(
            "extract",
            "--model",
            "resnet18",
            "--random-init",
            "--images",
            bad,
            "--image-size",
            32,
            "--out",
            out,
            "--workers",
            0,
        ),
        "broken.jpg",
        "cannot read image",
    )
    bbx = tmp_path / "short.txt"
    bbx.write_text("1 2 3 4\n")
    _fails(
        run_cli("extract", "--model", "resnet18", "--random-init", *base, "--bbx", bbx, "--whiten"),
        "short.txt",
        "1 lines for 3 images",
    )
    _fails(
        run_cli("extract", "--model", "resnet18", "--random-init", *base, "--whiten"),
        "no learned whitening",
    )
    assert not out.exists()
