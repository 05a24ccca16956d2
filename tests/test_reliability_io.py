"""Issue 26 (second round) and 30: outputs checked before the work, a full device named, binary codes that do not
depend on the storage dtype, a pickled whiten.npz and a bad sidecar as one line, opt-in advice that exists on the
command, --show links that survive odd names and a move, killed writers' temp folders removed, file modes from the
umask (docs/RELIABILITY.md, "Outputs and files (second round)")."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import click
import conftest
import numpy as np
import pytest
from conftest import read_only_folder, valid_sidecar
from PIL import Image

from aml import trust
from aml.binary import THRESHOLD, balance_warning, pack_bits
from aml.errors import UserError
from aml.io import TMP_TAG, atomic_path, atomic_write, host_tag, read_npz, scratch_dir, temp_dir, umask
from aml.show import draw_results, image_url
from aml.sidecar import read_sidecar, sidecar_path, write_sidecar

REPO = str(Path(__file__).resolve().parents[1])


def one_line(result, *needles):
    conftest.one_line(result, *needles)
    assert TMP_TAG not in result[2], result[2]  # never the hidden temp file


# ------------------------------------------------------------------------------------------- outputs first
def test_outputs_are_checked_before_the_work(tmp_path, image_list, run_cli):
    """embed --out, search --out / --show, whiten --out: refused before any model, index or data is read (none of
    them exists here), naming the user's path and the option."""
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "v.npy"  # a path through a regular file: unwritable even for root
    one_line(
        run_cli("embed", "--model", tmp_path / "none.onnx", "--images", image_list, "--out", bad), str(bad), "--out"
    )
    search = ["search", "--index", tmp_path / "no-index", "--encoder", "x.onnx", "--images", image_list]
    one_line(run_cli(*search, "--out", tmp_path / "file" / "r.jsonl"), "r.jsonl", "--out", "is a file, not a folder")
    one_line(run_cli(*search, "--out", tmp_path / "r.jsonl", "--show", tmp_path / "file" / "s.html"), "--show")
    one_line(run_cli(*search, "--out", tmp_path / "r.jsonl", "--show", tmp_path / "s.txt"), "expected a .png or .html")
    whiten = ["whiten", "--teacher", "resnet18", "--random-init", "--data", "nowhere:", "--image-size", "32"]
    one_line(run_cli(*whiten, "--out", tmp_path / "file" / "lw.pt"), "lw.pt", "--out")
    with read_only_folder(tmp_path / "ro") as ro:
        if ro is not None:
            one_line(run_cli(*search, "--out", ro / "r.jsonl"), "not writable")


def test_a_failed_rename_names_the_users_path_not_the_temp(tmp_path, monkeypatch):
    target = tmp_path / "r.json"

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError) as e, atomic_write(target) as f:
        f.write("x")
    assert e.value.filename == str(target) and TMP_TAG not in str(e.value)


# ------------------------------------------------------------------------------------------- full device
@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        OSError("15360 requested and 10208 written"),  # numpy's short write: no errno
        RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        ),  # torch.save on a full device  # fmt: skip
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # a real tmpfs
    ],
    ids=["ENOSPC", "EDQUOT", "short-write", "torch-save", "torch-pos"],
)
def test_a_full_device_is_one_line_naming_the_path(tmp_path, error):
    target = tmp_path / "out.npy"
    target.write_bytes(b"old")
    with pytest.raises(UserError) as e, atomic_path(target):
        raise error
    msg = str(e.value)
    assert msg.startswith(f"{target}: no space left on the device") and "\n" not in msg and TMP_TAG not in msg
    assert isinstance(e.value, OSError) and e.value.filename == str(target)  # callers cleaning up on ENOSPC see it
    assert e.value.errno == (errno.EDQUOT if getattr(error, "errno", None) == errno.EDQUOT else errno.ENOSPC)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_extract_and_a_checkpoint_on_a_full_device_say_so(tmp_path, image_list, run_cli, monkeypatch):
    import torch

    from aml.train.checkpoint import save_checkpoint

    def short_write(f, arr, *a, **k):
        raise OSError("15360 requested and 10208 written")

    with monkeypatch.context() as m:
        m.setattr(np, "save", short_write)
        out = tmp_path / "v.npy"
        args = ["extract", "--model", "resnet18", "--random-init", "--images", image_list, "--image-size", "32"]
        one_line(run_cli(*args, "--quiet", "--out", out), f"error: {out}: no space left on the device")

    def full(obj, f, *a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"epoch_001\.pt: no space left on the device"):
        save_checkpoint(tmp_path / "run", 1, {"state_dict": {}})


# ------------------------------------------------------------------------------------------- binary codes
def test_codes_do_not_depend_on_the_storage_dtype():
    """Raw GeM vectors hold tiny positives (its clamp, ~1e-8) that float16 rounds to 0: the codes of a float16
    and a float32 copy are the same (at 0 they differed: all ones from float32)."""
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((50, 64))).astype(np.float32) * 0.05
    x[rng.random(x.shape) < 0.4] = 1e-8  # dead channels after GeM's clamp and the L2 norm
    x[0, :4] = [THRESHOLD, np.nextafter(np.float32(THRESHOLD), 1), 2.0**-24, -1e-9]  # at the rounding boundary
    x[1] = rng.standard_normal(64) * 1e-7  # the whole float16 subnormal range
    c32, c16, c64 = pack_bits(x), pack_bits(x.astype(np.float16)), pack_bits(x.astype(np.float64))
    np.testing.assert_array_equal(c32, c16)
    np.testing.assert_array_equal(c32, c64)
    assert 0.3 < np.unpackbits(c32).mean() < 0.9  # the dead channels are 0 bits in both
    np.testing.assert_array_equal(np.unpackbits(c32[0])[:4], [0, 1, 1, 0])


def test_meaningless_codes_warn():
    positive = np.abs(np.random.default_rng(1).standard_normal((20, 32))).astype(np.float32) + 0.1
    codes = pack_bits(positive)  # every vector: all ones, so every hit scores alike
    w = balance_warning(codes, 32, "db")
    assert "all 20 codes are the same" in w and "\n" not in w and w.startswith("warning: db:")
    constant = np.tile(np.where(np.arange(32) % 2, 1.0, -1.0), (5, 1))  # half the bits set, still one code
    assert "all 5 codes are the same" in balance_warning(pack_bits(constant), 32, "db")
    centred = np.random.default_rng(2).standard_normal((20, 32))
    assert balance_warning(pack_bits(centred), 32, "db") is None


# ------------------------------------------------------------------------------------------- files read
@pytest.mark.parametrize("kind", ["pickled", "garbage", "missing-key"])
def test_a_planted_npz_is_one_line(tmp_path, kind):
    path = tmp_path / "whiten.npz"
    if kind == "pickled":
        np.savez(path, m=np.array([{"evil": 1}], dtype=object), P=np.eye(2), key="k", variant="ss")
    elif kind == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip")
    else:
        np.savez(path, m=np.zeros(2), key="k", variant="ss")
    with pytest.raises(UserError) as e:
        read_npz(path, ("m", "P", "key", "variant"))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert {"pickled": "pickled objects", "garbage": "not a readable .npz", "missing-key": "'P' missing"}[kind] in msg
    good = tmp_path / "good.npz"
    np.savez(good, m=np.zeros(2), P=np.eye(2), key="k", variant="ss")
    assert str(read_npz(good, ("m", "P", "key", "variant"))["key"]) == "k"


@pytest.mark.parametrize(
    "field,value",
    [
        ("format", 3), ("precision", "fp8"), ("mean", [0.5, "a", 0.5]), ("mean", [0.5, float("nan"), 0.5]),
        ("std", [0.2, 0.0, 0.2]), ("std", [0.2]), ("image_size", "224"), ("image_size", True), ("dim", -1),
        ("msp", float("nan")), ("msp", None), ("whiten", "yes"), ("whiten", {"dataset": 1}), ("teacher", [1]),
        ("output", "binary"), ("sha256", 5),
    ],
)  # fmt: skip
def test_bad_sidecar_values_are_one_line_naming_the_field(tmp_path, field, value, run_cli, image_list):
    model = tmp_path / "enc.onnx"
    model.write_bytes(b"model")
    path = sidecar_path(model)
    path.write_text(json.dumps(valid_sidecar() | {field: value}))  # json writes NaN as the bare NaN it reads
    with pytest.raises(UserError) as e:
        read_sidecar(model)
    msg = str(e.value)
    assert msg.startswith(f"{path}: field '{field}': ") and "\n" not in msg and "re-export" in msg
    one_line(run_cli("embed", "--model", model, "--images", image_list, "--out", tmp_path / "v.npy"), f"'{field}'")


def test_a_binary_sidecar_must_record_its_dim_in_bits(tmp_path):
    from aml.sidecar import binary_output

    model = tmp_path / "enc.onnx"
    info = valid_sidecar()
    write_sidecar(model, info | {"output": {"binary": binary_output(8)}})
    assert read_sidecar(model)["output"]["binary"]["bits"] == 8
    write_sidecar(model, info | {"output": {"binary": binary_output(16)}})
    with pytest.raises(UserError, match="field 'output.binary'"):
        read_sidecar(model)
    path = sidecar_path(model)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_sidecar(model)


def _commands() -> list[tuple[str, click.Command]]:
    """Every command of `aml`, subcommands of groups included, as (name, command)."""
    import importlib

    from aml.cli import COMMANDS

    found = []
    for name in COMMANDS:
        cmd = importlib.import_module(f"aml.commands.{name}").command
        subs = cmd.commands if isinstance(cmd, click.Group) else {"": cmd}
        found += [(f"{name} {sub}".strip(), c) for sub, c in subs.items()]
    return found


@pytest.mark.parametrize("name,cmd", _commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_opt_in_advice_names_only_what_the_command_has(name, cmd):
    has = "--trust-pickle" in [o for p in cmd.params for o in p.opts]
    with click.Context(cmd, info_name=name):
        hint = trust.opt_in_hint()
    assert ("--trust-pickle" in hint) == has and trust.ENV in hint, (name, hint)


def test_search_and_whiten_offer_trust_pickle_and_outside_a_command_the_advice_is_the_api():
    from aml.commands import search, whiten

    for cmd in (search.command, whiten.command):
        assert "--trust-pickle" in [o for p in cmd.params for o in p.opts]
    assert "--trust-pickle" not in trust.opt_in_hint() and "set_trust_pickle(True)" in trust.opt_in_hint()


# ------------------------------------------------------------------------------------------- --show
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _resolve(src: str, page: Path) -> Path:
    url = urlparse(src)
    return Path(unquote(url.path)) if url.scheme == "file" else (page.parent / unquote(src)).resolve()


def test_show_html_links_odd_names_relatively_below_and_by_uri_elsewhere(tmp_path):
    imgs = tmp_path / "site" / "img"
    imgs.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    names = [imgs / "q#1.png", imgs / "a?b.png", imgs / "c%20d &<e>.png", outside / "x#y%z.png"]
    for p in names:
        Image.fromarray(np.full((20, 20, 3), 50, dtype=np.uint8)).save(p)
    page = tmp_path / "site" / "r.html"
    hits = [[str(p) for p in names[1:]]]
    draw_results(page, [str(names[0])], None, hits, np.array([[0.9, 0.8, 0.7]]), [["positive", "junk", "negative"]])
    parsed = _Links()
    parsed.feed(page.read_text())
    assert [_resolve(s, page) for s in parsed.src] == [p.resolve() for p in names]
    assert [s.startswith("file://") for s in parsed.src] == [False, False, False, True]
    legend = " ".join(parsed.text)
    for meaning in ("query", "positive", "junk", "negative"):
        assert meaning in legend
    moved = tmp_path / "moved"
    (tmp_path / "site").rename(moved)  # the folder moves as a whole: the relative links still hold
    assert [_resolve(s, moved / "r.html").is_file() for s in parsed.src[:3]] == [True] * 3
    assert image_url(outside / "a b.png", moved) == (outside / "a b.png").as_uri()


def test_show_png_has_a_legend(tmp_path):
    q = tmp_path / "q.png"
    Image.fromarray(np.full((20, 20, 3), 50, dtype=np.uint8)).save(q)
    out = draw_results(tmp_path / "r.png", [str(q)], None, [[str(q)]], np.array([[0.5]]), [["negative"]])
    img = np.asarray(Image.open(out))
    top = img[:20]  # the legend strip above the first row: the label swatches
    for colour in ((0, 170, 0), (150, 150, 150), (210, 0, 0)):
        assert (top == colour).all(-1).any()


def test_search_show_n_draws_the_first_queries(tmp_path, image_list, run_cli, monkeypatch):
    """`aml search --show-n N --show-k K`: N query rows of K hits (index and encoder stubbed: the drawing is tested)."""
    import aml.identity
    import aml.index
    import aml.milvus

    for name in ("b.png", "c.png"):
        Image.fromarray(np.full((20, 20, 3), 60, dtype=np.uint8)).save(tmp_path / name)
    queries = tmp_path / "q.txt"
    queries.write_text("a.png\nb.png\nc.png\n")
    db_names = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")]

    class Fake:
        names, meta, kind, searched_on, note = db_names, {"image_size": 32}, "flat", "cpu", ""

        def __len__(self):
            return 3

        def gpus_for(self, *a, **k):
            return [], ""

        def search(self, q, k, **kw):
            return np.tile([0.9, 0.5, 0.1], (len(q), 1))[:, :k], np.tile([0, 1, 2], (len(q), 1))[:, :k]

    monkeypatch.setattr(aml.milvus, "open_searched", lambda db, milvus, collection: (Fake(), db))
    monkeypatch.setattr(aml.index, "query_vectors", lambda enc, paths, index, **k: (np.zeros((len(paths), 4)), {}))
    monkeypatch.setattr(aml.index, "index_identity", lambda meta: {})
    monkeypatch.setattr(aml.identity, "check_compatible", lambda *a, **k: None)
    show = tmp_path / "s.html"
    args = ["search", "--index", tmp_path, "--encoder", "x.onnx", "--images", queries, "--out", tmp_path / "r.jsonl"]
    code, out, err = run_cli(*args, "--show", show, "--show-n", 2, "--show-k", 2)
    assert code == 0, err
    assert f"{show}: 2 of 3 queries drawn" in out
    assert show.read_text().count("<figure>") == 2 * (1 + 2)
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3  # the results keep every query


# ------------------------------------------------------------------------------------------- temps and modes
def test_a_killed_exports_temp_folder_is_removed_by_the_next_write_into_the_folder(tmp_path):
    """A killed `aml export` of s-int8.onnx leaves `.s-int8.onnx.aml-tmp-...`; the next export into the folder
    (here of s-fp32.onnx, the same scratch_dir call `aml.export.pipeline.export_checkpoint` makes) removes it."""
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from aml.io import scratch_dir\n"
        "with scratch_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'fp32.onnx').write_bytes(b'x' * 100000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, "-c", code, str(out / "s-int8.onnx")], env=env)
    assert p.wait(timeout=120) == -signal.SIGKILL
    left = [d for d in out.iterdir() if d.name.startswith(f".s-int8.onnx{TMP_TAG}{host_tag()}-{p.pid}-")]
    assert len(left) == 1 and left[0].is_dir()
    with scratch_dir(out / "s-fp32.onnx") as tmp:
        assert not left[0].exists() and tmp.is_dir()
    assert list(out.iterdir()) == []
    src = Path(REPO, "aml", "export", "pipeline.py").read_text()
    assert "with scratch_dir(out) as tmp:" in src  # the export builds in the folder of its output


def test_written_files_and_folders_get_the_mode_open_and_mkdir_give(tmp_path):
    plain = tmp_path / "plain"
    with open(plain, "w") as f:
        f.write("x")
    (tmp_path / "plain-dir").mkdir()
    with atomic_write(tmp_path / "new.json") as f:
        f.write("x")
    mode = stat.S_IMODE
    assert mode((tmp_path / "new.json").stat().st_mode) == mode(plain.stat().st_mode) == 0o666 & ~umask()
    assert mode(temp_dir(tmp_path / "built").stat().st_mode) == mode((tmp_path / "plain-dir").stat().st_mode)
    (tmp_path / "new.json").chmod(0o640)  # a replaced file keeps its mode, as open(path, "w") keeps it
    with atomic_write(tmp_path / "new.json") as f:
        f.write("y")
    assert mode((tmp_path / "new.json").stat().st_mode) == 0o640


def test_modes_follow_another_umask():
    code = (
        "import os, stat, sys, tempfile\n"
        "os.umask(0o027)\n"
        "from aml.io import atomic_write, temp_dir\n"
        "d = tempfile.mkdtemp()\n"
        "with atomic_write(os.path.join(d, 'f')) as f: f.write('x')\n"
        "g = temp_dir(os.path.join(d, 'g'))\n"
        "print(oct(stat.S_IMODE(os.stat(os.path.join(d, 'f')).st_mode)), oct(stat.S_IMODE(g.stat().st_mode)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert out == ["0o640", "0o750"]


def test_modes_follow_a_umask_changed_after_an_earlier_write(tmp_path):
    with atomic_write(tmp_path / "before") as f:  # the umask is read again at the next write, not kept from this one
        f.write("x")
    old = os.umask(0o077)
    try:
        with atomic_write(tmp_path / "after") as f:
            f.write("x")
        folder = temp_dir(tmp_path / "built")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "after").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
