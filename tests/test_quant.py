"""int8 quantisation recipe: the kernels onnxruntime runs, the float stem / head, the Pad fold, the verdict."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from aml.export import quant_report
from aml.export.friendly import SameConv2d
from aml.export.onnx_export import export_onnx
from aml.export.quantize import Int8Recipe, float_nodes, fold_qdq_pads, quantize_int8, unshare_initializers
from aml.nn import gem, l2n


class TinyResNet(nn.Module):
    """Stem conv, two residual blocks (a tensor with two consumers each), GeM + L2N head."""

    def __init__(self, pool: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else nn.Identity()
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.proj = nn.Conv2d(8, 16, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.stem(x)))
        for conv in self.blocks:
            x = torch.relu(x + conv(x))
        return l2n(gem(torch.relu(self.proj(x)), torch.tensor(3.0)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    export_onnx(TinyResNet().eval(), d / "fp32.onnx", torch.randn(1, 3, 32, 32))
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    return d, batches


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def test_uint8_recipe_runs_every_convolution_but_the_stem_as_int8(tiny):
    d, batches = tiny
    quantize_int8(d / "fp32.onnx", d / "u8.onnx", batches)
    k = quant_report.kernel_counts(d / "u8.onnx")
    assert quant_report.kernel_counts(d / "fp32.onnx")["float_conv"] == 4
    assert k["int8_conv"] == 3 and k["float_conv"] == 1  # the stem stays float32
    assert k["quantize"] == 1 and k["dequantize"] == 1  # one Q after the stem, one DQ before the head
    ops = quant_report.optimized_ops(d / "u8.onnx")
    assert ops["QLinearAdd"] == 2  # the residual adds run on uint8 too
    x = batches[0]
    ref, got = _run(d / "fp32.onnx", x), _run(d / "u8.onnx", x)
    assert float((ref * got).sum()) > 0.99  # unit vectors (the head is float)
    assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)


def test_int8_activations_leave_float_convolutions_on_x86(tiny):
    """Why uint8: onnxruntime's x86 fusion into QLinearConv wants uint8 activations (int8: ARM only)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the int8-activation fusion limit is x86-specific")
    d, batches = tiny
    quantize_int8(d / "fp32.onnx", d / "s8.onnx", batches, Int8Recipe(activations="int8", ops=("Conv",)))
    k = quant_report.kernel_counts(d / "s8.onnx")
    assert k["float_conv"] > 1 and k["int8_conv"] < 3
    assert k["dequantize"] > 1


def test_float_nodes_are_the_stem_and_the_head(tiny):
    d, _ = tiny
    graph = onnx.load(str(d / "fp32.onnx")).graph
    names = set(float_nodes(graph))
    by_type = {n.name: n.op_type for n in graph.node}
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    assert convs[0] in names and not names & set(convs[1:])
    assert {"Pow", "ReduceMean"} <= {by_type[n] for n in names}  # GeM stays float32
    relu_after_stem = next(n for n in graph.node if n.op_type == "Relu")
    assert relu_after_stem.name in names  # up to the second conv's input
    assert set(float_nodes(graph, float_stem=False)).isdisjoint(convs)


def test_a_stem_ending_in_max_pool_is_quantised(tmp_path):
    """onnxruntime would run that pool on uint8 in NCHW (slow): the stem joins the int8 chain instead."""
    export_onnx(TinyResNet(pool=True).eval(), tmp_path / "pool.onnx", torch.randn(1, 3, 32, 32))
    graph = onnx.load(str(tmp_path / "pool.onnx")).graph
    types = {n.name: n.op_type for n in graph.node}
    assert "MaxPool" in types.values()
    kept = {types[n] for n in float_nodes(graph)}
    assert "Pow" in kept and not kept & {"Conv", "MaxPool"}  # the head only
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(2)]
    quantize_int8(tmp_path / "pool.onnx", tmp_path / "pool-int8.onnx", batches)
    k = quant_report.kernel_counts(tmp_path / "pool-int8.onnx")
    assert k["int8_conv"] == 4 and k["float_conv"] == 0
    assert quant_report.optimized_ops(tmp_path / "pool-int8.onnx")["MaxPool"] == 0  # NhwcMaxPool on uint8


def test_unshare_initializers_gives_each_consumer_its_copy():
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "w"], ["a"]), helper.make_node("Mul", ["a", "w"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], [w]))
    assert unshare_initializers(model) == 1
    assert model.graph.node[0].input[1] != model.graph.node[1].input[1]
    assert len(model.graph.initializer) == 2 and unshare_initializers(model) == 0


def _qdq_pad_model(q_scale: float) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(q_scale, np.float32), "s2"),
        numpy_helper.from_array(np.array(100, np.uint8), "zp"),
        numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 2, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("Shape", ["xd"], ["shape"]),
        helper.make_node("Pad", ["xd", "pads"], ["p"], mode="constant"),
        helper.make_node("QuantizeLinear", ["p", "s2", "zp"], ["pq"]),
        helper.make_node("DequantizeLinear", ["pq", "s2", "zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 5]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [4]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _plain(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_fold_qdq_pads_is_exact_and_keeps_the_tensor_quantised():
    x = np.random.default_rng(0).normal(0, 2, (1, 2, 3, 4)).astype(np.float32)
    model = _qdq_pad_model(0.05)
    want = _plain(model, x)
    assert fold_qdq_pads(model) == 2  # the Pad, and the Shape that read the dequantised copy
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["QuantizeLinear", "Shape", "Pad", "DequantizeLinear"]
    onnx.checker.check_model(model, full_check=True)
    got = _plain(model, x)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    other = _qdq_pad_model(0.07)  # the Q after the Pad requantises: not a plain Pad of the uint8 tensor
    assert fold_qdq_pads(other) == 1 and [n.op_type for n in other.graph.node].count("Pad") == 1
    assert "QuantizeLinear" in [n.op_type for n in other.graph.node[3:]]


def test_stride_one_same_conv_exports_without_pad(tmp_path):
    conv = SameConv2d(3, 4, 3, stride=1, dilation=2).eval()
    strided = SameConv2d(3, 4, 3, stride=2).eval()
    for m, name in ((conv, "s1"), (strided, "s2")):
        export_onnx(m, tmp_path / f"{name}.onnx", torch.randn(1, 3, 16, 16))
    assert "Pad" not in {n.op_type for n in onnx.load(str(tmp_path / "s1.onnx")).graph.node}
    s2 = onnx.load(str(tmp_path / "s2.onnx")).graph.node  # strided: one Conv with auto_pad SAME_UPPER, no Pad
    assert "Pad" not in {n.op_type for n in s2}
    assert [a.s for n in s2 if n.op_type == "Conv" for a in n.attribute if a.name == "auto_pad"] == [b"SAME_UPPER"]
    x = torch.randn(2, 3, 13, 18)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, [2, 2, 2, 2])  # TF "same" for k_eff 5, stride 1
        want = torch.nn.functional.conv2d(padded, conv.weight, conv.bias, dilation=2)
        assert torch.allclose(conv(x), want, atol=1e-6)
    np.testing.assert_allclose(_run(tmp_path / "s1.onnx", x.numpy()), want.numpy(), atol=1e-5)


def test_paired_latency_interleaves_and_takes_medians(tiny):
    d, _ = tiny
    steps = itertools.cycle([1.0, 3.0, 0.0, 1.5])  # fp32 takes 3 s, int8 1.5 s, per run
    now = itertools.accumulate(steps)
    lat = quant_report.paired_latency(d / "fp32.onnx", d / "fp32.onnx", 32, runs=3, clock=lambda: next(now))
    assert lat["fp32_ms"] == pytest.approx(3000) and lat["int8_ms"] == pytest.approx(1500)
    assert lat["ratio"] == pytest.approx(0.5) and lat["runs"] == 3 and lat["threads"] == 1
    assert "CPU threads" in lat["cpu"]
    with pytest.raises(ValueError):
        quant_report.paired_latency(d / "fp32.onnx", d / "fp32.onnx", 32, runs=0)


@pytest.mark.parametrize("ratio,recommend", [(0.45, "int8"), (0.6, "int8"), (0.61, "fp32"), (1.9, "fp32")])
def test_int8_verdict(ratio, recommend):
    lat = {"fp32_ms": 50.0, "int8_ms": 50.0 * ratio, "ratio": ratio, "size": 362, "threads": 1, "runs": 7}
    v = quant_report.int8_verdict(lat)
    assert v["recommend"] == recommend and v["max_ratio"] == 0.6
    assert f"{ratio:.2f}x" in v["message"] and "362 px" in v["message"] and "50.0 ms" in v["message"]
    assert ("--precision fp32" in v["message"]) == (recommend == "fp32")


def test_quant_report_and_the_session_factory_import_no_torch():
    """The int8 report and `aml.ort_session` are torch-free: they name the graph's input through `aml.sidecar`."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys\nimport aml.export.quant_report, aml.ort_session\nprint('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def test_one_session_factory_sets_the_options():
    """Every aml onnxruntime session: the given intra-op threads (else the one thread setting), one inter-op
    thread, every graph optimisation, no spinning, the CPU provider."""
    from aml.onnx_embed import resize_graph
    from aml.ort_session import session
    from aml.threads import intra_op_threads

    for threads, want in ((3, 3), (None, intra_op_threads())):
        sess = session(resize_graph(), threads)
        opts = sess.get_session_options()
        assert opts.intra_op_num_threads == want and opts.inter_op_num_threads == 1
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert sess.get_providers() == ["CPUExecutionProvider"]
