"""Binary codes end to end: `aml extract --binary`, `aml evaluate --binary` (features and models), `aml export
--binary` + `aml embed` against the torch path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_evaluate import image_dataset, real_dataset, structured_features
from test_export import TEACHER, lively

from aml.binary import pack_bits, unpack_signs
from aml.evaluate import BINARY_ROWS, evaluate_features
from aml.extract import ExtractSettings, extract
from aml.registry import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = ExtractSettings(32, workers=0, device="cpu", progress=False)


def ln_student(path, dim: int = 32):
    """A resnet18 student with a LayerNorm head (zero-centred vectors: balanced sign bits), saved as a checkpoint."""
    net = lively(create_model("resnet18", role="student", dim=dim, head="linear", layernorm=True, random_init=True))
    net.meta["aml"]["teacher"] = dict(TEACHER, dim=dim)
    torch.save({"state_dict": net.state_dict(), "meta": net.meta, "epoch": 1, "config": {"image_size": 32}}, path)
    return path


def save_features(folder, db: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """db.npy, its packed sign bits codes.npy and q.npy in `folder`; returns (db, q)."""
    np.save(folder / "db.npy", db)
    np.save(folder / "codes.npy", pack_bits(db))
    np.save(folder / "q.npy", q)
    return db, q


def test_evaluate_binary_from_features_matches_float_search_on_the_signs(tmp_path, run_cli):
    ds = real_dataset(tmp_path)
    db, q = save_features(tmp_path, *structured_features(ds, np.random.default_rng(0), d=64, noise=0.8))
    base = ("evaluate", "--dataset", "roxford5k", "--data-root", tmp_path, "--query-features", tmp_path / "q.npy")
    code, out, err = run_cli(
        *base, "--db-features", tmp_path / "db.npy", "--binary-rows", "--json", tmp_path / "a.json"
    )
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())
    signs = unpack_signs(pack_bits(db), 64)
    want_asym = evaluate_features(ds, q, signs / 8)  # float queries against the +-1 / sqrt(D) database
    want_ham = evaluate_features(ds, np.where(q > 0, 1.0, -1.0).astype(np.float32), signs)  # ties by index: as Hamming
    assert a["mAP"] == evaluate_features(ds, q, db)["mAP"]  # the float row too
    assert a["binary"]["float->bits"]["mAP"] == pytest.approx(want_asym["mAP"], abs=1e-9)
    assert a["binary"]["hamming"]["mAP"] == pytest.approx(want_ham["mAP"], abs=1e-9)
    assert 0 < a["binary"]["hamming"]["mAP"]["M"] < a["mAP"]["M"] and "float->bits" in out
    # codes written by `aml extract --binary` are taken as they are
    code, out, err = run_cli(
        *base, "--db-features", tmp_path / "codes.npy", "--binary-rows", "--json", tmp_path / "b.json"
    )
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert set(b) == {"dataset", "binary"} and b["binary"] == a["binary"]
    code, _, err = run_cli(*base, "--db-features", tmp_path / "codes.npy")
    assert code == 2 and "evaluate them with --binary-rows" in err


def test_extract_and_evaluate_binary_from_models(tmp_path, run_cli):
    ds = image_dataset(tmp_path)
    lst = tmp_path / "db.txt"
    lst.write_text("\n".join(ds.db_paths()) + "\n")
    student = ln_student(tmp_path / "s.pt")
    common = ("--image-size", "32", "--workers", "0", "--device", "cpu", "--quiet")
    extract_cli = ("extract", "--images", lst, "--binary", *common)
    code, out, err = run_cli(*extract_cli, "--model", student, "--out", tmp_path / "c.npy")
    assert code == 0, err
    net = create_model(student)
    floats = extract(net, ds.db_paths(), SETTINGS)
    codes = np.load(tmp_path / "c.npy")
    assert codes.dtype == np.uint8 and codes.shape == (8, 4) and "32 sign bits a row" in out
    np.testing.assert_array_equal(codes, pack_bits(floats))
    assert "warning" not in err  # LayerNorm'd vectors: balanced bits
    # a raw GeM teacher is non-negative: every bit set, and the user is told why
    code, _, err = run_cli(*extract_cli, "--model", "resnet18", "--random-init", "--out", tmp_path / "t.npy")
    assert code == 0 and "not zero-centred" in err and (np.load(tmp_path / "t.npy") == 255).all()

    code, out, err = run_cli(
        "evaluate", "--dataset", "imgs", "--data-root", tmp_path, "--teacher", student, "--student", student,
        "--binary-rows", "--force", "--cache-dir", tmp_path / "cache", "--json", tmp_path / "r.json", *common,
    )  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["binary"]) == {n for names in BINARY_ROWS.values() for n in names}
    assert "teacher hamming" in r["binary"] and "asymmetric float->bits" in r["binary"]
    assert "32 sign bits, 4 bytes a vector" in r["settings"]["binary"] and "database as sign bits" in out
    t_db = extract(net, ds.db_paths(), SETTINGS).astype(np.float16)  # the teacher cache's dtype
    q = extract(net, ds.query_paths(), SETTINGS, bbxs=ds.bbxs)
    signs = unpack_signs(pack_bits(t_db), 32)
    want = evaluate_features(ds, q, signs / np.sqrt(32))["mAP"]
    assert r["binary"]["asymmetric float->bits"]["mAP"] == pytest.approx(want, abs=1e-6)
    own = pack_bits(floats)  # the student row: the student's own float32 database as bits, its own queries
    want = evaluate_features(ds, q, unpack_signs(own, 32) / np.sqrt(32))["mAP"]
    assert r["binary"]["student float->bits"]["mAP"] == pytest.approx(want, abs=1e-6)
    hamming = evaluate_features(ds, unpack_signs(pack_bits(q), 32), unpack_signs(own, 32))["mAP"]
    assert r["binary"]["student hamming"]["mAP"] == pytest.approx(hamming, abs=1e-6)


def test_evaluate_binary_with_show_draws_the_float_ranking_and_refuses_bare_codes(tmp_path, run_cli):
    ds = image_dataset(tmp_path)
    save_features(tmp_path, *structured_features(ds, np.random.default_rng(1), d=16, noise=0.8))
    base = ("evaluate", "--dataset", "imgs", "--data-root", tmp_path, "--query-features", tmp_path / "q.npy",
            "--binary-rows", "--show-n", 1, "--show-k", 2)  # fmt: skip
    code, out, err = run_cli(*base, "--db-features", tmp_path / "db.npy", "--show", tmp_path / "s.html")
    assert code == 0, err
    assert "s.html: 2 queries of the features drawn" in out and "float->bits" in out
    code, _, err = run_cli(*base, "--db-features", tmp_path / "codes.npy", "--show", tmp_path / "c.html")
    assert code == 2 and "uint8 sign bits have no float ranking to draw" in err and not (tmp_path / "c.html").exists()


def test_export_binary_declares_it_and_embed_writes_the_codes_of_the_torch_model(tmp_path, run_cli):
    ds = image_dataset(tmp_path)
    lst = tmp_path / "db.txt"
    lst.write_text("\n".join(ds.db_paths()) + "\n")
    student = ln_student(tmp_path / "s.pt")
    code, out, err = run_cli("export", "--checkpoint", student, "--binary", "--image-size", "32", "--quiet")
    assert code == 0, err
    onnx = tmp_path / "s-fp32-b.onnx"
    side = json.loads((tmp_path / "s-fp32-b.onnx.json").read_text())
    assert {k: side["output"]["binary"][k] for k in ("bits", "bytes", "dtype")} == {
        "bits": 32,
        "bytes": 4,
        "dtype": "uint8",
    }
    code, out, err = run_cli("embed", "--model", onnx, "--images", lst, "--out", tmp_path / "e.npy")
    assert code == 0, err
    got = np.load(tmp_path / "e.npy")
    floats = extract(create_model(student), ds.db_paths(), SETTINGS)
    assert got.dtype == np.uint8 and "uint8 (32 sign bits a row)" in out
    clear = np.abs(floats) > 1e-4  # onnxruntime and torch differ by ~1e-7: only values at zero may flip
    np.testing.assert_array_equal(unpack_signs(got, 32)[clear], np.where(floats > 0, 1.0, -1.0)[clear])
