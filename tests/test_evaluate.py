"""Evaluation from features (library and CLI), its validation errors, the teacher/student/asymmetric run."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from conftest import shared_path
from test_scoring import ref_compute_map, ref_protocol_gnd

from aml.data.revisitop import load_revisitop, write_revisitop
from aml.errors import UserError
from aml.evaluate import default_topk, evaluate_features, evaluate_search, format_table
from aml.settings import ExtractSettings
from aml.whiten import FIRST


def unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def reference_result(gnd, db, q):
    """mAP / mP@k x100 from a float64 brute-force ranking and the per-query revisitop transcription."""
    ranks = np.argsort(-(q.astype(np.float64) @ db.astype(np.float64).T), axis=1, kind="stable")
    out = {"mAP": {}, "mP@k": {"k": [1, 5, 10]}}
    for p in "EMH":
        aps, prs = ref_compute_map(ranks.T.copy(), ref_protocol_gnd(gnd, p), [1, 5, 10])
        out["mAP"][p], out["mP@k"][p] = 100 * np.nanmean(aps), (100 * np.nanmean(prs, 0)).tolist()
    return out


def assert_close(got, want, atol=1e-9):
    for p in "EMH":
        assert got["mAP"][p] == pytest.approx(want["mAP"][p], abs=atol)
        np.testing.assert_allclose(got["mP@k"][p], want["mP@k"][p], atol=atol)


def real_dataset(tmp_path, name="roxford5k"):
    src = shared_path("revisitop", f"gnd_{name}.pkl")
    (tmp_path / name).mkdir()
    (tmp_path / name / src.name).symlink_to(src)
    return load_revisitop(tmp_path, name)


def structured_features(ds, rng, d=64, noise=1.2):
    """Random vectors where each query's positives lean towards it, so mAPs are neither 0 nor 100."""
    q = rng.standard_normal((len(ds.qimlist), d))
    db = rng.standard_normal((len(ds.imlist), d))
    for i, g in enumerate(ds.gnd):
        for key, w in (("easy", 1.0), ("hard", 0.5), ("junk", 0.3)):
            db[g[key]] += w * q[i] / noise
    return unit(db), unit(q)


# ---- from features ---------------------------------------------------------------------------------------


def test_real_gnd_matches_reference(tmp_path):
    ds = real_dataset(tmp_path)
    db, q = structured_features(ds, np.random.default_rng(0))
    got = evaluate_features(ds, q, db)
    assert set(got) == {"dataset", "mAP", "mP@k"} and got["dataset"] == "roxford5k"
    assert 10 < got["mAP"]["M"] < 95
    assert_close(got, reference_result(ds.gnd, db, q))


def test_truncated_ranking_bounds(tmp_path):
    ds = real_dataset(tmp_path, "rparis6k")
    db, q = structured_features(ds, np.random.default_rng(1))
    full = evaluate_features(ds, q, db)
    cut = evaluate_features(ds, q, db, topk=300)
    assert cut["topk"] == 300
    for p in "EMH":
        assert cut["mAP"][p] <= full["mAP"][p] <= cut["mAP_max"][p]
        assert full["mAP"][p] - cut["mAP"][p] > 0.01  # 300 is short enough to lose positives
    assert "truncated to top 300" in format_table(cut)


def test_distractors_are_appended_after_imlist(tmp_path):
    ds = real_dataset(tmp_path)
    rng = np.random.default_rng(2)
    db, q = structured_features(ds, rng, d=32)
    dis = unit(rng.standard_normal((2000, 32)))
    got = evaluate_features(ds, q, db, distractors=dis.astype(np.float16))
    both = np.concatenate([db, dis.astype(np.float16).astype(np.float32)])
    assert_close(got, reference_result(ds.gnd, both, q), atol=1e-4)  # float32 vs float64 near-ties
    assert got["mAP"]["M"] < evaluate_features(ds, q, db)["mAP"]["M"]
    assert default_topk(100_000) == 100_000 and default_topk(100_001) == 10_000


def tiny(tmp_path, name="tiny"):
    """Two objects, 8 database images, 2 queries; perfect features rank positives first."""
    imlist = [f"im{i}" for i in range(8)]
    gnd = [
        {"bbx": [0, 0, 30, 20], "easy": [0, 1], "hard": [2], "junk": [3]},
        {"bbx": [2, 2, 20, 30], "easy": [4], "hard": [5, 6], "junk": []},
    ]
    write_revisitop(tmp_path, name, imlist, ["q0", "q1"], gnd)
    e = np.eye(8)
    q = unit([e[0], e[1]])
    db = unit(
        [
            [1, 0, 0.9, 0, 0, 0, 0, 0],
            [1, 0, 0, 0.9, 0, 0, 0, 0],
            [1, 0, 0, 0, 0.95, 0, 0, 0],
            e[2],
            [0, 1, 0, 0, 0, 0.9, 0, 0],
            [0, 1, 0, 0, 0, 0, 0.9, 0],
            [0, 1, 0, 0, 0, 0, 0, 0.95],
            e[5],
        ]
    )
    return load_revisitop(tmp_path, name), db, q


def test_perfect_features_score_100(tmp_path):
    ds, db, q = tiny(tmp_path)
    got = evaluate_features(ds, q, db)
    assert got["mAP"] == {"E": 100.0, "M": 100.0, "H": 100.0}
    assert got["mP@k"] == {"k": [1, 5, 10], "E": [100.0] * 3, "M": [100.0] * 3, "H": [100.0] * 3}
    got = evaluate_features(ds, unit(q[::-1].copy()), db)  # swapped queries: every positive ranked last
    assert_close(got, reference_result(ds.gnd, db, unit(q[::-1].copy())))
    assert got["mAP"]["M"] < 40


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda db, q: (db[:-1], q), r"database features \(tiny imlist order\): 7 rows, expected 8"),
        (lambda db, q: (db, q[:1]), r"query features \(tiny qimlist order\): 1 rows, expected 2"),
        (lambda db, q: (db * 3, q), r"row 0 has norm 3, not 1 \(8 of rows 0..7\); .*L2-normalised"),
        (lambda db, q: (db, np.full_like(q, np.nan)), "row 0 has norm nan"),
        (lambda db, q: (db, q[:, :4]), "4-d vectors, but the database is 8-d"),
        (lambda db, q: (db.astype(np.int32), q), "dtype int32"),
    ],
)
def test_feature_validation(tmp_path, change, match):
    ds, db, q = tiny(tmp_path)
    with pytest.raises(UserError, match=match):
        evaluate_features(ds, *change(db, q)[::-1], check_unit=True)


def test_short_vectors_pass_without_the_unit_check(tmp_path):
    ds, db, q = tiny(tmp_path)
    assert evaluate_features(ds, q, 0.5 * db)["mAP"]["M"] == 100.0
    with pytest.raises(UserError, match="row 1 has norm nan"):
        evaluate_features(ds, np.array([q[0], [np.nan] * 8], np.float32), db)


def test_format_table_side_by_side(tmp_path):
    ds, db, q = tiny(tmp_path)
    r = evaluate_features(ds, q, db)
    single = format_table(r).splitlines()
    assert single[0] == "tiny" and [ln.split()[0] for ln in single[2:]] == ["mAP", "mP@1", "mP@5", "mP@10"]
    assert single[2].split()[1:] == ["100.00", "100.00", "100.00"]
    r2 = dict(r, mAP={"E": 12.345678, "M": 50.0, "H": 1.0})
    three = format_table({"dataset": "tiny", "teacher": r, "student": r2, "asymmetric": r}).splitlines()
    assert "teacher (sym)" in three[1] and "student (sym)" in three[1] and "asymmetric (s->t)" in three[1]
    assert three[3].split()[1:] == ["100.00"] * 3 + ["12.35", "50.00", "1.00"] + ["100.00"] * 3


# ---- the command from features ------------------------------------------------------------------------


def test_cli_from_features(tmp_path, run_cli):
    ds, db, q = tiny(tmp_path)
    rng = np.random.default_rng(3)
    q = unit(q + 0.8 * rng.standard_normal(q.shape))  # imperfect, so the numbers are not all 100
    np.save(tmp_path / "x.npy", db.astype(np.float16))
    np.save(tmp_path / "q.npy", q)
    code, out, err = run_cli(
        "evaluate",
        "--dataset",
        "tiny",
        "--data-root",
        tmp_path,
        "--db-features",
        tmp_path / "x.npy",
        "--query-features",
        tmp_path / "q.npy",
        "--json",
        tmp_path / "out.json",
    )
    assert code == 0, err
    res = json.loads((tmp_path / "out.json").read_text())
    assert set(res) == {"dataset", "mAP", "mP@k"} and res["dataset"] == "tiny"
    assert set(res["mAP"]) == {"E", "M", "H"} and res["mP@k"]["k"] == [1, 5, 10]
    assert all(len(res["mP@k"][p]) == 3 for p in "EMH")
    assert_close(res, reference_result(ds.gnd, db.astype(np.float16).astype(np.float32), q), atol=1e-6)
    assert f"{res['mAP']['M']:.2f}" in out and "mP@10" in out


def test_cli_errors_are_one_line(tmp_path, run_cli):
    ds, db, q = tiny(tmp_path)
    np.save(tmp_path / "x.npy", db[:5])
    np.save(tmp_path / "q.npy", q)
    (tmp_path / "bad").mkdir()
    with open(tmp_path / "bad" / "gnd_bad.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": []}]}, f)
    base = (
        "evaluate",
        "--data-root",
        tmp_path,
        "--db-features",
        tmp_path / "x.npy",
        "--query-features",
        tmp_path / "q.npy",
    )
    cases = [
        (("--dataset", "tiny"), "x.npy (tiny imlist order): 5 rows, expected 8"),
        (("--dataset", "nope"), "gnd_nope.pkl: ground-truth file not found"),
        (("--dataset", "bad"), "gnd[0] (query q): missing key 'junk'"),
    ]
    for extra, msg in cases:
        code, out, err = run_cli(*base, *extra)
        assert code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    code, _, err = run_cli(
        "evaluate",
        "--dataset",
        "tiny",
        "--data-root",
        tmp_path,
        "--db-features",
        tmp_path / "x.npy",
        "--teacher",
        "lite2",
    )
    assert code == 2 and "not both" in err


# ---- from models: teacher / student / asymmetric ---------------------------------------------------------


def image_dataset(tmp_path):
    """The tiny gnd with real (random-pattern) JPEGs: objects share a base pattern, queries are cropped."""
    from PIL import Image

    ds, _, _ = tiny(tmp_path, "imgs")
    rng = np.random.default_rng(5)
    base = [rng.integers(0, 255, (12, 16, 3)) for _ in range(3)]
    obj = {0: 0, 1: 0, 2: 0, 3: 2, 4: 1, 5: 1, 6: 1, 7: 2}
    for name, o in [*((f"im{i}", obj[i]) for i in range(8)), ("q0", 0), ("q1", 1)]:
        x = np.kron(base[o], np.ones((4, 4, 1))) + rng.normal(0, 25, (48, 64, 3))
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(tmp_path / "imgs" / "jpg" / f"{name}.jpg")
    return ds


def direct_vectors(model, paths, bbxs=None, lw=None):
    """Independent of the cache: extract, then (optionally) l2n(P (x - m)) in numpy."""
    from aml.extract import ExtractSettings, extract

    x = extract(model, paths, ExtractSettings(32, workers=0, device="cpu", progress=False), bbxs=bbxs)
    if lw is None:
        return x
    y = (x - lw["m"].reshape(1, -1)) @ lw["P"].T
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def assert_same_result(got, want):
    assert_close(got, want, atol=1e-6)


SETTINGS = ExtractSettings(32, workers=0, device="cpu", progress=False)
MODEL_KW = dict(random_init=True)


def test_models_rows_match_direct_extraction_and_cache_is_reused(tmp_path, monkeypatch, one_thread):
    import aml.registry
    from aml.evaluate import evaluate_models
    from aml.registry import create_model

    ds = image_dataset(tmp_path)
    cache = tmp_path / "cache"
    res = evaluate_models(ds, "lite2", "lite0", SETTINGS, cache_dir=cache, **MODEL_KW).result
    assert list(res) == ["dataset", "settings", "teacher", "student", "asymmetric"]

    t = create_model("lite2", random_init=True)
    s = create_model("lite0", role="student", dim=t.dim, random_init=True)
    t_db, t_q = direct_vectors(t, ds.db_paths()), direct_vectors(t, ds.query_paths(), ds.bbxs)
    s_db, s_q = direct_vectors(s, ds.db_paths()), direct_vectors(s, ds.query_paths(), ds.bbxs)
    assert_same_result(res["teacher"], evaluate_features(ds, t_q, t_db))
    assert_same_result(res["student"], evaluate_features(ds, s_q, s_db))
    assert_same_result(res["asymmetric"], evaluate_features(ds, s_q, t_db))

    # a second student: the teacher network is never built, the cache files stay the same
    files = sorted(p.name for p in cache.iterdir())
    built = []
    real = aml.registry.create_model
    monkeypatch.setattr(aml.registry, "create_model", lambda *a, **k: built.append(k.get("role")) or real(*a, **k))
    res2 = evaluate_models(
        ds, "lite2", "mobilenetv2", SETTINGS, cache_dir=cache, rows=("teacher", "asymmetric"), **MODEL_KW
    ).result
    assert built == ["student"] and sorted(p.name for p in cache.iterdir()) == files
    assert list(res2) == ["dataset", "settings", "teacher", "asymmetric"]
    assert res2["teacher"] == res["teacher"]


def test_models_whitening_uses_the_teachers_lw_on_both_sides(tmp_path, one_thread):
    import torch

    from aml.evaluate import evaluate_models
    from aml.registry import create_model

    ds = image_dataset(tmp_path)
    t = create_model("lite2", random_init=True)
    rng = np.random.default_rng(7)
    lw = {
        "m": rng.normal(0, 0.01, (t.dim, 1)).astype(np.float32),
        "P": (np.eye(t.dim) + rng.normal(0, 0.05, (t.dim, t.dim))).astype(np.float32),
    }
    ckpt = tmp_path / "teacher-lw.pth"
    torch.save({"state_dict": t.state_dict(), "meta": {**t.meta, "Lw": {"sfm": {"ss": lw}}}}, ckpt)
    res = evaluate_models(
        ds,
        str(ckpt),
        "lite0",
        SETTINGS,
        whiten=FIRST,
        cache_dir=tmp_path / "cache",
        rows=("teacher", "asymmetric"),
        **MODEL_KW,
    ).result
    assert res["settings"]["Lw"] == "teacher sfm/ss"
    s = create_model("lite0", role="student", dim=t.dim, random_init=True)
    t_db, t_q = direct_vectors(t, ds.db_paths(), lw=lw), direct_vectors(t, ds.query_paths(), ds.bbxs, lw=lw)
    s_q = direct_vectors(s, ds.query_paths(), ds.bbxs, lw=lw)
    assert_same_result(res["teacher"], evaluate_features(ds, t_q, t_db))
    assert_same_result(res["asymmetric"], evaluate_features(ds, s_q, t_db))
    with pytest.raises(UserError, match="no learned whitening"):
        evaluate_models(ds, "lite2", "lite0", SETTINGS, whiten=FIRST, cache_dir=tmp_path / "cache", **MODEL_KW)


def test_cli_from_models(tmp_path, run_cli, one_thread):
    image_dataset(tmp_path)
    base = (
        "evaluate",
        "--dataset",
        "imgs",
        "--data-root",
        tmp_path,
        "--teacher",
        "lite2",
        "--student",
        "lite0",
        "--random-init",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--cache-dir",
        tmp_path / "cache",
        "--quiet",
        "--device",
        "cpu",
    )
    code, out, err = run_cli(
        *base, "--row", "teacher", "--row", "asymmetric", "--json", tmp_path / "r.json", "--show", tmp_path / "r.html"
    )
    assert code == 0, err
    assert "r.html: 2 queries of the asymmetric row drawn" in out and "AP " in (tmp_path / "r.html").read_text()
    code, _, err = run_cli(*base, "--row", "teacher", "--show", tmp_path / "t.png")
    assert code == 2 and "--show-row asymmetric: not among the rows run (teacher); add --row asymmetric" in err
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) == {"dataset", "settings", "teacher", "asymmetric"}
    for row in ("teacher", "asymmetric"):
        assert set(res[row]) == {"dataset", "mAP", "mP@k"} and set(res[row]["mAP"]) == {"E", "M", "H"}
    assert "teacher (sym)" in out and "asymmetric (s->t)" in out and "student (sym)" not in out
    (tmp_path / "imgs" / "jpg" / "im3.jpg").unlink()
    code, _, err = run_cli(*base)
    assert code == 2 and "1 of 10 images are missing (first: " in err and "im3.jpg" in err


def test_models_query_size_and_an_exported_student(tmp_path, run_cli, one_thread):
    """The student's queries at their own size against the teacher's database at another (the asymmetric
    deployment), and an exported .onnx student scoring as its checkpoint does; the CLI prints both sizes."""
    from test_export import save_student

    from aml.evaluate import evaluate_models
    from aml.export import pipeline
    from aml.registry import create_model

    ds = image_dataset(tmp_path)
    t = create_model("lite2", random_init=True)
    ckpt = save_student(tmp_path / "s.pt", "lite0", dim=t.dim, config={"image_size": 24})
    kw = dict(cache_dir=tmp_path / "cache", rows=("asymmetric",), **MODEL_KW)
    res = evaluate_models(ds, "lite2", str(ckpt), SETTINGS, query_settings=SETTINGS.replace(image_size=24), **kw)
    s = create_model(str(ckpt))
    s_q = direct_vectors(s, ds.query_paths(), ds.bbxs)  # at 32: what the default (one size) would give
    s_q24 = extract_at(s, ds.query_paths(), 24, ds.bbxs)
    t_db = direct_vectors(t, ds.db_paths())
    assert not np.allclose(s_q, s_q24, atol=1e-3)
    assert_same_result(res.result["asymmetric"], evaluate_features(ds, s_q24, t_db))
    assert res.result["settings"]["image size"] == 32 and res.result["settings"]["query image size"] == 24

    onnx_path = tmp_path / "s.onnx"
    pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(), out=onnx_path)
    res_onnx = evaluate_models(
        ds, "lite2", str(onnx_path), SETTINGS, query_settings=SETTINGS.replace(image_size=24), **kw
    )
    assert_same_result(res_onnx.result["asymmetric"], res.result["asymmetric"])

    base = ("evaluate", "models", "--dataset", "imgs", "--data-root", tmp_path, "--teacher", "lite2", "--random-init")
    rest = ("--workers", "0", "--cache-dir", tmp_path / "cache", "--quiet", "--device", "cpu", "--row", "asymmetric")
    code, out, err = run_cli(*base, "--student", onnx_path, *rest)
    assert code == 2 and "teacher-under-test" in err  # the sidecar's teacher is checked like a checkpoint's
    code, out, err = run_cli(*base, "--student", onnx_path, "--force", "--db-image-size", 32, *rest)
    assert code == 0, err
    assert "queries at 24 px (from its sidecar), database at 32 px (--db-image-size)" in err
    code, out, err = run_cli(*base, "--student", ckpt, "--force", "--image-size", 32, "--query-image-size", 24, *rest)
    assert code == 0 and "queries at 24 px (--query-image-size), database at 32 px (--image-size)" in err
    code, out, err = run_cli(*base, "--student", "lite0", *rest)
    assert code == 0 and "queries at 1024 px (the default), database at 1024 px (as the queries)" in err


def extract_at(model, paths, size, bbxs=None):
    from aml.extract import extract

    return extract(model, paths, SETTINGS.replace(image_size=size), bbxs=bbxs)


# ---- --show: the worst and best queries drawn --------------------------------------------------------------


def test_worst_and_best():
    from aml.show import worst_and_best

    ap = np.array([0.5, np.nan, 0.1, 0.9, 0.3])
    assert worst_and_best(ap, 2).tolist() == [2, 4, 3, 0]
    assert worst_and_best(ap, 3).tolist() == [2, 4, 0, 3]  # 4 queries with positives: each drawn once
    assert worst_and_best(ap, 5).tolist() == [2, 4, 0, 3]
    assert worst_and_best(np.array([0.2, 0.2, 0.7]), 1).tolist() == [0, 2]  # ties by position


def test_cli_show_draws_worst_and_best_from_features(tmp_path, run_cli):
    from PIL import Image

    ds = image_dataset(tmp_path)
    _, db, q = tiny(tmp_path / "f")
    q = unit(q + 0.9 * np.random.default_rng(4).standard_normal(q.shape))
    np.save(tmp_path / "x.npy", db)
    np.save(tmp_path / "q.npy", q)
    ap = evaluate_search(ds, q, db).ranking.scores["M"].ap
    base = ["evaluate", "--dataset", "imgs", "--data-root", tmp_path, "--db-features", tmp_path / "x.npy",
            "--query-features", tmp_path / "q.npy", "--show-n", 1, "--show-k", 4]  # fmt: skip
    code, out, err = run_cli(*base, "--show", tmp_path / "s.html")
    assert code == 0, err
    assert "s.html: 2 queries of the features drawn" in out
    page = (tmp_path / "s.html").read_text()
    worst, best = np.argsort(ap)
    first, second = (page.index(f"AP {100 * ap[i]:.1f} q{i}") for i in (worst, best))
    assert first < second and page.count("<figure>") == 2 * (1 + 4)
    assert run_cli(*base, "--show", tmp_path / "s.png")[0] == 0
    img = np.asarray(Image.open(tmp_path / "s.png"))
    for colour in ((0, 170, 0), (210, 0, 0)):  # positive and negative frames
        assert (img == colour).all(-1).sum() > 0
    for extra, msg in [
        (("--show", tmp_path / "s.txt"), "expected a .png or .html file"),
    ]:
        code, _, err = run_cli(*base, *extra)
        assert code == 2 and msg in err and err.count("\n") == 1, err
    code, _, err = run_cli(*base, "--show", tmp_path / "s.png", "--show-row", "student")  # a models option
    assert code == 2 and "No such option '--show-row'" in err
    (tmp_path / "imgs" / "jpg" / "im3.jpg").unlink()
    code, _, err = run_cli(*base, "--show", tmp_path / "s.png")
    assert code == 2 and "im3.jpg" in err


@pytest.mark.parametrize(
    "content,why",
    [
        (b"", "empty or truncated"),
        (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (10, 8), }" + b" " * 50 + b"\n", ""),
        (b"not an npy at all", ""),
    ],
    ids=["empty", "truncated", "garbage"],
)
def test_load_features_bad_files_are_one_line(tmp_path, content, why):
    """A 0-byte or truncated .npy used to reach click as EOFError ('Aborted.', exit 130)."""
    from aml.evaluate import load_features

    p = tmp_path / "db.npy"
    p.write_bytes(content)
    with pytest.raises(UserError, match=rf"db\.npy: database features: not a readable \.npy array.*{why}") as e:
        load_features(p, "database features")
    assert "\n" not in str(e.value)


def test_load_features_refuses_pickled_arrays(tmp_path):
    from aml.evaluate import load_features

    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="obj.npy: features: not a readable .npy array"):
        load_features(p)
    ok = tmp_path / "ok.npy"
    np.save(ok, np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(load_features(ok), np.eye(3))


def test_evaluate_group_earlier_form_and_json_to_stdout(tmp_path, run_cli):
    ds, db, q = tiny(tmp_path)
    np.save(tmp_path / "x.npy", db)
    np.save(tmp_path / "q.npy", q)
    common = ("--dataset", "tiny", "--data-root", tmp_path, "--db-features", tmp_path / "x.npy")
    code, out, err = run_cli("evaluate", "features", *common, "--query-features", tmp_path / "q.npy", "--json", "-")
    assert code == 0, err
    res = json.loads(out[out.index("{") :])  # the table, then the JSON
    assert res["mAP"]["M"] == 100.0
    code, out2, err = run_cli("evaluate", *common, "--query-features", tmp_path / "q.npy", "--json", "-")
    assert code == 0 and out2 == out, err  # the earlier form, without a subcommand: the same run
    code, _, err = run_cli("evaluate", *common, "--teacher", "lite2")
    assert code == 2 and "not both" in err and err.count("\n") == 1
