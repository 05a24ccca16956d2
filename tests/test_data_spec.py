"""`--data SPEC` parsing: every accepted form, the cached default synth set, cached test splits, bad specs."""

from __future__ import annotations

import os
import pickle

import pytest
from PIL import Image

from aml.data import synth
from aml.data.revisitop import load_revisitop
from aml.data.spec import FORMS, parse_data_spec
from aml.data.synth import SynthConfig, generate_synth
from aml.errors import UserError

TINY = SynthConfig(
    landmarks=2, views=2, val_landmarks=1, test_landmarks=1, queries=1, db_views=3, distractors=0, size=48
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("AML_HOME", str(tmp_path / "home"))


def _img(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), colour).save(path, format="JPEG")


@pytest.mark.parametrize("spec", ["", "nope", "sfm120k", "sfm120k:", "folder: ", "csv:/x.csv", "synthetic:/x"])
def test_malformed_specs_list_the_forms(spec):
    with pytest.raises(UserError) as e:
        parse_data_spec(spec)
    assert FORMS in str(e.value)
    for form in ("synth:DIR", "sfm120k:DIR", "folder:DIR", "groups:CSV", "images:DIR"):
        assert form in str(e.value)


def test_synth_dir(tmp_path):
    out = generate_synth(tmp_path / "s", TINY)
    b = parse_data_spec(f"synth:{out}")
    assert len(b.train) == 4 and b.val is not None and len(b.val) == 2
    assert b.test == (str(out), "synth")
    assert len(load_revisitop(*b.test).qimlist) == 1
    with pytest.raises(UserError, match="aml data synth"):
        parse_data_spec(f"synth:{tmp_path / 'missing'}")


def test_default_synth_generated_once(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "DEFAULT_SYNTH", TINY)
    b = parse_data_spec("synth")
    root = b.test.data_root
    assert root.startswith(str(tmp_path / "home" / "datasets"))
    assert not [p for p in os.listdir(os.path.dirname(root)) if p.startswith(".")]  # temp folder renamed away

    def _fail(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synth, "generate_synth", _fail)
    b2 = parse_data_spec("synth")
    assert b2.test == b.test and b2.train.paths == b.train.paths


def test_sfm120k_dir(tmp_path):
    cids = ["aaaaaa01", "bbbbbb02", "cccccc03"]
    with open(tmp_path / "retrieval-SfM-120k.pkl", "wb") as f:
        pickle.dump(
            {
                "train": {"cids": cids, "cluster": [0, 0, 1], "qidxs": [0], "pidxs": [1]},
                "val": {"cids": cids[:2], "cluster": [0, 0], "qidxs": [1], "pidxs": [0]},
            },
            f,
        )
    for c in cids:
        _img(tmp_path / "ims" / c[-2:] / c[-4:-2] / c[-6:-4] / c)
    b = parse_data_spec(f"sfm120k:{tmp_path}")
    assert len(b.train) == 3 and len(b.val) == 2 and b.test is None


def test_folder_spec_writes_test_split_once(tmp_path):
    for i in range(5):
        for k in range(2):
            _img(tmp_path / "d" / f"class{i}" / f"{k}.jpg", (40 * i, 10, 10))
    b = parse_data_spec(f"folder:{tmp_path / 'd'}")
    assert b.train.num_clusters == 3 and b.train.num_pairs == 6 and b.val is None
    ds = load_revisitop(*b.test)
    assert ds.imlist == ["class3__0", "class3__1", "class4__0", "class4__1"] and ds.gnd[0]["easy"] == [1]
    assert parse_data_spec(f"folder:{tmp_path / 'd'}").test == b.test  # reused, same place


def test_groups_and_images_specs(tmp_path):
    rows = ["image,object,split"]
    for i in range(6):
        _img(tmp_path / "g" / "jpg" / f"{i}.jpg")
        rows.append(f"{i}.jpg,{i // 2},{'test' if i >= 4 else 'train'}")
    (tmp_path / "g" / "groups.csv").write_text("\n".join(rows) + "\n")
    b = parse_data_spec(f"groups:{tmp_path / 'g' / 'groups.csv'}")
    assert len(b.train) == 4 and b.test.dataset_name == "g"
    assert load_revisitop(*b.test).imlist == ["4", "5"]
    u = parse_data_spec(f"images:{tmp_path / 'g'}")
    assert len(u.train) == 6 and u.train.num_pairs == 0 and u.test is None


def test_groups_missing_images_up_front(tmp_path):
    (tmp_path / "groups.csv").write_text("image,object\n" + "".join(f"m{i}.jpg,{i}\n" for i in range(5)))
    with pytest.raises(UserError, match=r"3 of 3 images are missing.*m0.jpg"):
        parse_data_spec(f"groups:{tmp_path / 'groups.csv'}")
