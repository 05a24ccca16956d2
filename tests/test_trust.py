"""Nothing from disk runs code: crafted torch files and pickles are refused at every entry point (the payload's
marker file never appears), real files (cirtorch Lw numpy arrays, gnd pickles) still load, the opt-in works."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from aml import trust
from aml.data.revisitop import load_revisitop
from aml.data.sfm120k import load_sfm_pickle
from aml.errors import UserError
from aml.registry import create_model, model_identity, read_state_dict, read_torch_file
from aml.train.checkpoint import load_checkpoint
from tests.conftest import shared_path


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    monkeypatch.delenv(trust.ENV, raising=False)
    trust.set_trust_pickle(False)
    yield
    trust.set_trust_pickle(False)


def _evil_torch(tmp_path: Path, legacy: bool = False) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / ("evil_legacy.pt" if legacy else "evil.pt")
    obj = {
        "state_dict": {"w": torch.zeros(2)},
        "meta": {"architecture": "resnet18", "x": Payload(marker)},
        "optimizer": {},
        "config": {},
        "epoch": 1,
    }
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path, marker


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda p: read_torch_file(p), id="read_torch_file"),
        pytest.param(lambda p: read_state_dict(p), id="weights"),
        pytest.param(lambda p: create_model(str(p)), id="checkpoint"),
        pytest.param(lambda p: create_model("resnet18", role="student", weights=p), id="named-model-weights"),
        pytest.param(lambda p: model_identity(str(p)), id="model_identity"),
        pytest.param(lambda p: load_checkpoint(p), id="resume"),
    ],
)
def test_crafted_torch_file_is_refused(tmp_path, load, legacy):
    path, marker = _evil_torch(tmp_path, legacy)
    with pytest.raises(
        UserError, match=r"evil.*refused to load: it needs the global posix\.system.*AML_TRUST_PICKLE=1"
    ):
        load(path)
    assert not marker.exists()


def test_opt_in_loads_a_trusted_torch_file_with_a_warning(tmp_path, monkeypatch, capsys):
    path, marker = _evil_torch(tmp_path)
    monkeypatch.setenv(trust.ENV, "1")
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and marker.exists()  # full unpickling really happened, as the user asked
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning:" in err and "full unpickling" in err and str(path) in err


def test_set_trust_pickle_is_the_same_switch(tmp_path, capsys):
    path, marker = _evil_torch(tmp_path)
    trust.set_trust_pickle(True)
    assert trust.trust_pickle()
    read_torch_file(path)
    assert marker.exists() and "warning:" in capsys.readouterr().err


def test_cirtorch_lw_numpy_arrays_load_weights_only(tmp_path):
    """meta['Lw'] of float64 / float32 numpy arrays and numpy scalars load without the opt-in, under numpy 2 names
    and the numpy 1 names (numpy.core.multiarray) that files written before numpy 2 carry."""
    rng = np.random.default_rng(0)
    lw = {"ss": {"m": rng.normal(size=(4, 1)), "P": rng.normal(size=(4, 4))}}
    lw["ms"] = {k: v.astype(np.float32) for k, v in lw["ss"].items()}
    ck = {"state_dict": {"w": torch.ones(3)}, "meta": {"Lw": {"retrieval-SfM-120k": lw}, "s": np.float64(0.5)}}
    new, old = tmp_path / "new.pth", tmp_path / "old.pth"
    torch.save(ck, new)
    torch.save(ck, old, _use_new_zipfile_serialization=False)
    data = old.read_bytes()
    assert b"numpy._core.multiarray" in data
    old.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    for p in (new, old):
        got = read_torch_file(p)["meta"]
        np.testing.assert_array_equal(got["Lw"]["retrieval-SfM-120k"]["ms"]["P"], lw["ms"]["P"])
        assert got["Lw"]["retrieval-SfM-120k"]["ss"]["P"].dtype == np.float64 and got["s"] == 0.5


def test_torch_file_needing_more_than_numbers_is_refused_by_name(tmp_path):
    p = tmp_path / "strings.pt"
    torch.save({"a": np.array(["text"])}, p)  # a string dtype: not in a weights file's allow-list
    with pytest.raises(UserError, match=r"strings\.pt: refused to load: it needs the global numpy\.dtypes\.StrDType"):
        read_torch_file(p)


@pytest.mark.parametrize(
    "content,why",
    [(b"", "empty or truncated"), (b"\x80\x02garbage", "not a readable torch file")],
    ids=["empty", "garbage"],
)
def test_unreadable_torch_files_are_one_line(tmp_path, content, why):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(UserError, match=why) as e:
        load_checkpoint(p)
    assert "\n" not in str(e.value)


def test_checkpoint_zip_of_unexpected_structure(tmp_path):
    p = tmp_path / "odd.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/notes.txt", "not a torch archive")
    with pytest.raises(UserError, match=r"odd\.pt: not a readable torch file") as e:
        create_model(str(p))
    assert "\n" not in str(e.value)


def test_checkpoint_that_is_not_a_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(UserError, match=r"list\.pt: a list, not an aml training checkpoint"):
        load_checkpoint(p)


# ------------------------------------------------------------------------------------------ plain pickles
def _evil_pickle(path: Path, marker: Path, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [Payload(marker)]}, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 4])
def test_crafted_gnd_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    _evil_pickle(tmp_path / "evil" / "gnd_evil.pkl", marker, protocol)
    with pytest.raises(UserError, match=r"gnd_evil\.pkl: refused to load: it needs the global posix\.system"):
        load_revisitop(tmp_path, "evil")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_crafted_sfm_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    _evil_pickle(tmp_path / "retrieval-SfM-120k.pkl", marker, protocol)
    with pytest.raises(UserError, match=r"SfM-120k\.pkl: refused to load: it needs the global posix\.system"):
        load_sfm_pickle(tmp_path / "retrieval-SfM-120k.pkl")
    assert not marker.exists()


def test_opt_in_loads_a_trusted_pickle(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    _evil_pickle(tmp_path / "sfm.pkl", marker, 4)
    monkeypatch.setenv(trust.ENV, "1")
    assert load_sfm_pickle(tmp_path / "sfm.pkl")["imlist"] == ["a"]
    assert marker.exists() and "warning:" in capsys.readouterr().err


def test_pickles_of_containers_numbers_and_numpy_arrays_load(tmp_path):
    """What gnd and SfM files hold (dicts, lists, tuples, numbers, strings, numpy arrays and scalars) loads, from
    Python 3 pickles and from Python 2-style protocol-2 ones."""
    obj = {
        "cids": ["abcdef", "ghijkl"],
        "cluster": np.array([0, 1], dtype=np.int64),
        "qidxs": [np.int64(0)],
        "bbx": (1.0, 2.5, 3, 4),
        "set": {1, 2},
        "raw": b"\x00\x01",
        "f32": np.ones((2, 2), dtype=np.float32),
    }
    for protocol in (2, 4):
        p = tmp_path / f"ok{protocol}.pkl"
        p.write_bytes(pickle.dumps(obj, protocol=protocol))
        got = trust.load_pickle(p)
        assert got.keys() == obj.keys() and got["set"] == {1, 2} and got["raw"] == b"\x00\x01"
        np.testing.assert_array_equal(got["cluster"], obj["cluster"])
        assert got["f32"].dtype == np.float32 and got["qidxs"][0] == 0


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_real_gnd_pickles_still_load(tmp_path, name):
    src = shared_path("revisitop", f"gnd_{name}.pkl")
    (tmp_path / name).mkdir()
    (tmp_path / name / src.name).symlink_to(src)
    ds = load_revisitop(tmp_path, name)
    assert len(ds.qimlist) == 70 and len(ds.imlist) > 4000
