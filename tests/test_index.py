"""`aml.index` / `aml index` / `aml search`: the teacher's database as a faiss index, searched by queries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, aml_torchrun, shared_path
from fake_faiss import gpu_faiss

from aml import index as aml_index
from aml.errors import UserError
from aml.index import Index, build_index
from aml.registry import create_model, model_identity
from aml.search import search


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ vectors API
def test_flat_equals_exact_search_and_roundtrips(tmp_path):
    db, q = unit(300, 64, 0), unit(7, 64, 1)
    idx = build_index(db, "flat", meta={"teacher": {"name": "t", "dim": 64}})
    s, i = idx.search(q, 20)
    want_s, want_i = search(q, db, 20, device="cpu")
    assert np.array_equal(i, want_i) and np.allclose(s, want_s, atol=1e-5)
    idx.save(tmp_path / "db")
    again = Index.open(tmp_path / "db")
    assert np.array_equal(again.search(q, 20)[1], i) and again.names == [str(k) for k in range(300)]


def test_add_equals_build_of_the_concatenation(tmp_path):
    a, b, q = unit(120, 32, 2), unit(50, 32, 3), unit(5, 32, 4)
    for kind in ("flat", "flat16", "binary"):
        one = build_index(a, kind, meta={"teacher": {}})
        one.save(tmp_path / kind)
        opened = Index.open(tmp_path / kind)
        opened.add(b, [f"b{k}" for k in range(50)])
        opened.save()
        got = Index.open(tmp_path / kind)
        both = build_index(np.concatenate([a, b]), kind)
        assert len(got) == 170 and got.generation == 1
        assert sorted(os.listdir(tmp_path / kind)) == ["images-1.txt", "index-1.faiss", "manifest.json"]
        for x, y in zip(got.search(q, 30), both.search(q, 30), strict=True):
            assert np.array_equal(x, y), kind


def test_flat16_and_binary_are_sensible():
    db, q = unit(400, 128, 5), unit(20, 128, 6)
    db[:20] = q + 0.3 * unit(20, 128, 7)  # each query has a near neighbour
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    exact = build_index(db, "flat").search(q, 10)[1]
    assert np.array_equal(build_index(db, "flat16").search(q, 10)[1][:, 0], exact[:, 0])
    binary = build_index(db, "binary")
    b_ids = binary.search(q, 10)[1]
    recall = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(b_ids, exact, strict=True)])
    print(f"binary (asymmetric) recall@10 vs flat: {recall:.2f}")
    assert (b_ids[:, 0] == np.arange(20)).mean() >= 0.9 and recall > 0.2
    h_ids = binary.search(q, 10, hamming=True)[1]
    assert (h_ids[:, 0] == np.arange(20)).mean() >= 0.8
    ivf = build_index(db, "ivfpq", nlist=4, m=16, nbits=6, nprobe=4)
    assert (ivf.search(q, 10)[1][:, 0] == np.arange(20)).mean() >= 0.8


def test_bad_index_dirs_are_one_line(tmp_path):
    build_index(unit(30, 16, 8), "flat", meta={"teacher": {}}).save(tmp_path / "db")
    man_path = tmp_path / "db" / "manifest.json"
    man = json.loads(man_path.read_text())
    with pytest.raises(UserError, match="already exists"):
        build_index(unit(30, 16, 8), "flat", meta={"teacher": {}}).save(tmp_path / "db")
    man_path.write_text(json.dumps({**man, "version": 99}))
    with pytest.raises(UserError, match="version 99; this aml reads up to 1"):
        Index.open(tmp_path / "db")
    man_path.write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        Index.open(tmp_path / "db")
    man_path.write_text(json.dumps({**man, "bytes": {**man["bytes"], "index": 1}}))
    with pytest.raises(UserError, match="wrong size"):
        Index.open(tmp_path / "db")
    man_path.unlink()
    with pytest.raises(UserError, match="not a complete aml index"):
        Index.open(tmp_path / "db")
    with pytest.raises(UserError, match="index directory not found"):
        Index.open(tmp_path / "nope")


def test_identity_mismatch_names_the_fields():
    from aml.identity import check_compatible, describe, mismatch

    a = {"name": "rn101", "weights": "w.pth", "sha256": "aa", "dim": 2048, "image_size": 1024, "whitening": None}
    assert mismatch(a, dict(a)) == []
    assert mismatch({**a, "sha256": "bb", "image_size": 362}, a) == ["sha256", "image_size"]
    random = {**a, "sha256": None, "weights": "random-init"}
    assert mismatch(random, dict(random)) == [] and mismatch(random, a) == ["sha256"]
    kw = dict(what="encoder s is for", where="index DB holds", fix="use another encoder")
    with pytest.raises(UserError, match=r"holds rn101 \(sha256 aa, 2048-d, 1024 px, no whitening\) \(differ: dim\); u"):
        check_compatible({**a, "dim": 512}, a, force=False, **kw)
    assert "warning: --force" in check_compatible({**a, "dim": 512}, a, force=True, **kw)
    assert check_compatible(a, dict(a), force=False, **kw) == ""
    assert describe({"dim": 512}) == "512-d vectors"


# ------------------------------------------------------------------------------------------------ faiss-gpu
def test_search_gpus_picks_the_device():
    from aml.index import search_gpus

    def pick(kind="flat", device="auto", k=10, hamming=False, n=2):
        return search_gpus(kind, device, k, hamming=hamming, n_gpus=n)

    assert pick(n=0) == (None, "") and pick(device="cpu") == (None, "")
    assert pick() == ([0, 1], "") and pick("flat16") == ([0, 1], "") and pick("ivfpq", n=1) == ([0], "")
    assert pick(device="cuda:all") == ([0, 1], "") and pick(device="cuda:1") == ([1], "")
    assert pick(device="cuda") == ([0], "")  # cuda: the first GPU, as for --device
    assert pick("binary", hamming=True) == ([0], "")  # binary codes: one GPU
    gpus, note = pick("binary")
    assert gpus is None and "scored against float queries on the CPU" in note
    gpus, note = pick(k=3000)
    assert gpus is None and "beyond faiss-gpu's limit of 2048" in note
    for kw, match in [
        (dict(device="cuda", n=0), "faiss sees no GPU"),
        (dict(device="cuda:2"), "sees 2 GPU"),
        (dict(device="cuda", k=3000), "limit of 2048"),
        (dict(device="cuda", kind="binary"), "--hamming"),
        (dict(device="gpu"), "unknown device; use auto, cpu, cuda or cuda:N or cuda:all"),
    ]:
        with pytest.raises(UserError, match=match):
            pick(**kw)


def test_gpu_search_shards_and_equals_cpu(monkeypatch):
    db, q = unit(500, 64, 20), unit(9, 64, 21)
    indexes = {kind: build_index(db, kind, nlist=4, m=8, nbits=6) for kind in ("flat", "flat16", "ivfpq")}
    cpu = {kind: idx.search(q, 20, device="cpu") for kind, idx in indexes.items()}
    fake = gpu_faiss(monkeypatch, 2)
    for kind, idx in indexes.items():
        s, i = idx.search(q, 20)  # auto: faiss-gpu is present
        assert idx.searched_on == "cuda:0,1 (sharded)" and idx.note == ""
        assert np.array_equal(i, cpu[kind][1]) and np.allclose(s, cpu[kind][0], atol=1e-5), kind
    flat16 = "IndexFlatIP"  # flat16 is decoded into a flat index: one GPU type, shardable
    assert fake.calls == [
        ("multi", (0, 1), True, False, "IndexFlatIP"),
        ("multi", (0, 1), True, True, flat16),
        ("multi", (0, 1), True, True, "IndexIVFPQ"),
    ]
    indexes["flat"].search(q, 5)
    assert len(fake.calls) == 3  # the GPU copy is kept
    indexes["flat"].add(unit(3, 64, 22), ["x", "y", "z"])
    indexes["flat"].search(q, 5, device="cuda:1")
    indexes["ivfpq"].search(q, 5, nprobe=2)  # another nprobe: a new copy with it
    assert fake.calls[3:] == [("one", (1,), None, False, "IndexFlatIP"), ("multi", (0, 1), True, True, "IndexIVFPQ")]
    binary = build_index(db, "binary")
    want = binary.search(q, 10, hamming=True, device="cpu")
    got = binary.search(q, 10, hamming=True)
    assert fake.calls[-1] == ("binary", None, None, None, "IndexBinaryFlat") and binary.searched_on == "cuda:0"
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    binary.search(q, 10)
    assert binary.searched_on == "cpu" and "float queries" in binary.note


def test_gpu_refusal_falls_back_on_auto_only(monkeypatch):
    db, q = unit(300, 64, 23), unit(4, 64, 24)
    idx = build_index(db, "ivfpq", nlist=4, m=8, nbits=6)
    want = idx.search(q, 10, device="cpu")
    gpu_faiss(monkeypatch, 1, fail="Bits per code must be 8 (passed 6)")
    got = idx.search(q, 10)
    assert idx.searched_on == "cpu" and idx.note == (
        "faiss-gpu cannot hold this ivfpq index (Bits per code must be 8 (passed 6)): searching on the CPU"
    )
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(UserError, match=r"--search-device cuda: faiss-gpu cannot hold this ivfpq index \(Bits"):
        idx.search(q, 10, device="cuda")
    gpu_faiss(monkeypatch, 0)
    idx.search(q, 10)
    assert idx.searched_on == "cpu" and idx.note == ""  # no GPU: the CPU, nothing to say


# ------------------------------------------------------------------------------------------------ UKBench, CLI
SIZE = 96


@pytest.fixture(scope="module")
def ukbench(tmp_path_factory):
    jpg = shared_path("ukbench", "jpg")
    d = tmp_path_factory.mktemp("uk")
    names = sorted(os.listdir(jpg))
    (d / "db.txt").write_text("".join(f"{jpg / n}\n" for n in names[:32]))
    (d / "more.txt").write_text("".join(f"{jpg / n}\n" for n in names[32:40]))
    (d / "all.txt").write_text("".join(f"{jpg / n}\n" for n in names[:40]))
    (d / "q.txt").write_text("".join(f"{jpg / n}\n" for n in names[0:40:5]))
    return d


@pytest.fixture
def home(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "uk-home"  # shared by the module: one teacher cache


def build_args(lst, out, *extra):
    return ["index", "build", "--teacher", "lite2", "--images", lst, "--image-size", SIZE, "--device", "cpu",
            "--workers", "0", "--out", out, "--quiet", *extra]  # fmt: skip


def test_build_search_equals_evaluate_search(ukbench, tmp_path, home, run_cli, one_thread):
    from aml.settings import ExtractSettings
    from aml.teacher_vectors import TeacherVectors

    env = {"AML_HOME": home}
    code, out, err = run_cli(*build_args(ukbench / "all.txt", tmp_path / "db"), env=env)
    assert code == 0, err
    res = tmp_path / "r.jsonl"
    code, out, err = run_cli(
        "search", "--index", tmp_path / "db", "--encoder", "lite2", "--images", ukbench / "q.txt", "--topk", 10,
        "--device", "cpu", "--out", res, "--show", tmp_path / "r.html", env=env,
    )  # fmt: skip
    assert code == 0, err
    t = TeacherVectors(
        "lite2", ExtractSettings(SIZE, workers=0, device="cpu", progress=False), cache_dir=home / "cache"
    )
    paths = (ukbench / "all.txt").read_text().split()
    db = t.get(paths)
    q = db[0:40:5].astype(np.float32)  # the queries are database images: the teacher's own vectors
    want = search(q, db, 10, device="cpu")[1]
    lines = [json.loads(ln) for ln in res.read_text().splitlines()]
    got = [[paths.index(h["name"]) for h in ln["results"]] for ln in lines]
    assert np.array_equal(np.array(got), want)
    assert all(ln["results"][0]["score"] >= ln["results"][1]["score"] for ln in lines)
    assert "<img src=" in (tmp_path / "r.html").read_text()


def test_add_equals_build_and_killed_build_resumes(ukbench, tmp_path, home, run_cli, monkeypatch, one_thread):
    env = {"AML_HOME": home}
    assert run_cli(*build_args(ukbench / "db.txt", tmp_path / "a", "--type", "flat16"), env=env)[0] == 0
    code, _, err = run_cli("index", "add", tmp_path / "a", "--images", ukbench / "more.txt", "--device", "cpu",
                           "--workers", "0", "--quiet", env=env)  # fmt: skip
    assert code == 0, err
    assert run_cli(*build_args(ukbench / "all.txt", tmp_path / "b", "--type", "flat16"), env=env)[0] == 0
    a, b = Index.open(tmp_path / "a"), Index.open(tmp_path / "b")
    q = unit(4, 1280, 0)
    assert a.names == b.names and all(
        np.array_equal(x, y) for x, y in zip(a.search(q, 40), b.search(q, 40), strict=True)
    )

    def boom(*args, **kw):
        raise RuntimeError("killed mid-build")

    with monkeypatch.context() as m:
        m.setattr(aml_index.Index, "manifest", boom)
        with pytest.raises(RuntimeError, match="killed"):
            run_cli(*build_args(ukbench / "all.txt", tmp_path / "c", "--type", "flat16"), env=env)
    assert not (tmp_path / "c").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".c")]
    assert run_cli(*build_args(ukbench / "all.txt", tmp_path / "c", "--type", "flat16"), env=env)[0] == 0
    c = Index.open(tmp_path / "c")
    assert (tmp_path / "c" / "index-0.faiss").read_bytes() == (tmp_path / "b" / "index-0.faiss").read_bytes()
    assert c.names == b.names


def save_student(path, teacher: dict):
    net = create_model("lite0", role="student", dim=teacher["dim"], random_init=True)
    net.meta["aml"]["teacher"] = teacher
    torch.save({"state_dict": net.state_dict(), "meta": net.meta, "epoch": 1, "config": {}}, path)
    return path


def test_compatibility_check_refuses_and_force_accepts(ukbench, tmp_path, home, run_cli, one_thread):
    env = {"AML_HOME": home}
    assert run_cli(*build_args(ukbench / "all.txt", tmp_path / "db"), env=env)[0] == 0
    good = save_student(tmp_path / "good.pt", model_identity("lite2"))
    bad = save_student(tmp_path / "bad.pt", {"name": "rn101", "weights": "x.pth", "sha256": "ab" * 32, "dim": 1280})
    base = ["search", "--index", tmp_path / "db", "--images", ukbench / "q.txt", "--device", "cpu", "--topk", 3]
    code, out, err = run_cli(*base, "--encoder", good, "--out", tmp_path / "g.jsonl", env=env)
    assert code == 0, err
    assert "top 3 of 40 (flat, cpu)" in out  # no faiss-gpu here: auto searches on the CPU
    code, _, err = run_cli(*base, "--encoder", good, "--search-device", "cuda", "--out", tmp_path / "c.jsonl", env=env)
    assert code == 2 and "--search-device cuda: faiss sees no GPU" in err and not (tmp_path / "c.jsonl").exists()
    code, out, err = run_cli(*base, "--encoder", bad, "--out", tmp_path / "b.jsonl", env=env)
    assert code == 2 and err.startswith("error: encoder") and "rn101" in err and "lite2" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b.jsonl").exists()
    code, out, err = run_cli(*base, "--encoder", bad, "--out", tmp_path / "b.jsonl", "--force", env=env)
    assert code == 0 and "warning: --force" in err and len((tmp_path / "b.jsonl").read_text().splitlines()) == 8
    # another query size than the index's is the asymmetric deployment: allowed, and both sizes are printed
    code, out, err = run_cli(*base, "--encoder", good, "--image-size", 64, "--out", tmp_path / "s.jsonl", env=env)
    assert code == 0 and "queries at 64 px (--image-size), database at 96 px (from the index)" in err


def test_bad_inputs_are_one_line(ukbench, tmp_path, home, run_cli):
    lst = tmp_path / "l.txt"
    lst.write_text(f"{tmp_path / 'missing.jpg'}\n")
    code, _, err = run_cli(*build_args(lst, tmp_path / "db"), env={"AML_HOME": home})
    assert code == 2 and "1 of 1 images are missing" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "index-0.faiss").write_bytes(b"x")
    code, _, err = run_cli("index", "info", tmp_path / "half")
    assert code == 2 and "not a complete aml index" in err


def test_torchrun_two_processes_equal_one(ukbench, tmp_path, home, run_cli, one_thread):
    env = {"AML_HOME": home}
    same = ("--backend", "torch", "--threads", "1")  # one backend and thread count on both sides
    assert run_cli(*build_args(ukbench / "all.txt", tmp_path / "one", *same), env=env)[0] == 0
    p = aml_torchrun(*build_args(ukbench / "all.txt", tmp_path / "two", *same), env={"AML_HOME": home})
    assert p.returncode == 0, p.stderr[-2000:]
    one, two = Index.open(tmp_path / "one"), Index.open(tmp_path / "two")
    assert one.names == two.names
    a, b = (i.faiss_index.reconstruct_n(0, i.faiss_index.ntotal) for i in (one, two))
    # the same vectors up to float16 cache rounding: shards batch their images differently, and a float
    # difference of 1e-7 can round the other way in the float16 cache
    np.testing.assert_allclose(a, b, atol=1e-3)
    q = a[:20]
    assert (one.search(q, 10)[1] == two.search(q, 10)[1]).mean() > 0.95


def test_onnx_encoder_searches_torch_free(ukbench, tmp_path, home, run_cli, one_thread):
    from aml.export import pipeline

    env = {"AML_HOME": home}
    assert run_cli(*build_args(ukbench / "all.txt", tmp_path / "db"), env=env)[0] == 0
    ckpt = save_student(tmp_path / "s.pt", model_identity("lite2"))
    pipeline.export_checkpoint(ckpt, pipeline.ExportSettings(image_size=SIZE), out=tmp_path / "s.onnx")
    code = (
        "import sys\nfrom cli import main\nmain(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported on the search path'\nprint('TORCH-FREE')"
    )
    args = ["search", "--index", tmp_path / "db", "--encoder", tmp_path / "s.onnx", "--images", ukbench / "q.txt",
            "--topk", 5, "--out", tmp_path / "o.jsonl"]  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, AML_HOME=str(home)))  # fmt: skip
    assert p.returncode == 0 and "TORCH-FREE" in p.stdout, p.stderr[-2000:]
    code, _, err = run_cli(*args[:-1], tmp_path / "t.jsonl", "--encoder", ckpt, "--device", "cpu", env=env)
    assert code == 0, err
    onnx_res = [json.loads(ln) for ln in (tmp_path / "o.jsonl").read_text().splitlines()]
    torch_res = [json.loads(ln) for ln in (tmp_path / "t.jsonl").read_text().splitlines()]
    for a, b in zip(onnx_res, torch_res, strict=True):
        assert np.allclose([h["score"] for h in a["results"]], [h["score"] for h in b["results"]], atol=1e-3)


def test_show_frames_hits_with_revisitop_ground_truth(ukbench, tmp_path, home, run_cli, one_thread):
    from PIL import Image

    from aml.data.revisitop import write_revisitop
    from aml.show import gnd_labels, name_ids

    paths = (ukbench / "all.txt").read_text().split()
    root = tmp_path / "data"
    (root / "uk" / "jpg").mkdir(parents=True)
    for p in paths:
        os.symlink(p, root / "uk" / "jpg" / os.path.basename(p))
    names = [os.path.basename(p)[:-4] for p in paths]
    same = [[4 * (i // 4) + j for j in range(4) if 4 * (i // 4) + j != i] for i in range(0, 40, 5)]
    gnd = [{"easy": s[:2], "hard": [], "junk": s[2:]} for s in same]  # the other 3 of each object
    write_revisitop(root, "uk", names, names[0:40:5], gnd)
    assert name_ids(paths[:3], names).tolist() == [0, 1, 2] and name_ids(["x/none.jpg"], names).tolist() == [-1]
    labels = gnd_labels(gnd[:1], np.array([[1, 3, 7, -1]]))
    assert labels == [["positive", "junk", "negative", None]]
    env = {"AML_HOME": home}
    assert run_cli(*build_args(ukbench / "all.txt", tmp_path / "db"), env=env)[0] == 0
    code, out, err = run_cli(
        "search", "--index", tmp_path / "db", "--encoder", "lite2", "--images", ukbench / "q.txt", "--topk", 6,
        "--device", "cpu", "--out", tmp_path / "r.jsonl", "--show", tmp_path / "r.png", "--dataset", "uk",
        "--data-root", root, env=env,
    )  # fmt: skip
    assert code == 0, err
    img = np.asarray(Image.open(tmp_path / "r.png"))
    green = ((img[..., 0] == 0) & (img[..., 1] == 170) & (img[..., 2] == 0)).sum()
    red = ((img[..., 0] == 210) & (img[..., 1] == 0) & (img[..., 2] == 0)).sum()
    assert green > 0 and red > 0


def test_whitened_index_add_and_search(ukbench, tmp_path, home, run_cli, one_thread):
    from aml.whiten import Lw

    rng = np.random.default_rng(0)
    lw = Lw(rng.standard_normal(1280) * 0.01, np.linalg.qr(rng.standard_normal((1280, 1280)))[0][:256], "t", "demo")
    lw.save(tmp_path / "lw.pt")
    env = {"AML_HOME": home}
    w = ["--whiten", tmp_path / "lw.pt"]
    assert run_cli(*build_args(ukbench / "db.txt", tmp_path / "a", *w), env=env)[0] == 0
    code, _, err = run_cli("index", "add", tmp_path / "a", "--images", ukbench / "more.txt", "--device", "cpu",
                           "--workers", "0", "--quiet", env=env)  # fmt: skip
    assert code == 0, err
    assert run_cli(*build_args(ukbench / "all.txt", tmp_path / "b", *w), env=env)[0] == 0
    a, b = Index.open(tmp_path / "a"), Index.open(tmp_path / "b")
    assert a.dim == 256 and a.meta["whitening"] == "demo/ss" and a.lw() is not None
    q = unit(3, 256, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a.search(q, 40), b.search(q, 40), strict=True))
    code, _, err = run_cli("search", "--index", tmp_path / "a", "--encoder", "lite2", "--images", ukbench / "q.txt",
                           "--device", "cpu", "--topk", 3, "--out", tmp_path / "r.jsonl", env=env)  # fmt: skip
    assert code == 0, err
    first = [json.loads(ln)["results"][0]["name"] for ln in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert first == (ukbench / "q.txt").read_text().split()  # whitened on both sides: each query finds itself


def test_info_json_is_a_path_with_dash_for_stdout(tmp_path, run_cli):
    idx = build_index(unit(20, 8, 0), "flat", meta={"teacher": {"name": "t", "dim": 8}})
    idx.save(tmp_path / "db")
    code, out, err = run_cli("index", "info", tmp_path / "db", "--json", "-")
    assert code == 0 and json.loads(out)["count"] == 20, err
    code, out, err = run_cli("index", "info", tmp_path / "db", "--json", tmp_path / "m.json")
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    assert code == 0 and json.loads((tmp_path / "m.json").read_text()) == manifest
    assert "flat index, 20 x 8 vectors" in out
