"""The closed-form start: each method fits the student's head to the teacher, deterministically, before epoch 1;
a zero-epoch run is the closed form alone; the head is kept by checkpoints, resume and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from aml.registry import create_model
from aml.train.checkpoint import load_checkpoint
from aml.train.head_init import HEAD_INITS, fit_images, head_for, init_head
from aml.train.loop import Trainer, distill


def _teacher_vectors(net, paths, size):
    from aml.extract import extract
    from aml.settings import ExtractSettings

    return extract(net, paths, ExtractSettings(size, device="cpu", progress=False))


@pytest.mark.parametrize("method", [m for m in HEAD_INITS if m != "random"])
def test_same_backbone_on_both_sides_is_recovered_exactly(method, tmp_path):
    """Student and teacher with the same random backbone: the known relation is the identity, and every
    closed form finds it (the student's vectors become the teacher's). 24 random 160 px images: enough local
    descriptors (5 x 5 per image) to span the 512 dimensions, which a rotation fitted on them needs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(paths[-1])
    teacher = create_model("resnet18", role="teacher", random_init=True)
    student = create_model("resnet18", role="student", dim=512, head=head_for(method), random_init=True)
    t = _teacher_vectors(teacher, paths, 160)
    info = init_head(
        student, method, paths=paths, teacher_vectors=t, teacher_net=lambda: teacher, image_size=160, device="cpu"
    )
    assert info["method"] == method and info["images"] == len(paths) and info["pairs"] >= len(paths)
    assert info["residual"] < 1e-3
    s = _teacher_vectors(student, paths, 160)
    cos = (s * t).sum(1)
    assert cos.min() > 0.99, (method, cos.min())


def test_init_is_deterministic_and_a_zero_epoch_run_writes_it(tiny_data, tmp_path, monkeypatch):
    runs = []
    for i in range(2):  # two homes: the second run fits again instead of reading the first one's cached start
        monkeypatch.setenv("AML_HOME", str(tmp_path / f"home{i}"))
        runs.append(distill(tiny_cfg(tiny_data, tmp_path / f"run{i}", epochs=0), progress=False))
    a, b = (load_checkpoint(r / "last.pt") for r in runs)
    assert a["epoch"] == 0 and (runs[0] / "epoch_000.pt").is_file()
    assert torch.equal(a["state_dict"]["fc.weight"], b["state_dict"]["fc.weight"])
    assert a["init"]["method"] == "local-procrustes" and np.isfinite(a["init"]["residual"])
    assert json.loads((runs[0] / "config.json").read_text())["head_init"] == "auto"
    (first,) = [json.loads(line) for line in (runs[0] / "log.jsonl").read_text().splitlines()]
    assert first["epoch"] == 0 and first["init"] == a["init"] and {"student", "asymmetric"} <= set(first["eval"])
    assert a["metrics"]["eval"] == first["eval"]  # the closed form alone is a row of every table


def test_random_keeps_the_aml_papers_head_and_start(tiny_data, tmp_path, home):
    run = distill(tiny_cfg(tiny_data, tmp_path / "r", epochs=1, head_init="random"), progress=False)
    ck = load_checkpoint(run / "last.pt")
    assert "proj.0.weight" in ck["state_dict"] and "fc.weight" not in ck["state_dict"]
    assert ck["init"] == {"method": "random", "head": "aml"}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "eval" not in log[0]  # nothing fitted: no extra evaluation before epoch 1


def test_resume_keeps_the_init_record_and_does_not_refit(tiny_data, tmp_path, home):
    cfg = tiny_cfg(tiny_data, tmp_path / "run", epochs=1, eval_every=0)
    distill(cfg, progress=False)
    first = load_checkpoint(tmp_path / "run" / "last.pt")["init"]
    trainer = Trainer(cfg.replace(epochs=2), resume=True, progress=False)
    assert not trainer.teacher.built  # no refit: the teacher network is not even built
    trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["init"] == first


def test_checkpoint_with_a_linear_head_loads_and_exports(tiny_data, tmp_path, home):
    from aml.export import pipeline

    run = distill(tiny_cfg(tiny_data, tmp_path / "run", epochs=0, eval_every=0), progress=False)
    student = create_model(run / "last.pt").eval()
    assert student.head == "linear" and student.dim == 512 and student.msp == 1.0
    info = pipeline.export_checkpoint(run / "last.pt", pipeline.ExportSettings(fmt="onnx"), out=tmp_path / "enc.onnx")
    assert info["verification"]["equivalence"]["passed"]


def test_fit_images_is_a_seeded_subset():
    assert fit_images(10, 0, 0).tolist() == list(range(10))
    a, b = fit_images(100, 7, 3), fit_images(100, 7, 3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 7 and list(a) == sorted(a)


def test_head_and_method_must_match():
    student = create_model("resnet18", role="student", dim=8, head="aml", random_init=True)
    with pytest.raises(ValueError, match="linear"):
        init_head(student, "procrustes", paths=[], teacher_vectors=np.zeros((0, 8)), teacher_net=None, image_size=8)
    with pytest.raises(ValueError, match="expected one of"):
        head_for("pca")


def test_a_rerun_reads_the_fitted_start_from_the_cache(tiny_data, tmp_path, home):
    first = Trainer(tiny_cfg(tiny_data, tmp_path / "a", epochs=0), progress=False)
    assert first.teacher.built and "cached" not in first.init_info
    again = Trainer(tiny_cfg(tiny_data, tmp_path / "b", epochs=0, loss="reg"), progress=False)  # another method
    assert not again.teacher.built and again.init_info["cached"]
    assert torch.equal(first.student.fc.weight, again.student.fc.weight)
    other = Trainer(tiny_cfg(tiny_data, tmp_path / "c", epochs=0, init_images=5), progress=False)
    assert "cached" not in other.init_info  # another fit: another key
