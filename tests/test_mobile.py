"""On-device formats: ExecuTorch .pte (fp32 / int8), Core ML .mlpackage, ORT .ort; their gates, the pipeline
wiring (sidecar, nothing written on failure) and `aml embed` of a .pte.

A tiny TF-"same" network stands in for a student where the format alone is tested (ExecuTorch lowering has a
fixed cost of tens of seconds on a loaded machine; each format is exported once per module). Each format's tests
skip, saying which package is missing, only when that package is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import lively, save_student

from aml.export import pipeline, verify
from aml.export.encoder import export_encoder, reference_encoder
from aml.export.formats import install, missing_package, sha256_path, verify_format
from aml.export.friendly import SameConv2d, TFSamePad
from aml.export.mobile import MOBILE_FORMATS
from aml.nn import l2n
from aml.registry import create_model
from aml.sidecar import read_sidecar, sidecar_path

SIZE = 96  # a .pte takes sides from aml.pte_embed.MIN_SIDE (64); the probes at 96 are 96, 73 and 71
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def needs(fmt: str) -> None:
    """Skip with the install line when the format's package is absent."""
    fix = missing_package(MOBILE_FORMATS[fmt])
    if fix:
        pytest.skip(fix)


class Tiny(torch.nn.Module):
    """Three strided TF-"same" convolutions, GeM, L2N: the export-relevant parts of a student, small."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList(SameConv2d(c, o, 3, stride=2) for c, o in ((3, 8), (8, 16), (16, 16)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return l2n(x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3))


def calibration() -> list[np.ndarray]:
    return [verify.probe_batch(SIZE, SIZE, seed=s, batch=1) for s in range(4)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """(format, precision) -> (path, equivalence, runner), exported on first use."""
    done: dict = {}

    def get(fmt: str, precision: str):
        needs(fmt)
        if (fmt, precision) not in done:
            f = MOBILE_FORMATS[fmt]
            path = tmp_path_factory.mktemp(fmt) / f"tiny-{precision}{f.suffix}"
            f.export(tiny, SIZE, precision, calibration, path)
            ref = pipeline.torch_runner(tiny)
            eq, run = verify_format(f, path, ref, SIZE, gate=precision == "fp32", dim=16, mean=MEAN, std=STD)
            done[fmt, precision] = path, eq, run
        return done[fmt, precision]

    return get


@pytest.mark.parametrize("fmt", ["executorch", "ort"])
def test_fp32_formats_pass_the_equivalence_gate(exported, tiny, fmt):
    path, eq, run = exported(fmt, "fp32")
    assert eq["gated"] and eq["passed"] and len(eq["probes"]) == 3, eq
    x = verify.probe_batch(SIZE - 9, SIZE, seed=5, batch=3)  # another size and batch than the probes
    with torch.no_grad():
        want = tiny(torch.from_numpy(x)).numpy()
    assert np.std(want, axis=0).max() > 1e-3  # the vectors depend on the input
    assert np.abs(run(x) - want).max() <= 1e-5


@pytest.mark.parametrize("fmt", ["executorch", "ort"])
def test_int8_formats_are_quantised_and_close(exported, tiny, fmt):
    path, eq, run = exported(fmt, "int8")
    assert not eq["gated"] and 0.99 < eq["cosine_min"] < 1.0 and eq["max_abs_diff"] > 1e-6  # int8, not float
    assert path.stat().st_size < exported(fmt, "fp32")[0].stat().st_size or fmt == "ort"


def test_pte_int8_keeps_the_stem_and_the_head_float(tiny):
    """As the ONNX int8 recipe: the first convolution (it reads the normalised image) and everything after the last
    convolution's activation stay float32; the convolutions between take int8 weights."""
    needs("executorch")
    from aml.export.executorch_format import _op, float_node_names, quantize_pt2e

    example = torch.from_numpy(verify.probe_batch(SIZE, SIZE, seed=99, batch=2))
    graph = torch.export.export(tiny, (example,)).module().graph
    floats = {_op(n) for n in graph.nodes if n.name in float_node_names(graph)}
    assert {"conv2d", "clamp", "pow", "mean", "linalg_vector_norm"} <= floats
    convs = [n for n in graph.nodes if _op(n) == "conv2d"]
    assert [n.name in float_node_names(graph) for n in convs] == [True, False, False]
    assert [n.name in float_node_names(graph, float_stem=False) for n in convs] == [False, False, False]
    prog = quantize_pt2e(tiny, example, SIZE, calibration)
    weights = [_op(n.args[1]) for n in prog.graph.nodes if _op(n) == "conv2d"]
    assert weights == ["", "dequantize_per_channel", "dequantize_per_channel"]  # float stem, int8 body
    ops = [_op(n) for n in prog.graph.nodes if n.op == "call_function"]
    assert "quantize_per_tensor" not in ops[ops.index("clamp") :]  # GeM and L2N float


def test_the_gate_fails_on_vectors_that_differ(exported, tiny):
    path, _, run = exported("executorch", "fp32")
    f = MOBILE_FORMATS["executorch"]
    wrong = pipeline.torch_runner(torch.nn.Sequential(tiny, torch.nn.Dropout(0.0), torch.nn.Softsign()))
    eq, _ = verify_format(f, path, wrong, SIZE, gate=True, dim=16, mean=MEAN, std=STD)
    assert not eq["passed"]
    assert "nothing written" in verify.failure_message("x", {"equivalence": eq})


def test_coreml_package_is_checked_for_names_shapes_and_metadata(exported):
    path, eq, run = exported("coreml", "fp16")
    assert path.is_dir() and run is None  # Linux: Core ML does not run here
    s = eq["structure"]
    assert s["passed"] and s["inputs"] == ["images"] and s["outputs"] == ["vectors"]
    assert s["input_ranges"] == [(1, 4), (3, 3), (64, SIZE), (64, SIZE)] and s["metadata"]["dim"] == 16
    assert "macOS" in eq["numeric_check"] and not eq["gated"]
    with pytest.raises(verify.VerificationError, match="Core ML package check failed.*metadata"):
        MOBILE_FORMATS["coreml"].check(path, SIZE, 17)


STUDENTS = ("lite0", "mobilenetv2", "effnet-b3")  # the bundled students (random weights, lively BatchNorm)
# the teachers' dimension: the absolute gate (1e-4 per component) is for unit vectors of this size; at D = 16 the
# components are ~11x larger and effnet-b3's .pte differs by 4.5e-4 at cosine 0.9999997
STUDENT_DIM = 2048


@pytest.fixture(scope="module")
def students():
    """name -> (export-ready encoder, torch reference) of a random-init, lively STUDENT_DIM-d student."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            net = lively(create_model(name, role="student", dim=STUDENT_DIM, random_init=True), SIZE).eval()
            made[name] = export_encoder(net)[0], reference_encoder(net)
        return made[name]

    return get


# The ExecuTorch lowering of effnet-b3 and lite0 takes about two and one minutes of CPU: marked slow, outside
# `make test` (the ExecuTorch path runs there on mobilenetv2); `.venv/bin/python -m pytest -m slow` runs them.
SLOW = {("effnet-b3", "executorch"), ("lite0", "executorch")}
EVERY = [
    pytest.param(name, fmt, marks=[pytest.mark.slow] if (name, fmt) in SLOW else [])
    for name in STUDENTS
    for fmt in ("executorch", "ort", "coreml")
]


@pytest.mark.parametrize(("name", "fmt"), EVERY)
def test_every_format_of_every_student_passes_its_gate(students, tmp_path, name, fmt):
    """Each format of each bundled student, at 96 px: its vectors equal torch's (ExecuTorch, ORT: the fp32 gate
    and a batch of another size) or its package holds the right names, shapes and metadata (Core ML on Linux)."""
    needs(fmt)
    enc, ref = students(name)
    f = MOBILE_FORMATS[fmt]
    path = tmp_path / f"{name}{f.suffix}"
    precision = "fp16" if fmt == "coreml" else "fp32"
    f.export(enc, SIZE, precision, calibration, path)
    torch_run = pipeline.torch_runner(ref)
    eq, run = verify_format(f, path, torch_run, SIZE, gate=precision == "fp32", dim=STUDENT_DIM, mean=MEAN, std=STD)
    if run is None:
        assert eq["structure"]["passed"] and eq["structure"]["metadata"]["preprocessing"]["input"]["name"] == "images"
        return
    assert eq["passed"], eq
    x = verify.probe_batch(SIZE - 11, SIZE - 2, seed=7, batch=3)
    want = torch_run(x)
    assert np.std(want, axis=0).max() > 1e-3 and np.abs(run(x) - want).max() <= 1e-4


def test_static_shape_pte_takes_one_size_and_coreml_records_it(tiny, tmp_path):
    """--static-shape: a .pte of one side (batch still dynamic) that the equivalence gate checks at that size."""
    needs("executorch")
    f = MOBILE_FORMATS["executorch"]
    details = f.export(tiny, 80, "fp32", calibration, tmp_path / "s.pte", True)
    assert details["dynamic"]["side"] == [80, 80]
    eq, run = verify_format(
        f, tmp_path / "s.pte", pipeline.torch_runner(tiny), 80, gate=True, dim=16, mean=MEAN, std=STD, static_shape=True
    )
    assert eq["passed"] and [p["size"] for p in eq["probes"]] == [[80, 80]]
    needs("coreml")
    c = MOBILE_FORMATS["coreml"]
    c.export(tiny, 80, "fp32", calibration, tmp_path / "s.mlpackage", True)
    eq, _ = verify_format(c, tmp_path / "s.mlpackage", None, 80, gate=True, dim=16, mean=MEAN, std=STD, static_shape=1)
    pre = eq["structure"]["metadata"]["preprocessing"]
    assert eq["structure"]["input_ranges"] == [(1, 4), (3, 3), (80, 80), (80, 80)] and pre["static_shape"]
    assert pre["input"]["shape"] == ["batch", 3, 80, 80] and "padded" in pre["resize"]
    from aml.export.coreml_format import coreml_friendly

    x = torch.from_numpy(verify.probe_batch(80, 80, seed=3, batch=2))
    with torch.no_grad():  # the constant pads of the static package are TF "same" at that size
        assert torch.equal(coreml_friendly(tiny, 80)(x), tiny(x))


def test_coreml_pad_by_axis_equals_tf_same_padding():
    """The Core ML rewrite of TF "same" padding (static pad + dynamic crop) gives the same maps at every parity."""
    from aml.export.coreml_format import PadByAxis

    for k, s, d in [(3, 2, 1), (5, 2, 1), (2, 2, 1), (3, 1, 1), (4, 3, 1), (3, 2, 2)]:
        same = TFSamePad(k, s, d)
        for h, w in [(16, 17), (15, 21), (30, 9), (33, 34)]:
            x = torch.randn(1, 2, h, w)
            assert torch.equal(PadByAxis(same)(x), same(x)), (k, s, d, h, w)


def test_install_swaps_a_folder_whole(tmp_path):
    new, out = tmp_path / "new.mlpackage", tmp_path / "enc.mlpackage"
    (out / "Data").mkdir(parents=True)
    (out / "Data" / "old.bin").write_bytes(b"old")
    (new / "Data").mkdir(parents=True)
    (new / "Data" / "w.bin").write_bytes(b"new")
    digest = sha256_path(new)
    install(new, out)
    assert not new.exists() and [p.name for p in out.rglob("*.bin")] == ["w.bin"] and sha256_path(out) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.mlpackage"]


# ---- through `aml export` / `aml embed` -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pte_export(tmp_path_factory):
    needs("executorch")
    d = tmp_path_factory.mktemp("pte")
    ckpt = save_student(d / "s.pt", "resnet18", config={"image_size": SIZE})
    info = pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(fmt="executorch"), out=d / "enc.pte")
    return ckpt, d / "enc.pte", info


def test_pte_export_is_verified_and_its_sidecar_complete(pte_export):
    ckpt, path, info = pte_export
    side = read_sidecar(path)
    assert side["format"] == "executorch" and side["precision"] == "fp32" and side["file"] == "enc.pte"
    assert side["sha256"] == sha256_path(path) and side["student"]["sha256"] == sha256_path(ckpt)
    assert side["verification"]["equivalence"]["passed"] and side["image_size"] == SIZE and side["dim"] == 32
    exp = side["export"]
    assert exp["delegate"] == "XnnpackBackend" and exp["delegated_subgraphs"] >= 1 and exp["executorch"]
    assert exp["dynamic"] == {"batch": [1, 4], "side": [64, SIZE]}
    pre = side["preprocessing"]
    assert pre["input"] == {"name": "images", "dtype": "float32", "shape": ["batch", 3, "height", "width"],
                            "bounds": {"batch": [1, 4], "side": [64, SIZE]}}  # fmt: skip
    assert pre["output"]["shape"] == ["batch", 32] and pre["output"]["l2_normalised"] and not pre["static_shape"]
    assert pre["mean"] == side["mean"] and pre["layout"] == "NCHW" and pre["channel_order"] == "RGB"
    assert pre["value_range"] == [0.0, 1.0] and "Lanczos" in pre["resize"] and not pre["whitening_included"]


def test_embed_runs_a_pte_like_an_onnx(pte_export, tmp_path, run_cli):
    from PIL import Image

    ckpt, path, _ = pte_export
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate([(120, 90), (90, 120), (100, 100)]):
        names.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(names[-1])
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    code, out, err = run_cli("embed", "--model", path, "--images", tmp_path / "list.txt", "--out", tmp_path / "v.npy")
    assert code == 0, err
    got = np.load(tmp_path / "v.npy")
    from aml.extract import ExtractSettings, extract

    want = extract(create_model(ckpt).eval(), names, ExtractSettings(SIZE, workers=0, device="cpu", progress=False))
    assert got.shape == (3, 32) and np.abs(got - np.asarray(want)).max() <= 1e-4


def test_failed_gate_writes_no_mobile_file(tmp_path, monkeypatch):
    needs("ort")
    ckpt = save_student(tmp_path / "s.pt", "mobilenetv2", config={"image_size": SIZE})
    monkeypatch.setattr(verify, "MIN_COSINE", 1.5)
    out = tmp_path / "out"
    with pytest.raises(verify.VerificationError, match="nothing written"):
        pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(fmt="ort"), out=out / "enc.ort")
    assert not out.exists() or list(out.iterdir()) == []
    monkeypatch.setattr(verify, "MIN_COSINE", 0.9999)
    info = pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(fmt="ort"), out=out / "enc.ort")
    assert info["export"]["opset"] == 17 and sidecar_path(out / "enc.ort").is_file()


def test_coreml_cli_defaults_to_fp16_and_writes_the_phone_sidecar(tmp_path, run_cli):
    """`aml export --format coreml` with no --precision: fp16, checked for names / shapes / metadata on Linux; the
    package's metadata carries the sidecar's preprocessing block."""
    needs("coreml")
    import json

    import coremltools as ct

    ckpt = save_student(tmp_path / "s.pt", "mobilenetv2", config={"image_size": SIZE})
    code, out, err = run_cli("export", "--checkpoint", ckpt, "--format", "coreml")
    assert code == 0, err
    path = tmp_path / "s-fp16.mlpackage"
    side = read_sidecar(path)
    assert side["format"] == "coreml" and side["precision"] == "fp16" and path.is_dir()
    eq = side["verification"]["equivalence"]
    assert not eq["gated"] and eq["structure"]["passed"] and "macOS" in eq["numeric_check"]
    meta = json.loads(ct.utils.load_spec(str(path)).description.metadata.userDefined["aml"])
    assert meta["preprocessing"] == side["preprocessing"] and meta["preprocessing"]["input"]["bounds"]["side"] == [
        64,
        SIZE,
    ]
    assert set(side["preprocessing"]) == set(read_sidecar(path)["preprocessing"])


def test_unsupported_precision_is_a_user_error(tmp_path, run_cli):
    args = ("--checkpoint", tmp_path / "none.pt", "--format", "executorch", "--precision", "fp16")
    code, _, err = run_cli("export", *args)
    assert code == 2 and "--format executorch --precision fp16" in err and "Traceback" not in err
