"""Metrix: the generic pair forms against loop transcriptions, the mixed losses of each mode against hand-written
per-pair loops, gradient routing, and tiny trainer runs (every mode, exact resume, weight 0, DDP, CLI + export)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, distill_args, tiny_cfg, torchrun

from aml.errors import UserError
from aml.losses import LOSSES, PAIR_BASED, clean_refs
from aml.registry import create_model
from aml.train.augment import resize_to
from aml.train.batches import Embedder
from aml.train.batchnorm import set_train_mode
from aml.train.checkpoint import load_checkpoint
from aml.train.config import TrainConfig
from aml.train.loop import Trainer, distill
from aml.train.mixup import Metrix, feature_mixes
from aml.train.recipe import check

B, K, D = 4, 3, 10
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}
FORM = {"contr": "contrastive", "contr+": "contrastive", "sym": "contrastive", "triplet": "triplet", "ms": "ms"}


def unit(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def near(anchor: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, K, D) unit vectors near the anchors, so that margin terms are active."""
    return F.normalize(unit(len(anchor), K, anchor.shape[1], seed=seed, dtype=anchor.dtype) + anchor[:, None], dim=-1)


def norm(v) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in v))


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def l2n(v: torch.Tensor) -> torch.Tensor:
    """docs/REFERENCE.md §2's L2N, x / (||x|| + 1e-6), as the network normalises."""
    return v / (norm(v) + 1e-6)


# ------------------------------------------------------------------- transcriptions of the generic forms
def ref_generic(form: str, a, refs, labels, mixed=None, margin=0.7, alpha=2.0, beta=40.0, lam=0.5) -> list[float]:
    """Per anchor, loop by loop: contrastive (docs/REFERENCE.md §5, labels), multi-similarity (its §8's sigma, rho),
    triplet (ordered pairs y_i > y_j, weight y_i (1 - y_j)); with `mixed`, the terms of the mixed references."""
    out = []
    for b in range(len(a)):
        M = refs.shape[1]
        y = [float(labels[b, j]) for j in range(M)]
        counts = [mixed is None or bool(mixed[b, j]) for j in range(M)]
        d = [norm(a[b] - refs[b, j]) for j in range(M)]
        if form == "contrastive":
            v = sum(
                y[j] * 0.5 * d[j] ** 2 + (1 - y[j]) * 0.5 * max(0.0, margin - d[j]) ** 2 for j in range(M) if counts[j]
            )
        elif form == "ms":
            s = [dot(a[b], refs[b, j]) for j in range(M)]
            rho_pos = sum(y[j] * math.exp(-alpha * (s[j] - lam)) for j in range(M) if counts[j])
            rho_neg = sum((1 - y[j]) * math.exp(beta * (s[j] - lam)) for j in range(M) if counts[j])
            v = math.log(1 + rho_pos) / alpha + math.log(1 + rho_neg) / beta
        else:
            v = sum(
                y[i] * (1 - y[j]) * max(0.0, d[i] ** 2 - d[j] ** 2 + margin)
                for i in range(M)
                for j in range(M)
                if y[i] > y[j] and (counts[i] or counts[j])
            )
        out.append(v)
    return out


def close(got: torch.Tensor, want) -> None:
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), **TOL[got.dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", PAIR_BASED)
def test_clean_labels_reproduce_the_registered_loss(name, dtype):
    spec = LOSSES[name]
    a, p, at = unit(B, D, seed=1, dtype=dtype), unit(B, D, seed=2, dtype=dtype), unit(B, D, seed=4, dtype=dtype)
    n = near(a, 3)
    kw = {"anchor_teacher": at} if "anchor_teacher" in spec.inputs else {}
    refs, labels = clean_refs(p, n, kw.get("anchor_teacher"))
    for constants in ({}, {"margin": 0.3} if "margin" in spec.defaults else {"alpha": 3.0, "lam": 0.2}):
        want = spec(a, p, n, **kw, **constants, reduction="none")
        torch.testing.assert_close(spec.pairs(a, refs, labels, **constants), want, rtol=1e-12, atol=1e-6)


@pytest.mark.parametrize("form", ["contr", "ms", "triplet"])
def test_soft_labels_and_mixed_terms_match_the_loops(form):
    spec = LOSSES[form]
    a = unit(B, D, seed=5)
    refs = F.normalize(unit(B, 6, D, seed=6) + a[:, None], dim=-1)
    g = torch.Generator().manual_seed(7)
    labels = torch.rand(B, 6, generator=g, dtype=torch.float64)
    labels[:, 0], labels[:, 1] = 1.0, 0.0  # clean pairs among the soft ones
    mixed = torch.rand(B, 6, generator=g) < 0.5
    mixed[:, 0] = mixed[:, 1] = False
    for m in (None, mixed):
        close(spec.pairs(a, refs, labels, mixed=m), ref_generic(FORM[form], a, refs, labels, m))
    labels[:, 2:] = 0.35  # one lambda: the triplet drops its pairs of two mixed references
    close(spec.pairs(a, refs, labels, mixed=mixed), ref_generic(FORM[form], a, refs, labels, mixed))


def test_ms_side_without_pairs_is_zero_with_finite_gradients():
    a = unit(B, D, seed=8).requires_grad_()
    refs = unit(B, 3, D, seed=9)
    labels = torch.ones(B, 3, dtype=torch.float64)  # no negative weight anywhere
    value = LOSSES["ms"].pairs(a, refs, labels)
    close(value, ref_generic("ms", a.detach(), refs, labels))
    value.sum().backward()
    assert torch.isfinite(a.grad).all()


# ------------------------------------------------------------------------------ the mixed loss per mode
def metrix(name: str, mode: str, pairs: str = "pos-neg", weight: float = 0.4) -> Metrix:
    spec = LOSSES[name]
    return Metrix(spec, dict(spec.defaults), mode, pairs, weight)


def _embedding_case(dtype=torch.float64):
    a, p, tq = unit(B, D, seed=10, dtype=dtype), unit(B, D, seed=11, dtype=dtype), unit(B, D, seed=12, dtype=dtype)
    return a, p, near(a, 13), tq, np.array([0.2, 0.5, 0.7, 0.9], dtype=np.float32)


def floats(lam: np.ndarray) -> list[float]:
    """The lambdas as Python floats, for the float64 loops."""
    return [float(x) for x in lam]


def embedding_loss(mx: Metrix, a, p, n, tq, lam, anchor_ref=None):
    at = tq if "anchor_teacher" in mx.spec.inputs else None
    ref = tq if anchor_ref is None else anchor_ref
    return mx.loss(a, p, n, anchor_ref=ref, anchor_teacher=at, lam=lam)


def test_embedding_pos_neg_contrastive_is_the_per_pair_loop():
    a, p, n, tq, lam32 = _embedding_case()
    lam = floats(lam32)
    want = 0.0
    for b in range(B):
        for k in range(K):
            v = l2n(lam[b] * p[b] + (1 - lam[b]) * n[b, k])
            d = norm(a[b] - v)
            want += lam[b] * 0.5 * d**2 + (1 - lam[b]) * 0.5 * max(0.0, 0.7 - d) ** 2
    for name in ("contr", "contr+"):  # contr+'s extra positive t(q) is a clean reference: no mixed term
        close(embedding_loss(metrix(name, "embedding"), a, p, n, tq, lam32), 0.4 * want)


def test_embedding_anchor_neg_triplet_pairs_mixed_with_clean_references():
    a, p, n, tq, lam32 = _embedding_case()
    lam = floats(lam32)
    want = 0.0
    for b in range(B):
        dp = norm(a[b] - p[b]) ** 2
        for k in range(K):
            dv = norm(a[b] - l2n(lam[b] * tq[b] + (1 - lam[b]) * n[b, k])) ** 2  # mixed with the teacher's t(q)
            want += lam[b] * sum(max(0.0, dv - norm(a[b] - n[b, j]) ** 2 + 0.7) for j in range(K))
            want += (1 - lam[b]) * max(0.0, dp - dv + 0.7)
    close(embedding_loss(metrix("triplet", "embedding", "anchor-neg", 1.0), a, p, n, tq, lam32), want)


def test_embedding_both_ms_groups_every_mixed_pair_in_one_sigma():
    a, p, n, tq, lam32 = _embedding_case()
    lam = floats(lam32)
    want = 0.0
    for b in range(B):
        v = [l2n(lam[b] * x + (1 - lam[b]) * n[b, k]) for x in (p[b], tq[b]) for k in range(K)]
        s = [dot(a[b], x) for x in v]
        want += math.log(1 + sum(lam[b] * math.exp(-2 * (x - 0.5)) for x in s)) / 2
        want += math.log(1 + sum((1 - lam[b]) * math.exp(40 * (x - 0.5)) for x in s)) / 40
    close(embedding_loss(metrix("ms", "embedding", "both", 1.0), a, p, n, tq, lam32), want)


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    net = create_model("resnet18", role="student", dim=D, random_init=True).double()
    set_train_mode(net)  # BatchNorm frozen, as in training
    return net


def _images(seed: int, sizes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


def test_feature_mixes_mix_the_maps_of_same_size_pairs(tiny_net):
    xs = _images(20, [(32, 40), (40, 32), (32, 40)])
    ns = [resize_to(n, tuple(x.shape[-2:])) for n, x in zip(_images(21, [(40, 32)] * 3), xs, strict=True)]
    lam = np.array([0.3, 1.0, 0.6])
    got = feature_mixes(tiny_net, list(zip(xs, ns, strict=True)), lam, torch.device("cpu"))
    with torch.no_grad():
        for i, (x, n) in enumerate(zip(xs, ns, strict=True)):
            m = lam[i] * tiny_net.maps(x[None]) + (1 - lam[i]) * tiny_net.maps(n[None])
            torch.testing.assert_close(got[i : i + 1].double(), tiny_net.embed_maps(m), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1:2].double(), tiny_net(xs[1][None]), rtol=1e-5, atol=1e-6)  # lambda 1


@pytest.mark.parametrize("mode", ["input", "feature"])
def test_asymmetric_mixed_query_against_teacher_references(mode, tiny_net):
    """The student's mixed example mix(p, n_1) is a query; t(p) gets lambda, t(n_1) 1 - lambda, t(n_2..) 0."""
    lam = np.array([0.25, 0.6, 0.8, 0.45], dtype=np.float32)
    p, n, tq = unit(B, D, seed=30), unit(B, K, D, seed=31), unit(B, D, seed=32)
    a = unit(B, D, seed=33)
    images = _images(34, [(32, 32), (32, 40), (32, 32), (40, 32)]) + _images(35, [(40, 40)] * B)
    mx = metrix("contr+", mode, weight=1.0)
    with torch.no_grad():
        mixed = mx.embed_mixes(images, lam, Embedder(tiny_net, tiny_net, torch.device("cpu")))
    got = mx.loss(a, p, n, anchor_ref=tq, anchor_teacher=tq, lam=lam, mixed=mixed)
    want = 0.0
    with torch.no_grad():
        for b in range(B):
            x, nb = images[b][None], resize_to(images[B + b], tuple(images[b].shape[-2:]))[None]
            if mode == "input":
                m = tiny_net(float(lam[b]) * x + (1 - float(lam[b])) * nb)[0]
            else:
                m = tiny_net.embed_maps(float(lam[b]) * tiny_net.maps(x) + (1 - float(lam[b])) * tiny_net.maps(nb))[0]
            refs = [p[b], tq[b], *n[b]]
            labels = [lam[b], lam[b], 1 - lam[b]] + [0.0] * (K - 1)
            for r, y in zip(refs, labels, strict=True):
                d = norm(m - r)
                want += y * 0.5 * d**2 + (1 - y) * 0.5 * max(0.0, 0.7 - d) ** 2
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-5, atol=1e-6)


def test_symmetric_input_mixup_scores_the_anchor_against_the_mixed_example(tiny_net):
    lam = np.array([0.3, 0.7], dtype=np.float32)
    images = _images(40, [(32, 32)] * 4)  # sources (the anchors), then the hardest negatives
    a, p, n = unit(2, D, seed=41), unit(2, D, seed=42), unit(2, K, D, seed=43)
    mx = metrix("sym", "input", "anchor-neg", 1.0)
    with torch.no_grad():
        mixed = mx.embed_mixes(images, lam, Embedder(tiny_net, tiny_net, torch.device("cpu")))
    got = mx.loss(a, p, n, anchor_ref=a, anchor_teacher=None, lam=lam, mixed=mixed)
    want = 0.0
    with torch.no_grad():
        for b in range(2):
            m = tiny_net(float(lam[b]) * images[b][None] + (1 - float(lam[b])) * images[2 + b][None])[0]
            d = norm(a[b] - m)
            want += lam[b] * 0.5 * d**2 + (1 - lam[b]) * 0.5 * max(0.0, 0.7 - d) ** 2
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pairs", ["pos-neg", "anchor-neg", "both"])
@pytest.mark.parametrize("name", PAIR_BASED)
def test_gradient_of_the_embedding_mixup_reaches_only_the_student(name, pairs):
    spec = LOSSES[name]
    a = unit(B, D, seed=50).requires_grad_()
    p, tq = unit(B, D, seed=51).requires_grad_(), unit(B, D, seed=52).requires_grad_()
    n = near(a.detach(), 53).requires_grad_()
    lam = np.full(B, 0.6, dtype=np.float32)
    embedding_loss(
        metrix(name, "embedding", pairs), a, p, n, tq, lam, anchor_ref=a if spec.student_refs else tq
    ).backward()
    if spec.student_refs:  # sym: every vector is the student's (p is unused when only anchors are mixed)
        students, teachers = ([a, n] if pairs == "anchor-neg" else [a, p, n]), [tq]
    else:
        students, teachers = [a], [p, n, tq]
    for x in students:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in teachers:
        assert x.grad is None


@pytest.mark.parametrize("mode", ["input", "feature"])
def test_gradient_of_image_mixup_reaches_the_student_network_only(mode, tiny_net):
    p, tq = unit(2, D, seed=60).requires_grad_(), unit(2, D, seed=61).requires_grad_()
    n = unit(2, K, D, seed=62).requires_grad_()
    images = _images(63, [(32, 32)] * 4)
    lam = np.array([0.4, 0.7])
    mx = metrix("contr+", mode)
    mixed = mx.embed_mixes(images, lam, Embedder(tiny_net, tiny_net, torch.device("cpu")))
    loss = mx.loss(unit(2, D, seed=64), p, n, anchor_ref=tq, anchor_teacher=tq, lam=lam, mixed=mixed)
    loss.backward()
    assert all(x.grad is None for x in (p, n, tq))
    assert sum(float(w.grad.abs().sum()) for w in tiny_net.parameters() if w.grad is not None) > 0


# ------------------------------------------------------------------------------------------ the trainer
def state(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["state_dict"]


def test_config_refuses_mixup_with_a_loss_that_is_not_pair_based():
    for loss in ("reg", "csd", "contr+csd"):
        with pytest.raises(
            UserError, match=f"^--mixup embedding: loss {re.escape(repr(loss))} is not pair-based; use --loss contr"
        ):
            check(TrainConfig(loss=loss, mixup="embedding"))
    with pytest.raises(UserError, match="--mixup-alpha 0"):
        check(TrainConfig(mixup="embedding", mixup_alpha=0))
    with pytest.raises(UserError, match="--mixup-pairs"):
        check(TrainConfig(mixup="input", mixup_pairs="pos-pos"))
    check(TrainConfig(loss="reg"))  # mixup none: any loss


@pytest.mark.parametrize(
    "loss,mode,pairs",
    [
        ("contr+", "embedding", "both"),
        ("contr", "input", "pos-neg"),
        ("triplet", "feature", "anchor-neg"),
        ("ms", "embedding", "pos-neg"),
        ("sym", "feature", "both"),
        ("sym", "input", "anchor-neg"),
    ],
)
def test_every_mode_trains_one_epoch(loss, mode, pairs, tiny_data, tmp_path, home, one_thread):
    cfg = tiny_cfg(tiny_data, tmp_path / "run", loss=loss, mixup=mode, mixup_pairs=pairs, epochs=1, eval_every=0)
    trainer = Trainer(cfg, progress=False)
    before = [w.detach().clone() for w in trainer.student.parameters()]
    stats = trainer.train_epoch(0)
    assert np.isfinite(stats["loss"]) and stats["steps"] > 0
    assert any(not torch.equal(x, w) for x, w in zip(before, trainer.student.parameters(), strict=True))


def test_mixup_draws_after_the_plan_weight_zero_trains_exactly_as_without(tiny_data, tmp_path, home, one_thread):
    """The lambdas are drawn after the epoch's tuples and order, so a zero weight changes nothing at all, and the
    mixed term is what changes a weighted run."""
    base = tiny_cfg(tiny_data, tmp_path / "clean", loss="contr", epochs=1, eval_every=0)
    distill(base, progress=False)
    distill(base.replace(out=str(tmp_path / "w0"), mixup="input", mixup_weight=0.0), progress=False)
    distill(base.replace(out=str(tmp_path / "w4"), mixup="input"), progress=False)
    clean, zero, mixed = state(tmp_path / "clean"), state(tmp_path / "w0"), state(tmp_path / "w4")
    assert all(torch.equal(clean[k], zero[k]) for k in clean)
    assert any(not torch.equal(clean[k], mixed[k]) for k in clean)


def test_mixup_run_resumes_bit_for_bit(tiny_data, tmp_path, home, one_thread):
    cfg = tiny_cfg(tiny_data, tmp_path / "full", loss="contr+", mixup="feature", mixup_pairs="both", eval_every=0)
    distill(cfg, progress=False)
    half = cfg.replace(out=str(tmp_path / "half"))
    distill(half.replace(epochs=1), progress=False)
    Trainer(half, resume=True, progress=False).fit()
    a, b = state(tmp_path / "full"), state(tmp_path / "half")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="option 'mixup_weight' differs"):
        Trainer(half.replace(mixup_weight=0.1, epochs=3), resume=True, progress=False)


def test_cli_distill_with_mixup_then_export(tiny_data, tmp_path, home, run_cli):
    out = tmp_path / "run"
    mixup = dict(loss="ms", mixup="embedding", mixup_pairs="anchor-neg", mixup_weight=0.3, eval_every=0)
    args = distill_args(tiny_data, out, **mixup)
    code, _, stderr = run_cli("distill", *args, env={"AML_HOME": str(home)})
    assert code == 0, stderr
    saved = load_checkpoint(out / "last.pt")["config"]
    assert (saved["mixup"], saved["mixup_pairs"], saved["mixup_weight"], saved["mixup_alpha"]) == (
        "embedding",
        "anchor-neg",
        0.3,
        2.0,
    )
    code, _, stderr = run_cli("export", "--checkpoint", out / "last.pt", "--out", tmp_path / "q.onnx", "--quiet")
    assert code == 0, stderr
    code, _, stderr = run_cli("distill", *distill_args(tiny_data, tmp_path / "bad", **{**mixup, "loss": "reg"}))
    assert code == 2 and "--mixup embedding: loss 'reg' is not pair-based" in stderr


DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from aml.train.config import TrainConfig
from aml.train.loop import Trainer
cfg = TrainConfig.from_dict(__import__("json").loads(sys.argv[1]))
trainer = Trainer(cfg, progress=False)
trainer.train_epoch(0)
v = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
both = [torch.zeros_like(v) for _ in range(2)]
dist.all_gather(both, v)
print("rank", dist.get_rank(), "differs", float((both[0] - both[1]).abs().max()), flush=True)
dist.destroy_process_group()
"""


def test_ddp_ranks_stay_equal_with_feature_mixup(tiny_data, tmp_path, home):
    """Feature mixup runs the student's maps outside the DDP wrapper, in the step's one backward: two gloo ranks
    train on different tuples and still hold the same weights (the gradients were all-reduced)."""
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    cfg = tiny_cfg(tiny_data, tmp_path / "ddp", loss="contr+", mixup="feature", epochs=1, eval_every=0, batch_size=2)
    p = torchrun(script, json.dumps(cfg.to_dict()), env={"PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("differs 0.0") == 2, p.stdout
