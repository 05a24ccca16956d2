"""SfM-120k reader: ims/ layout, pickle validation (errors name the key and entry), missing images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from aml.data.sfm120k import SFM_PICKLE, cid_path, read_sfm, write_sfm_pickle
from aml.data.trainset import TrainSet
from aml.errors import UserError

CIDS = ["0123456789abcdef", "fedcba9876543210", "00aa11bb22cc33dd", "deadbeefcafe0001", "aabbccddeeff0102"]


def _split(**over):
    s = {"cids": list(CIDS), "cluster": [7, 7, 3, 3, 3], "qidxs": [0, 2, 3], "pidxs": [1, 3, 4]}
    s.update(over)
    return s


def _write(root, db, images=CIDS):
    with open(root / SFM_PICKLE, "wb") as f:
        pickle.dump(db, f)
    for c in images:
        p = root / "ims" / c[-2:] / c[-4:-2] / c[-6:-4] / c
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_cid_path_layout(tmp_path):
    assert cid_path("/data", "0123456789abcdef") == "/data/ims/ef/cd/ab/0123456789abcdef"
    assert cid_path(tmp_path, "abcdef") == str(tmp_path / "ims" / "ef" / "cd" / "ab" / "abcdef")


def test_read_train_and_val(tmp_path):
    _write(tmp_path, {"train": _split(), "val": _split(qidxs=[4], pidxs=[2])})
    train, val = read_sfm(tmp_path)
    assert isinstance(train, TrainSet) and len(train) == 5
    assert train.paths[0] == str(tmp_path / "ims/ef/cd/ab/0123456789abcdef")
    assert train.cluster.dtype == np.int64 and train.cluster.tolist() == [7, 7, 3, 3, 3]
    assert train.qidxs.tolist() == [0, 2, 3] and train.pidxs.tolist() == [1, 3, 4]
    assert train.num_pairs == 3 and train.num_clusters == 2
    assert val is not None and val.qidxs.tolist() == [4] and val.name.endswith("val")


def test_val_is_optional(tmp_path):
    _write(tmp_path, {"train": _split()})
    assert read_sfm(tmp_path)[1] is None


@pytest.mark.parametrize(
    "db, words",
    [
        ({"val": _split()}, ["missing split 'train'"]),
        ({"train": {k: v for k, v in _split().items() if k != "pidxs"}}, ["train: missing key 'pidxs'"]),
        ({"train": _split(pidxs=[1, 3])}, ["qidxs / pidxs", "3 queries but 2 positives"]),
        ({"train": _split(pidxs=[1, 3, 99])}, ["pidxs[2] = 99", "out of range [0, 5)"]),
        ({"train": _split(qidxs=[0, -1, 3])}, ["qidxs[1] = -1"]),
        ({"train": _split(cluster=[7, 7, 3])}, ["cluster: has 3 entries", "5 images"]),
        ({"train": _split(cluster=[7, "b", 3, 3, 3])}, ["train.cluster[1] = 'b'", "not an integer"]),
        ({"train": _split(cids=[*CIDS[:3], 12345, CIDS[4]])}, ["cids[3] = 12345"]),
        ({"train": [1, 2]}, ["train: expected a dict"]),
    ],
)
def test_validation_names_key_and_entry(tmp_path, db, words):
    _write(tmp_path, db)
    with pytest.raises(UserError) as e:
        read_sfm(tmp_path)
    msg = str(e.value)
    assert SFM_PICKLE in msg
    for w in words:
        assert w in msg


def test_not_a_dict_and_unreadable(tmp_path):
    _write(tmp_path, [1, 2, 3])
    with pytest.raises(UserError, match="expected a dict"):
        read_sfm(tmp_path)
    (tmp_path / SFM_PICKLE).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable pickle"):
        read_sfm(tmp_path)
    with pytest.raises(UserError, match="file not found"):
        read_sfm(tmp_path / "nowhere")


def test_missing_images_reported_up_front(tmp_path):
    _write(tmp_path, {"train": _split()}, images=CIDS[:3])
    with pytest.raises(UserError) as e:
        read_sfm(tmp_path)
    msg = str(e.value)
    assert "2 of 5 images are missing" in msg
    assert CIDS[3] in msg and CIDS[4] in msg
    train, _ = read_sfm(tmp_path, check_images=False)  # the check can be skipped
    assert len(train) == 5


def test_write_roundtrip(tmp_path):
    write_sfm_pickle(
        tmp_path / "x.pkl", {"train": {k: np.asarray(v) if k != "cids" else v for k, v in _split().items()}}
    )
    with open(tmp_path / "x.pkl", "rb") as f:
        db = pickle.load(f)
    assert db == {"train": _split()}
    assert all(type(v) is int for v in db["train"]["cluster"])  # plain ints, like the original pickle


def test_trainset_validate_direct():
    ts = TrainSet(paths=["a", "b"], cluster=[0, 0], qidxs=[0], pidxs=[1], name="t").validate()
    assert ts.qidxs.dtype == np.int64
    with pytest.raises(UserError, match=r"t: pidxs\[0\] = 2"):
        TrainSet(paths=["a", "b"], cluster=[0, 0], qidxs=[0], pidxs=[2], name="t").validate()
    empty = TrainSet(paths=["a"], cluster=[0], qidxs=[], pidxs=[], name="u").validate()
    assert empty.num_pairs == 0
