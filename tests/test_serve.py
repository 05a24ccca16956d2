"""`aml serve` (a real uvicorn process on a loopback port, queried over HTTP), `aml keys`, `aml index push` into
a real Milvus Lite file and `aml search --milvus`, the page in a real headless browser."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from aml.errors import UserError
from aml.index import Index, build_index
from aml.serve.keys import KeyRing, new_key
from aml.serve.spawn import serve_process

IDENTITY = {"name": "t", "weights": "random-init", "sha256": None, "dim": 32}


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    reason = r.json()["error"]
    assert reason and "\n" not in reason
    return reason


@pytest.fixture(scope="module")
def vec_db(tmp_path_factory):
    """A 200 x 32 flat index whose names are small image files under root/ (and one file of root that is not
    in the index)."""
    d = tmp_path_factory.mktemp("vec")
    root = d / "root" / "imgs"
    root.mkdir(parents=True)
    names = []
    for i in range(200):
        p = root / f"{i:03d}.png"
        if i < 3:
            Image.new("RGB", (8, 8), (i, 0, 0)).save(p)
        names.append(str(p))
    (root / "other.png").write_bytes(b"not in the index")
    (d / "secret.txt").write_text("outside the root")
    meta = {"teacher": IDENTITY, "image_size": 64, "whitening": None}
    build_index(unit(200, 32, 0), "flat", names, meta=meta).save(d / "db")
    return d


def test_keys_hash_only_and_check(tmp_path, run_cli):
    f = tmp_path / "keys"
    code, out, err = run_cli("keys", "new", f, "--label", "phone app")
    assert code == 0, err
    key = out.strip()
    assert key.startswith("aml_") and key not in f.read_text() and key.split("_", 2)[2] not in f.read_text()
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    other = new_key(f)
    ring = KeyRing(f)
    assert ring.check(f"Bearer {key}") == "" and ring.check(f"bearer {other}") == ""
    assert ring.check(f"Bearer {key}") == ""  # verified once, remembered
    assert ring.check(None).startswith("missing API key") and ring.check(f"Basic {key}").startswith("missing")
    assert ring.check(f"Bearer {key[:-1]}x") == "invalid API key" and ring.check("Bearer aml_00_x") == "invalid API key"
    code, out, _ = run_cli("keys", "list", f)
    assert code == 0 and "phone app" in out and len(out.splitlines()) == 2
    f.write_text("".join(ln + "\n" for ln in f.read_text().splitlines() if not ln.startswith(key.split("_")[1])))
    assert ring.check(f"Bearer {key}") == "invalid API key" and ring.check(f"Bearer {other}") == ""  # revoked
    f.write_text("garbage line\n")
    with pytest.raises(UserError, match="line 1: not a key record"):
        KeyRing(f)


def test_search_refusals_keys_and_limits_over_http(vec_db, tmp_path):
    keys = tmp_path / "keys"
    key = new_key(keys)
    db = Index.open(vec_db / "db")
    q = unit(3, 32, 1)
    want_s, want_i = db.search(q, 10)
    auth = {"Authorization": f"Bearer {key}"}
    args = ["--index", vec_db / "db", "--keys", keys, "--max-body", 20000, "--max-k", 50]
    with serve_process(args, log=str(tmp_path / "serve.log")) as (url, _), httpx.Client(base_url=url) as c:
        assert c.get("/healthz").json()["status"] == "ok"  # open without a key
        one_line_error(c.get("/info"), 401)
        body = {"vectors": q.tolist(), "k": 10, "encoder": {"teacher": IDENTITY, "image_size": 64, "whiten": None}}
        one_line_error(c.post("/search", json=body), 401)
        one_line_error(c.post("/search", json=body, headers={"Authorization": "Bearer aml_1234abcd_nope"}), 401)
        info = c.get("/info", headers=auth).json()
        assert info["count"] == 200 and info["dim"] == 32 and info["generation"] == 0
        assert info["identity"]["name"] == "t" and "compatible" in info

        res = c.post("/search", json=body, headers=auth).json()["results"]
        assert [[db.names.index(h["name"]) for h in row] for row in res] == want_i.tolist()
        assert np.allclose([[h["score"] for h in row] for row in res], want_s, atol=1e-5)
        raw_headers = {**auth, "Content-Type": "application/octet-stream", "X-AML-Encoder": json.dumps(body["encoder"])}
        raw = c.post("/search?k=10&dim=32", content=q.astype("<f4").tobytes(), headers=raw_headers)
        assert raw.json()["results"] == res

        def bad(status, **changes):
            text = json.dumps({**body, **changes})  # NaN allowed: what a careless client may send
            r = c.post("/search", content=text, headers={**auth, "Content-Type": "application/json"})
            return one_line_error(r, status)

        assert "32-d" in bad(400, vectors=unit(1, 16, 2).tolist())  # wrong dimension
        assert "differ: name" in bad(409, encoder={**body["encoder"], "teacher": {**IDENTITY, "name": "u"}})
        assert "differ: image_size" in bad(409, encoder={**body["encoder"], "image_size": 32})
        assert "between 1 and 50" in bad(400, k=51)
        bad(400, vectors=[[1.0, 2.0], [3.0]])
        bad(400, encoder=None)
        assert "NaN" in bad(400, vectors=[[float("nan")] * 32])
        r = c.post("/search", content=b"x" * 30000, headers={**auth, "Content-Type": "application/json"})
        assert "at most 20000" in one_line_error(r, 413)  # oversized body
        r = c.post("/search?k=5", content=b"\0" * 12, headers=raw_headers)
        assert "whole number of 32-d" in one_line_error(r, 400)
        one_line_error(c.post("/search", content=b"{}", headers={**auth, "Content-Type": "text/plain"}), 415)

        img = c.get("/images/001.png", headers=auth)
        assert img.status_code == 200 and img.content == (vec_db / "root" / "imgs" / "001.png").read_bytes()
        one_line_error(c.get("/images/001.png"), 401)
        assert "outside the image root" in one_line_error(c.get("/images/..%2F..%2Fsecret.txt", headers=auth), 403)
        one_line_error(c.get("/images/%2Fetc%2Fpasswd", headers=auth), 403)
        assert "not an image of this index" in one_line_error(c.get("/images/other.png", headers=auth), 404)
        assert c.post("/search", json=body, headers=auth).json()["results"] == res  # still serving


# ------------------------------------------------------------------------------------------ real teacher, ONNX
SIZE = 48


def photos(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n small seeded photos (48 x 40 JPEGs: a colour gradient and noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        base = rng.integers(0, 255, (1, 1, 3)) * np.linspace(0.3, 1, 48)[None, :, None]
        img = np.clip(base + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        out.append(str(folder / f"{i:02d}.jpg"))
        Image.fromarray(img).save(out[-1])
    return out


def aml(*args: object, env: dict) -> subprocess.CompletedProcess:
    """`aml ARGS` as a child process (the service's own processes are children too)."""
    from aml.serve.spawn import CLI

    return subprocess.run([sys.executable, str(CLI), *map(str, args)], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """An `aml index build` of lite2 over 24 small photos (6 more to add), and a student (a random lite0 recording
    lite2 as its teacher) exported to ONNX with its sidecar."""
    from aml.export import pipeline
    from aml.registry import create_model, model_identity

    d = tmp_path_factory.mktemp("real")
    images = photos(d / "photos", 30)
    (d / "db.txt").write_text("".join(f"{p}\n" for p in images[:24]))
    (d / "more.txt").write_text("".join(f"{p}\n" for p in images[24:]))
    env = {**os.environ, "AML_HOME": str(d / "home"), "OMP_NUM_THREADS": "1", "AML_THREADS": "1"}
    p = aml("index", "build", "--teacher", "lite2", "--images", d / "db.txt", "--image-size", SIZE, "--device", "cpu",
            "--workers", "0", "--out", d / "db", "--quiet", env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    net = create_model("lite0", role="student", dim=1280, random_init=True)
    net.meta["aml"]["teacher"] = model_identity("lite2")
    torch.save({"state_dict": net.state_dict(), "meta": net.meta, "epoch": 1, "config": {}}, d / "s.pt")
    pipeline.export_checkpoint(d / "s.pt", pipeline.ExportSettings(image_size=SIZE), out=d / "s.onnx")
    return d, env


def test_asymmetric_path_end_to_end(real, tmp_path):
    """The phone's side (the exported student embeds a photo, the vector goes to POST /search with the sidecar's
    identity) answers the same top-10 as `aml search` with that student on the same index."""
    from aml.onnx_embed import OnnxEncoder

    d, env = real
    query = photos(tmp_path / "q", 1, seed=7)[0]
    (tmp_path / "q.txt").write_text(query + "\n")
    p = aml("search", "--index", d / "db", "--encoder", d / "s.onnx", "--images", tmp_path / "q.txt", "--topk", 10,
            "--out", tmp_path / "r.jsonl", env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    want = json.loads((tmp_path / "r.jsonl").read_text())["results"]
    enc = OnnxEncoder(d / "s.onnx")  # the phone: the export and its sidecar, no torch
    v = enc.embed([query])
    sidecar = {k: enc.info[k] for k in ("teacher", "image_size", "whiten")}
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(Path(query).read_bytes()[:300])
    big = tmp_path / "big.png"
    Image.new("RGB", (400, 300), (9, 9, 9)).save(big)  # 120000 pixels, a few hundred bytes
    with serve_process(["--index", d / "db", "--encoder", d / "s.onnx", "--max-pixels", 100_000], env=env) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            got = c.post("/search", json={"vectors": v.tolist(), "k": 10, "encoder": sidecar}).json()["results"][0]
            assert [h["name"] for h in got] == [h["name"] for h in want]
            assert np.allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-4)
            with open(query, "rb") as f:
                up = c.post("/search/image", files={"image": f}, data={"k": "10", "encoder": "s.onnx"}).json()
            assert [h["name"] for h in up["results"][0]] == [h["name"] for h in want]
            other = {**sidecar, "teacher": {**sidecar["teacher"], "sha256": "ab" * 32}}
            r = c.post("/search", json={"vectors": v.tolist(), "k": 10, "encoder": other})
            assert "differ: sha256" in one_line_error(r, 409)  # distilled for another teacher
            with open(corrupt, "rb") as f:
                r = c.post("/search/image", files={"image": f}, data={"encoder": "s.onnx"})
            assert "not a readable image" in one_line_error(r, 400)
            with open(big, "rb") as f:
                r = c.post("/search/image", files={"image": f}, data={"encoder": "s.onnx"})
            assert "400 x 300 pixels; at most 100000" in one_line_error(r, 413)
            r = c.post("/search/image", files={"image": ("x.jpg", b"")}, data={"encoder": "nope"})
            one_line_error(r, 400)
            assert c.post("/search", json={"vectors": v.tolist(), "k": 10, "encoder": sidecar}).status_code == 200


def test_generation_switch_while_index_add_runs(real, tmp_path):
    """Clients searching throughout an `aml index add` all get answers; the service moves to the new generation."""
    d, env = real
    shutil.copytree(d / "db", tmp_path / "db")
    body = {"vectors": unit(2, 1280, 3).tolist(), "k": 40, "encoder": _lite2()}
    seen, failures, stop = [[], [], []], [], threading.Event()

    def client(url: str, mine: list) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/search", json=body)
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                res = r.json()
                mine.append((res["generation"], len(res["results"][0])))
                time.sleep(0.02)  # leave the 2 cores to the add and the server

    with serve_process(["--index", tmp_path / "db", "--poll", 0.05], env=env) as (url, _):
        threads = [threading.Thread(target=client, args=(url, mine)) for mine in seen]
        for t in threads:
            t.start()
        try:
            p = aml("index", "add", tmp_path / "db", "--images", d / "more.txt", "--device", "cpu", "--workers", 0,
                    "--quiet", env=env)  # fmt: skip
            assert p.returncode == 0, p.stderr[-2000:]
            deadline = time.monotonic() + 30
            while not all(mine and mine[-1][0] == 1 for mine in seen) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
        info = httpx.get(f"{url}/info").json()
    assert failures == [] and info["generation"] == 1 and info["count"] == 30
    answers = [a for mine in seen for a in mine]
    assert {g for g, _ in answers} == {0, 1} and all(n == (24 if g == 0 else 30) for g, n in answers)  # whole
    assert all([g for g, _ in mine] == sorted(g for g, _ in mine) for mine in seen)  # never back to generation 0


def _lite2() -> dict:
    from aml.registry import model_identity

    return {**model_identity("lite2"), "image_size": SIZE, "whitening": None}


# ------------------------------------------------------------------------------------------ Milvus Lite
def test_milvus_push_resumes_and_agrees_with_faiss(tmp_path, monkeypatch):
    from aml import milvus

    pytest.importorskip("pymilvus")
    db, uri = tmp_path / "db", str(tmp_path / "m.db")
    x = unit(3000, 32, 4)
    x[100:110] = x[50]  # exact ties
    build_index(x, "flat", [f"/img/{i}.jpg" for i in range(3000)], meta={"teacher": IDENTITY}).save(db)
    real_put = milvus._put_meta

    def killed_after_first_batch(c, coll, rows):
        real_put(c, coll, rows)
        raise RuntimeError("killed mid-push")

    with monkeypatch.context() as m:
        m.setattr(milvus, "_put_meta", killed_after_first_batch)
        with pytest.raises(RuntimeError, match="killed"):
            milvus.push(db, uri, batch=1000)
    with pytest.raises(UserError, match="no complete push"):
        milvus.MilvusIndex(uri)
    assert milvus.push(db, uri, batch=1000) == (2000, 3000)  # resumed after the first batch
    assert milvus.push(db, uri, batch=1000) == (0, 3000)  # idempotent
    faiss_db, mil = Index.open(db), milvus.MilvusIndex(uri)
    assert mil.names == faiss_db.names and mil.meta["teacher"] == IDENTITY
    q = np.concatenate([unit(7, 32, 5), x[50:51]])
    (fs, fi), (ms, mi) = faiss_db.search(q, 100), mil.search(q, 100)
    np.testing.assert_allclose(ms, fs, atol=1e-5)
    assert (mi == fi).all() or all(  # identical up to ties: equal scores may swap
        set(fi[r][np.isclose(fs[r], s)]) >= {i} for r in range(len(q)) for s, i in zip(ms[r], mi[r], strict=True)
    )
    assert set(mi[-1][:11]) == set(fi[-1][:11]) == {50, *range(100, 110)}
    with pytest.raises(UserError, match="differ: name"):
        other = tmp_path / "other"
        build_index(x, "flat", meta={"teacher": {**IDENTITY, "name": "u"}}).save(other)
        milvus.push(other, uri)
    # a later generation pushes only its new rows, and searches see it whole
    grown = Index.open(db)
    grown.add(unit(500, 32, 6), [f"/img/new{i}.jpg" for i in range(500)])
    grown.save()
    assert milvus.push(db, uri, batch=1000) == (500, 3500)
    again = milvus.MilvusIndex(uri)
    assert len(again) == 3500 and again.generation == 1
    assert (again.search(q, 20)[1] == Index.open(db).search(q, 20)[1]).mean() > 0.95
    hnsw = tmp_path / "h.db"
    milvus.push(db, str(hnsw), kind="hnsw", params=milvus.index_params("hnsw", None, None, None))
    recall = (milvus.MilvusIndex(str(hnsw)).search(q, 10)[1][:, 0] == Index.open(db).search(q, 10)[1][:, 0]).mean()
    assert recall >= 0.85


def test_serve_and_search_from_milvus(real, tmp_path, run_cli):
    """`aml index push`, then `aml search --milvus` and `aml serve --milvus` answer as the faiss index does (each a
    child process: a Milvus Lite file is opened by one process at a time)."""
    pytest.importorskip("pymilvus")
    d, env = real
    uri = tmp_path / "m.db"
    p = aml("index", "push", d / "db", "--to", "milvus", uri, env=env)
    assert p.returncode == 0 and "+24 rows, 24 in all (FLAT)" in p.stdout, p.stderr[-2000:]
    args = ["--encoder", d / "s.onnx", "--images", d / "more.txt", "--topk", 10]
    for where, out_file in ((["--index", d / "db"], "f.jsonl"), (["--milvus", uri], "m.jsonl")):
        p = aml("search", *where, *args, "--out", tmp_path / out_file, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
    f, m = ([json.loads(ln) for ln in (tmp_path / n).read_text().splitlines()] for n in ("f.jsonl", "m.jsonl"))
    assert [[h["name"] for h in r["results"]] for r in f] == [[h["name"] for h in r["results"]] for r in m]
    code, _, err = run_cli("search", "--index", d / "db", "--milvus", uri, *args, "--out", tmp_path / "x.jsonl")
    assert code == 2 and "one of them" in err
    body = {"vectors": unit(2, 1280, 8).tolist(), "k": 10, "encoder": _lite2()}
    want = Index.open(d / "db").search(np.array(body["vectors"], np.float32), 10)[1]
    with (
        serve_process(["--milvus", uri], env=env, log=str(tmp_path / "serve.log")) as (url, _),
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        assert c.get("/info").json()["backend"] == "milvus"
        res = c.post("/search", json=body).json()["results"]
        names = Index.open(d / "db").names
        assert [[names.index(h["name"]) for h in row] for row in res] == want.tolist()
        one_line_error(c.post("/search", json={**body, "vectors": [[0.1] * 64]}), 400)


# ------------------------------------------------------------------------------------------ the page, in a browser
def browser() -> str:
    """A headless-capable chromium on this machine, or a skip saying how to get one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium on this machine (Debian: apt-get install chromium): the page's browser test skips")


def test_page_loads_in_a_headless_browser(vec_db, tmp_path):
    chrome = browser()
    keys = tmp_path / "keys"
    new_key(keys)
    with serve_process(["--index", vec_db / "db"]) as (url, _):
        dom = subprocess.run(
            [chrome, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom", f"{url}/"],
            capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        assert 'id="photo"' in dom and "200 images, t (weights random-init, 32-d" in dom  # the page's script ran
        assert "this server has no --encoder" in dom
    with serve_process(["--index", vec_db / "db", "--keys", keys]) as (url, _):
        dom = subprocess.run(
            [chrome, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile2'}",
             "--virtual-time-budget=5000", "--dump-dom", f"{url}/"],
            capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        assert 'id="photo"' in dom and "401: missing API key" in dom  # the page opens; the data needs the key


class Chrome:
    """Headless chromium driven over its DevTools pipe (--remote-debugging-pipe: JSON messages ending in NUL on
    fds 3 and 4), attached to its one page."""

    def __init__(self, chrome: str, url: str, profile: Path) -> None:
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()
        args = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                url]  # fmt: skip
        to_fds = f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'  # the pipe ends on fds 3 and 4
        self.proc = subprocess.Popen(["bash", "-c", to_fds, chrome, *args], pass_fds=(to_r, from_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_r)
        os.close(from_w)
        self._id, self._buf, self.session = 0, b"", None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def send(self, method: str, **params: object) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                ready, _, _ = select.select([self._r], [], [], 60)
                assert ready and self.proc.poll() is None, f"chromium stopped answering ({method})"
                self._buf += os.read(self._r, 1 << 16)
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expr: str) -> object:
        return self.send("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def wait_for(self, expr: str, timeout: float = 60) -> object:
        deadline = time.monotonic() + timeout
        while not (value := self.js(expr)):
            assert time.monotonic() < deadline, f"the page never satisfied {expr}"
            time.sleep(0.2)
        return value

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def test_page_picks_a_photo_and_shows_thumbnails(real, tmp_path):
    """In a real browser: the key typed in, a photo picked, Search: the top hits appear as image thumbnails
    (fetched from /images with the key) with their scores."""
    chrome = browser()
    d, env = real
    keys = tmp_path / "keys"
    key = new_key(keys)
    photo = Path((d / "db.txt").read_text().split()[5])
    args = ["--index", d / "db", "--encoder", d / "s.onnx", "--encoder", "lite2", "--keys", keys]  # lite2 first
    with serve_process(args, env=env) as (url, _):
        b = Chrome(chrome, f"{url}/", tmp_path / "profile")
        try:
            b.wait_for("document.readyState === 'complete' && document.getElementById('error').textContent")
            b.js(f"document.getElementById('key').value = {json.dumps(key)}; loadInfo()")
            assert "24 images, lite2" in b.wait_for("document.getElementById('info').textContent.includes('images')"
                                                    " && document.getElementById('info').textContent")  # fmt: skip
            root = b.send("DOM.getDocument")["root"]["nodeId"]
            node = b.send("DOM.querySelector", nodeId=root, selector="#photo")["nodeId"]
            b.send("DOM.setFileInputFiles", nodeId=node, files=[str(photo)])
            b.js("document.getElementById('k').value = 5; document.getElementById('form').requestSubmit()")
            shown = b.wait_for(
                "[...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth > 0)"
                " && document.querySelectorAll('#hits img').length === 5"
                " && [...document.querySelectorAll('#hits figcaption')].map(c => c.textContent)"
            )
        finally:
            b.close()
    assert len(shown) == 5 and all(float(c.split()[0]) <= float(shown[0].split()[0]) + 1e-6 for c in shown)
    assert shown[0].endswith(photo.name)  # a database photo finds itself first
