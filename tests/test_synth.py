"""Synthetic landmarks: deterministic under a seed, disjoint splits, valid SfM pickle and gnd, fast."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aml.data.revisitop import load_revisitop
from aml.data.sfm120k import cid_path, read_sfm
from aml.data.synth import META, SYNTH_PICKLE, SynthConfig, generate_synth
from aml.data.synth_scene import render_landmark, sample_landmark
from aml.data.synth_view import Scene, classify, homography, render_view, sample_view
from aml.errors import UserError

TINY = SynthConfig(
    landmarks=3,
    views=3,
    val_landmarks=1,
    test_landmarks=2,
    queries=2,
    db_views=5,
    distractors=1,
    distractor_views=2,
    size=64,
    seed=5,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    t0 = time.time()
    generate_synth(out, TINY)
    return out, time.time() - t0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_set_is_fast(tiny):
    _, seconds = tiny
    assert seconds < 15, f"tiny synthetic set took {seconds:.1f} s"


def test_deterministic_under_seed(tiny, tmp_path):
    out, _ = tiny
    again = generate_synth(tmp_path / "again", TINY)
    a, b = _files(out), _files(again)
    assert a.keys() == b.keys() and len(a) > 20
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:3]
    other = generate_synth(tmp_path / "other", dataclasses.replace(TINY, seed=6, landmarks=1, val_landmarks=0))
    c = _files(other)
    assert c["synth/jpg/lm000_q0.jpg"] != a["synth/jpg/lm000_q0.jpg"]


def test_layout_and_sfm_pickle(tiny):
    out, _ = tiny
    train, val = read_sfm(out, SYNTH_PICKLE)  # validates keys, pairs, ranges and image presence
    assert len(train) == TINY.landmarks * TINY.views and len(val) == TINY.val_landmarks * TINY.views
    with open(out / SYNTH_PICKLE, "rb") as f:
        db = pickle.load(f)
    assert set(db) == {"train", "val"}
    assert set(db["train"]) == {"cids", "cluster", "qidxs", "pidxs"}
    for cid, path in zip(db["train"]["cids"], train.paths, strict=True):
        assert path == os.path.join(out, "ims", cid[-2:], cid[-4:-2], cid[-6:-4], cid) == cid_path(out, cid)
        assert "." not in os.path.basename(path)
    q, p = train.qidxs, train.pidxs
    assert len(q) > 0 and np.all(q != p) and np.all(train.cluster[q] == train.cluster[p])
    with Image.open(train.paths[0]) as im:
        assert im.format == "JPEG" and max(im.size) == TINY.size


def test_gnd_structure(tiny):
    out, _ = tiny
    ds = load_revisitop(out, "synth")  # validates indices and boxes
    ds.check_images()
    assert len(ds.qimlist) == TINY.test_landmarks * TINY.queries
    assert len(ds.imlist) == TINY.test_landmarks * TINY.db_views + TINY.distractors * TINY.distractor_views
    assert not set(ds.qimlist) & set(ds.imlist)
    for qn, g in zip(ds.qimlist, ds.gnd, strict=True):
        lm = qn.split("_")[0]
        e, h, j = set(g["easy"]), set(g["hard"]), set(g["junk"])
        assert not (e & h or e & j or h & j)
        assert e | h | j == {i for i, n in enumerate(ds.imlist) if n.startswith(lm + "_")}
        assert e | h, f"query {qn} has no positives"
        with Image.open(ds.image_path(qn)) as im:
            w, hh = im.size
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= hh


def test_train_and_test_landmarks_disjoint(tiny):
    out, _ = tiny
    meta = json.loads((out / META).read_text())
    keys = {s: {tuple(k) for k in v} for s, v in meta["landmarks"].items()}
    for a in keys:
        for b in keys:
            assert a == b or not keys[a] & keys[b]
    # and the landmarks themselves differ: no test rendering equals a training one
    px = 48
    train = [render_landmark(sample_landmark(np.random.default_rng([TINY.seed, 0, k, 0])), px) for k in range(3)]
    test = [render_landmark(sample_landmark(np.random.default_rng([TINY.seed, 2, k, 0])), px) for k in range(2)]
    for t in test:
        assert all(np.abs(t.astype(int) - r.astype(int)).mean() > 5 for r in train)


def _scene():
    return Scene.from_rgba(render_landmark(sample_landmark(np.random.default_rng(3)), 96))


def test_homography_frontal_is_a_scaling():
    spec = dataclasses.replace(
        sample_view(np.random.default_rng(0), "easy"), yaw=0.0, pitch=0.0, roll=0.0, scale=0.5, cx=0.5, cy=0.5
    )
    box = (10.0, 20.0, 50.0, 100.0)  # 40 x 80: the longest side maps to 0.5 * 64 = 32 px
    hm = homography(box, spec, 64, 48)
    pts = np.c_[[[10, 20], [50, 100]], [1, 1]] @ hm.T
    xy = pts[:, :2] / pts[:, 2:]
    np.testing.assert_allclose(xy, [[32 - 8, 24 - 16], [32 + 8, 24 + 16]], atol=1e-6)


def test_visibility_measurements():
    sc = _scene()
    base = dataclasses.replace(
        sample_view(np.random.default_rng(1), "query"),
        occluders=0,
        yaw=0.0,
        pitch=0.0,
        roll=0.0,
        scale=0.6,
        cx=0.5,
        cy=0.5,
        harsh=False,
    )
    _, info = render_view(sc, base, 64, np.random.default_rng(0))
    assert info.visible == 1.0 and info.occluded == 0.0 and classify(base, info) == "easy"
    half = dataclasses.replace(base, cx=0.0, aspect=1.0)  # the landmark's centre on the left edge
    _, info = render_view(sc, half, 64, np.random.default_rng(0))
    assert 0.3 < info.visible < 0.7 and classify(half, info) == "hard"
    gone = dataclasses.replace(base, cx=-2.0)
    _, info = render_view(sc, gone, 64, np.random.default_rng(0))
    assert info.visible == 0.0 and classify(gone, info) == "junk"


def test_bad_config_and_existing_out(tmp_path):
    with pytest.raises(UserError, match="views"):
        generate_synth(tmp_path / "a", dataclasses.replace(TINY, views=1))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        generate_synth(tmp_path / "b", TINY)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
