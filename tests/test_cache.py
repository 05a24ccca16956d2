"""Teacher feature cache: completeness detection, resume after interruption, stale/truncated rebuild."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aml.cache import FeatureCache, cache_key
from aml.errors import UserError

DIM = 6
IDENTITY = {"name": "rn101", "weights": "sha256:abc", "dim": DIM}


def rows_of(idx: np.ndarray) -> np.ndarray:
    """A deterministic fake extractor: row i is (i, i + 0.5, ...) / 100."""
    return (idx[:, None] + 0.5 * np.arange(DIM)[None, :]).astype(np.float32) / 100


class Recorder:
    """Extractor that records requested rows and can fail after `fail_after` rows (a simulated kill)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.requested: list[int] = []
        self.fail_after = fail_after

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and len(self.requested) + len(idx) > self.fail_after:
            raise KeyboardInterrupt("simulated interrupt")
        self.requested.extend(idx.tolist())
        return rows_of(idx)


def make(tmp_path, n=50, dtype="float32", size=64, paths=None):
    paths = paths or [f"img{i}.jpg" for i in range(n)]
    return FeatureCache(tmp_path, cache_key(IDENTITY, size, (1.0,), paths), n, DIM, dtype)


def test_build_load_complete(tmp_path):
    cache = make(tmp_path)
    assert not cache.complete()
    with pytest.raises(RuntimeError, match="not complete"):
        cache.load()
    rec = Recorder()
    x = cache.build(rec, chunk=16, progress=False)
    assert rec.requested == list(range(50))
    assert cache.complete() and isinstance(x, np.memmap) and not x.flags.writeable
    np.testing.assert_array_equal(x, rows_of(np.arange(50)))
    # only the final file and its sidecar remain
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.path.name, cache.sidecar.name])
    # a fresh object with the same key sees it complete, and building again extracts nothing
    again = make(tmp_path)
    assert again.complete()
    rec2 = Recorder()
    again.build(rec2, progress=False)
    assert rec2.requested == []
    side = json.loads(cache.sidecar.read_text())
    assert side["shape"] == [50, DIM] and side["dtype"] == "float32" and side["key"]["teacher"] == IDENTITY


def test_resume_after_interrupt(tmp_path):
    cache = make(tmp_path, n=100)
    with pytest.raises(KeyboardInterrupt):  # chunks 0-19 and 20-39 are flushed, 40-59 is interrupted
        cache.build(Recorder(fail_after=45), chunk=20, progress=False)
    assert not cache.complete() and cache.rows_done() == 40
    rec = Recorder()
    x = make(tmp_path, n=100).build(rec, chunk=20, progress=False)
    assert rec.requested == list(range(40, 100))  # only the remaining rows
    np.testing.assert_array_equal(x, rows_of(np.arange(100)))
    assert not cache.partial.exists() and not cache.progress_path.exists()


def test_progress_of_another_key_is_not_resumed(tmp_path):
    cache = make(tmp_path, n=30)
    with pytest.raises(KeyboardInterrupt):
        cache.build(Recorder(fail_after=12), chunk=10, progress=False)
    record = json.loads(cache.progress_path.read_text())
    record["key"]["image_size"] = 999  # the record no longer describes this cache
    cache.progress_path.write_text(json.dumps(record))
    rec = Recorder()
    cache.build(rec, chunk=10, progress=False)
    assert rec.requested == list(range(30))


def test_truncated_partial_is_not_resumed(tmp_path):
    cache = make(tmp_path, n=30)
    with pytest.raises(KeyboardInterrupt):
        cache.build(Recorder(fail_after=12), chunk=10, progress=False)
    cache.partial.write_bytes(cache.partial.read_bytes()[:-4])
    assert cache.rows_done() == 0
    rec = Recorder()
    cache.build(rec, chunk=10, progress=False)
    assert rec.requested == list(range(30))


def test_stale_sidecar_is_rebuilt(tmp_path):
    cache = make(tmp_path, n=20)
    cache.build(Recorder(), progress=False)
    side = json.loads(cache.sidecar.read_text())
    side["key"]["images"] = "0" * 64
    cache.sidecar.write_text(json.dumps(side))
    assert not cache.complete()
    rec = Recorder()
    cache.build(rec, progress=False)
    assert rec.requested == list(range(20)) and cache.complete()
    good = json.loads(cache.sidecar.read_text())
    for broken in (
        "{not json",
        json.dumps({**good, "dtype": "float16"}),
        json.dumps({**good, "shape": [19, DIM]}),
        json.dumps({**good, "complete": False}),
    ):
        cache.sidecar.write_text(broken)
        assert not cache.complete()


def test_truncated_or_missing_file_is_rebuilt(tmp_path):
    cache = make(tmp_path, n=20)
    cache.build(Recorder(), progress=False)
    cache.path.write_bytes(cache.path.read_bytes()[:-10])
    assert not cache.complete()
    with pytest.raises(RuntimeError):
        cache.load()
    rec = Recorder()
    x = cache.build(rec, progress=False)
    assert rec.requested == list(range(20))
    np.testing.assert_array_equal(x, rows_of(np.arange(20)))
    cache.path.unlink()
    assert not cache.complete()


def test_sidecar_missing_means_incomplete(tmp_path):
    """A data file without its sidecar (killed between rename and sidecar) is not used."""
    cache = make(tmp_path, n=10)
    cache.build(Recorder(), progress=False)
    cache.sidecar.unlink()
    assert not cache.complete()


def test_float16_storage(tmp_path):
    cache = make(tmp_path, n=40, dtype="float16")
    x = cache.build(Recorder(), chunk=7, progress=False)
    assert x.dtype == np.float16
    np.testing.assert_array_equal(x, rows_of(np.arange(40)).astype(np.float16))
    assert cache.path.stat().st_size < 40 * DIM * 4  # half the float32 size (plus a small header)
    other = make(tmp_path, n=40, dtype="float32")
    assert other.path != cache.path and not other.complete()
    with pytest.raises(UserError, match="float16 or float32"):
        make(tmp_path, dtype="float64")


def test_key_change_gives_new_file(tmp_path):
    names = [f"img{i}.jpg" for i in range(10)]
    a = make(tmp_path, n=10, size=64)
    a.build(Recorder(), progress=False)
    b = make(tmp_path, n=10, size=96)
    c = make(tmp_path, n=10, paths=[f"other{i}.jpg" for i in range(10)])
    d = FeatureCache(tmp_path, cache_key({**IDENTITY, "weights": "sha256:def"}, 64, (1.0,), names), 10, DIM, "float32")
    e = FeatureCache(tmp_path, cache_key(IDENTITY, 64, (1.0, 0.5), names), 10, DIM, "float32")
    assert len({x.path for x in (a, b, c, d, e)}) == 5
    assert a.complete() and not any(x.complete() for x in (b, c, d, e))
    b.build(Recorder(), progress=False)
    assert a.complete() and b.complete()  # they coexist in one directory
    assert a.path.name.startswith("rn101-")


def test_cache_key_contents():
    key = cache_key(IDENTITY, 362, (1, 0.7071), ["a", "b"])
    assert key["image_size"] == 362 and key["scales"] == [1.0, 0.7071] and key["n_images"] == 2
    assert key["images"] != cache_key(IDENTITY, 362, (1,), ["b", "a"])["images"]  # order matters
    assert json.loads(json.dumps(key)) == key


def test_extractor_shape_is_checked(tmp_path):
    cache = make(tmp_path, n=5)
    with pytest.raises(ValueError, match="expected"):
        cache.build(lambda idx: np.zeros((len(idx), DIM + 1)), progress=False)
    assert not cache.complete()


def test_empty_list(tmp_path):
    cache = make(tmp_path, n=0, paths=[])
    x = cache.build(Recorder(), progress=False)
    assert x.shape == (0, DIM) and cache.complete()
