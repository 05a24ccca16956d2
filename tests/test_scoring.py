"""Revisitop scoring against a per-query transcription of revisitop's compute_ap / compute_map, on the real
ground truth with random rankings (full and truncated), plus hand-made cases with known AP."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import shared_path

from aml.scoring import KAPPAS, PROTOCOLS, score_rankings, summary

# ---- the reference: revisitop python/evaluate.py, one query at a time --------------------------------------


def ref_compute_ap(ranks, nres):
    ap = 0.0
    recall_step = 1.0 / nres
    for j in np.arange(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_compute_map(ranks, gnd, kappas):
    """`ranks` is (db positions, Q) as in revisitop. One addition: a query whose truncated ranking holds no
    positive gets P@k = 0 (revisitop's max() of an empty array would raise)."""
    nq = len(gnd)
    aps, prs = np.zeros(nq), np.zeros((nq, len(kappas)))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i], prs[i, :] = np.nan, np.nan
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        aps[i] = ref_compute_ap(pos, len(qgnd))
        pos += 1
        for j in range(len(kappas)):
            if len(pos) == 0:
                prs[i, j] = 0.0
                continue
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
    return aps, prs


def ref_protocol_gnd(gnd, protocol):
    positive, ignored = {
        "E": (["easy"], ["junk", "hard"]),
        "M": (["easy", "hard"], ["junk"]),
        "H": (["hard"], ["junk", "easy"]),
    }[protocol]
    return [
        {
            "ok": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in positive]),
            "junk": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ignored]),
        }
        for g in gnd
    ]


def check_against_reference(ranks, gnd, n_db):
    scores = score_rankings(ranks, gnd, n_db)
    for p in "EMH":
        aps, prs = ref_compute_map(ranks.T.copy(), ref_protocol_gnd(gnd, p), list(KAPPAS))
        np.testing.assert_allclose(scores[p].ap, aps, rtol=0, atol=1e-9, equal_nan=True)
        np.testing.assert_allclose(scores[p].pk, prs, rtol=0, atol=1e-9, equal_nan=True)
        assert abs(scores[p].map - np.nanmean(aps)) < 1e-9
        np.testing.assert_allclose(scores[p].mpk, np.nanmean(prs, 0), atol=1e-9)
    return scores


def load_gnd(name):
    with open(shared_path("revisitop", f"gnd_{name}.pkl"), "rb") as f:
        return pickle.load(f)


def biased_rankings(gnd, n_db, rng, boost=3.0):
    """Rankings where easy/hard images tend to come first (APs spread over [0, 1], not all near 0)."""
    s = rng.standard_normal((len(gnd), n_db))
    for i, g in enumerate(gnd):
        s[i, g["easy"]] += boost * rng.random()
        s[i, g["hard"]] += boost * rng.random()
        s[i, g["junk"]] += boost * rng.random()
    return np.argsort(-s, axis=1, kind="stable")


# ---- real ground truth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_full_rankings_match_reference(name):
    g = load_gnd(name)
    n_db, rng = len(g["imlist"]), np.random.default_rng(0)
    uniform = np.argsort(rng.random((len(g["gnd"]), n_db)), axis=1)
    check_against_reference(uniform, g["gnd"], n_db)
    scores = check_against_reference(biased_rankings(g["gnd"], n_db, rng), g["gnd"], n_db)
    ap = scores["M"].ap  # the biased rankings exercise the whole AP range
    assert ap.min() < 0.1 and ap.max() > 0.5
    if name == "roxford5k":  # two queries have no easy images: excluded from the E means only
        assert np.isnan(scores["E"].ap).sum() == 2 and not np.isnan(scores["M"].ap).any()


@pytest.mark.parametrize("k", [10, 300, 2000])
def test_truncated_rankings_match_reference(k):
    g = load_gnd("rparis6k")
    n_db, rng = len(g["imlist"]), np.random.default_rng(k)
    full = biased_rankings(g["gnd"], n_db, rng, boost=2.0)
    trunc = check_against_reference(full[:, :k].copy(), g["gnd"], n_db)
    whole = score_rankings(full, g["gnd"], n_db)
    for p in "EMH":  # truncation can only lose AP, and mAP_max bounds what it lost
        assert np.all(trunc[p].ap <= whole[p].ap + 1e-12)
        assert np.all(whole[p].ap <= trunc[p].ap_max + 1e-12)
        np.testing.assert_allclose(whole[p].ap_max, whole[p].ap)


def test_distractors_are_negatives():
    """Extra database images after imlist push positives down like any negative."""
    g = load_gnd("roxford5k")
    n_db, rng = len(g["imlist"]), np.random.default_rng(1)
    ranks = np.argsort(rng.random((len(g["gnd"]), n_db + 3000)), axis=1)
    check_against_reference(ranks, g["gnd"], n_db + 3000)


def test_an_index_outside_the_database_is_refused():
    """The label matrix stops after the last listed image; an index past the database is still an error."""
    assert one([3, 9], easy=[3], n_db=10)["E"].ap[0] == 1.0
    with pytest.raises(IndexError, match="outside"):
        one([3, 10], easy=[3], n_db=10)


# ---- hand-made cases ------------------------------------------------------------------------------------


def one(ranking, easy=(), hard=(), junk=(), n_db=10):
    return score_rankings(np.array([ranking]), [{"easy": list(easy), "hard": list(hard), "junk": list(junk)}], n_db)


def test_known_ap_and_junk_removal():
    # positives at cleaned ranks 0 and 2: AP = ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2
    want = (1.0 + (0.5 + 2 / 3) / 2) / 2
    assert one([1, 5, 2, 0, 3, 4, 6, 7, 8, 9], easy=[1, 2])["E"].ap[0] == pytest.approx(want, abs=1e-12)
    # the same after removing a junk image ranked first and one between the positives
    s = one([9, 1, 5, 8, 2, 0, 3, 4, 6, 7], easy=[1, 2], junk=[9, 8])
    assert s["E"].ap[0] == pytest.approx(want, abs=1e-12)
    # hard images are ignored in E, positives in M and H; easy ignored in H
    s = one([3, 1, 5, 2, 0, 4, 6, 7, 8, 9], easy=[1, 2], hard=[3])
    assert s["E"].ap[0] == pytest.approx(want, abs=1e-12)
    assert s["M"].ap[0] == pytest.approx((1 + 1 + (2 / 3 + 3 / 4) / 2) / 3, abs=1e-12)
    assert s["H"].ap[0] == pytest.approx(1.0)


def test_missing_positives_count_but_contribute_nothing():
    s = one([1, 5, 2], easy=[1, 2, 7])
    assert s["E"].ap[0] == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 3, abs=1e-12)
    # the best extension puts positive 7 at cleaned rank 3: (2/3 + 3/4) / 2
    assert s["E"].ap_max[0] == pytest.approx((1.0 + (0.5 + 2 / 3) / 2 + (2 / 3 + 3 / 4) / 2) / 3, abs=1e-12)
    none_found = one([5, 6], easy=[1])
    assert none_found["E"].ap[0] == 0 and np.all(none_found["E"].pk[0] == 0)


def test_precision_at_k_rule():
    # positives at 1-based cleaned ranks 1 and 3, all found: kq = min(3, k)
    s = one([1, 5, 2, 0, 3, 4, 6, 7, 8, 9], easy=[1, 2])["E"]
    np.testing.assert_allclose(s.pk[0], [1.0, 2 / 3, 2 / 3])
    # first positive at rank 2: P@1 = #(R <= 1) / 1 = 0
    s = one([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], easy=[1, 8])["E"]
    np.testing.assert_allclose(s.pk[0], [0.0, 1 / 5, 2 / 9])


def test_queries_without_positives_are_excluded_from_every_mean():
    gnd = [{"easy": [1], "hard": [], "junk": []}, {"easy": [], "hard": [2], "junk": []}]
    s = score_rankings(np.array([[1, 0, 2], [0, 1, 2]]), gnd, 3)
    assert s["E"].map == 1.0 and np.isnan(s["E"].ap[1])
    np.testing.assert_allclose(s["E"].mpk, [1, 1, 1])
    assert s["H"].map == pytest.approx((0 + 1 / 3) / 2) and np.isnan(s["H"].ap[0])  # (P0 + P1) / 2, n = 1
    assert s["M"].map == pytest.approx((1 + 1 / 6) / 2)
    out = summary(s)
    assert out["mAP"]["E"] == 100.0 and out["mP@k"]["k"] == [1, 5, 10] and len(out["mP@k"]["H"]) == 3


def test_positive_also_listed_as_junk_follows_revisitop():
    rng = np.random.default_rng(3)
    gnd = [{"easy": [1, 4, 6], "hard": [2], "junk": [4, 7]}, {"easy": [0], "hard": [3, 5], "junk": [5, 9]}]
    ranks = np.argsort(rng.random((2, 10)), axis=1)
    check_against_reference(ranks, gnd, 10)


def test_protocol_table_matches_spec():
    assert PROTOCOLS == {
        "E": (("easy",), ("junk", "hard")),
        "M": (("easy", "hard"), ("junk",)),
        "H": (("hard",), ("junk", "easy")),
    }
