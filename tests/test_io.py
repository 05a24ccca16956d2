"""Atomic writes: recognisable temp names, and a killed writer's temp file removed by the next write of the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from aml.io import TMP_TAG, atomic_write, host_tag, remove_stale_temps, scratch_dir, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _temps(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}{TMP_TAG}"))


def test_killed_write_leaves_a_named_temp_that_the_next_write_removes(tmp_path):
    target = tmp_path / "last.pt"
    code = (
        "import os, signal, sys\n"
        "from aml.io import atomic_write\n"
        "with atomic_write(sys.argv[1], 'wb') as f:\n"
        "    f.write(b'x' * 1000); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], env={**os.environ, "PYTHONPATH": REPO})
    assert p.wait(timeout=120) == -signal.SIGKILL
    left = _temps(tmp_path, "last.pt")
    assert len(left) == 1 and left[0].startswith(f".last.pt{TMP_TAG}{host_tag()}-{p.pid}-") and not target.exists()

    live = tmp_path / f".last.pt{TMP_TAG}{host_tag()}-{os.getpid()}-inflight"  # a writer still running: kept
    other_host = tmp_path / f".last.pt{TMP_TAG}otherhost-{p.pid}-x"  # another machine's PID: not ours to judge
    other_file = tmp_path / f".other.pt{TMP_TAG}{host_tag()}-{p.pid}-x"  # another target's dead writer: removed too
    for f in (live, other_host, other_file):
        f.write_bytes(b"")
    with atomic_write(target, "wb") as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert _temps(tmp_path, "last.pt") == sorted([live.name, other_host.name])
    assert not other_file.exists()  # its writer may never come back (e.g. an export of another precision)


def test_remove_stale_temps_ignores_a_missing_folder(tmp_path):
    assert remove_stale_temps(tmp_path / "nowhere" / "x.json") == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"a": 1})
    try:
        with atomic_write(target) as f:
            f.write("partial")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert target.read_text().startswith("{") and _temps(tmp_path, "r.json") == []


def test_scratch_dir_is_beside_its_target_and_removed_even_on_error(tmp_path):
    target = tmp_path / "out" / "enc.onnx"
    stale = tmp_path / "out" / f".enc.onnx{TMP_TAG}{host_tag()}-999999999-dead"  # a killed builder's: removed
    stale.mkdir(parents=True)
    (stale / "fp32.onnx").write_bytes(b"x")
    with scratch_dir(target) as tmp:
        assert tmp.is_dir() and tmp.parent == target.parent and tmp.name.startswith(f".enc.onnx{TMP_TAG}")
        assert not stale.exists()
        (tmp / "model.onnx").write_bytes(b"y")
    assert not tmp.exists()
    try:
        with scratch_dir(target) as tmp:
            (tmp / "part").write_bytes(b"z")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not tmp.exists() and _temps(target.parent, "enc.onnx") == []


def test_json_files_are_strict_json(tmp_path):
    """NaN / inf (a score with no positives to rank) become null: every parser reads the file."""
    from aml.io import json_text, write_json

    obj = {"mAP": {"E": float("nan"), "M": 51.5, "H": float("inf")}, "rows": [1.0, float("-inf")]}
    write_json(tmp_path / "x.json", obj)
    strict = json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert strict == {"mAP": {"E": None, "M": 51.5, "H": None}, "rows": [1.0, None]}
    assert "NaN" not in json_text(obj) and json.loads(json_text(obj)) == strict
