"""The revisitop-layout loader on the real ground truth, the writer, and its validation messages."""

from __future__ import annotations

import pickle

import pytest
from conftest import shared_path

from aml.data.images import read_image_list
from aml.data.revisitop import load_revisitop, write_revisitop
from aml.errors import UserError


@pytest.mark.parametrize("name,n_db", [("roxford5k", 4993), ("rparis6k", 6322)])
def test_real_ground_truth(tmp_path, name, n_db):
    src = shared_path("revisitop", f"gnd_{name}.pkl")
    with open(src, "rb") as f:
        raw = pickle.load(f)
    # the shared folder holds the pickles flat; the layout is DIR/NAME/gnd_NAME.pkl
    (tmp_path / name).mkdir()
    (tmp_path / name / src.name).symlink_to(src)
    ds = load_revisitop(tmp_path, name)
    assert len(ds.imlist) == n_db and len(ds.qimlist) == 70 and len(ds.gnd) == 70
    assert ds.imlist == raw["imlist"] and ds.qimlist == raw["qimlist"]
    for g, r in zip(ds.gnd, raw["gnd"], strict=True):
        assert g["easy"] == list(r["easy"]) and g["hard"] == list(r["hard"]) and g["junk"] == list(r["junk"])
        assert g["bbx"] == tuple(float(v) for v in r["bbx"])
    assert all(len(b) == 4 and b[2] > b[0] and b[3] > b[1] for b in ds.bbxs)
    assert ds.db_paths()[0].endswith(f"{name}/jpg/{raw['imlist'][0]}.jpg")
    assert ds.query_paths()[5].endswith(f"{name}/jpg/{raw['qimlist'][5]}.jpg")


def tiny_gnd():
    return (
        ["a", "b", "c", "d"],
        ["q0", "q1"],
        [
            {"bbx": [0, 0, 10, 20], "easy": [0], "hard": [1], "junk": [2]},
            {"bbx": [1.5, 2, 3, 4], "easy": [3], "hard": [], "junk": []},
        ],
    )


def test_write_then_load_round_trip(tmp_path):
    path = write_revisitop(tmp_path, "tiny", *tiny_gnd())
    assert path == tmp_path / "tiny" / "gnd_tiny.pkl" and (tmp_path / "tiny" / "jpg").is_dir()
    assert sorted(p.name for p in path.parent.iterdir()) == ["gnd_tiny.pkl", "jpg"]  # no temp file left
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert raw["gnd"][1] == {"bbx": [1.5, 2.0, 3.0, 4.0], "easy": [3], "hard": [], "junk": []}
    ds = load_revisitop(tmp_path, "tiny")
    assert ds.bbxs == [(0.0, 0.0, 10.0, 20.0), (1.5, 2.0, 3.0, 4.0)]
    assert ds.gnd[0]["hard"] == [1]


def write_raw(tmp_path, obj, name="bad"):
    (tmp_path / name).mkdir(exist_ok=True)
    with open(tmp_path / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(obj, f)


def raw_gnd(**changes):
    imlist, qimlist, gnd = tiny_gnd()
    obj = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    obj.update(changes)
    return obj


@pytest.mark.parametrize(
    "obj,match",
    [
        ({"imlist": ["a"], "gnd": []}, "missing key 'qimlist'"),
        (raw_gnd(gnd=tiny_gnd()[2][:1]), "gnd has 1 entries but qimlist has 2"),
        (raw_gnd(gnd=[tiny_gnd()[2][0], {"easy": [3], "hard": []}]), r"gnd\[1\] \(query q1\): missing key 'junk'"),
        (
            raw_gnd(gnd=[tiny_gnd()[2][0], {"easy": [4], "hard": [], "junk": []}]),
            r"gnd\[1\] \(query q1\): easy: index 4 is outside imlist \(0..3\)",
        ),
        (
            raw_gnd(gnd=[{"easy": [0.5], "hard": [], "junk": []}, tiny_gnd()[2][1]]),
            r"gnd\[0\] \(query q0\): easy: 0.5 is not an integer",
        ),
        (raw_gnd(gnd=[{"easy": [0, 0], "hard": [], "junk": []}, tiny_gnd()[2][1]]), "repeated indices"),
        (
            raw_gnd(gnd=[{"easy": [0], "hard": [], "junk": [], "bbx": [5, 0, 1, 2]}, tiny_gnd()[2][1]]),
            r"gnd\[0\] \(query q0\): bbx",
        ),
        (raw_gnd(imlist="abc"), "imlist: expected a list of image names"),
        ([1, 2], "expected a dict"),
    ],
)
def test_malformed_gnd_names_the_key_and_query(tmp_path, obj, match):
    write_raw(tmp_path, obj)
    with pytest.raises(UserError, match=match) as e:
        load_revisitop(tmp_path, "bad")
    assert "gnd_bad.pkl" in str(e.value) and "\n" not in str(e.value)


def test_missing_and_unreadable_gnd(tmp_path):
    write_revisitop(tmp_path, "other", *tiny_gnd())
    with pytest.raises(UserError, match=r"gnd_roxford5k.pkl: ground-truth file not found \(found: other/gnd"):
        load_revisitop(tmp_path, "roxford5k")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "gnd_junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable pickle"):
        load_revisitop(tmp_path, "junk")


def test_check_images_counts_missing(tmp_path):
    write_revisitop(tmp_path, "tiny", *tiny_gnd())
    ds = load_revisitop(tmp_path, "tiny")
    for n in ["a", "c", "q1"]:
        (tmp_path / "tiny" / "jpg" / f"{n}.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match=r"3 of 6 images are missing \(first: .*b\.jpg, .*d\.jpg, .*q0\.jpg"):
        ds.check_images()
    for n in ["b", "d", "q0"]:
        (tmp_path / "tiny" / "jpg" / f"{n}.jpg").write_bytes(b"x")
    ds.check_images()
    with pytest.raises(UserError, match=r"1 of 7 images are missing \(first: .*r1m\.jpg\)"):
        ds.check_images([str(tmp_path / "r1m.jpg")])


def test_image_list_skips_blank_and_comment_lines(tmp_path):
    lst = tmp_path / "d.txt"
    lst.write_text("x/1.jpg\n\n# comment\n  #indented comment\n/abs/2.jpg\n")
    assert read_image_list(lst) == [str(tmp_path / "x" / "1.jpg"), "/abs/2.jpg"]
    with pytest.raises(UserError, match="distractor list not found"):
        read_image_list(tmp_path / "none.txt", "distractor list")
    only = tmp_path / "only.txt"
    only.write_text("# nothing here\n\n")
    with pytest.raises(UserError, match="image list is empty"):
        read_image_list(only)
