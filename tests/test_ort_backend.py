"""The onnxruntime extraction backend: same vectors as torch (1e-5), the ONNX cache (reused, a corrupt or
half-written file rebuilt), the backend choice and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aml import ort_backend
from aml.errors import UserError
from aml.extract import ExtractSettings, choose_backend, extract
from aml.registry import create_model
from aml.settings import ORT_MIN_IMAGES
from aml.train.batchnorm import estimate_batchnorm
from aml.whiten import Lw

# odd and even sides, portrait and landscape, repeated sizes (batches of several images)
SIZES = [(64, 48), (48, 64), (37, 53), (64, 48), (53, 37), (64, 48), (20, 90), (61, 61)]
BBXS = [None, (4, 6, 40, 50), None, (10.4, 3.6, 50.2, 40.9), None, None, (2, 10, 18, 70), None]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        # smooth colour blocks plus noise: image-like activations (pure noise makes every vector alike)
        arr = np.kron(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
        arr = (arr + rng.normal(0, 12, arr.shape)).clip(0, 255).astype(np.uint8)
        p = d / f"im{i}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def net():
    """A lite0 student (TF "same" padding, the export-friendly swaps), BatchNorm statistics set so it is lively."""
    m = create_model("lite0", role="student", dim=16, random_init=True)
    g = torch.Generator().manual_seed(1)
    estimate_batchnorm(m, [list(torch.randn(2, 3, 40, 48, generator=g))], torch.device("cpu"))
    return m.eval()


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    """One AML_HOME for the module (its exports are reused across tests), a fresh in-process memo per test."""
    monkeypatch.setenv("AML_HOME", str(tmp_path_factory.getbasetemp() / "ort-home"))
    ort_backend.forget()
    yield ort_backend.cache_dir()
    ort_backend.forget()


@pytest.fixture
def exports(monkeypatch):
    """Counts the exports (`ort_backend._export` calls)."""
    calls = []
    real = ort_backend._export

    def counting(model, path, maps=False):
        calls.append(path)
        return real(model, path, maps)

    monkeypatch.setattr(ort_backend, "_export", counting)
    return calls


def _both(net, images, size=64, scales=(1.0,), bbxs=None, lw=None):
    kw = dict(bbxs=bbxs, lw=lw)
    a = extract(net, images, ExtractSettings(size, scales, progress=False, backend="torch"), **kw)
    b = extract(net, images, ExtractSettings(size, scales, progress=False, backend="onnxruntime"), **kw)
    return a, b


def test_onnxruntime_gives_the_torch_vectors(net, images):
    a, b = _both(net, images, bbxs=BBXS)
    assert np.abs(a - a[:1]).max() > 0.05  # the vectors differ between images: the comparison means something
    assert np.abs(a - b).max() <= 1e-5
    a, b = _both(net, images[:5], scales=(1.0, 2**-0.5, 0.5))
    assert np.abs(a - b).max() <= 1e-5


def test_lw_is_applied_after_the_onnxruntime_forward(net, images):
    rng = np.random.default_rng(3)
    lw = Lw(rng.normal(size=16).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32), "test", "t", "ss")
    a, b = _both(net, images[:4], lw=lw)
    assert a.shape == (4, 8) and np.abs(a - b).max() <= 1e-5


def test_the_cached_graph_is_reused(net, images, exports, home):
    extract(net, images[:2], ExtractSettings(64, progress=False, backend="onnxruntime"))
    ort_backend.forget()  # a new process: only the disk cache is left
    extract(net, images[:2], ExtractSettings(64, progress=False, backend="onnxruntime"))
    assert len(exports) <= 1  # 0 when an earlier test already exported this model
    assert [p.name for p in home.glob("*.onnx")] == [f"{ort_backend.model_digest(net)}.onnx"]
    assert not [p for p in home.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other model"])
def test_a_damaged_cached_graph_is_rebuilt(net, images, exports, home, damage, tmp_path):
    want = extract(net, images[:3], ExtractSettings(64, progress=False, backend="torch"))
    path = home / f"{ort_backend.model_digest(net)}.onnx"
    extract(net, images[:1], ExtractSettings(64, progress=False, backend="onnxruntime"))  # cached now
    if damage == "garbage":
        path.write_bytes(b"not an onnx file")
    elif damage == "truncated":  # a half-written file under the final name (a lying disk)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # loads fine, but another model's graph: the probe check catches it
        other = create_model("lite0", role="student", dim=16, random_init=True).eval()
        ort_backend._export(other, tmp_path / "other.onnx")
        path.write_bytes((tmp_path / "other.onnx").read_bytes())
    ort_backend.forget()
    exports.clear()
    got = extract(net, images[:3], ExtractSettings(64, progress=False, backend="onnxruntime"))
    assert len(exports) == 1
    assert np.abs(got - want).max() <= 1e-5


def test_changed_weights_get_their_own_graph(net, images, home):
    changed = create_model("lite0", role="student", dim=16, random_init=True).eval()
    changed.load_state_dict(net.state_dict())
    assert ort_backend.model_digest(changed) == ort_backend.model_digest(net)
    with torch.no_grad():
        changed.proj[0].weight.mul_(-1)  # an optimiser step, in place
    assert ort_backend.model_digest(changed) != ort_backend.model_digest(net)
    a, b = _both(changed, images[:2])
    assert np.abs(a - b).max() <= 1e-5


def test_backend_choice():
    cpu = torch.device("cpu")
    auto = ExtractSettings(64)
    assert choose_backend(auto, ORT_MIN_IMAGES - 1, cpu) == "torch"  # the one-off export would not pay
    assert choose_backend(auto, ORT_MIN_IMAGES, cpu) == "onnxruntime"
    assert choose_backend(auto.replace(backend="torch"), 10**6, cpu) == "torch"
    assert choose_backend(auto.replace(backend="onnxruntime"), 1, cpu) == "onnxruntime"
    assert choose_backend(auto, 10**6, torch.device("cuda")) == "torch"
    with pytest.raises(UserError, match="runs on the CPU"):
        choose_backend(auto.replace(backend="onnxruntime"), 1, torch.device("cuda"))


def test_list_size_picks_the_backend_of_the_whole_list(net, images):
    """A chunk of a long list (the teacher cache's) runs on the backend auto picks for the whole list."""
    extract(net, images[:2], ExtractSettings(64, progress=False))
    assert ort_backend.remembered() == 0  # 2 images: torch
    extract(net, images[:2], ExtractSettings(64, progress=False), list_size=ORT_MIN_IMAGES)
    assert ort_backend.remembered() == 1


def test_auto_without_onnxruntime_is_torch(monkeypatch):
    monkeypatch.setattr(ort_backend, "available", lambda: False)
    assert choose_backend(ExtractSettings(64), 10**6, torch.device("cpu")) == "torch"
    with pytest.raises(UserError, match="onnxruntime is not installed"):
        choose_backend(ExtractSettings(64, backend="onnxruntime"), 1, torch.device("cpu"))


def test_unknown_backend_is_a_one_line_user_error():
    with pytest.raises(UserError) as e:
        ExtractSettings(64, backend="tensorflow")
    assert str(e.value) == "--backend tensorflow: unknown extraction backend; use auto, torch, onnxruntime"


def test_cli_rejects_an_unknown_backend(run_cli, images, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(images[:1]) + "\n")
    args = ["extract", "--model", "lite0", "--random-init", "--images", lst, "--image-size", 32]
    code, _, err = run_cli(*args, "--out", tmp_path / "v.npy", "--backend", "tf")
    assert code == 2 and "'tf' is not one of 'auto', 'torch', 'onnxruntime'" in err


class _NotANet(torch.nn.Module):
    """A module with what extraction reads but no RetrievalNet: the onnxruntime backend does not take it."""

    dim, msp, mean, std = 3, 1.0, [0.5] * 3, [0.25] * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=1)


def test_a_model_that_does_not_export(images, capsys):
    m = _NotANet()
    auto = extract(m, images[:2], ExtractSettings(64, progress=False))
    assert auto.shape == (2, 3)  # auto with a short list: torch, no warning
    ort_backend.forget()
    with pytest.raises(UserError, match="--backend onnxruntime: _NotANet is not a float32 RetrievalNet"):
        extract(m, images[:2], ExtractSettings(64, progress=False, backend="onnxruntime"))
    assert ort_backend.ort_forward(m) is None  # auto falls back to torch, with a warning
    assert "extracting with torch" in capsys.readouterr().err
