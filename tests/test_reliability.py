"""Issue 13, phase 2: the CLI side of 'trust nothing from disk' (docs/RELIABILITY.md): --trust-pickle, option
values checked before any work, no run overwritten, resume from the checkpoint's config, models and output paths
checked first, exported model and sidecar a matched pair, a student checked against its teacher, stale temp
folders removed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, one_line, read_only_folder, tiny_cfg
from PIL import Image

from aml import trust
from aml.data.revisitop import write_revisitop
from aml.data.synth import generate_synth
from aml.errors import UserError
from aml.identity import check_compatible, recorded_teacher
from aml.io import TMP_TAG, atomic_write, host_tag, temp_dir
from aml.train.checkpoint import load_checkpoint
from aml.train.config import TrainConfig
from aml.train.loop import Trainer, distill
from aml.train.recipe import check
from tests.test_trust import _evil_torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    monkeypatch.delenv(trust.ENV, raising=False)
    trust.set_trust_pickle(False)
    yield
    trust.set_trust_pickle(False)


@pytest.fixture
def data(tiny_data):
    """The trainer tests' tiny synthetic set (conftest), under the name these tests use."""
    return tiny_data


def click_error(result, *needles):
    code, out, err = result
    assert code == 2 and "Traceback" not in err, (code, err)
    for n in needles:
        assert n in err, err


# ------------------------------------------------------------------------------------------- --trust-pickle
def test_trust_pickle_flag_is_the_opt_in(tmp_path, image_list, run_cli):
    evil, marker = _evil_torch(tmp_path)
    args = ("extract", "--model", evil, "--images", image_list, "--image-size", "32", "--out", tmp_path / "v.npy")
    one_line(run_cli(*args), "refused to load", "--trust-pickle")
    assert not marker.exists()
    code, _, err = run_cli(*args[:1], "--trust-pickle", *args[1:])
    assert marker.exists() and "warning:" in err and "full unpickling" in err  # the user asked for it


@pytest.mark.parametrize("name", ["extract", "evaluate", "distill", "export"])
def test_every_loading_command_has_trust_pickle(name):
    import importlib

    cmd = importlib.import_module(f"aml.commands.{name}").command
    for sub in getattr(cmd, "commands", {"": cmd}).values():  # a group (evaluate): every subcommand
        assert "--trust-pickle" in [o for p in sub.params for o in p.opts]


def test_data_info_has_trust_pickle():
    from aml.commands.data import command

    assert "--trust-pickle" in [o for p in command.commands["info"].params for o in p.opts]


# ------------------------------------------------------------------------------------------- evaluate files
def _tiny_dataset(root: Path) -> None:
    gnd = [{"bbx": [0, 0, 3, 3], "easy": [0], "hard": [1], "junk": []}]
    write_revisitop(root, "tiny", ["a", "b", "c"], ["q"], gnd)


def test_evaluate_empty_npy_is_one_line_not_aborted(tmp_path, run_cli):
    _tiny_dataset(tmp_path)
    (tmp_path / "db.npy").write_bytes(b"")
    np.save(tmp_path / "q.npy", np.eye(1, 3, dtype=np.float32))
    args = ["--db-features", tmp_path / "db.npy", "--query-features", tmp_path / "q.npy"]
    one_line(run_cli("evaluate", "--dataset", "tiny", "--data-root", tmp_path, *args), "db.npy")


# ------------------------------------------------------------------------------------------- option values
@pytest.mark.parametrize(
    "option",
    [
        ("--batch-size", "0"),
        ("--image-size", "0"),
        ("--neg-num", "-1"),
        ("--lr", "-1"),
        ("--update-every", "0"),
        ("--device", "tpu"),
        ("--query-size", "0"),
        ("--epochs", "-1"),
        ("--lr-decay", "0"),
    ],
)
def test_distill_option_values_are_checked_before_any_work(option, tmp_path, home, run_cli):
    data = tmp_path / "never"
    click_error(run_cli("distill", *option, "--data", f"synth:{data}", "--out", tmp_path / "run"), option[0])
    assert not data.exists() and not (tmp_path / "run").exists()


def test_loss_arg_naming_a_tensor_input_is_one_line(tmp_path, home, run_cli):
    data = tmp_path / "never"
    result = run_cli("distill", "--loss-arg", "anchor_teacher=1", "--data", f"synth:{data}", "--out", tmp_path / "r")
    one_line(result, "anchor_teacher", "not a constant")
    assert not data.exists()


def test_train_config_check_gives_python_callers_the_same_checks():
    assert check(TrainConfig(epochs=0)).epochs == 0  # valid: writes the initialised student
    for bad, match in [
        (dict(batch_size=0), "--batch-size 0"),
        (dict(epochs=-1), "--epochs -1"),
        (dict(device="tpu"), "--device tpu"),
        (dict(mining="best"), "--mining best"),
        (dict(lr_decay=0.0), "--lr-decay"),
        (dict(loss_args={"ref": 1.0}), "'ref' is an input"),
    ]:
        with pytest.raises(UserError, match=match):
            check(TrainConfig(**bad))
    with pytest.raises(UserError, match="--neg-num"):
        Trainer(TrainConfig(neg_num=-1), progress=False)


@pytest.mark.parametrize("name", ["extract", "evaluate"])
def test_device_is_a_choice_on_every_command(name, tmp_path, image_list, run_cli):
    args = {
        "extract": ["--model", "resnet18", "--random-init", "--images", image_list, "--image-size", "32"],
        "evaluate": ["--dataset", "x", "--data-root", tmp_path],
    }[name]
    extra = ["--out", tmp_path / "v.npy"] if name == "extract" else []
    click_error(run_cli(name, *args, *extra, "--device", "tpu"), "tpu", "cuda")


def test_binary_image_list_is_not_a_text_list(tmp_path, run_cli):
    lst = tmp_path / "list.txt"
    lst.write_bytes(bytes(range(256)) * 4)
    args = ["--model", "resnet18", "--random-init", "--image-size", "32", "--out", tmp_path / "v.npy"]
    one_line(run_cli("extract", "--images", lst, *args), "not a text list")


# ------------------------------------------------------------------------------------------- run folders
def test_a_finished_run_is_never_overwritten(data, tmp_path, home):
    cfg = tiny_cfg(data, tmp_path / "run", epochs=1, eval_every=0)
    run = distill(cfg, progress=False)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(UserError, match=r"holds a run.*--resume.*new --out.*--overwrite"):
        Trainer(cfg, progress=False)
    assert (run / "last.pt").read_bytes() == before
    (run / "notes.txt").write_text("mine")
    (run / "epoch_007.pt").write_bytes(b"x")
    Trainer(cfg, overwrite=True, progress=False)
    assert not (run / "last.pt").exists() and not (run / "epoch_007.pt").exists() and not (run / "log.jsonl").exists()
    assert (run / "notes.txt").read_text() == "mine"  # only aml's own run files are removed


def test_resume_takes_the_checkpoints_config_and_compares_only_given_options(data, tmp_path, home, run_cli):
    cfg = tiny_cfg(data, tmp_path / "run", epochs=1, eval_every=0)
    distill(cfg, progress=False)
    other = TrainConfig(out=cfg.out)  # the aml preset: another teacher, lr, sizes ... none of them given
    t = Trainer(other.replace(epochs=2), resume=True, given=frozenset({"epochs"}), progress=False)
    assert t.cfg.lr == cfg.lr and t.cfg.teacher == cfg.teacher and t.cfg.epochs == 2 and t.start_epoch == 1
    with pytest.raises(UserError, match="option 'lr' differs"):
        Trainer(cfg.replace(lr=0.5), resume=True, given=frozenset({"lr"}), progress=False)
    code, out, err = run_cli("distill", "--out", tmp_path / "run", "--resume")  # the demo preset differs: fine
    assert code == 0 and f"run: {tmp_path / 'run'}" in out, err
    # the next step it prints scores the run's own test set, not the preset's default (which it never generates)
    assert f"--teacher {cfg.teacher} " in out and f"--data-root {cfg.data[0].split(':', 1)[1]}" in out, out
    assert not list((home / "datasets").glob("synth-*"))
    one_line(run_cli("distill", "--out", tmp_path / "run", "--resume", "--lr", "0.5"), "'lr' differs")


def test_resume_from_a_damaged_checkpoint_names_the_key(data, tmp_path, home):
    cfg = tiny_cfg(data, tmp_path / "run", epochs=1, eval_every=0)
    run = distill(cfg, progress=False)
    ck = load_checkpoint(run / "last.pt")
    key = next(k for k, v in ck["state_dict"].items() if v.ndim == 4)
    bad = {**ck, "state_dict": {**ck["state_dict"], key: torch.zeros(1, 1, 1, 1)}}
    save = lambda obj: ((run / "last.pt").unlink(), torch.save(obj, run / "last.pt"))  # noqa: E731 - new inode (mmap)
    save(bad)
    with pytest.raises(UserError, match=rf"last\.pt: state_dict: key '{key}' has shape \(1, 1, 1, 1\)"):
        Trainer(cfg.replace(epochs=2), resume=True, progress=False)
    save({**ck, "optimizer": {"state": {}, "param_groups": []}})
    with pytest.raises(UserError, match=r"last\.pt: optimizer: state does not fit"):
        Trainer(cfg.replace(epochs=2), resume=True, progress=False)
    save({**ck, "scheduler": "nonsense"})
    with pytest.raises(UserError, match=r"last\.pt: scheduler: state does not fit"):
        Trainer(cfg.replace(epochs=2), resume=True, progress=False)


def test_models_are_checked_before_the_synthetic_set_is_generated(tmp_path, home, run_cli):
    data = tmp_path / "synth-never"
    args = ["--teacher", "rn101", "--student", "effnet-b3", "--data", f"synth:{data}", "--out", tmp_path / "r"]
    one_line(run_cli("distill", *args), "--teacher-weights FILE")
    assert not data.exists()
    with pytest.raises(UserError, match="--student-weights"):
        Trainer(TrainConfig(teacher="lite2", student="effnet-b3", data=f"synth:{data}"))
    assert not data.exists()


# ------------------------------------------------------------------------------------------- output paths
def test_unwritable_outputs_are_one_line_before_the_work(tmp_path, image_list, run_cli):
    (tmp_path / "file").write_text("x")
    base = ["extract", "--model", "resnet18", "--random-init", "--images", image_list, "--image-size", "32"]
    one_line(run_cli(*base, "--out", tmp_path / "file" / "v.npy"), "file", "is a file, not a folder")
    _tiny_dataset(tmp_path)
    args = ["--dataset", "tiny", "--data-root", tmp_path, "--db-features", "x.npy", "--query-features", "q.npy"]
    one_line(run_cli("evaluate", *args, "--json", tmp_path / "file" / "s.json"), "--json", "is a file")
    with read_only_folder(tmp_path / "ro") as ro:
        if ro is not None:
            one_line(run_cli(*base, "--out", ro / "v.npy"), "not writable")
            with pytest.raises(UserError, match="not writable"):
                Trainer(TrainConfig(out=str(ro / "run")), progress=False)


def test_no_space_while_writing_results_names_the_path(tmp_path, image_list, run_cli, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "v.npy"
    args = ["--model", "resnet18", "--random-init", "--images", image_list, "--image-size", "32", "--out", out]
    one_line(run_cli("extract", *args, "--quiet"), f"error: {out}: no space left on the device")  # no progress
    with (
        pytest.raises(UserError, match=f"^{tmp_path / 'r.json'}: no space left on the device"),
        atomic_write(tmp_path / "r.json") as f,
    ):
        f.write("x")
        full()


# ------------------------------------------------------------------------------------------- export pair
def test_embed_refuses_a_model_that_is_not_its_sidecars(tmp_path):
    from conftest import valid_sidecar

    from aml.io import sha256_file
    from aml.onnx_embed import OnnxEncoder
    from aml.sidecar import write_sidecar

    model = tmp_path / "enc.onnx"
    model.write_bytes(b"new model bytes")
    info = valid_sidecar() | {"sha256": "0" * 64}
    write_sidecar(model, info)  # the sidecar of another export (a killed re-export)
    with pytest.raises(UserError, match="does not match its sidecar"):
        OnnxEncoder(model)
    write_sidecar(model, {**info, "sha256": sha256_file(model)})
    with pytest.raises(UserError, match="onnxruntime cannot load"):  # the pair matches: on to loading it
        OnnxEncoder(model)
    write_sidecar(model, {k: v for k, v in info.items() if k != "sha256"})
    with pytest.raises(UserError, match="'sha256' missing"):
        OnnxEncoder(model)


def test_export_writes_the_sidecar_before_the_model(monkeypatch):
    """A kill between the two renames must leave the old model beside the new sidecar (refused by embed)."""
    import inspect

    from aml.export import pipeline

    src = inspect.getsource(pipeline._write)
    assert src.index("write_sidecar(out, info)") < src.index("install(tmp_model, out)")
    assert src.index("sha256_path(tmp_model)") < src.index("write_sidecar(out, info)")


# ------------------------------------------------------------------------------------------- teacher pairs
def test_check_compatible_names_both_identities():
    t = {"name": "rn101", "weights": "w.pth", "sha256": "a" * 64, "dim": 2048}

    def check(meta):
        have, fields = recorded_teacher(meta)
        return check_compatible(have, t, what="s.pt was distilled for", where="--teacher is", fix="fix", fields=fields)

    assert check({"aml": {"teacher": dict(t)}}) == ""
    for change in ({"sha256": "b" * 64}, {"name": "lite2"}, {"dim": 1280}):
        with pytest.raises(UserError, match=r"distilled for .*, but --teacher is rn101 \(sha256 aaaaaaaaaaaa, 2048-d"):
            check({"aml": {"teacher": {**t, **change}}})
    assert check({"aml": {"dim": 2048}}) == ""  # records no teacher: the dim must fit
    with pytest.raises(UserError, match="for 512-d vectors, but"):
        check({"aml": {"dim": 512}})
    assert check({}) == ""  # nothing recorded: nothing to check


def test_evaluate_refuses_a_student_of_another_teacher(tmp_path, run_cli):
    _tiny_dataset(tmp_path)
    other = {"name": "lite2", "weights": "bundled", "sha256": "c" * 64, "dim": 512}
    meta = {"architecture": "resnet18", "aml": {"name": "resnet18", "role": "student", "dim": 512, "teacher": other}}
    student = tmp_path / "student.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": meta}, student)
    args = ["evaluate", "--dataset", "tiny", "--data-root", tmp_path, "--teacher", "resnet18", "--random-init"]
    one_line(run_cli(*args, "--student", student), "distilled for teacher lite2", "--teacher is resnet18", "--force")
    code, _, err = run_cli(*args, "--student", student, "--force")
    assert "warning:" in err and "distilled for teacher lite2" in err and "Traceback" not in err


def test_export_gate_refuses_a_teacher_other_than_the_recorded_one(tmp_path, monkeypatch):
    """The retrieval gate's database is the teacher the student records; a changed weights file is refused."""
    from aml.export.pipeline import default_verify_data
    from aml.registry import model_identity

    _tiny_dataset(tmp_path)
    for name in ("a", "b", "c", "q"):
        Image.new("RGB", (8, 8)).save(tmp_path / "tiny" / "jpg" / f"{name}.jpg")
    monkeypatch.setenv("AML_HOME", str(tmp_path / "home"))
    recorded = {**model_identity("lite2"), "sha256": "0" * 64}
    with pytest.raises(UserError, match=r"s.pt: distilled for teacher lite2 \(sha256 000000000000.*found now is lite2"):
        default_verify_data({}, str(tmp_path / "tiny"), recorded, 32, None, "s.pt")


# ------------------------------------------------------------------------------------------- temp folders
def test_stale_temp_folders_of_a_killed_generation_are_removed(tmp_path):
    out = tmp_path / "synth"
    stale = tmp_path / f".synth{TMP_TAG}{host_tag()}-999999999-abc"
    live = tmp_path / f".synth{TMP_TAG}{host_tag()}-{os.getpid()}-abc"
    for d in (stale, live):
        (d / "train").mkdir(parents=True)
    generate_synth(out, TINY)
    assert not stale.exists() and live.exists() and out.is_dir()
    new = temp_dir(tmp_path / "split")
    assert new.is_dir() and new.name.startswith(f".split{TMP_TAG}{host_tag()}-{os.getpid()}-")
