"""Issue 26, second round: training, data and images (docs/RELIABILITY.md, "Training, data and images (second
round)"): a damaged whitening, a diverged or step-less run, 16-bit and tiny images, two runs into one folder,
unbounded synthetic sets and scales, duplicated rows, a damaged checkpoint config, a half-written split."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import distill_args, one_line, paired_workers, tiny_cfg
from PIL import Image

from aml.data.folders import read_groups_csv, write_object_split
from aml.data.images import load_image, read_image_list
from aml.errors import UserError
from aml.extract import extract
from aml.lock import exclusive
from aml.registry import create_model
from aml.settings import ExtractSettings
from aml.train.checkpoint import load_checkpoint
from aml.train.loop import Trainer, distill
from aml.train.run_dir import LOCK
from aml.whiten import Lw

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(path: Path, size=(40, 30), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One tiny finished run (one epoch, contr+, no evaluation), copied by the tests that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("AML_HOME", str(out.parent / "home"))
    torch.set_num_threads(1)
    try:
        distill(tiny_cfg(tiny_data, out, epochs=1, eval_every=None), progress=False)
    finally:
        mp.undo()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path, home):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.copytree(finished_run.parent / "home", home)  # its teacher cache
    return run


# ------------------------------------------------------------------------------------------- whitening
@pytest.mark.parametrize(
    "damage, field",
    [
        (lambda m, P: (m, np.full_like(P, np.nan)), "P: 32 of 32 values are NaN or inf"),
        (lambda m, P: (m, np.zeros_like(P)), "P: 4 of 4 rows are all zero"),
        (lambda m, P: (np.full_like(m, np.inf), P), "m: 8 of 8 values are NaN or inf"),
    ],
)
def test_a_damaged_whitening_is_refused_where_it_is_loaded(damage, field, tmp_path, run_cli):
    rng = np.random.default_rng(0)
    m, P = damage(rng.normal(size=8).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32))
    path = tmp_path / "lw.pt"
    tree = {"m": torch.from_numpy(m.reshape(-1, 1)), "P": torch.from_numpy(P)}
    torch.save({"Lw": {"custom": {"ss": tree}}}, path)
    with pytest.raises(UserError, match=rf"{path}.*{field}.*learn it again"):
        Lw.load(path)
    with pytest.raises(UserError, match=field):
        Lw.from_meta({"Lw": {"d": {"ss": {"m": m, "P": P}}}}, False)
    _image(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png\n")
    args = ["--model", "resnet18", "--random-init", "--images", tmp_path / "list.txt", "--image-size", "32"]
    one_line(run_cli("extract", *args, "--whiten", path, "--out", tmp_path / "v.npy"), str(path), field)
    assert not (tmp_path / "v.npy").exists()


def test_non_finite_vectors_stop_extraction_naming_the_cause(tmp_path):
    net = create_model("resnet18", random_init=True)
    paths = [str(_image(tmp_path / "a.png")), str(_image(tmp_path / "b.png", seed=1))]
    settings = ExtractSettings(32, workers=0, device="cpu", progress=False)
    assert np.allclose(np.linalg.norm(extract(net, paths, settings), axis=1), 1, atol=1e-5)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match=r"2 of 2 vectors are NaN or inf, first .*a\.png.*weights hold NaN"):
        extract(net, paths, settings)


# ------------------------------------------------------------------------------------------- diverged runs
def test_a_diverged_run_stops_with_the_fix_and_saves_no_nan(tiny_data, tmp_path, home, run_cli):
    out = tmp_path / "run"
    result = run_cli("distill", *distill_args(tiny_data, out, lr="1e10", eval_every=0))
    one_line(result, "training diverged at epoch 1", "lower --lr (now 1e+10)", "no checkpoint was written")
    assert "database features" not in result[2]
    assert not (out / "last.pt").exists() and not list(out.glob("epoch_*.pt"))


def test_a_diverged_epoch_keeps_the_last_good_checkpoint(tiny_data, run_copy, monkeypatch):
    before = (run_copy / "last.pt").read_bytes()
    step = Trainer._step

    def nan_step(self):
        step(self)
        with torch.no_grad():
            next(self.student.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Trainer, "_step", nan_step)
    cfg = tiny_cfg(tiny_data, run_copy, epochs=2, eval_every=None)
    with pytest.raises(UserError, match=r"epoch 2, step 1: the student's weights hold NaN.*last\.pt \(the last good"):
        distill(cfg, resume=True, progress=False)
    assert (run_copy / "last.pt").read_bytes() == before and not (run_copy / "epoch_002.pt").exists()
    assert load_checkpoint(run_copy / "last.pt")["epoch"] == 1


def test_a_nan_loss_is_named_as_the_loss(tiny_data, tmp_path, home, monkeypatch):
    from aml.train.objective import Objective

    monkeypatch.setattr(Objective, "__call__", lambda self, *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(UserError, match=r"diverged at epoch 1, step 1: the loss is nan; lower --lr"):
        distill(tiny_cfg(tiny_data, tmp_path / "run", epochs=1, eval_every=None), progress=False)


# ------------------------------------------------------------------------------------------- runs without steps
def test_a_run_without_training_steps_is_an_error(tmp_path, home, run_cli):
    for label in ("a", "b"):
        for k in range(2):
            _image(tmp_path / "lab" / label / f"{k}.png", (48, 48), seed=ord(label) * 10 + k)
    args = distill_args(tmp_path / "unused", tmp_path / "run", neg_num=5)
    args[args.index("--data") + 1] = f"folder:{tmp_path / 'lab'}"
    one_line(run_cli("distill", *args), "has no training steps", "more images per label", "label-free loss", "csd")
    assert not (tmp_path / "run" / "last.pt").exists()


# ------------------------------------------------------------------------------------------- images
def test_a_16_bit_png_reads_as_its_8_bit_copy(tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    a16 = np.asarray(load_image(tmp_path / "16.png", 64), dtype=np.int16)
    a8 = np.asarray(load_image(tmp_path / "8.png", 64), dtype=np.int16)
    assert np.array_equal(a16, a8)
    odd = np.minimum(eight.astype(np.int64) * 257 + 100, 65535).astype(np.uint16)  # within rounding
    Image.fromarray(odd).save(tmp_path / "odd.png")
    assert np.abs(np.asarray(load_image(tmp_path / "odd.png", 64), dtype=np.int16) - a8).max() <= 1


def test_a_too_small_image_is_refused_naming_the_file(tmp_path, home):
    net = create_model("lite2")  # its pretrained features vanish below 32 px (a norm 0.973 vector)
    paths = [str(_image(tmp_path / "ok.png", (64, 48))), str(_image(tmp_path / "dot.png", (1, 1)))]
    with pytest.raises(UserError, match=r"dot\.png: a 1x1 px image, too small .*norm 0\.97.*at least 32 px"):
        extract(net, paths, ExtractSettings(64, workers=0, device="cpu", progress=False))
    ok = extract(net, paths[:1], ExtractSettings(64, workers=0, device="cpu", progress=False))
    assert abs(float(np.linalg.norm(ok)) - 1) < 1e-5


# ------------------------------------------------------------------------------------------- one writer per run
def test_a_second_run_into_a_locked_folder_is_refused(run_copy, tiny_data, run_cli):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    with exclusive(run_copy / LOCK, wait=False):  # another distill holds it
        for extra in ({"overwrite": True}, {"resume": True, "epochs": 2}):
            one_line(
                run_cli("distill", *distill_args(tiny_data, run_copy, **extra)),
                str(run_copy),
                "another aml process is writing the run folder",
                "choose another --out",
            )
        assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.name != LOCK} == before
    (run_copy / "notes.txt").write_text("mine")
    code, _, err = run_cli("distill", *distill_args(tiny_data, run_copy, overwrite=True, epochs=0))
    assert code == 0, err  # the lock is free: --overwrite removes aml's run files only
    assert (run_copy / "notes.txt").read_text() == "mine" and not (run_copy / "epoch_001.pt").exists()
    assert not (run_copy / LOCK).exists()


# ------------------------------------------------------------------------------------------- bounds
def test_synthetic_sizes_and_scales_are_bounded(tmp_path, run_cli):
    one_line(run_cli("data", "synth", "--out", tmp_path / "s", "--size", "1000000"), "at most 2048 px", "memory")
    one_line(run_cli("data", "synth", "--out", tmp_path / "s", "--landmarks", "1000000"), "at most 200000")
    assert not (tmp_path / "s").exists()
    _image(tmp_path / "a.png")
    (tmp_path / "l.txt").write_text("a.png\n")
    args = ["extract", "--model", "resnet18", "--random-init", "--images", tmp_path / "l.txt", "--image-size", "32"]
    for bad in ("1000000", "nan", "1,inf"):
        code, _, err = run_cli(*args, "--multiscale", bad, "--out", tmp_path / "v.npy")
        assert code == 2 and "Traceback" not in err and "(0, 2]" in err, err
    with pytest.raises(UserError, match=r"--multiscale 1e\+06: scales must be in \(0, 2\]"):
        ExtractSettings(32, scales=(1e6,))


# ------------------------------------------------------------------------------------------- duplicated rows
def test_duplicated_list_and_csv_rows_are_refused(tmp_path, run_cli):
    for k in range(4):
        _image(tmp_path / f"{k}.png", seed=k)
    csv = tmp_path / "groups.csv"
    csv.write_text("image,object\n0.png,a\n1.png,a\n\n2.png,b\n3.png,b\n1.png,a\n")
    with pytest.raises(UserError, match=rf"{csv}: lines 3 and 7 list the same image .*1\.png \(2 times"):
        read_groups_csv(csv)
    lst = tmp_path / "list.txt"
    lst.write_text("# images\n0.png\n1.png\n./0.png\n")
    with pytest.raises(UserError, match=rf"{lst}: lines 2 and 4 list the same image"):
        read_image_list(lst)
    one_line(run_cli("data", "split", "--groups", csv, "--out", tmp_path / "out"), "lines 3 and 7")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_config_that_is_not_a_dict_is_one_line(tmp_path, home, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": {}, "meta": {}, "optimizer": {}, "config": "lr=1", "epoch": 1}, run / "last.pt")
    one_line(run_cli("distill", "--out", run, "--resume"), "last.pt: config: a str, not a dict")
    torch.save({"state_dict": {}, "meta": {}, "optimizer": {}, "config": {"nope": 1}, "epoch": 1}, run / "last.pt")
    one_line(run_cli("distill", "--out", run, "--resume"), "last.pt: config: unknown field(s) ['nope']")


def test_resume_with_mixup_names_the_option_not_a_loss_it_does_not_use(run_copy, run_cli):
    result = run_cli("distill", "--out", run_copy, "--resume", "--mixup", "input")
    one_line(result, "option 'mixup' differs from the checkpoint's config")
    assert "pair-based" not in result[2] and "csd" not in result[2]


# ------------------------------------------------------------------------------------------- data split
def _labelled(root: Path) -> Path:
    for label in "abcde":
        for k in range(2):
            _image(root / label / f"{label}{k}.png", seed=ord(label) + 7 * k)
    return root


def test_data_split_is_never_half_written_and_names_stay_under_out(tmp_path, run_cli):
    lab = _labelled(tmp_path / "lab")
    (lab / "e" / "e1.png").write_bytes(b"not an image")  # a test object (the last 40%)
    out = tmp_path / "out"
    one_line(run_cli("data", "split", "--folder", lab, "--out", out, "--name", "ds"), "e1.png", "cannot read image")
    assert not out.exists() or not list(out.iterdir())  # nothing half written, no temp folder
    _image(lab / "e" / "e1.png", seed=99)
    for bad in ("../x", "..", "a/b", "."):
        one_line(run_cli("data", "split", "--folder", lab, "--out", out, "--name", bad), "not a plain name")
    one_line(run_cli("data", "split", "--folder", tmp_path / "no", "--out", out, "--name", "../x"), "not a plain name")
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli("data", "split", "--folder", lab, "--out", out, "--name", "ds")
    assert code == 0, err
    first = sorted(p.name for p in (out / "ds" / "jpg").iterdir())
    code, _, err = run_cli("data", "split", "--folder", lab, "--out", out, "--name", "ds", "--test-objects", "a")
    assert code == 0, err  # an earlier split is replaced whole
    assert sorted(p.name for p in (out / "ds" / "jpg").iterdir()) == ["a0.jpg", "a1.jpg"] != first
    assert sorted(p.name for p in out.iterdir()) == ["ds"]  # no temp folder left
    (out / "mine").mkdir()
    (out / "mine" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a split written by aml data split"):
        write_object_split([str(p) for p in sorted(lab.rglob("*.png"))], list("aabbccddee"), out, "mine")
    assert (out / "mine" / "keep.txt").read_text() == "x"


def _lock_worker(tasks, barrier, results) -> None:
    """A child process: for each run folder, wait for the other worker, then enter `run_lock` at the same moment
    and hold it a while (a distill's whole run), reporting whether it held or was refused."""
    from aml.errors import UserError
    from aml.train.run_dir import run_lock

    while (d := tasks.get()) is not None:
        barrier.wait(timeout=120)
        try:
            with run_lock(Path(d)):
                (Path(d) / "log.jsonl").write_text("mine\n")
                time.sleep(0.3)
            results.put(("held", ""))
        except UserError as e:
            results.put(("refused", str(e)))


def test_two_runs_into_one_folder_at_once_one_is_refused(tmp_path):
    """Two processes entering one run folder at the same moment, over 10 trials: exactly one runs, the other gets
    the one-line refusal; the lock file is gone afterwards."""
    with paired_workers(_lock_worker) as run:
        for trial in range(10):
            d = tmp_path / f"run{trial}"
            got = run([str(d), str(d)])
            assert [g[0] for g in got] == ["held", "refused"], got
            assert "another aml process is writing the run folder" in got[1][1] and "\n" not in got[1][1]
            assert (d / "log.jsonl").read_text() == "mine\n" and not (d / LOCK).exists()
