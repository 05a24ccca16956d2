"""GLAM: each attention against the paper's formula written out, the near-identity start, parts switchable,
checkpoints, ONNX parity at the gate's sizes, gradients, and tiny distillations (resume, DDP) with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import aml_torchrun, distill_args, tiny_cfg
from test_export import TEACHER, lively

from aml import glam as G
from aml.errors import UserError
from aml.export import pipeline
from aml.extract import extract
from aml.registry import create_model
from aml.settings import ExtractSettings
from aml.train.checkpoint import load_checkpoint
from aml.train.config import TrainConfig
from aml.train.loop import Trainer, distill
from aml.train.optim import param_groups
from aml.train.recipe import check

C, H, W = 16, 5, 7


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the zero-initialised last convs too), so no part is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _maps(b: int = 2) -> torch.Tensor:
    return torch.rand(b, C, H, W, generator=torch.Generator().manual_seed(5))


def test_each_attention_has_the_papers_shape():
    f = _maps()
    assert G.LocalChannelAttention(C)(f).shape == (2, C, 1, 1)
    assert G.LocalSpatialAttention(C, 4)(f).shape == (2, 1, H, W)
    assert G.GlobalChannelAttention(C)(f).shape == (2, C, H, W)
    assert G.GlobalSpatialAttention(C, 4)(f).shape == (2, C, H, W)
    assert G.GLAM(C)(f).shape == (2, C, H, W)
    assert [G.eca_kernel(c) for c in (16, 512, 1280, 2048)] == [3, 5, 5, 7]


def test_global_spatial_attention_is_softmax_over_keys_written_out():
    """G_s = conv1x1(V softmax(K^T Q)), the paper's notation, one image and one query location at a time."""
    m = _randomise(G.GlobalSpatialAttention(C, 4))
    f = _maps()
    got = m(f)
    for b in range(2):
        x = f[b].reshape(C, H * W)  # (C, hw)
        q, k, v = (conv.weight[:, :, 0, 0] @ x + conv.bias[:, None] for conv in (m.query, m.key, m.value))
        a = torch.softmax(k.T @ q, dim=0)  # (hw_k, hw_q): each column (a query location) sums to 1 over keys
        for j in range(H * W):
            g = sum(v[:, i] * a[i, j] for i in range(H * W))  # (c',)
            want = m.out.weight[:, :, 0, 0] @ g + m.out.bias
            torch.testing.assert_close(got[b].reshape(C, -1)[:, j], want, rtol=1e-5, atol=1e-5)


def test_global_channel_attention_is_v_times_softmax_of_k_transpose_q():
    m = _randomise(G.GlobalChannelAttention(C))
    f = _maps()
    got = m(f)
    pad = m.query.padding[0]
    for b in range(2):
        p = f[b].mean(dim=(1, 2))  # GAP: (C,)
        pp = torch.nn.functional.pad(p, (pad, pad))
        conv = [
            [sum(w[0, 0, t] * pp[c + t] for t in range(w.shape[-1])) for c in range(C)]
            for w in (m.query.weight, m.key.weight)
        ]
        q, k = (torch.sigmoid(torch.stack(v)) for v in conv)  # (C,) each
        a = torch.softmax(k[:, None] * q[None, :], dim=0)  # (C_in, C_out) = softmax(K^T Q) over the keys
        v = f[b].reshape(C, H * W).T  # V: (hw, C)
        torch.testing.assert_close(got[b], (v @ a).T.reshape(C, H, W), rtol=1e-5, atol=1e-6)


def test_local_attentions_and_the_fusion_follow_the_formulas():
    m = _randomise(G.GLAM(C))
    f = _maps()
    lc = m.local_channel(f)
    pad = m.local_channel.conv.padding[0]
    pooled = torch.nn.functional.pad(f.mean(dim=(2, 3)), (pad, pad))  # (B, C + 2 pad)
    kernel = m.local_channel.conv.weight[0, 0]
    want = torch.sigmoid(torch.stack([pooled[:, c : c + len(kernel)] @ kernel for c in range(C)], 1))
    torch.testing.assert_close(lc[:, :, 0, 0], want)
    r = m.local_spatial.reduce(f)
    ls = m.local_spatial.out(torch.cat([r] + [conv(r) for conv in m.local_spatial.dilated], 1))
    assert [c.dilation for c in m.local_spatial.dilated] == [(1, 1), (2, 2), (3, 3)]
    f_l = (f * lc + f) * ls + (f * lc + f)
    f_gc = f * m.global_channel(f)
    f_g = f_gc * m.global_spatial(f) + f_gc
    w = torch.softmax(m.fusion, 0)
    torch.testing.assert_close(m(f), w[0] * f + w[1] * f_l + w[2] * f_g)


@pytest.mark.parametrize("parts", ["local-channel", "local-spatial", "global-spatial", "local-channel,global-spatial"])
def test_without_global_channel_glam_starts_as_a_multiple_of_its_input(parts):
    f = _maps()
    with torch.no_grad():
        out = G.GLAM(C, G.parse_parts(parts))(f)
    ratio = out / f
    torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio))
    assert float(ratio.flatten()[0]) >= 1.0


def test_a_glam_student_starts_with_the_descriptors_of_the_plain_one():
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    plain = lively(create_model("resnet18", role="student", random_init=True)).eval()
    with torch.no_grad():
        want = plain(x)
        for parts in ("local-channel,local-spatial,global-spatial", "all"):
            net = create_model("resnet18", role="student", random_init=True, glam=parts).eval()
            net.load_state_dict(plain.state_dict(), strict=False)  # the same BatchNorm statistics
            cos = (net(x) * want).sum(1)
            exact = "global-channel" not in G.parse_parts(parts)
            assert cos.min() > (1 - 1e-6 if exact else 0.99), (parts, cos)


def test_parts_are_switchable_and_named_once():
    assert G.parse_parts("all") == G.PARTS and G.parse_parts("none") == () and G.parse_parts(None) == ()
    assert G.parse_parts("global-spatial, local-channel") == ("local-channel", "global-spatial")
    assert G.spec_of(G.PARTS) == "all" and G.spec_of(()) == "none"
    with pytest.raises(UserError, match="--glam local: unknown GLAM part"):
        G.parse_parts("local")
    with pytest.raises(UserError, match="--glam nope"):
        check(TrainConfig(glam="nope"))
    f = _maps()
    for n in range(1, 5):
        parts = G.PARTS[:n]
        m = G.GLAM(C, parts)
        held = {name.split(".")[0] for name, _ in m.named_parameters()} - {"fusion"}
        assert held == {G.attr(p) for p in parts}
        assert m.fusion.numel() == 1 + any(p in G.LOCAL for p in parts) + any(p in G.GLOBAL for p in parts)
        assert G.parts_in(f"glam.{k}" for k in m.state_dict()) == parts
        assert m(f).shape == f.shape


def test_gradients_reach_every_glam_parameter_and_its_own_lr_group():
    net = create_model("resnet18", role="student", dim=8, head="linear", random_init=True, glam="all")
    net.train()
    net(torch.randn(2, 3, 48, 48)).sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if n.startswith("glam.")}
    assert grads and all(g is not None for g in grads.values())  # in the graph: DDP needs no unused parameters
    for n in ("fusion", "local_channel.conv.weight", "local_spatial.out.weight", "global_spatial.out.weight"):
        assert grads[f"glam.{n}"].abs().sum() > 0, n  # the zero-started parts learn from the first step
    cfg = TrainConfig(lr=1e-4, glam_lr_mult=10.0)
    groups = param_groups(net, cfg)
    assert len(groups) == 4 and groups[3]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in groups[3]["params"]} == {id(p) for n, p in net.named_parameters() if n.startswith("glam.")}
    assert len(param_groups(create_model("resnet18", role="student", dim=8, random_init=True), cfg)) == 3


def _save(net, path):
    torch.save({"state_dict": net.state_dict(), "meta": net.meta}, path)
    return path


def test_checkpoints_are_rebuilt_with_the_glam_parts_they_hold(tmp_path):
    student = create_model("resnet18", role="student", dim=8, random_init=True, glam="local-spatial,global-channel")
    _randomise(student.glam)
    path = _save(student, tmp_path / "s.pt")
    again = create_model(path)
    assert again.glam_parts == ("local-spatial", "global-channel") and again.meta["aml"]["role"] == "student"
    x = torch.randn(2, 3, 40, 52)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), student.eval()(x))
    with pytest.raises(UserError, match="checkpoint has GLAM parts local-spatial,global-channel, but --glam all"):
        create_model(path, glam="all")
    plain = _save(create_model("resnet18", role="student", dim=8, random_init=True), tmp_path / "p.pt")
    assert create_model(plain).glam is None
    assert create_model(plain, glam="global-spatial").glam_parts == ("global-spatial",)  # a fresh module added
    teacher = create_model(path, role="teacher")  # either side: a teacher checkpoint keeps its GLAM, frozen
    assert teacher.glam is not None and not any(p.requires_grad for p in teacher.parameters())


def test_onnx_export_passes_the_parity_gate_with_dynamic_sizes(tmp_path):
    net = lively(create_model("mobilenetv2", role="student", dim=32, random_init=True, glam="all"))
    _randomise(net.glam, seed=3)
    with torch.no_grad():
        net.glam.fusion.zero_()
    net.meta["aml"]["teacher"] = TEACHER
    ckpt = tmp_path / "s.pt"
    torch.save({"state_dict": net.state_dict(), "meta": net.meta, "config": {"image_size": 48}}, ckpt)
    info = pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(fmt="onnx"), out=tmp_path / "enc.onnx")
    eq = info["verification"]["equivalence"]
    assert eq["passed"] and len(eq["probes"]) == 3, eq
    run = pipeline.ort_runner(tmp_path / "enc.onnx")
    student = create_model(ckpt).eval()
    for b, h, w in [(2, 70, 45), (1, 33, 97)]:  # other grids than the traced one: hw x hw stays dynamic
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            want = student(x).numpy()
        got = run(x.numpy())
        assert np.abs(got - want).max() <= 1e-4 and (got * want).sum(1).min() >= 0.9999, (h, w)


def test_fp16_export_keeps_glam_in_float32():
    from aml.export.encoder import export_encoder, reference_encoder

    net = lively(create_model("resnet18", role="student", dim=16, random_init=True, glam="all")).eval()
    _randomise(net.glam, seed=4)
    enc, _ = export_encoder(net, precision="fp16")
    assert isinstance(enc.net.glam, G.GLAM) and enc.net.glam.fusion.dtype == torch.float32
    x = torch.randn(2, 3, 48, 56)
    with torch.no_grad():
        cos = (enc(x) * reference_encoder(net)(x)).sum(1)
    assert cos.min() > 0.99


def test_cli_distill_glam_option_is_checked_first(tmp_path, home, run_cli):
    code, _, stderr = run_cli("distill", "--glam", "local", "--data", "synth", "--out", tmp_path / "r")
    assert code == 2 and stderr.strip().startswith("error: --glam local: unknown GLAM part; use all, none")


def test_distill_with_glam_fits_through_it_trains_it_and_resumes(tiny_data, tmp_path, home):
    cfg = tiny_cfg(tiny_data, tmp_path / "full", glam="all", eval_every=0)
    full = distill(cfg, progress=False)
    ck = load_checkpoint(full / "last.pt")
    assert json.loads((full / "config.json").read_text())["glam"] == "all"
    assert ck["init"]["method"] == "local-procrustes" and np.isfinite(ck["init"]["residual"])
    start = create_model("resnet18", role="student", dim=512, head="linear", random_init=True, glam="all")
    assert not torch.equal(ck["state_dict"]["glam.fusion"], start.glam.fusion.detach())  # GLAM trained
    assert create_model(full / "last.pt").glam_parts == G.PARTS
    half = tiny_cfg(tiny_data, tmp_path / "half", glam="all", eval_every=0)
    distill(half.replace(epochs=1), progress=False)
    trainer = Trainer(half, resume=True, progress=False)
    assert trainer.student.glam_parts == G.PARTS and len(trainer.optimizer.param_groups) == 4
    trainer.fit()
    b = load_checkpoint(tmp_path / "half" / "last.pt")["state_dict"]
    for k, v in ck["state_dict"].items():
        assert torch.equal(v, b[k]), k
    with pytest.raises(UserError, match="option 'glam' differs"):
        Trainer(half.replace(glam="none", epochs=3), resume=True, progress=False, given=frozenset({"glam"}))


def test_a_glam_teacher_fine_tuned_without_a_teacher_serves_as_the_teacher_of_a_distillation(tiny_data, tmp_path, home):
    # the teacher side: `sym` trains a GLAM net on its own references (no teacher); its checkpoint is then --teacher
    tuned = distill(tiny_cfg(tiny_data, tmp_path / "t", loss="sym", glam="all", epochs=1, eval_every=0), progress=False)
    teacher = create_model(tuned / "last.pt", role="teacher")
    assert teacher.glam_parts == G.PARTS and not any(p.requires_grad for p in teacher.parameters())
    cfg = tiny_cfg(tiny_data, tmp_path / "s", teacher=str(tuned / "last.pt"), random_init=False, epochs=1)
    cfg = cfg.replace(student_random_init=True)  # the teacher checkpoint carries its weights
    trainer = Trainer(cfg, progress=False)
    want = extract(teacher, trainer.train.paths[:3], ExtractSettings(cfg.image_size, device="cpu", backend="torch"))
    torch.testing.assert_close(  # the cached teacher vectors are the fine-tuned GLAM net's (float16 cache)
        torch.as_tensor(np.asarray(trainer.train_teacher[:3], np.float32)), torch.as_tensor(want), atol=2e-3, rtol=0
    )
    trainer.fit()
    ev = load_checkpoint(tmp_path / "s" / "last.pt")["metrics"]["eval"]
    assert np.isfinite(ev["asymmetric"]["mAP"]["M"])


def test_the_closed_form_start_is_fitted_on_the_maps_through_glam(tiny_data, tmp_path, home):
    """GLAM moved far from its start: the residual the fit reports is that of the GLAM student's own vectors."""
    from aml.extract import extract
    from aml.nn import gem, l2n
    from aml.settings import ExtractSettings
    from aml.train.head_init import init_head

    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "r", glam="all", head_init="procrustes"), progress=False)
    student, paths = trainer.student, trainer.train.paths
    _randomise(student.glam, seed=1)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        p = student.pool.p
        bare, through = (l2n(gem(m, p)) for m in (student.features(x), student.trunk(x)))
    assert (bare * through).sum(1).min() < 0.99  # the fit would differ on the bare backbone's maps
    t = trainer.train_teacher
    info = init_head(student, "procrustes", paths=paths, teacher_vectors=t, teacher_net=trainer.teacher.net,
                     image_size=40)  # fmt: skip
    s = extract(student, paths, ExtractSettings(40, device="cpu", progress=False))
    residual = float(np.mean(1 - (s * np.asarray(t, dtype=np.float32)).sum(1)))
    assert info["residual"] == pytest.approx(residual, abs=1e-4)


def test_ddp_two_cpu_processes_with_glam(tiny_data, tmp_path, home):
    """Every GLAM parameter is in the graph, so DistributedDataParallel needs no find_unused_parameters."""
    out = tmp_path / "ddp"
    p = aml_torchrun("distill", *distill_args(tiny_data, out, batch_size=2, eval_every=0, glam="all"))
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and any(k.startswith("glam.") for k in ckpt["state_dict"])
