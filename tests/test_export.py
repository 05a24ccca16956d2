"""Export: TF-same padding swaps, ONNX / TorchScript with dynamic shapes, gates, sidecar, int8 / fp16."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from aml.data.revisitop import load_revisitop, write_revisitop
from aml.export import pipeline, verify
from aml.export.encoder import export_encoder
from aml.export.friendly import SameConv2d, TFSamePad, make_export_friendly
from aml.export.onnx_export import export_onnx
from aml.io import sha256_file
from aml.registry import create_model
from aml.sidecar import read_sidecar, sidecar_path
from aml.train.batchnorm import estimate_batchnorm

SIZE = 48
TEACHER = {"name": "teacher-under-test", "weights": "random-init", "sha256": None, "dim": 32}


def lively(net: torch.nn.Module, size: int = 40) -> torch.nn.Module:
    """Re-estimate BatchNorm statistics on random inputs (random-init nets give constant vectors)."""
    g = torch.Generator().manual_seed(1)
    estimate_batchnorm(net, [list(torch.randn(2, 3, size, size + 8, generator=g))], torch.device("cpu"))
    return net


def save_student(path, name: str, dim: int = 32, config: dict | None = None):
    net = lively(create_model(name, role="student", dim=dim, random_init=True))
    net.meta["aml"]["teacher"] = dict(TEACHER, dim=dim)
    torch.save(
        {
            "state_dict": net.state_dict(),
            "meta": net.meta,
            "epoch": 3,
            "optimizer": {},
            "config": config if config is not None else {"image_size": SIZE},
        },
        path,
    )
    return path


def tf_same_reference(x: torch.Tensor, k: int, s: int, d: int) -> torch.Tensor:
    """TF "same" padding straight from its definition (per axis, Python ints)."""
    pads = []
    for i in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


@pytest.mark.parametrize(
    "k,s,d", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (5, 2, 1), (2, 2, 1), (1, 2, 1), (3, 3, 1), (3, 2, 2), (4, 3, 1)]
)
def test_tf_same_pad_matches_definition_at_all_sizes(k, s, d):
    pad = TFSamePad(k, s, d)
    for h, w in [(5, 6), (7, 7), (8, 11), (12, 9), (13, 10)]:
        x = torch.randn(1, 2, h, w)
        assert torch.equal(pad(x), tf_same_reference(x, k, s, d)), (k, s, d, h, w)


@pytest.mark.parametrize(
    "k,s,d,pads", [(5, 2, 1, 0), (3, 2, 1, 0), (2, 2, 1, 0), (3, 2, 2, 1), (3, 1, 1, 0), (1, 2, 1, 1)]
)
def test_tf_same_pad_stays_dynamic_in_onnx(tmp_path, k, s, d, pads):
    """Strided: one Conv with auto_pad SAME_UPPER (a Pad where auto_pad does not apply: dilated, or k_eff < s);
    stride 1: static pads in the Conv."""
    conv = SameConv2d(3, 4, k, stride=s, dilation=d).eval()
    export_onnx(conv, tmp_path / "c.onnx", torch.randn(1, 3, 16, 16))
    assert [n.op_type for n in onnx.load(str(tmp_path / "c.onnx")).graph.node].count("Pad") == pads
    sess = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(17, 16), (15, 21), (30, 9)]:
        x = torch.randn(2, 3, h, w)
        want = F.conv2d(tf_same_reference(x, k, s, d), conv.weight, conv.bias, stride=s, dilation=d)
        got = sess.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5)


def test_original_dynamic_padding_is_baked_by_the_exporter(tmp_path):
    """Why the swap exists: efficientnet-pytorch's own module exports the padding of the traced size only."""
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding

    conv = Conv2dDynamicSamePadding(3, 4, 3, stride=2).eval()
    export_onnx(conv, tmp_path / "c.onnx", torch.randn(1, 3, 16, 16))
    sess = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 17, 17)  # other parity: TF pads (1, 1) here, the trace baked (0, 1)
    got = sess.run(None, {"images": x.numpy()})[0]
    assert got.shape != tuple(conv(x).shape) or not np.allclose(got, conv(x).detach().numpy(), atol=1e-4)


def _check_swap(net: torch.nn.Module, sizes: list[tuple[int, int]]) -> torch.nn.Module:
    friendly, counts = make_export_friendly(net)
    assert counts.get("Conv2dDynamicSamePadding", 0) > 0
    names = {type(m).__name__ for m in friendly.modules()}
    assert not names & {"Conv2dDynamicSamePadding", "MemoryEfficientSwish"}
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            a, b = net.maps(x), friendly.maps(x)
        assert a.abs().max() > 1e-3  # the comparison means something
        assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    return friendly


def test_lite0_swap_is_identical_at_odd_sizes():
    _check_swap(lively(create_model("lite0", role="student", dim=16, random_init=True)), [(33, 47), (41, 29)])


def test_effnet_b3_swap_and_onnx_equal_pytorch_at_odd_sizes(tmp_path):
    """The one effnet-b3 test: swap equality, then the dynamic graph at sizes other than the traced one.

    A random-init b3 is ill-conditioned (PyTorch's own float32 vs float64 differ by up to ~0.3 here), so the
    dynamic graph is compared with a graph traced at the very size it runs at, both in onnxruntime: same
    kernels, same rounding; only the padding logic differs (a wrong padding moves vectors by ~0.1).
    """
    net = lively(create_model("effnet-b3", role="student", dim=16, random_init=True), size=32)
    _check_swap(net, [(33, 39)])
    assert any(type(m).__name__ == "MemoryEfficientSwish" for m in net.modules())
    enc, _ = export_encoder(net)
    export_onnx(enc, tmp_path / "b3.onnx", torch.randn(1, 3, 32, 32))
    run = pipeline.ort_runner(tmp_path / "b3.onnx")
    g = torch.Generator().manual_seed(0)
    for h, w in [(35, 30), (29, 37)]:
        x = torch.randn(2, 3, h, w, generator=g)
        export_onnx(enc, tmp_path / f"b3_{h}x{w}.onnx", x[:1])
        want = pipeline.ort_runner(tmp_path / f"b3_{h}x{w}.onnx")(x.numpy())
        got = run(x.numpy())
        assert np.abs(got - want).max() <= 1e-5, (h, w)


@pytest.fixture(scope="module")
def lite0_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("lite0")
    ckpt = save_student(d / "student.pt", "lite0")
    info = pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(fmt="onnx"), out=d / "enc.onnx")
    return ckpt, d / "enc.onnx", info


def test_onnx_fp32_export_is_verified_and_sidecar_complete(lite0_onnx):
    ckpt, path, info = lite0_onnx
    side = read_sidecar(path)
    assert side == json.loads(json.dumps(info, sort_keys=True)) | {"sidecar_version": 1}
    assert side["format"] == "onnx" and side["precision"] == "fp32" and side["dim"] == 32
    assert side["image_size"] == SIZE and side["teacher"] == TEACHER
    assert side["mean"] == [0.485, 0.456, 0.406] and side["std"] == [0.229, 0.224, 0.225]
    assert side["sha256"] == sha256_file(path) and side["student"]["sha256"] == sha256_file(ckpt)
    eq = side["verification"]["equivalence"]
    assert eq["passed"] and len(eq["probes"]) == 3
    shapes = [tuple(p["size"]) for p in eq["probes"]]
    assert shapes[0][0] == shapes[0][1] and shapes[1][0] > shapes[1][1] and shapes[2][0] < shapes[2][1]
    assert side["msp"] == pytest.approx(3.0)


def test_onnx_dynamic_batch_height_width(lite0_onnx):
    ckpt, path, _ = lite0_onnx
    student = create_model(ckpt).eval()
    run = pipeline.ort_runner(path)
    for b, h, w in [(3, 80, 57), (1, 31, 90)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            want = student(x).numpy()
        got = run(x.numpy())
        assert got.shape == (b, 32)
        assert np.abs(got - want).max() <= 1e-4 and (got * want).sum(1).min() >= 0.9999
        if b > 1:
            assert np.std(want, axis=0).max() > 1e-3  # vectors depend on the input


def test_failed_equivalence_gate_writes_nothing(tmp_path, monkeypatch):
    ckpt = save_student(tmp_path / "s.pt", "mobilenetv2")
    monkeypatch.setattr(verify, "MIN_COSINE", 1.5)
    out = tmp_path / "out"
    with pytest.raises(verify.VerificationError, match=r"cosine .*need >= 1.5.*nothing written"):
        pipeline.export_checkpoint(ckpt, out=out / "enc.onnx")
    assert not out.exists() or list(out.iterdir()) == []


def test_torchscript_export_verified_with_dynamic_shapes(tmp_path):
    ckpt = save_student(tmp_path / "s.pt", "resnet18")
    info = pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(fmt="torchscript"), out=tmp_path / "enc.pt")
    assert info["verification"]["equivalence"]["passed"]
    assert read_sidecar(tmp_path / "enc.pt")["format"] == "torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(tmp_path / "enc.pt"))
    student = create_model(ckpt).eval()
    x = torch.randn(3, 3, 45, 70)
    with torch.no_grad():
        assert torch.allclose(ts(x), student(x), atol=1e-5)


# ---- fp16 / int8: the retrieval gate on a tiny revisitop-layout set ----------------------------------


def _tiny_revisitop(root, n_obj: int = 4, per_obj: int = 3):
    """Objects = smooth random patterns; views = the pattern plus noise; one query per object."""
    rng = np.random.default_rng(0)
    imlist, qimlist, gnd = [], [], []
    jpg = root / "tiny" / "jpg"
    jpg.mkdir(parents=True)
    for o in range(n_obj):
        base = rng.uniform(0, 255, (8, 8, 3))
        views = []
        for v in range(per_obj + 1):
            img = np.kron(base, np.ones((10, 10, 1))) + rng.normal(0, 20, (80, 80, 3))
            name = f"o{o}v{v}"
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(jpg / f"{name}.jpg")
            views.append(name)
        qimlist.append(views[0])
        gnd.append(
            {
                "bbx": [4, 4, 76, 70],
                "easy": list(range(len(imlist), len(imlist) + per_obj - 1)),
                "hard": [len(imlist) + per_obj - 1],
                "junk": [],
            }
        )
        imlist += views[1:]
    write_revisitop(root, "tiny", imlist, qimlist, gnd)
    return load_revisitop(root, "tiny")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    ds = _tiny_revisitop(d)
    ckpt = save_student(d / "s.pt", "lite0")
    student = create_model(ckpt).eval()
    from aml.extract import ExtractSettings, extract

    db = extract(student, ds.db_paths(), ExtractSettings(SIZE, workers=0, device="cpu", progress=False))
    return d, ckpt, ds, db


def _fixed(ds, db):
    return lambda *a: pipeline.VerifyData(ds, db)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_low_precision_exports_report_cosine_and_map(tiny_set, precision):
    d, ckpt, ds, db = tiny_set
    out = d / f"enc-{precision}.onnx"
    settings = pipeline.ExportSettings(
        precision=precision, calib_images=ds.db_paths(), calib_count=4, map_tolerance=100.0, latency_runs=1
    )
    info = pipeline.export_checkpoint(ckpt, settings, out=out, verify_data_fn=_fixed(ds, db))
    assert out.is_file() and sidecar_path(out).is_file()
    eq, rt = info["verification"]["equivalence"], info["verification"]["retrieval"]
    low = 0.99 if precision == "fp16" else 0.5  # int8 of a random-init net calibrated on 4 images: loose
    assert not eq["gated"] and low < eq["cosine_min"] <= 1.0 + 1e-9
    assert rt["n_queries"] == 4 and set(rt["exported_mAP"]) == {"E", "M", "H"}
    assert low < rt["query_cosine"]["cosine_min"] <= 1.0 + 1e-9
    assert info["precision"] == precision
    assert rt["tolerance"] == 100.0 and read_sidecar(out)["gates"]["map_tolerance"] == 100.0
    if precision == "int8":
        import onnx

        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        rep = read_sidecar(out)["int8"]
        assert rep["convolutions"] == 50 and rep["kernels"]["int8_conv"] == 49  # lite0: all but the stem
        assert rep["kernels"]["float_conv"] == 1 and rep["recipe"]["activations"] == "uint8"
        lat = rep["latency"]
        assert lat["size"] == SIZE and lat["runs"] == 1 and lat["fp32_ms"] > 0 and lat["int8_ms"] > 0
        assert rep["recommend"] in ("int8", "fp32") and f"{lat['ratio']:.2f}x" in rep["message"]
    else:
        import onnx

        types = {i.data_type for i in onnx.load(str(out)).graph.initializer}
        assert onnx.TensorProto.FLOAT16 in types


def test_int8_export_recommends_fp32_when_int8_does_not_pay(tiny_set, tmp_path, monkeypatch):
    from aml.export import quant_report

    _, ckpt, ds, db = tiny_set
    seen = []

    def slow_int8(fp32, int8, size, runs):
        seen.append((size, runs))
        lat = {"fp32_ms": 20.0, "int8_ms": 17.0, "ratio": 0.85, "size": size, "batch": 1, "runs": runs}
        return lat | {"threads": 1, "cpu": quant_report.cpu_description()}

    monkeypatch.setattr(quant_report, "paired_latency", slow_int8)
    logs: list[str] = []
    out = tmp_path / "slow.onnx"
    settings = pipeline.ExportSettings(
        precision="int8", calib_images=ds.db_paths(), calib_count=2, map_tolerance=100.0, latency_runs=3
    )
    info = pipeline.export_checkpoint(ckpt, settings, out=out, verify_data_fn=_fixed(ds, db), log=logs.append)
    assert seen == [(SIZE, 3)] and out.is_file()  # written anyway: a recommendation, not a gate
    rep = read_sidecar(out)["int8"]
    assert rep["recommend"] == "fp32" and rep["latency"]["ratio"] == 0.85 and info["int8"] == rep
    assert any("does not pay" in line and "0.85x" in line and "--precision fp32" in line for line in logs)
    assert any(line.startswith("int8 kernels: 49 of 50") for line in logs)


def test_retrieval_gate_fails_with_the_numbers(tiny_set):
    _, _, ds, db = tiny_set
    rng = np.random.default_rng(0)
    q = rng.normal(size=(len(ds.qimlist), db.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    same = verify.retrieval(ds, db, q, q)
    assert same["passed"] and same["max_mAP_difference"] == 0
    assert same["noise"] == {"queries": 4, "one_query_points": 25.0, "largest_query_points": 0.0, "queries_changed": 0}
    note = verify.summary_lines({"retrieval": same})[-1]  # 4 queries: one query is 25 points > 1 point
    assert note.startswith("  note: on 4 queries one query's AP moves mAP by up to 25.00 points")
    assert "the gate is noisy here" in note and "--map-tolerance POINTS" in note
    worse = verify.retrieval(ds, db, q, -q, tolerance=1.0)
    assert not worse["passed"] and worse["max_mAP_difference"] > 1.0
    msg = verify.failure_message("ckpt.pt", {"retrieval": worse})
    assert "asymmetric mAP exported vs fp32 student" in msg and "nothing written" in msg
    assert worse["noise"]["queries_changed"] >= 1 and worse["noise"]["largest_query_points"] > 0
    assert "one query's AP moves mAP by up to 25.00 points" in msg and "--verify-data" in msg
    assert "--calib-count" in msg and "--map-tolerance POINTS" in msg
    assert f"{worse['exported_mAP']['M']:.2f} vs {worse['student_fp32_mAP']['M']:.2f}" in msg


def test_whiten_folds_teacher_lw_and_blocks_multiscale_embed(tmp_path):
    from aml.errors import UserError
    from aml.onnx_embed import OnnxEncoder

    rng = np.random.default_rng(0)
    m, P = rng.normal(0, 0.05, (32, 1)), rng.normal(0, 1, (32, 32)) / 6 + np.eye(32)
    teacher_file = tmp_path / "teacher.pth"
    torch.save(
        {"state_dict": {}, "meta": {"Lw": {"sfm": {"ss": {"m": m, "P": P}, "ms": {"m": m, "P": P}}}}}, teacher_file
    )
    net = lively(create_model("mobilenetv2", role="student", dim=32, random_init=True))
    net.meta["aml"]["teacher"] = dict(TEACHER, weights=str(teacher_file))
    ckpt = tmp_path / "s.pt"
    torch.save(
        {"state_dict": net.state_dict(), "meta": net.meta, "epoch": 1, "optimizer": {}, "config": {"image_size": SIZE}},
        ckpt,
    )
    out = tmp_path / "w.onnx"
    info = pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(whiten="first"), out=out)
    assert info["whiten"]["dataset"] == "sfm" and info["msp"] == 1.0
    x = torch.randn(2, 3, 50, 61)
    with torch.no_grad():
        v = net(x).numpy().astype(np.float64)
    w = (v - m.reshape(1, -1)) @ P.T
    want = w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-6)
    got = pipeline.ort_runner(out)(x.numpy())
    assert np.abs(got - want).max() <= 1e-4
    with pytest.raises(UserError, match="single-scale Lw"):
        OnnxEncoder(out).embed(["unused.jpg"], scales=(1.0, 0.5))


def test_static_shape_onnx_is_one_size_and_embed_pads_to_it(tmp_path, run_cli):
    """--static-shape: the ONNX input is (batch, 3, S, S), gated at S x S; the sidecar says so and how to pad, and
    `aml embed` pads each image as the sidecar says (vectors equal torch on the padded input)."""
    ckpt = save_student(tmp_path / "s.pt", "mobilenetv2")
    code, out, err = run_cli("export", "--checkpoint", ckpt, "--static-shape", "--map-tolerance", "2.5")
    assert code == 0, err
    path = tmp_path / "s-fp32-s.onnx"
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == ["batch", 3, SIZE, SIZE]
    side = read_sidecar(path)
    pre = side["preprocessing"]
    assert pre["static_shape"] and pre["input"]["shape"] == ["batch", 3, SIZE, SIZE] and "padded" in pre["resize"]
    assert pre["input"]["bounds"] == {"batch": [1, None], "side": [SIZE, SIZE]}
    assert side["input"]["dynamic"] == ["batch"]
    assert side["gates"]["map_tolerance"] == 2.5 and json.loads(sidecar_path(path).read_text()) == side
    assert [p["size"] for p in side["verification"]["equivalence"]["probes"]] == [[SIZE, SIZE]]
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8)).save(img)
    (tmp_path / "list.txt").write_text(f"{img}\n")
    code, _, err = run_cli("embed", "--model", path, "--images", tmp_path / "list.txt", "--out", tmp_path / "v.npy")
    from aml.data.images import load_image, to_array

    x = to_array(load_image(img, SIZE), pre["mean"], pre["std"])[None]  # 48 x 24 after the thumbnail
    padded = np.zeros((1, 3, SIZE, SIZE), np.float32)
    padded[..., : x.shape[2], : x.shape[3]] = x
    with torch.no_grad():
        want = create_model(ckpt).eval()(torch.from_numpy(padded)).numpy()
    assert code == 0, err
    assert np.abs(np.load(tmp_path / "v.npy") - want).max() <= 1e-4
    code, _, err = run_cli("export", "--checkpoint", ckpt, "--format", "torchscript", "--static-shape")
    assert code == 2 and "--static-shape" in err and "Traceback" not in err
    code, _, err = run_cli("export", "--checkpoint", ckpt, "--map-tolerance", "-1")
    assert code == 2 and "--map-tolerance" in err


def test_export_cli(tmp_path, run_cli):
    ckpt = save_student(tmp_path / "s.pt", "resnet18")
    code, out, err = run_cli("export", "--checkpoint", ckpt, "--out", tmp_path / "e.onnx", "--image-size", "32")
    assert code == 0, err
    assert "verified" in out and "equivalence gate" in out and (tmp_path / "e.onnx.json").is_file()
    assert "queries at 32 px (--image-size), database (no retrieval check at fp32) at 32 px (as the queries)" in err
    code, _, err = run_cli("export", "--checkpoint", ckpt, "--format", "torchscript", "--precision", "int8")
    assert code == 2 and err.startswith("error: ") and "int8" in err and "Traceback" not in err


def test_retrieval_check_database_at_its_own_size(tiny_set, tmp_path):
    """`db_image_size` (--db-image-size): the retrieval check's teacher database at another size than the
    encoder's queries (the asymmetric deployment); unset, at the encoder's size."""
    d, ckpt, ds, db = tiny_set
    asked = []

    def fetch(config, verify_data, identity, image_size, lw, where):
        asked.append(image_size)
        return pipeline.VerifyData(ds, db)

    for db_size in (40, None):
        st = pipeline.ExportSettings(precision="fp16", db_image_size=db_size, map_tolerance=100.0)
        info = pipeline.export_checkpoint(ckpt, st, out=tmp_path / f"e{db_size}.onnx", verify_data_fn=fetch)
        assert info["image_size"] == SIZE
    assert asked == [40, SIZE]


def test_pad_static_pads_bottom_right_and_refuses_a_larger_image():
    from aml.errors import UserError
    from aml.sidecar import is_static, pad_static

    x = np.ones((2, 3, 30, 48), np.float32)
    y = pad_static(x, 48)
    assert y.shape == (2, 3, 48, 48) and np.array_equal(y[..., :30, :], x) and not y[..., 30:, :].any()
    assert pad_static(y, 48) is y
    with pytest.raises(UserError, match="static-shape model takes 48x48.*--image-size 48"):
        pad_static(np.ones((1, 3, 49, 40), np.float32), 48, "enc.onnx")
    assert is_static({"preprocessing": {"static_shape": True}})
    assert not is_static({"preprocessing": {"static_shape": "yes"}}) and not is_static({})


def test_static_shape_int8_calibrates_on_padded_images(tiny_set):
    """--static-shape --precision int8: the calibration images are padded to the fixed size as every input is
    (non-square images would not fit the static graph)."""
    from PIL import Image

    d, ckpt, ds, db = tiny_set
    calib = []
    for i, (w, h) in enumerate([(60, 40), (40, 60), (50, 30), (30, 50)]):  # not size x size
        calib.append(str(d / f"calib{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(calib[-1])
    out = d / "enc-int8-s.onnx"
    settings = pipeline.ExportSettings(
        precision="int8", calib_images=calib, calib_count=4, map_tolerance=100.0, static_shape=True
    )
    info = pipeline.export_checkpoint(ckpt, settings, out=out, verify_data_fn=_fixed(ds, db))
    assert out.is_file() and info["preprocessing"]["static_shape"] is True
