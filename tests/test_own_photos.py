"""The first hour with your own photos (docs/OWN_PHOTOS.md), end to end through the real command line: folders of
real landmark photos -> `aml distill` -> `aml evaluate` -> `aml export` -> `aml data lists` + `aml index build` ->
`aml search`, at one image size that every artefact records, with no list or CSV written by hand."""

from __future__ import annotations

import json
import os

import pytest
from conftest import shared_path

SIZE = 128  # tiny: the walk, not the scores, is under test
TRAIN_PER_LANDMARK, TEST_PER_LANDMARK = 8, 4


def _photo_folders(tmp_path, landmarks):
    """The user's photos as folders, one per landmark: the first few real photos of each (linked, not copied)."""
    out = tmp_path / "photos"
    for split, n in (("train", TRAIN_PER_LANDMARK), ("test", TEST_PER_LANDMARK)):
        for src in sorted((landmarks / f"vn5-{split}").iterdir()):
            dst = out / split / src.name
            dst.mkdir(parents=True)
            for photo in sorted(src.iterdir())[:n]:
                os.symlink(photo, dst / photo.name)
    return out / "train", out / "test"


def _ok(run_cli, *args, env):
    code, out, err = run_cli(*args, env=env)
    assert code == 0, f"aml {args[0]}: exit {code}\n{err}"
    return out, err


def test_own_photos_walk(tmp_path, run_cli, one_thread):
    landmarks = shared_path("real", "landmarks")
    train, test = _photo_folders(tmp_path, landmarks)
    env = {"AML_HOME": tmp_path / "home"}
    run, lists = tmp_path / "run", tmp_path / "lists"
    threads = ("--threads", "1")

    # 1. distill the recipe for real photos on the train folders, its test set the test folders
    out, _ = _ok(
        run_cli, "distill", "--preset", "real", "--data", f"folder:{train}", "--test-data", f"folder:{test}",
        "--image-size", SIZE, "--epochs", 1, "--query-size", 16, "--out", run, "--quiet", *threads, env=env,
    )  # fmt: skip
    ckpt = run / "last.pt"
    hint = out.strip().splitlines()[-1].split("aml evaluate models ")[1].split()  # the printed next step
    dataset = dict(zip(hint[::2], hint[1::2], strict=True))

    # 2. evaluate: the sizes come from the checkpoint; the exported encoder (step 3) scores the same
    evaluate = ("evaluate", "models", "--teacher", "lite2", "--dataset", dataset["--dataset"], "--data-root",
                dataset["--data-root"], "--row", "asymmetric", "--quiet", *threads)  # fmt: skip
    _, err = _ok(run_cli, *evaluate, "--student", ckpt, "--json", tmp_path / "ckpt.json", env=env)
    assert f"queries at {SIZE} px (from the checkpoint), database at {SIZE} px (as the queries)" in err
    scores = json.loads((tmp_path / "ckpt.json").read_text())
    assert scores["settings"]["image size"] == SIZE

    # 3. export the query encoder: at the checkpoint's size, recorded in its sidecar
    encoder = run / "encoder.onnx"
    _ok(run_cli, "export", "--checkpoint", ckpt, "--out", encoder, "--quiet", *threads, env=env)
    assert json.loads(encoder.with_name("encoder.onnx.json").read_text())["image_size"] == SIZE
    _, err = _ok(run_cli, *evaluate, "--student", encoder, "--json", tmp_path / "onnx.json", env=env)
    assert f"queries at {SIZE} px (from its sidecar)" in err
    exported = json.loads((tmp_path / "onnx.json").read_text())
    assert exported["asymmetric"]["mAP"]["M"] == pytest.approx(scores["asymmetric"]["mAP"]["M"], abs=0.5)

    # 4. the test photos as lists, in the evaluation's order, and the teacher's index of them at the same size
    _ok(run_cli, "data", "lists", f"folder:{test}", "--out", lists, env=env)
    db_paths = (lists / "db.txt").read_text().splitlines()
    _ok(run_cli, "index", "build", "--teacher", "lite2", "--images", lists / "db.txt", "--image-size", SIZE,
        "--out", tmp_path / "index", "--quiet", *threads, env=env)  # fmt: skip
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["image_size"] == SIZE

    # 5. search it with the exported encoder: both sizes printed, one result line per query
    _, err = _ok(
        run_cli, "search", "--index", tmp_path / "index", "--encoder", encoder, "--images", lists / "queries.txt",
        "--bbx", lists / "queries.bbx", "--topk", 5, "--out", tmp_path / "hits.jsonl", *threads, env=env,
    )  # fmt: skip
    assert f"queries at {SIZE} px (from its sidecar), database at {SIZE} px (from the index)" in err
    rows = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
    queries = (lists / "queries.txt").read_text().splitlines()
    assert [r["query"] for r in rows] == queries and len(rows) == 5 * TEST_PER_LANDMARK
    assert all(len(r["results"]) == 5 and {h["name"] for h in r["results"]} <= set(db_paths) for r in rows)
    # the landmark of a photo is its folder; the hits other than the photo itself are mostly of its landmark
    label = {p: os.path.realpath(p).split(os.sep)[-2] for p in db_paths}
    same = [label[h["name"]] == label[r["query"]] for r in rows for h in r["results"] if h["name"] != r["query"]]
    assert sum(same) / len(same) > 0.3  # chance: 3 of the 19 other photos (0.16); this run: 0.49
