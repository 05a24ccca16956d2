"""The index folder under faults: concurrent writers, hostile manifests and links, damaged files, a full disk,
`--out` mistakes and images added twice. Tiny indexes of vectors made from their names: no model runs."""

from __future__ import annotations

import errno
import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import paired_workers

from aml import index as aml_index
from aml.errors import UserError
from aml.index import Index, append, build_from_images, build_index

DIM = 8
TEACHER = {"name": "t", "weights": "w.pth", "sha256": "ab" * 32, "dim": DIM}
TRIALS = 12


def vec(names: list[str]) -> np.ndarray:
    """The vector of each name (seeded by its crc32): a name and its vector can be matched after the fact."""
    x = np.stack([np.random.default_rng(zlib.crc32(n.encode())).standard_normal(DIM) for n in names])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def names_of(tag: str, n: int = 40) -> list[str]:
    return [f"/img/{tag}{i}.jpg" for i in range(n)]


def make_index(d: Path, names: list[str] | None = None, **meta) -> Index:
    names = names or names_of("b")
    idx = build_index(vec(names), "flat", names, meta={"teacher": TEACHER, "image_size": 96, "scales": [1.0], **meta})
    idx.save(d)
    return idx


def stored(d: Path) -> tuple[list[str], np.ndarray]:
    idx = Index.open(d)
    return idx.names, idx.faiss_index.reconstruct_n(0, len(idx))


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


def edit_manifest(d: Path, **fields) -> None:
    man = json.loads((d / "manifest.json").read_text())
    man.update(fields)
    (d / "manifest.json").write_text(json.dumps({k: v for k, v in man.items() if v is not None}))


# ------------------------------------------------------------------------------------------------ concurrency
class FakeTeacher:
    """What `build_from_images` reads of a TeacherVectors, with vectors from the names and a slow `get`."""

    settings = type("S", (), {"image_size": 96, "scales": (1.0,)})()
    identity, dtype, teacher, weights, random_init = TEACHER, "float32", "t", "w.pth", False

    def __init__(self, pause: float) -> None:
        self.pause, self.gets = pause, 0

    def get(self, paths, **_):
        self.gets += 1
        time.sleep(self.pause)
        return vec(paths)


def _worker(tasks, barrier, results) -> None:
    """A child process: for each task, wait for the other worker, then add to or build the same index at once."""
    while (task := tasks.get()) is not None:
        op, d, tag = task
        barrier.wait(timeout=120)
        try:
            if op == "add":
                names = names_of(tag)

                def slow(index, rows, names=names):
                    time.sleep(0.03)  # the extraction
                    return vec([names[i] for i in rows])

                index, n, _ = append(d, names, slow, quiet=True)
                results.put(("ok", tag, n, len(index)))
            else:
                t = FakeTeacher(0.03)
                try:
                    index = build_from_images(t, names_of(tag), "flat", d, quiet=True)
                    results.put(("ok", tag, t.gets, len(index)))
                except UserError as e:
                    results.put(("refused", tag, t.gets, str(e)))
        except Exception as e:  # reported, not hung on
            results.put(("error", tag, 0, repr(e)))


@pytest.fixture(scope="module")
def workers():
    with paired_workers(_worker) as run:
        yield lambda op, d, tags: run([(op, str(d), tag) for tag in tags])


def test_two_adds_at_once_keep_every_image_with_its_vector(tmp_path, workers):
    for trial in range(TRIALS):
        d = tmp_path / f"db{trial}"
        make_index(d)
        got = workers("add", d, ("a", "c"))
        assert [r[0] for r in got] == ["ok", "ok"] and [r[2] for r in got] == [40, 40], got
        assert sorted(r[3] for r in got) == [80, 120]  # the second writer waited and added to the first's result
        names, x = stored(d)
        assert sorted(names) == sorted(names_of("a") + names_of("b") + names_of("c")), trial
        np.testing.assert_allclose(x, vec(names), atol=1e-6)  # every vector carries its own name
        assert sorted(os.listdir(d)) == ["images-2.txt", "index-2.faiss", "manifest.json"]
        assert not (tmp_path / f".db{trial}.lock").exists()


def test_two_builds_into_one_new_out_keep_the_first(tmp_path, workers):
    for trial in range(TRIALS):
        d = tmp_path / f"db{trial}"
        (ok, tag, gets, n), (refused, _, loser_gets, msg) = workers("build", d, ("a", "c"))
        assert (ok, refused, n, gets) == ("ok", "refused", 40, 1), (ok, refused, msg)
        assert loser_gets == 0, msg  # refused before extracting: at once, or after the first finished
        assert "another aml process is writing index" in msg or "already exists; pass --overwrite" in msg, msg
        names, x = stored(d)
        assert names == names_of(tag) and np.allclose(x, vec(names), atol=1e-6)
        assert sorted(os.listdir(tmp_path)) == sorted(f"db{i}" for i in range(trial + 1))  # no temp, no lock


# ------------------------------------------------------------------------------------------------ hostile files
@pytest.mark.parametrize("role", ["images", "index"])
@pytest.mark.parametrize("bad", ["ABS", "../outside.txt", "sub/images-0.txt", "..", ""])
def test_manifest_file_names_stay_inside_the_folder(tmp_path, role, bad, run_cli):
    d = tmp_path / "db"
    make_index(d)
    outside = tmp_path / "outside.txt"
    outside.write_text("/etc/passwd\n" * 40)
    bad = str(outside) if bad == "ABS" else bad
    man = json.loads((d / "manifest.json").read_text())
    edit_manifest(d, files={**man["files"], role: bad})
    with pytest.raises(UserError, match=f"manifest.json: field 'files.{role}': .* is not a plain file name") as e:
        Index.open(d)
    assert "remove" in one_line(e)
    with pytest.raises(UserError, match=f"field 'files.{role}'"):
        append(d, names_of("a"), lambda index, rows: vec(names_of("a")), quiet=True)
    assert outside.read_text() == "/etc/passwd\n" * 40  # neither read as names nor deleted
    code, _, err = run_cli("index", "info", d)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"files.{role}" in err


def test_a_planted_link_is_replaced_never_written_through(tmp_path):
    d = tmp_path / "db"
    make_index(d)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    for name in ("index-1.faiss", "images-1.txt"):  # the next generation's names
        os.symlink(victim, d / name)
    append(d, names_of("a"), lambda index, rows: vec(names_of("a")), quiet=True)
    assert victim.read_bytes() == b"precious"
    assert not any((d / n).is_symlink() for n in os.listdir(d)) and len(Index.open(d)) == 80


def test_a_link_out_of_the_folder_is_not_read(tmp_path):
    d = tmp_path / "db"
    make_index(d)
    copy = tmp_path / "elsewhere.txt"
    copy.write_bytes((d / "images-0.txt").read_bytes())
    (d / "images-0.txt").unlink()
    os.symlink(copy, d / "images-0.txt")  # same bytes, same digest: refused for where it points
    with pytest.raises(UserError, match="images-0.txt: a link out of the index folder") as e:
        Index.open(d)
    one_line(e)
    (d / "images-0.txt").unlink()
    (d / "images-0.copy").write_bytes(copy.read_bytes())
    os.symlink("images-0.copy", d / "images-0.txt")  # a link inside the folder is read
    assert len(Index.open(d)) == 40


@pytest.mark.parametrize(
    "field, value",
    [("dim", "8"), ("count", -1), ("type", 3), ("files", ["index-0.faiss"]), ("bytes", {"index": "12"}),
     ("teacher", "t"), ("generation", True), ("sha256", {"index": "zz"}), ("scales", "1.0"), ("image_size", 0),
     ("params", {"nlist": "4"}), ("files.images", None), ("bytes.index", None)],
)  # fmt: skip
def test_manifest_fields_of_the_wrong_type_are_one_line(tmp_path, field, value):
    d = tmp_path / "db"
    make_index(d)
    man = json.loads((d / "manifest.json").read_text())
    if "." in field:
        top, key = field.split(".")
        edit_manifest(d, **{top: {k: v for k, v in man[top].items() if k != key}})
    else:
        edit_manifest(d, **{field: value})
    with pytest.raises(UserError, match=f"manifest.json: field '{field}'") as e:
        Index.open(d)
    assert "the manifest is damaged" in one_line(e)


def test_a_non_utf8_image_list_is_one_line(tmp_path):
    d = tmp_path / "db"
    make_index(d)
    raw = b"".join(b"/img/\xff%d.jpg\n" % i for i in range(40))
    (d / "images-0.txt").write_bytes(raw)
    with pytest.raises(UserError, match="images-0.txt: damaged"):
        Index.open(d)  # the digest catches it first
    man = json.loads((d / "manifest.json").read_text())
    edit_manifest(d, sha256=None, bytes={**man["bytes"], "images": len(raw)})  # a manifest of an older aml
    with pytest.raises(UserError, match="images-0.txt: not UTF-8 text") as e:
        Index.open(d)
    one_line(e)


def test_a_flipped_bit_is_damaged_and_old_manifests_still_open(tmp_path):
    d = tmp_path / "db"
    make_index(d)
    q = vec(["/q.jpg"])
    want = Index.open(d).search(q, 5)
    path = d / "index-0.faiss"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # an exponent bit of a stored float: same size, scores far off
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"index-0.faiss: damaged \(its sha256 differs.*aml index build --overwrite"):
        Index.open(d)
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    edit_manifest(d, sha256=None)  # written before digests: opened on sizes alone
    got = Index.open(d).search(q, 5)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


# ------------------------------------------------------------------------------------------------ build --out
def build_cli(images: Path, out: Path, *extra) -> list:
    return ["index", "build", "--teacher", "lite2", "--images", images, "--image-size", 96, "--device", "cpu",
            "--out", out, "--quiet", *extra]  # fmt: skip


def test_build_out_is_checked_before_any_work(tmp_path, run_cli):
    missing = tmp_path / "list.txt"
    missing.write_text("/nowhere/a.jpg\n")  # a build that got past the --out checks would say 'missing'
    thesis = tmp_path / "work" / "thesis.tex"
    thesis.parent.mkdir()
    thesis.write_text("years of work")
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli(*build_cli(missing, thesis.parent, *extra))
        assert code == 2 and "is not an aml index (no manifest.json)" in err and len(err.splitlines()) == 1
        assert thesis.read_text() == "years of work"
    make_index(tmp_path / "db")
    code, _, err = run_cli(*build_cli(missing, tmp_path / "db"))
    assert code == 2 and "already exists; pass --overwrite" in err
    code, _, err = run_cli(*build_cli(missing, thesis / "db"))  # a path through a file: not writable
    assert code == 2 and str(thesis / "db") in err and "is a file, not a folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(*build_cli(missing, tmp_path / "empty"))  # nothing to lose: the build goes on
    assert code == 2 and "1 of 1 images are missing" in err


def test_overwrite_replaces_only_the_index_files(tmp_path):
    d = tmp_path / "db"
    make_index(d)
    (d / "notes.txt").write_text("mine")
    t = FakeTeacher(0)
    with pytest.raises(UserError, match="already exists"):
        build_from_images(t, names_of("a", 10), "flat", d, quiet=True)
    assert t.gets == 0
    build_from_images(t, names_of("a", 10), "flat", d, overwrite=True, quiet=True)
    assert sorted(os.listdir(d)) == ["images-1.txt", "index-1.faiss", "manifest.json", "notes.txt"]
    names, x = stored(d)
    assert names == names_of("a", 10) and np.allclose(x, vec(names), atol=1e-6)
    assert Index.open(d).generation == 1  # a served index sees a new generation
    edit_manifest(d, files={"index": "../x", "images": "images-1.txt"})
    with pytest.raises(UserError, match="--overwrite removes only the files a valid manifest lists"):
        build_from_images(t, names_of("a", 10), "flat", d, overwrite=True, quiet=True)


# ------------------------------------------------------------------------------------------------ full disk
def no_space(*args, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["_write_faiss", "write_json"])
def test_a_full_disk_is_one_line_and_keeps_the_old_index(tmp_path, monkeypatch, where):
    d = tmp_path / "db"
    make_index(d)
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    monkeypatch.setattr(aml_index, where, no_space)
    with pytest.raises(UserError, match=f"^{d}: the disk is full .*the index there is unchanged") as e:
        append(d, names_of("a"), lambda index, rows: vec(names_of("a")), quiet=True)
    one_line(e)
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before  # no partial file beside it
    with pytest.raises(UserError, match=f"^{tmp_path / 'new'}: the disk is full .*nothing was written"):
        make_index(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["db"]
    monkeypatch.undo()
    assert len(Index.open(d)) == 40


def test_the_faiss_writer_reports_a_full_disk(tmp_path):
    idx = build_index(vec(names_of("b")), "flat")
    with open("/dev/full", "wb", buffering=0) as f, pytest.raises(OSError) as e:  # faiss's writer only prints it
        aml_index._write_faiss(idx.faiss_index, "flat", f)
    assert e.value.errno == errno.ENOSPC


# ------------------------------------------------------------------------------------------------ add twice
def test_images_already_indexed_are_refused_or_skipped(tmp_path):
    d = tmp_path / "db"
    make_index(d)
    asked: list[list[int]] = []
    names = names_of("b", 45)

    def vectors_of(index, rows):
        asked.append(rows)
        return vec([names[i] for i in rows])

    with pytest.raises(UserError, match=r"list.txt: 40 of 45 images are already in index .*--skip-existing") as e:
        append(d, names_of("b", 45), vectors_of, where="list.txt", quiet=True)
    one_line(e)
    twice = names_of("x", 2) * 2
    with pytest.raises(UserError, match="2 of 4 images .* or listed twice"):
        append(d, twice, vectors_of, quiet=True)
    assert asked == [] and Index.open(d).generation == 0
    index, added, skipped = append(d, names_of("b", 45), vectors_of, skip_existing=True, quiet=True)
    assert (added, skipped, len(index), asked) == (5, 40, 45, [[40, 41, 42, 43, 44]])
    index, added, skipped = append(d, names_of("b", 45), vectors_of, skip_existing=True, quiet=True)
    assert (added, skipped, index.generation) == (0, 45, 1)  # nothing new: no new generation


def test_add_cli_refuses_or_skips_indexed_images(tmp_path, run_cli):
    files = [tmp_path / f"{i}.jpg" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    make_index(tmp_path / "db", [str(f) for f in files])
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{f.name}\n" for f in files))  # relative to the list: the same absolute names
    code, _, err = run_cli("index", "add", tmp_path / "db", "--images", lst, "--quiet")
    assert code == 2 and "3 of 3 images are already in index" in err and len(err.splitlines()) == 1
    code, out, err = run_cli("index", "add", tmp_path / "db", "--images", lst, "--skip-existing", "--quiet")
    assert code == 0 and "+0 images (3 already in the index, skipped), 3 in all" in out, err


# ------------------------------------------------------------------------------------------------ planted files
def test_a_pickled_whiten_file_in_the_index_is_one_line(tmp_path):
    d = tmp_path / "db"
    make_index(d)
    np.savez(d / "whiten.npz", m=np.zeros(DIM), P=np.array([{"payload": 1}], dtype=object), key="k", variant="v")
    man = json.loads((d / "manifest.json").read_text())
    files, sizes = (
        {**man["files"], "whiten": "whiten.npz"},
        {**man["bytes"], "whiten": (d / "whiten.npz").stat().st_size},
    )
    edit_manifest(d, sha256=None, files=files, bytes=sizes)  # a manifest written before digests
    with pytest.raises(UserError, match="whiten.npz: it holds pickled objects"):
        Index.open(d).lw()


def test_a_binary_index_of_raw_vectors_warns(tmp_path, run_cli):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\n" for p in paths))
    code, out, err = run_cli(*build_cli(lst, tmp_path / "db", "--type", "binary", "--random-init"))
    assert code == 0, err
    assert "warning:" in err and "binary index" in err and "bits are set" in err  # raw GeM of ReLU maps: all ones
