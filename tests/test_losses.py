"""Each loss against a direct, loop-by-loop transcription of its formula (SPEC §5), plus gradient routing."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from aml.losses import LOSS_KIND, LOSSES, NEEDS_ANCHOR_TEACHER, STUDENT_TUPLES, combined, weight_name

B, K, D = 6, 5, 12


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.fixture
def tuples():
    return unit(B, D, seed=1), unit(B, D, seed=2), unit(B, K, D, seed=3), unit(B, D, seed=4)


def norm(v: torch.Tensor) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in v))


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ------------------------------------------------------------------------------------ transcriptions
def ref_contrastive(a, p, n, margin=0.7, at=None):
    out = []
    for b in range(len(a)):
        v = 0.5 * norm(a[b] - p[b]) ** 2
        for i in range(n.shape[1]):
            v += 0.5 * max(0.0, margin - norm(a[b] - n[b, i])) ** 2
        if at is not None:
            v += 0.5 * norm(a[b] - at[b]) ** 2
        out.append(v)
    return out


def ref_triplet(a, p, n, margin):
    out = []
    for b in range(len(a)):
        v = 0.0
        for i in range(n.shape[1]):
            v += max(0.0, norm(a[b] - p[b]) ** 2 - norm(a[b] - n[b, i]) ** 2 + margin)
        out.append(v)
    return out


def ref_ms(a, p, n, alpha=2.0, beta=40.0, lam=0.5):
    out = []
    for b in range(len(a)):
        pos = math.log(1 + math.exp(-alpha * (dot(a[b], p[b]) - lam))) / alpha
        neg = math.log(1 + sum(math.exp(beta * (dot(a[b], n[b, i]) - lam)) for i in range(n.shape[1]))) / beta
        out.append(pos + neg)
    return out


def ref_rkd(s, t):
    n = len(s)

    def potentials(x):
        d = [[norm(x[i] - x[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        nonzero = [d[i][j] for i in range(n) for j in range(n) if d[i][j] > 0]
        mean = sum(nonzero) / len(nonzero)
        d = [[d[i][j] / mean for j in range(n)] for i in range(n)]
        e = [
            [(x[j] - x[i]) / norm(x[j] - x[i]) if i != j else torch.zeros_like(x[i]) for j in range(n)]
            for i in range(n)
        ]
        ang = [[[dot(e[i][j], e[i][k]) for k in range(n)] for j in range(n)] for i in range(n)]
        return d, ang

    ds, as_ = potentials(s)
    dt, at = potentials(t)
    loss_d = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    loss_a = sum(smooth_l1(as_[i][j][k] - at[i][j][k]) for i in range(n) for j in range(n) for k in range(n))
    return 2 * loss_a / n**3 + loss_d


def ref_darkrank(s, t, alpha=3.0, beta=3.0, list_len=4, denominator="all"):
    n = len(s)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        teacher_score = {j: -alpha * norm(t[i] - t[j]) ** beta for j in others}
        student_score = {j: -alpha * norm(s[i] - s[j]) ** beta for j in others}
        perm = sorted(others, key=lambda j: -teacher_score[j])[:list_len]
        logp = 0.0
        for r, j in enumerate(perm):
            pool = perm[r:] if denominator == "list" else [c for c in others if c not in perm[:r]]
            logp += student_score[j] - math.log(sum(math.exp(student_score[c]) for c in pool))
        total += -logp
    return total / n


def ref_csd(s, t, ref=None, k=256, tau_s=1.0, tau_t=0.01):
    refs = list(t) + (list(ref) if ref is not None else [])
    total = 0.0
    for q in range(len(s)):
        sims = [(dot(t[q], r), j) for j, r in enumerate(refs)]
        top = sorted(sims, key=lambda x: -x[0])[:k]
        zt = sum(math.exp(v / tau_t) for v, _ in top)
        zs = sum(math.exp(dot(s[q], refs[j]) / tau_s) for _, j in top)
        for v, j in top:
            pt = math.exp(v / tau_t) / zt
            ps = math.exp(dot(s[q], refs[j]) / tau_s) / zs
            total += pt * math.log(pt / ps)
    return total / len(s)


# ------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("margin", [0.7, 1.3])
def test_contrastive_family_matches_formula(tuples, margin):
    a, p, n, at = tuples
    for name, ref in [
        ("contr", ref_contrastive(a, p, n, margin)),
        ("sym", ref_contrastive(a, p, n, margin)),
        ("contr+", ref_contrastive(a, p, n, margin, at)),
    ]:
        got = LOSSES[name](a, p, n, at, margin=margin, reduction="none")
        assert got.shape == (B,)
        torch.testing.assert_close(got, torch.tensor(ref, dtype=got.dtype), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(LOSSES[name](a, p, n, at, margin=margin), got.sum())
        torch.testing.assert_close(LOSSES[name](a, p, n, at, margin=margin, reduction="mean"), got.mean())


def test_contrastive_margin_is_active(tuples):
    """With margin 1.3 on random unit vectors (d ~ 1.4) some but not all negative terms are non-zero."""
    a, _, n, _ = tuples
    d = (a[:, None] - n).norm(dim=-1)
    assert (d < 1.3).any() and (d > 1.3).any()


def test_contr_plus_needs_anchor_teacher(tuples):
    a, p, n, _ = tuples
    with pytest.raises(ValueError, match="anchor_teacher"):
        LOSSES["contr+"](a, p, n)


@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_matches_formula(tuples, margin):
    a, p, n, at = tuples
    got = LOSSES["triplet"](a, p, n, at, margin=margin, reduction="none")
    torch.testing.assert_close(got, torch.tensor(ref_triplet(a, p, n, margin), dtype=got.dtype))
    assert inspect.signature(LOSSES["triplet"]).parameters["margin"].default == 0.1


def test_ms_matches_formula(tuples):
    a, p, n, at = tuples
    # pull a few negatives close to the anchor so the beta-term is not negligible
    n = F.normalize(n + 2 * a[:, None], dim=-1)
    got = LOSSES["ms"](a, p, n, at, reduction="none")
    torch.testing.assert_close(got, torch.tensor(ref_ms(a, p, n), dtype=got.dtype))
    got = LOSSES["ms"](a, p, n, alpha=3.0, beta=10.0, lam=0.3, reduction="none")
    torch.testing.assert_close(got, torch.tensor(ref_ms(a, p, n, 3.0, 10.0, 0.3), dtype=got.dtype))


def test_reg_matches_formula():
    s, t = unit(B, D, seed=5), unit(B, D, seed=6)
    got = LOSSES["reg"](s, t, reduction="none")
    ref = [0.5 * norm(s[i] - t[i]) ** 2 for i in range(B)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=got.dtype))
    torch.testing.assert_close(LOSSES["reg"](s, t), got.sum())


def test_rkd_matches_formula():
    s, t = unit(B, D, seed=7), unit(B, D, seed=8)
    got = LOSSES["rkd"](s, t)
    assert got.dim() == 0
    torch.testing.assert_close(got, torch.tensor(ref_rkd(s, t), dtype=got.dtype))
    for reduction in ("mean", "none"):
        torch.testing.assert_close(LOSSES["rkd"](s, t, reduction=reduction), got)


def test_rkd_large_differences_use_linear_part():
    """An outlier makes normalised distances differ by more than 1: both smooth-L1 branches run."""
    s = unit(B, D, seed=9)
    s = torch.cat([s[:1] * 6.0, s[1:]])  # one far outlier
    t = unit(B, D, seed=10)
    torch.testing.assert_close(LOSSES["rkd"](s, t), torch.tensor(ref_rkd(s, t), dtype=torch.float64))


@pytest.mark.parametrize("denominator", ["all", "list"])
def test_darkrank_matches_formula(denominator):
    n = 7
    s, t = unit(n, D, seed=11), unit(n, D, seed=12)
    got = LOSSES["darkrank"](s, t, denominator=denominator)
    assert got.dim() == 0
    want = ref_darkrank(s, t, denominator=denominator)
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype))
    got2 = LOSSES["darkrank"](s, t, alpha=1.0, beta=2.0, list_len=3, denominator=denominator, reduction="none")
    ref2 = ref_darkrank(s, t, 1.0, 2.0, 3, denominator)
    torch.testing.assert_close(got2, torch.tensor(ref2, dtype=got2.dtype))


def test_darkrank_all_differs_from_list():
    s, t = unit(7, D, seed=13), unit(7, D, seed=14)
    assert not torch.isclose(LOSSES["darkrank"](s, t), LOSSES["darkrank"](s, t, denominator="list"))


def test_csd_matches_formula_in_batch():
    s, t = unit(B, D, seed=15), unit(B, D, seed=16)
    got = LOSSES["csd"](s, t, k=4, tau_s=0.5, tau_t=0.1)
    assert got.dim() == 0
    torch.testing.assert_close(got, torch.tensor(ref_csd(s, t, k=4, tau_s=0.5, tau_t=0.1), dtype=got.dtype))
    # defaults (k = 256 > B is capped at B)
    torch.testing.assert_close(LOSSES["csd"](s, t), torch.tensor(ref_csd(s, t), dtype=got.dtype))


def test_csd_with_reference_set():
    s, t, ref = unit(B, D, seed=17), unit(B, D, seed=18), unit(40, D, seed=19)
    got = LOSSES["csd"](s, t, teacher_ref=ref, k=9, tau_s=0.2, tau_t=0.05, reduction="none")
    torch.testing.assert_close(got, torch.tensor(ref_csd(s, t, ref, 9, 0.2, 0.05), dtype=got.dtype))
    assert not torch.isclose(got, LOSSES["csd"](s, t, k=9, tau_s=0.2, tau_t=0.05))


def test_csd_is_zero_when_student_equals_teacher_at_equal_temperatures():
    t, ref = unit(B, D, seed=20), unit(30, D, seed=21)
    same = LOSSES["csd"](t.clone(), t, teacher_ref=ref, tau_s=0.1, tau_t=0.1)
    assert float(same) == pytest.approx(0, abs=1e-12)
    assert float(LOSSES["csd"](unit(B, D, seed=22), t, teacher_ref=ref, tau_s=0.1, tau_t=0.1)) > 1e-3


def test_combined_is_the_weighted_sum(tuples):
    a, p, n, at = tuples
    ref = unit(20, D, seed=23)
    fn = LOSSES["contr+csd"]
    want = LOSSES["contr+"](a, p, n, at) + LOSSES["csd"](a, at, teacher_ref=ref)
    torch.testing.assert_close(fn(a, p, n, at, teacher_ref=ref), want)
    want = LOSSES["contr+"](a, p, n, at, margin=0.5) + 0.25 * LOSSES["csd"](a, at, teacher_ref=ref, k=3)
    torch.testing.assert_close(fn(a, p, n, at, teacher_ref=ref, margin=0.5, k=3, weight_csd=0.25), want)
    none = fn(a, p, n, at, teacher_ref=ref, reduction="none")
    assert none.shape == (B,)
    torch.testing.assert_close(none.sum(), fn(a, p, n, at, teacher_ref=ref))
    mixed = combined({"reg": 2.0, "rkd": 0.5})
    assert mixed.kind == "batch"
    torch.testing.assert_close(mixed(a, at), 2 * LOSSES["reg"](a, at) + 0.5 * LOSSES["rkd"](a, at))
    assert weight_name("contr+") == "weight_contr_plus"
    with pytest.raises(ValueError, match="unknown loss"):
        combined({"nope": 1.0})
    with pytest.raises(TypeError, match="unexpected keyword"):
        fn(a, p, n, at, tau=1.0)


def test_registry_tables():
    assert set(LOSSES) == set(LOSS_KIND)
    assert {"contr", "contr+", "reg", "triplet", "ms", "rkd", "darkrank", "sym", "csd"} <= set(LOSSES)
    assert {n for n, k in LOSS_KIND.items() if k == "batch"} == {"reg", "rkd", "darkrank", "csd"}
    assert "contr+" in NEEDS_ANCHOR_TEACHER and STUDENT_TUPLES == {"sym"}
    for name, fn in LOSSES.items():
        params = inspect.signature(fn).parameters
        assert params["reduction"].default == "sum"
        if LOSS_KIND[name] == "tuple":
            assert list(params)[:4] == ["anchor", "positive", "negatives", "anchor_teacher"]
        else:
            assert list(params)[:2] == ["student", "teacher"]
    with pytest.raises(ValueError, match="reduction"):
        LOSSES["reg"](unit(2, D, seed=1), unit(2, D, seed=2), reduction="avg")


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_reaches_only_the_student(name):
    """Teacher tensors that require grad get none: the losses detach the frozen teacher side."""
    s = unit(B, D, seed=30).requires_grad_()
    t = unit(B, D, seed=31).requires_grad_()
    if LOSS_KIND[name] == "batch":
        kw = {"teacher_ref": unit(20, D, seed=32).requires_grad_()} if name == "csd" else {}
        loss = LOSSES[name](s, t, **kw)
        teachers = [t, *kw.values()]
        students = [s]
    else:
        p = unit(B, D, seed=33).requires_grad_()
        # negatives near the anchors, so that margin terms are active
        n = F.normalize(unit(B, K, D, seed=34) + s.detach()[:, None], dim=-1).requires_grad_()
        kw = (
            {"teacher_ref": unit(20, D, seed=32).requires_grad_()}
            if "teacher_ref" in inspect.signature(LOSSES[name]).parameters
            else {}
        )
        loss = LOSSES[name](s, p, n, t, **kw)
        if name in STUDENT_TUPLES:  # symmetric baseline: every input is a student vector
            students, teachers = [s, p, n], [t]
        else:
            students, teachers = [s], [p, n, t, *kw.values()]
    loss.backward()
    for x in students:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in teachers:
        assert x.grad is None


def test_contr_plus_pulls_student_to_its_teacher(tuples):
    """The extra term's gradient w.r.t. the anchor is (s - t(q)) on top of contr's."""
    a, p, n, at = tuples
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    LOSSES["contr+"](a1, p, n, at).backward()
    LOSSES["contr"](a2, p, n, at).backward()
    torch.testing.assert_close(a1.grad - a2.grad, a - at)


def test_float32_and_no_nan_at_zero_distance():
    t = unit(B, D, seed=40).float()
    s = t.clone().requires_grad_()  # student == teacher: distances exactly 0
    for name in ("reg", "rkd", "darkrank", "csd"):
        s.grad = None
        LOSSES[name](s, t).backward()
        assert torch.isfinite(s.grad).all(), name
    n = t[:, None].expand(B, K, D).clone()
    s.grad = None
    LOSSES["contr"](s, t, n).backward()  # negatives identical to the anchor: d = 0 < margin
    assert torch.isfinite(s.grad).all()
