"""Each loss against a loop-by-loop transcription of its formula (docs/REFERENCE.md §5), plus gradient routing."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from aml.errors import UserError
from aml.losses import LABEL_FREE, LOSSES, combine, weight_name
from aml.losses.normsoftmax import class_labels, class_proxies, fit_proxies, normsoftmax
from aml.losses.spec import STEP_INPUTS

B, K, D = 6, 5, 12
# The oracles are float64 loops; float32 inputs are compared at float32 precision (as PML's TEST_DTYPES sweep).
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def unit(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def tuples(dtype):
    return (
        unit(B, D, seed=1, dtype=dtype),
        unit(B, D, seed=2, dtype=dtype),
        unit(B, K, D, seed=3, dtype=dtype),
        unit(B, D, seed=4, dtype=dtype),
    )


def close(got: torch.Tensor, want, **kw) -> None:
    """`got` against an oracle value (a float or list of floats), at the precision of `got`'s dtype."""
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), **{**TOL[got.dtype], **kw})


def tensor_inputs(name: str, anchor_teacher: torch.Tensor | None = None, ref: torch.Tensor | None = None) -> dict:
    """The keyword tensors loss `name` reads, as its spec says (proxies, and own_proxies where read: the teacher's
    class means of `anchor_teacher`, frozen, with the images in classes 0, 0, 1, 1, ...)."""
    spec = LOSSES[name]
    kw = {"anchor_teacher": anchor_teacher} if "anchor_teacher" in spec.inputs else {}
    if spec.kind == "class":
        labels = torch.arange(len(anchor_teacher)) // 2
        kw.update(labels=labels, proxies=class_proxies(anchor_teacher, labels.numpy(), int(labels.max()) + 1))
        if "own_proxies" in spec.inputs:  # `bct`: the student's own proxies, here a frozen copy of the teacher's
            kw["own_proxies"] = kw["proxies"].clone()
    return {**kw, "ref": ref} if "ref" in spec.inputs else kw


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


def ref_normsoftmax(x, y, p, sigma=0.05):
    out = []
    for b in range(len(x)):
        xb = x[b] / norm(x[b])
        logits = [dot(xb, p[z] / norm(p[z])) / sigma for z in range(len(p))]
        out.append(-(logits[int(y[b])] - math.log(sum(math.exp(v) for v in logits))))
    return out


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
        kw = tensor_inputs(name, at)
        got = LOSSES[name](a, p, n, **kw, margin=margin, reduction="none")
        assert got.shape == (B,)
        close(got, ref)
        torch.testing.assert_close(LOSSES[name](a, p, n, **kw, margin=margin), got.sum())
        torch.testing.assert_close(LOSSES[name](a, p, n, **kw, margin=margin, reduction="mean"), got.mean())


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
    a, p, n, _ = tuples
    got = LOSSES["triplet"](a, p, n, margin=margin, reduction="none")
    close(got, ref_triplet(a, p, n, margin))


def test_triplet_defaults_to_the_paper_codes_margin(tuples):
    """budnikm/aml main.py trains TripletLoss with its --loss-margin default 0.7, not the class default 0.1."""
    a, p, n, _ = tuples
    assert LOSSES["triplet"].defaults["margin"] == 0.7
    close(LOSSES["triplet"](a, p, n, reduction="none"), ref_triplet(a, p, n, 0.7))


def test_ms_matches_formula(tuples):
    a, p, n, _ = tuples
    # pull a few negatives close to the anchor so the beta-term is not negligible
    n = F.normalize(n + 2 * a[:, None], dim=-1)
    close(LOSSES["ms"](a, p, n, reduction="none"), ref_ms(a, p, n))
    close(LOSSES["ms"](a, p, n, alpha=3.0, beta=10.0, lam=0.3, reduction="none"), ref_ms(a, p, n, 3.0, 10.0, 0.3))


def test_reg_matches_formula(dtype):
    s, t = unit(B, D, seed=5, dtype=dtype), unit(B, D, seed=6, dtype=dtype)
    got = LOSSES["reg"](s, t, reduction="none")
    close(got, [0.5 * norm(s[i] - t[i]) ** 2 for i in range(B)])
    torch.testing.assert_close(LOSSES["reg"](s, t), got.sum())


def test_rkd_matches_formula(dtype):
    s, t = unit(B, D, seed=7, dtype=dtype), unit(B, D, seed=8, dtype=dtype)
    got = LOSSES["rkd"](s, t)
    assert got.dim() == 0
    close(got, ref_rkd(s, t))
    torch.testing.assert_close(LOSSES["rkd"](s, t, reduction="mean"), got)


def test_rkd_large_differences_use_linear_part(dtype):
    """An outlier makes normalised distances differ by more than 1: both smooth-L1 branches run."""
    s = unit(B, D, seed=9, dtype=dtype)
    s = torch.cat([s[:1] * 6.0, s[1:]])  # one far outlier
    t = unit(B, D, seed=10, dtype=dtype)
    close(LOSSES["rkd"](s, t), ref_rkd(s, t))


@pytest.mark.parametrize("denominator", ["all", "list"])
def test_darkrank_matches_formula(denominator, dtype):
    n = 7
    s, t = unit(n, D, seed=11, dtype=dtype), unit(n, D, seed=12, dtype=dtype)
    got = LOSSES["darkrank"](s, t, denominator=denominator)
    assert got.dim() == 0
    close(got, ref_darkrank(s, t, denominator=denominator))
    got2 = LOSSES["darkrank"](s, t, alpha=1.0, beta=2.0, list_len=3, denominator=denominator, reduction="mean")
    close(got2, ref_darkrank(s, t, 1.0, 2.0, 3, denominator))


def test_darkrank_defaults_to_the_paper_codes_list_denominator():
    """budnikm/aml trains HardDarkRank: the denominator over the teacher's list only."""
    s, t = unit(7, D, seed=13), unit(7, D, seed=14)
    assert LOSSES["darkrank"].defaults["denominator"] == "list"
    torch.testing.assert_close(LOSSES["darkrank"](s, t), LOSSES["darkrank"](s, t, denominator="list"))


def test_darkrank_all_differs_from_list():
    s, t = unit(7, D, seed=13), unit(7, D, seed=14)
    assert not torch.isclose(LOSSES["darkrank"](s, t, denominator="all"), LOSSES["darkrank"](s, t))


def test_csd_matches_formula_in_batch(dtype):
    s, t = unit(B, D, seed=15, dtype=dtype), unit(B, D, seed=16, dtype=dtype)
    got = LOSSES["csd"](s, t, k=4, tau_s=0.5, tau_t=0.1)
    assert got.dim() == 0
    close(got, ref_csd(s, t, k=4, tau_s=0.5, tau_t=0.1))
    # defaults (k = 256 > B is capped at B)
    close(LOSSES["csd"](s, t), ref_csd(s, t))


def test_csd_with_reference_set(dtype):
    s, t = unit(B, D, seed=17, dtype=dtype), unit(B, D, seed=18, dtype=dtype)
    ref = unit(40, D, seed=19, dtype=dtype)
    got = LOSSES["csd"](s, t, ref=ref, k=9, tau_s=0.2, tau_t=0.05, reduction="mean")
    close(got, ref_csd(s, t, ref, 9, 0.2, 0.05))
    assert not torch.isclose(got, LOSSES["csd"](s, t, k=9, tau_s=0.2, tau_t=0.05))


def ref_csd_labels(s, t, ref, labels, ref_labels, k, tau_s, tau_t, w):
    """The label-refined target, transcribed: same-cluster references first, then the teacher's nearest others."""
    refs = list(t) + list(ref)
    ids = list(labels) + list(ref_labels)
    total = 0.0
    for q in range(len(s)):
        same = [j == q or (ids[j] == labels[q] and labels[q] >= 0) for j in range(len(refs))]
        sims = [(dot(t[q], r), j) for j, r in enumerate(refs)]
        top = sorted(sims, key=lambda x: (not same[x[1]], -x[0]))[:k]
        zt = sum(math.exp(v / tau_t) for v, _ in top)
        zs = sum(math.exp(dot(s[q], refs[j]) / tau_s) for _, j in top)
        n_same = sum(same[j] for _, j in top)
        for v, j in top:
            target = (1 - w) * math.exp(v / tau_t) / zt + w * same[j] / n_same
            ps = math.exp(dot(s[q], refs[j]) / tau_s) / zs
            total += target * math.log(target / ps) if target > 0 else 0.0
    return total / len(s)


@pytest.mark.parametrize("w", [0.3, 1.0])
def test_csd_label_refined_target_matches_formula(w, dtype):
    s, t = unit(B, D, seed=23, dtype=dtype), unit(B, D, seed=24, dtype=dtype)
    ref = unit(12, D, seed=25, dtype=dtype)
    labels = torch.tensor([0, 1, 1, 2, -1, 3])  # -1: no cluster (matches only itself); 3: alone in the batch
    ref_labels = torch.tensor([1, 0, 5, 1, -1, 2, 2, 4, 0, 1, 6, 7])
    for k in (5, 9, 18):  # fewer than, about and all the references: same-cluster ones are always kept first
        got = LOSSES["csd"](s, t, ref=ref, labels=labels, ref_labels=ref_labels, k=k, label_weight=w,
                            tau_s=0.2, tau_t=0.05)  # fmt: skip
        close(got, ref_csd_labels(s, t, ref, labels.tolist(), ref_labels.tolist(), k, 0.2, 0.05, w))


def test_csd_label_weight_zero_is_csd_and_a_positive_weight_needs_clusters():
    s, t, ref = unit(B, D, seed=26), unit(B, D, seed=27), unit(10, D, seed=28)
    labels, ref_labels = torch.arange(B) % 2, torch.arange(10) % 2
    plain = LOSSES["csd"](s, t, ref=ref, k=7)
    assert torch.equal(LOSSES["csd"](s, t, ref=ref, labels=labels, ref_labels=ref_labels, k=7), plain)
    labelled = LOSSES["csd"](s, t, ref=ref, labels=labels, ref_labels=ref_labels, k=7, label_weight=0.5)
    assert not torch.isclose(labelled, plain)
    with pytest.raises(ValueError, match="needs the cluster ids"):
        LOSSES["csd"](s, t, ref=ref, labels=labels, k=7, label_weight=0.5)
    with pytest.raises(ValueError, match=r"label_weight 1.5 must be in \[0, 1\]"):
        LOSSES["csd"](s, t, label_weight=1.5)
    # a combination passes the cluster ids to its csd member
    combo = combine("x", {"reg": 1.0, "csd": 1.0}, LOSSES)
    assert {"labels", "ref_labels"} <= combo.inputs
    got = combo(s, t, ref=ref, labels=labels, ref_labels=ref_labels, k=7, label_weight=0.5)
    torch.testing.assert_close(got, LOSSES["reg"](s, t) + labelled)


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_normsoftmax_matches_formula(sigma, dtype):
    g = torch.Generator().manual_seed(50)
    x = (3 * torch.randn(B, D, generator=g, dtype=torch.float64)).to(dtype)  # not unit: the loss normalises
    p = (2 * torch.randn(4, D, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.tensor([0, 3, 1, 1, 2, 0])
    got = normsoftmax(x, y, p, temperature=sigma, reduction="none")
    close(got, ref_normsoftmax(x, y, p, sigma))
    torch.testing.assert_close(normsoftmax(x, y, p, temperature=sigma), got.sum())
    torch.testing.assert_close(normsoftmax(x, y, p, temperature=sigma, reduction="mean"), got.mean())
    t = unit(B, D, seed=51, dtype=dtype)
    spec = LOSSES["normsoftmax"]  # the registered form: the student's vectors, the teacher's batch unread
    assert spec.defaults["temperature"] == 0.05 and spec.needs_labels and spec.per_sample
    torch.testing.assert_close(
        spec(x, t, labels=y, proxies=p, reduction="none"), normsoftmax(x, y, p, reduction="none")
    )


def test_class_proxies_are_normalised_class_means_and_labels_are_dense():
    labels, c = class_labels([7, 3, 7, 9, 3])
    assert labels.tolist() == [1, 0, 1, 2, 0] and c == 3
    v = unit(5, D, seed=52)
    want = [sum(v[i] for i in range(5) if labels[i] == z) for z in range(c)]
    got = class_proxies(v.numpy().astype("float16"), labels, c)
    assert got.dtype == torch.float32 and not got.requires_grad
    close(got.double(), [[float(w) / norm(wz) for w in wz] for wz in want], rtol=1e-3, atol=1e-3)


def test_fit_proxies_lowers_the_loss_of_fixed_vectors_from_the_class_means_deterministically():
    # overlapping classes, so the class means misclassify some vectors and the fit has room to improve them
    g = torch.Generator().manual_seed(56)
    labels = torch.arange(60) % 4
    v = torch.randn(4, D, generator=g)[labels] + 1.5 * torch.randn(60, D, generator=g)
    v = torch.nn.functional.normalize(v, dim=1).half().float()  # L2N rows in float16, as the teacher cache holds
    proxies, fit = fit_proxies(v.numpy().astype("float16"), labels.numpy(), 4, steps=50)  # as the cache stores them
    means = class_proxies(v, labels.numpy(), 4)
    assert proxies.shape == (4, D) and not proxies.requires_grad
    torch.testing.assert_close(proxies.norm(dim=1), torch.ones(4))
    start = float(normsoftmax(v, labels, means, reduction="mean"))
    end = float(normsoftmax(v, labels, proxies, reduction="mean"))
    assert fit["loss_before"] == pytest.approx(start, rel=1e-3) and fit["loss_after"] == pytest.approx(end, rel=1e-3)
    assert end < 0.9 * start and fit["accuracy_after"] >= fit["accuracy_before"]
    again, _ = fit_proxies(v.numpy().astype("float16"), labels.numpy(), 4, steps=50)
    assert torch.equal(proxies, again)
    none, _ = fit_proxies(v, labels.numpy(), 4, steps=0)  # no steps: the class means
    torch.testing.assert_close(none, means, rtol=1e-3, atol=1e-4)  # up to re-normalising float16 rows


def test_normsoftmax_learned_proxies_get_gradients_and_combinations_refuse_it():
    s = unit(B, D, seed=53).requires_grad_()
    p = unit(3, D, seed=54).requires_grad_()  # the symmetric use: trainable proxies
    LOSSES["normsoftmax"](s, unit(B, D, seed=55), labels=torch.arange(B) % 3, proxies=p).backward()
    assert s.grad.abs().sum() > 0 and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="classifies by proxies"):
        combine("x", {"reg": 1.0, "normsoftmax": 1.0}, LOSSES)


def test_csd_is_zero_when_student_equals_teacher_at_equal_temperatures():
    t, ref = unit(B, D, seed=20), unit(30, D, seed=21)
    same = LOSSES["csd"](t.clone(), t, ref=ref, tau_s=0.1, tau_t=0.1)
    assert float(same) == pytest.approx(0, abs=1e-12)
    assert float(LOSSES["csd"](unit(B, D, seed=22), t, ref=ref, tau_s=0.1, tau_t=0.1)) > 1e-3


@pytest.mark.parametrize("name", ["rkd", "darkrank", "csd", "contr+csd"])
def test_whole_batch_losses_refuse_reduction_none(name, tuples):
    """A loss defined over the whole batch has no per-sample values: 'none' is an error, not a scalar."""
    a, p, n, at = tuples
    assert not LOSSES[name].per_sample
    inputs = (a, at) if LOSSES[name].kind == "batch" else (a, p, n)
    with pytest.raises(ValueError, match="whole batch.*per_sample=False"):
        LOSSES[name](*inputs, **tensor_inputs(name, at, unit(20, D, seed=23, dtype=a.dtype)), reduction="none")


# ----------------------------------------------------------------------------------------- combined
def test_combined_default_weights_give_the_sum(tuples):
    a, p, n, at = tuples
    ref = unit(20, D, seed=23, dtype=a.dtype)
    want = LOSSES["contr+"](a, p, n, anchor_teacher=at) + LOSSES["csd"](a, at, ref=ref)
    torch.testing.assert_close(LOSSES["contr+csd"](a, p, n, anchor_teacher=at, ref=ref), want)


def test_csd_plus_reg_is_the_weighted_sum_of_its_batch_members(tuples):
    a, _, _, at = tuples
    ref = unit(20, D, seed=23, dtype=a.dtype)
    got = LOSSES["csd+reg"](a, at, ref=ref, tau_s=0.1, weight_reg=4.0)
    torch.testing.assert_close(got, LOSSES["csd"](a, at, ref=ref, tau_s=0.1) + 4.0 * LOSSES["reg"](a, at))


def test_combined_constants_and_weights_reach_their_members(tuples):
    a, p, n, at = tuples
    ref = unit(20, D, seed=23, dtype=a.dtype)
    got = LOSSES["contr+csd"](a, p, n, anchor_teacher=at, ref=ref, margin=0.5, k=3, weight_csd=0.25)
    want = LOSSES["contr+"](a, p, n, anchor_teacher=at, margin=0.5) + 0.25 * LOSSES["csd"](a, at, ref=ref, k=3)
    torch.testing.assert_close(got, want)


def test_combined_of_per_sample_members_reduces_per_tuple(tuples):
    a, p, n, at = tuples
    spec = combine("contr+reg", {"contr": 1.0, "reg": 0.5}, LOSSES)
    assert spec.per_sample and spec.kind == "tuple" and "anchor_teacher" in spec.inputs
    none = spec(a, p, n, anchor_teacher=at, reduction="none")
    assert none.shape == (B,)
    torch.testing.assert_close(
        none, LOSSES["contr"](a, p, n, reduction="none") + 0.5 * LOSSES["reg"](a, at, reduction="none")
    )
    torch.testing.assert_close(none.sum(), spec(a, p, n, anchor_teacher=at))


def test_combination_of_batch_losses_is_a_batch_loss(tuples):
    a, _, _, at = tuples
    mixed = combine("reg+rkd", {"reg": 2.0, "rkd": 0.5}, LOSSES)
    assert mixed.kind == "batch" and not mixed.needs_labels and "anchor_teacher" not in mixed.inputs
    torch.testing.assert_close(mixed(a, at), 2 * LOSSES["reg"](a, at) + 0.5 * LOSSES["rkd"](a, at))


def test_combined_spec_is_composed_from_its_members():
    spec = LOSSES["contr+csd"]
    assert (spec.kind, spec.inputs, spec.needs_labels) == (
        "tuple",
        {"anchor_teacher", "labels", "ref", "ref_labels"},
        True,
    )
    assert not spec.student_refs and not spec.per_sample
    assert dict(spec.defaults) == {
        **LOSSES["contr+"].defaults,
        **LOSSES["csd"].defaults,
        "weight_contr_plus": 1.0,
        "weight_csd": 1.0,
    }


def test_weight_name_spells_out_non_word_characters():
    assert weight_name("contr+") == "weight_contr_plus"


def test_combine_refuses_an_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss"):
        combine("x", {"nope": 1.0}, LOSSES)


def test_combined_refuses_an_unknown_constant(tuples):
    a, p, n, at = tuples
    with pytest.raises(TypeError, match="unexpected keyword"):
        LOSSES["contr+csd"](a, p, n, anchor_teacher=at, tau=1.0)


# ----------------------------------------------------------------------------------------- the specs
def test_spec_table_names_kinds_and_inputs():
    assert {"contr", "contr+", "reg", "triplet", "ms", "rkd", "darkrank", "sym", "csd", "contr+csd"} <= set(LOSSES)
    assert all(spec.name == name for name, spec in LOSSES.items())
    assert {n for n, s in LOSSES.items() if s.kind == "batch"} == {"reg", "rkd", "darkrank", "csd", "csd+reg"}
    assert {n for n, s in LOSSES.items() if s.kind == "class"} == {"normsoftmax", "bct"}
    assert {n for n, s in LOSSES.items() if "proxies" in s.inputs} == {"normsoftmax", "bct"}
    assert {n for n, s in LOSSES.items() if "own_proxies" in s.inputs} == {"bct"}
    assert {n for n, s in LOSSES.items() if "anchor_teacher" in s.inputs} == {"contr+", "contr+csd"}
    assert {n for n, s in LOSSES.items() if "ref" in s.inputs} == {"csd", "contr+csd", "csd+reg", "bct"}
    assert {n for n, s in LOSSES.items() if s.student_refs} == {"sym"}
    assert {n for n, s in LOSSES.items() if "ref_labels" in s.inputs} == {"csd", "contr+csd", "csd+reg", "bct"}
    assert {n for n, s in LOSSES.items() if "labels" in s.inputs} == {
        "csd",
        "contr+csd",
        "csd+reg",
        "normsoftmax",
        "bct",
    }
    assert {n for n, s in LOSSES.items() if not s.per_sample} == {"rkd", "darkrank", "csd", "contr+csd", "csd+reg"}
    assert LABEL_FREE == ("reg", "rkd", "darkrank", "csd", "csd+reg")


@pytest.mark.parametrize("name", [n for n in LOSSES if n not in ("contr+csd", "csd+reg")])  # combinations: above
def test_spec_matches_its_function(name):
    """A function takes exactly the tensor inputs its spec says it reads; its constants are the spec's defaults."""
    spec = LOSSES[name]
    params = inspect.signature(spec.fn).parameters
    assert params["reduction"].default == "sum"
    first = ["anchor", "positive", "negatives"] if spec.kind == "tuple" else ["student", "teacher"]
    assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == first
    assert spec.inputs == {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n in STEP_INPUTS}
    assert ("proxies" in params) == (spec.kind == "class")
    assert dict(spec.defaults) == {
        n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in (*STEP_INPUTS, "reduction")
    }


def test_spec_checks_constants():
    assert LOSSES["contr"].constants({"margin": 0.5}) == {"margin": 0.5}
    with pytest.raises(UserError, match=r"^--loss-arg alpha: loss 'reg' takes no constants$"):
        LOSSES["reg"].constants({"alpha": 1.0})
    with pytest.raises(UserError, match=r"^--margin 0.5: loss 'csd' takes k, label_weight, tau_s, tau_t$"):
        LOSSES["csd"].constants({"margin": 0.5}, where="--margin 0.5")


@pytest.mark.parametrize("name", ["ref", "anchor_teacher", "reduction"])
def test_spec_refuses_an_input_as_a_constant(name):
    with pytest.raises(UserError, match=f"--loss-arg {name}: '{name}' is an input of loss 'contr\\+csd'"):
        LOSSES["contr+csd"].constants({name: 1.0})


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        LOSSES["reg"](unit(2, D, seed=1), unit(2, D, seed=2), reduction="avg")


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_reaches_only_the_student(name):
    """Teacher tensors that require grad get none: the losses detach the frozen teacher side."""
    s = unit(B, D, seed=30).requires_grad_()
    t = unit(B, D, seed=31).requires_grad_()
    spec = LOSSES[name]
    kw = tensor_inputs(name, t, unit(20, D, seed=32).requires_grad_())
    if spec.kind != "tuple":
        loss = spec(s, t, **kw)
        students, teachers = [s], [t, *kw.values()]
    else:
        p = unit(B, D, seed=33).requires_grad_()
        # negatives near the anchors, so that margin terms are active
        n = F.normalize(unit(B, K, D, seed=34) + s.detach()[:, None], dim=-1).requires_grad_()
        loss = spec(s, p, n, **kw)
        if spec.student_refs:  # symmetric baseline: every input is a student vector
            students, teachers = [s, p, n], []
        else:
            students, teachers = [s], [p, n, *kw.values()]
    loss.backward()
    for x in students:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in teachers:
        assert x.grad is None


def test_contr_plus_pulls_student_to_its_teacher(tuples):
    """The extra term's gradient w.r.t. the anchor is (s - t(q)) on top of contr's."""
    a, p, n, at = tuples
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    LOSSES["contr+"](a1, p, n, anchor_teacher=at).backward()
    LOSSES["contr"](a2, p, n).backward()
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
