"""Teacher cache under faults: concurrent builders, kill -9 at any moment, a full disk, corrupt and hostile files."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from aml import cache as cache_mod
from aml.cache import FeatureCache, cache_key
from aml.errors import UserError

DIM = 6
N = 60
IDENTITY = {"name": "rn101", "weights": "sha256:abc", "dim": DIM}


def rows_of(idx: np.ndarray) -> np.ndarray:
    """A deterministic fake extractor: unit rows that differ per index."""
    x = np.cos(idx[:, None] * 0.37 + np.arange(DIM)[None, :]).astype(np.float32) + 0.01
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(folder, n=N, dtype="float32") -> FeatureCache:
    return FeatureCache(folder, cache_key(IDENTITY, 64, (1.0,), [f"img{i}.jpg" for i in range(n)]), n, DIM, dtype)


def _slow_build(folder: str, barrier, results, pause: float) -> None:
    """A child process: wait for the others, build the cache with a slow extractor, report what it extracted."""
    done: list[int] = []

    def extract(idx):
        time.sleep(pause)
        done.extend(idx.tolist())
        return rows_of(idx)

    if barrier is not None:
        barrier.wait(timeout=120)
    x = make(folder).build(extract, chunk=5, progress=False)
    if results is not None:
        results.put((len(done), np.asarray(x).tobytes()))


def _ctx():
    return mp.get_context("spawn")  # no fork of a process that may hold torch threads


@pytest.mark.parametrize("procs", [2, 4])
def test_concurrent_builds_give_the_solo_array(tmp_path, procs):
    solo = make(tmp_path / "solo").build(rows_of, chunk=5, progress=False)
    ctx = _ctx()
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    ps = [
        ctx.Process(target=_slow_build, args=(str(tmp_path / "shared"), barrier, results, 0.02)) for _ in range(procs)
    ]
    for p in ps:
        p.start()
    got = [results.get(timeout=240) for _ in ps]
    for p in ps:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(n for n, _ in got) == N  # one builder extracted every row once; the others waited and read it
    for _, data in got:
        np.testing.assert_array_equal(np.frombuffer(data, np.float32).reshape(N, DIM), solo)
    c = make(tmp_path / "shared")
    assert c.complete()
    assert sorted(p.name for p in c.directory.iterdir()) == sorted([c.path.name, c.sidecar.name])


def test_kill_9_at_any_moment_never_leaves_a_wrong_complete_cache(tmp_path):
    folder = tmp_path / "c"
    want = rows_of(np.arange(N))
    ctx = _ctx()
    for delay in (0.0, 0.3, 0.8, 1.5):
        p = ctx.Process(target=_slow_build, args=(str(folder), None, None, 0.03))
        p.start()
        time.sleep(1.0 + delay)  # the child's start-up, then some way into (or past) its build
        os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=60)
        c = make(folder)
        if c.complete():
            np.testing.assert_array_equal(c.load(), want)
        else:
            with pytest.raises(RuntimeError, match="not complete"):
                c.load()
    c = make(folder)
    done = c.rows_done()
    requested: list[int] = []
    x = c.build(lambda idx: (requested.extend(idx.tolist()), rows_of(idx))[1], chunk=5, progress=False)
    np.testing.assert_array_equal(x, want)
    assert requested == list(range(done, N)) if done else len(requested) in (0, N)
    assert sorted(p.name for p in folder.iterdir()) == sorted([c.path.name, c.sidecar.name])


def test_kill_9_mid_build_resumes_from_the_last_flushed_chunk(tmp_path):
    folder = tmp_path / "c"
    p = _ctx().Process(target=_slow_build, args=(str(folder), None, None, 0.05))
    p.start()
    c = make(folder)
    deadline = time.time() + 120
    while c.rows_done() < 20 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.join(timeout=60)
    assert not c.complete()
    done = c.rows_done()
    assert 20 <= done < N and done % 5 == 0
    requested: list[int] = []
    x = make(folder).build(lambda idx: (requested.extend(idx.tolist()), rows_of(idx))[1], chunk=5, progress=False)
    assert requested == list(range(done, N))
    np.testing.assert_array_equal(x, rows_of(np.arange(N)))


def test_exception_inside_extract_rows_never_marks_complete(tmp_path):
    c = make(tmp_path)
    calls = []

    def failing(idx):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("extractor crashed")
        return rows_of(idx)

    with pytest.raises(RuntimeError, match="extractor crashed"):
        c.build(failing, chunk=7, progress=False)
    assert not c.complete() and c.rows_done() == 14 and not c.path.exists() and not c.lock_path.exists()


def test_rows_changed_under_the_build_are_caught_before_marking(tmp_path):
    """A partial file altered behind the builder's back (zero-filled by another writer) is never marked complete."""
    c = make(tmp_path)

    def tamper(idx):
        if idx[0] == 50:
            data = np.lib.format.open_memmap(c.partial, mode="r+")
            data[:5] = 0
            data.flush()
            del data
        return rows_of(idx)

    with pytest.raises(UserError, match=r"rows 0\.\.9 differ from what was extracted.*run again"):
        c.build(tamper, chunk=10, progress=False)
    assert not c.complete() and not c.partial.exists()
    np.testing.assert_array_equal(make(tmp_path).build(rows_of, progress=False), rows_of(np.arange(N)))


def test_full_disk_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "posix_fallocate", no_space, raising=False)
    c = make(tmp_path / "cache")
    with pytest.raises(UserError, match=r"cache: no space left on the device for the teacher cache") as e:
        c.build(rows_of, progress=False)
    assert "\n" not in str(e.value) and str(tmp_path / "cache") in str(e.value)
    assert not c.complete() and not list((tmp_path / "cache").glob("*.partial-*"))


def test_allocation_without_posix_fallocate_writes_every_byte(tmp_path, monkeypatch):
    monkeypatch.delattr(cache_mod.os, "posix_fallocate", raising=False)
    seen = {}

    def extract(idx):
        if "blocks" not in seen:
            st = os.stat(c.partial)
            seen["blocks"], seen["size"] = st.st_blocks * 512, st.st_size
        return rows_of(idx)

    c = make(tmp_path, n=2000)
    c.build(extract, chunk=500, progress=False)
    assert seen["blocks"] >= seen["size"] - 4096  # not sparse before the first row was written
    np.testing.assert_array_equal(c.load(), rows_of(np.arange(2000)))


def test_unwritable_cache_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a regular file")
    c = make(tmp_path / "file" / "cache")
    with pytest.raises(UserError, match=r"file/cache: cannot write the teacher cache"):
        c.build(rows_of, progress=False)


def test_nan_rows_in_a_cache_name_the_file_and_are_rebuilt(tmp_path, capsys):
    c = make(tmp_path)
    c.build(rows_of, progress=False)
    data = np.lib.format.open_memmap(c.path, mode="r+")
    data[7] = np.nan
    data.flush()
    del data
    assert c.complete()  # the files look right ...
    with pytest.raises(UserError, match=rf"{c.path.name}: row 7 of the teacher feature cache is NaN.*delete"):
        c.load()  # ... but the vectors are not used
    requested: list[int] = []
    x = c.build(lambda idx: (requested.extend(idx.tolist()), rows_of(idx))[1], progress=False)
    assert requested == list(range(N)) and "rebuilding it" in capsys.readouterr().err
    np.testing.assert_array_equal(x, rows_of(np.arange(N)))


def test_extractor_nan_is_not_cached(tmp_path):
    c = make(tmp_path)
    with pytest.raises(UserError, match=r"returned NaN or inf for row 3"):
        c.build(lambda idx: np.where(idx[:, None] == 3, np.nan, rows_of(idx)), chunk=10, progress=False)
    assert not c.complete()


def test_symlinked_cache_files_are_not_trusted_or_followed(tmp_path):
    victim_dir = tmp_path / "victim"
    victim = make(victim_dir)
    victim.build(lambda idx: rows_of(idx) * -1, progress=False)  # other, valid vectors under the same name
    before = victim.path.read_bytes()
    c = make(tmp_path / "cache")
    c.directory.mkdir()
    os.symlink(victim.path, c.path)
    os.symlink(victim.sidecar, c.sidecar)
    assert not c.complete()
    # a planted progress record naming a symlinked "partial": not taken over, not written through
    partial = c.directory / f"{c.name}.npy.partial-evil-1-x"
    os.symlink(victim.path, partial)
    rec = {**c._record(partial=partial.name), "rows_done": 0, "chunks": []}
    c.progress_path.write_text(json.dumps(rec))
    x = c.build(rows_of, progress=False)
    np.testing.assert_array_equal(x, rows_of(np.arange(N)))
    assert victim.path.read_bytes() == before and not c.path.is_symlink() and not partial.exists()


def test_sidecar_of_a_newer_version_is_left_alone(tmp_path):
    c = make(tmp_path)
    c.build(rows_of, progress=False)
    side = json.loads(c.sidecar.read_text())
    c.sidecar.write_text(json.dumps({**side, "version": cache_mod.VERSION + 1}))
    before = c.path.read_bytes()
    with pytest.raises(UserError, match=r"written by a newer aml.*upgrade aml, or use another cache folder"):
        c.build(rows_of, progress=False)
    assert c.path.read_bytes() == before


def test_without_file_locks_builds_stay_private(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)

    def fails_at_20(idx):
        if idx[0] >= 20:
            raise RuntimeError("boom")
        return rows_of(idx)

    c = make(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        c.build(fails_at_20, chunk=10, progress=False)
    assert not list(tmp_path.glob("*.partial-*")) and not c.progress_path.exists()
    np.testing.assert_array_equal(c.build(rows_of, progress=False), rows_of(np.arange(N)))


def test_key_holds_image_sizes_and_mtimes(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"im{i}.jpg"
        p.write_bytes(b"x" * (10 + i))
        paths.append(str(p))
    k = cache_key(IDENTITY, 64, (1.0,), paths, files=paths)
    assert cache_key(IDENTITY, 64, (1.0,), paths, files=paths) == k
    (tmp_path / "im1.jpg").write_bytes(b"y" * 50)  # replaced in place, same name, new content
    assert cache_key(IDENTITY, 64, (1.0,), paths, files=paths)["content"] != k["content"]
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    k2 = cache_key(IDENTITY, 64, (1.0,), paths, files=paths)
    (tmp_path / "im1.jpg").write_bytes(b"z" * 50)  # same size ...
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # ... and mtime kept: the documented miss
    assert cache_key(IDENTITY, 64, (1.0,), paths, files=paths) == k2 != k
