"""Folder datasets: labelled folders, groups CSVs, unlabelled folders, object splits in revisitop layout."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from aml.data.folders import (
    default_split,
    image_names,
    parse_ranges,
    read_groups_csv,
    read_label_folder,
    same_label_pairs,
    split_by_object,
    unlabelled_trainset,
    write_object_split,
)
from aml.data.revisitop import load_revisitop
from aml.errors import UserError


def _img(path, colour=(10, 20, 30), size=(12, 8), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _brute_pairs(cluster):
    return {(i, j) for i, j in itertools.permutations(range(len(cluster)), 2) if cluster[i] == cluster[j]}


def test_same_label_pairs_small_groups_are_all_pairs():
    cluster = np.array([3, 1, 3, 3, 2, 1, 9, 3])
    q, p = same_label_pairs(cluster)
    assert q.dtype == np.int64 and len(q) == len(p)
    assert set(zip(q.tolist(), p.tolist(), strict=True)) == _brute_pairs(cluster.tolist())
    assert len(q) == len(_brute_pairs(cluster.tolist()))  # no duplicates


def test_same_label_pairs_caps_large_groups():
    cluster = np.array([0] * 20 + [1] * 3)
    q, p = same_label_pairs(cluster, max_pos=8)
    pairs = set(zip(q.tolist(), p.tolist(), strict=True))
    assert len(pairs) == len(q) == 20 * 8 + 3 * 2
    assert all(cluster[a] == cluster[b] and a != b for a, b in pairs)
    assert np.bincount(q[q < 20], minlength=20).tolist() == [8] * 20


def test_label_folder(tmp_path):
    for lab, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _img(tmp_path / lab / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    paths, labels = read_label_folder(tmp_path)
    assert labels == ["cat", "cat", "dog", "dog", "dog"]
    assert paths[0] == str(tmp_path / "cat" / "0.png")


def test_label_folder_errors(tmp_path):
    _img(tmp_path / "a.jpg")
    with pytest.raises(UserError, match="images:"):
        read_label_folder(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        read_label_folder(tmp_path / "missing")


def test_unlabelled_folder(tmp_path):
    for i in range(4):
        _img(tmp_path / ("sub" if i % 2 else "") / f"{i}.jpg")
    ts = unlabelled_trainset(tmp_path)
    assert len(ts) == 4 and ts.num_pairs == 0
    assert sorted(ts.cluster.tolist()) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="no images"):
        (tmp_path / "empty").mkdir()
        unlabelled_trainset(tmp_path / "empty")


def test_groups_csv_resolves_beside_and_jpg(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "jpg" / "b.jpg")
    (tmp_path / "g.csv").write_text("image,object\na.jpg,0\nb.jpg,1\n\n")
    paths, objects, splits = read_groups_csv(tmp_path / "g.csv")
    assert paths == [str(tmp_path / "a.jpg"), str(tmp_path / "jpg" / "b.jpg")]
    assert objects == ["0", "1"] and splits is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("img,obj\na.jpg,0\n", "lacks 'image' and 'object'"),
        ("image,object\na.jpg,\n", "line 2"),
        ("image,object,split\na.jpg,0,dev\n", "split = 'dev'"),
        ("image,object\n", "no rows"),
    ],
)
def test_groups_csv_errors(tmp_path, text, match):
    (tmp_path / "g.csv").write_text(text)
    with pytest.raises(UserError, match=match):
        read_groups_csv(tmp_path / "g.csv")


def test_parse_ranges_and_default_split():
    assert parse_ranges("0-3,7,9-10").tolist() == [0, 1, 2, 3, 7, 9, 10]
    with pytest.raises(UserError, match="0-149"):
        parse_ranges("a-b")
    with pytest.raises(UserError, match="ends before"):
        parse_ranges("5-2")
    tr, te = default_split(np.repeat(np.arange(250), 4))
    assert tr.tolist() == list(range(150)) and te.tolist() == list(range(150, 250))
    tr, te = default_split(np.array([5, 1, 3, 3, 9]))
    assert tr.tolist() == [1, 3] and te.tolist() == [5, 9]


def test_split_by_object_sources():
    paths = [f"/x/{i}.jpg" for i in range(12)]
    labels = [str(i // 2) for i in range(12)]  # 6 objects
    train, tp, tk = split_by_object(paths, labels, "t")
    assert sorted(set(train.cluster.tolist())) == [0, 1, 2, 3] and tk.tolist() == [4, 4, 5, 5]
    train, tp, tk = split_by_object(paths, labels, "t", train_objects=np.array([0, 5]))
    assert sorted(set(train.cluster.tolist())) == [0, 5] and sorted(set(tk.tolist())) == [1, 2, 3, 4]
    splits = ["test" if i // 2 == 1 else "train" for i in range(12)]
    train, tp, tk = split_by_object(paths, labels, "t", splits=splits)
    assert tp == ["/x/2.jpg", "/x/3.jpg"]
    with pytest.raises(UserError, match="both"):
        split_by_object(paths, labels, "t", train_objects=np.array([0, 1]), test_objects=np.array([1]))
    shared = ["test" if i == 2 else "train" for i in range(12)]  # the user's split, labels shared (class-level)
    train, tp, tk = split_by_object(paths, labels, "t", splits=shared)
    assert tp == ["/x/2.jpg"] and len(train) == 11 and tk[0] in train.cluster


def test_image_names_unique():
    assert image_names(["/a/x.jpg", "/a/y.png"]) == ["x", "y"]
    assert image_names(["/d/a/x.jpg", "/d/b/x.jpg"]) == ["a__x", "b__x"]


def test_write_object_split_gnd(tmp_path):
    src = tmp_path / "src"
    rows = ["image,object"]
    for obj in range(5):
        for k in range(3):
            _img(src / f"o{obj}_{k}.jpg", size=(16 + k, 10))
            rows.append(f"o{obj}_{k}.jpg,{obj}")
    (src / "groups.csv").write_text("\n".join(rows) + "\n")
    paths, labels, splits = read_groups_csv(src / "groups.csv")
    train, ref, csv_path = write_object_split(paths, labels, tmp_path / "data", "tiny", test_objects=np.array([3, 4]))
    assert sorted(set(train.cluster.tolist())) == [0, 1, 2] and train.num_pairs == 3 * 6
    ds = load_revisitop(ref.data_root, ref.dataset_name)
    ds.check_images()
    assert ds.imlist == ds.qimlist == [f"o{o}_{k}" for o in (3, 4) for k in range(3)]
    for i, g in enumerate(ds.gnd):
        same = [j for j, n in enumerate(ds.imlist) if n[:2] == ds.imlist[i][:2]]
        assert sorted(g["easy"]) == [j for j in same if j != i]
        assert g["hard"] == [] and g["junk"] == [i]
        assert tuple(g["bbx"]) == (0.0, 0.0, 16.0 + int(ds.imlist[i][-1]), 10.0)
    assert os.path.islink(os.path.join(ds.root, "jpg", "o3_0.jpg"))
    # the written CSV reproduces the split
    p2, l2, s2 = read_groups_csv(csv_path)
    assert s2.count("test") == 6 and s2.count("train") == 9
    assert {os.path.realpath(p) for p, s in zip(p2, s2, strict=True) if s == "train"} == {
        os.path.realpath(p) for p in train.paths
    }


def test_ukbench_split_on_real_groups(tmp_path):
    csv_path = shared_path("ukbench", "groups.csv")
    paths, labels, splits = read_groups_csv(csv_path)
    assert len(paths) == 1000 and all(os.path.isfile(p) for p in paths[:8])
    train, ref, _ = write_object_split(
        paths,
        labels,
        tmp_path,
        "ukbench",
        train_objects=parse_ranges("0-149"),
        test_objects=parse_ranges("150-249"),
    )
    assert len(train) == 600 and train.num_clusters == 150 and train.cluster.max() == 149
    ds = load_revisitop(tmp_path, "ukbench")
    assert len(ds.imlist) == 400 and ds.imlist[0] == "ukbench00600" and ds.qimlist == ds.imlist
    for i in (0, 1, 203, 399):
        num = int(ds.imlist[i][-5:])
        expect = sorted(j for j, n in enumerate(ds.imlist) if int(n[-5:]) // 4 == num // 4 and j != i)
        assert sorted(ds.gnd[i]["easy"]) == expect and len(expect) == 3
        assert ds.gnd[i]["junk"] == [i]


def test_data_lists_follow_evaluate_order(tmp_path, run_cli):
    """`aml data lists SPEC --out DIR`: the database and query lists (and query boxes) in the order `aml evaluate`
    scores them, readable by `--images` / `--bbx`; from a folder and from the revisitop set it was written to."""
    from aml.commands._options import read_images
    from aml.data.revisitop import load_revisitop

    for lab, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _img(tmp_path / "photos" / lab / f"{i}.png", colour=(40 * i, 80, 20))
    env = {"AML_HOME": tmp_path / "home"}
    code, out, err = run_cli("data", "lists", f"folder:{tmp_path / 'photos'}", "--out", tmp_path / "l", env=env)
    assert code == 0, err
    name, root = out.split("--dataset ")[1].split("`")[0].split(" --data-root ")
    ds = load_revisitop(root, name)
    db, _ = read_images(str(tmp_path / "l" / "db.txt"), None)
    queries, boxes = read_images(str(tmp_path / "l" / "queries.txt"), str(tmp_path / "l" / "queries.bbx"))
    assert db == ds.db_paths() and queries == ds.query_paths() and len(db) == 5
    assert boxes == [tuple(float(v) for v in b) for b in ds.bbxs]
    code, out2, err = run_cli("data", "lists", f"revisitop:{root}/{name}", "--out", tmp_path / "r", env=env)
    assert code == 0, err
    assert all((tmp_path / "r" / f).read_text() == (tmp_path / "l" / f).read_text() for f in ("db.txt", "queries.bbx"))
    code, _, err = run_cli("data", "lists", f"revisitop:{tmp_path}/nothing", "--out", tmp_path / "x", env=env)
    assert code == 2 and "gnd_nothing.pkl: not found" in err and len(err.strip().splitlines()) == 1
