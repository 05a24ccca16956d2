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


def _random_images(folder, n, seed=0):
    """`n` random photos of two shapes (portrait and landscape), so a fit meets more than one image size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.png"))
        shape = (160, 192, 3) if i % 3 else (192, 160, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    return paths


def _dense_fit(student, teacher, paths, size, method):
    """The closed form on every location pair stacked at once (the reference the streamed fit must equal):
    torch maps, image by image, the image and its mirror."""
    from aml.closed_form import CrossCovariance
    from aml.nn import l2n
    from aml.train.batches import ImageTensors
    from aml.train.head_init import _common_grid, _rows

    images = ImageTensors(paths, size, student.mean, student.std)
    s_rows, t_rows = [], []
    with torch.inference_mode():
        for i in range(len(paths)):
            for x in (images[i][None], images[i][None].flip(-1)):
                a, b = _common_grid(student.eval().trunk(x), teacher.eval().trunk(x))
                a, b = _rows(a), _rows(b)
                if method == "local-procrustes":
                    a, b = l2n(a.clamp(min=1e-6)), l2n(b.clamp(min=1e-6))
                s_rows.append(a.numpy())
                t_rows.append(b.numpy())
    acc = CrossCovariance(student.out_channels, teacher.out_channels)
    acc.add(np.concatenate(s_rows), np.concatenate(t_rows))
    return acc.procrustes() if method == "local-procrustes" else acc.lstsq()


@pytest.mark.parametrize("backend", ["torch", "torch-batched", "onnxruntime"])
@pytest.mark.parametrize("method", ["local-procrustes", "lstsq"])
def test_streamed_fit_equals_the_closed_form_on_all_pairs_at_once(method, backend, tmp_path, monkeypatch):
    """The fit streams (sums only, O(D^2) memory), one image per forward on the CPU (same-size batches with their
    mirrors elsewhere), and reads the maps from onnxruntime when it may: the map equals the closed form on every
    pair of every image stacked at once."""
    from aml.train import head_init

    monkeypatch.setenv("AML_HOME", str(tmp_path / "home"))
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        monkeypatch.setattr(head_init, "ORT_MIN_IMAGES", 1)  # the tiny fit takes the fast path too
    else:
        monkeypatch.setattr(head_init.ort_backend, "available", lambda: False)
    if backend == "torch-batched":  # an accelerator's path: images of one size and their mirrors in one forward
        monkeypatch.setattr(head_init, "_per_image", lambda dev: False)
    paths = _random_images(tmp_path, 14)
    teacher = create_model("resnet18", role="teacher", random_init=True)
    student = create_model("resnet18", role="student", dim=512, head=head_for(method), random_init=True)
    with torch.no_grad():  # another backbone than the teacher's: the relation is not the identity
        for w in student.features.parameters():
            w.mul_(1.0 + 0.2 * torch.randn_like(w))
    want = _dense_fit(student, teacher, paths, 160, method)
    t = np.zeros((len(paths), 512), dtype=np.float32)
    info = init_head(student, method, paths=paths, teacher_vectors=t, teacher_net=lambda: teacher, image_size=160)
    w = student.fc.weight if method == "local-procrustes" else student.proj[0].weight[:, :, 0, 0]
    got = w.detach().T.numpy()
    assert info["pairs"] == 14 * 2 * 25  # 5 x 5 maps, mirrored
    tol = 1e-5 if backend == "torch" else 2e-4  # other kernels: the maps differ from torch's in float rounding only
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max())


def test_the_residual_reads_a_bounded_seeded_sample(monkeypatch):
    """A fit on more than RESIDUAL_IMAGES images keeps that many pooled vectors for its residual, drawn under the
    seed; smaller fits keep all."""
    from aml.train import head_init

    monkeypatch.setattr(head_init, "RESIDUAL_IMAGES", 5)
    a = head_init._residual_positions(12, 0)
    assert len(a) == 5 and a.tolist() == sorted(set(a.tolist())) and a.max() < 12
    assert a.tolist() == head_init._residual_positions(12, 0).tolist()
    assert head_init._residual_positions(4, 0).tolist() == [0, 1, 2, 3]


def test_the_fit_shows_progress_and_a_cached_fit_says_so(tmp_path, monkeypatch, capsys):
    """The fit draws the one progress bar (a line at start and end in a log), and a start read from the cache
    says so in one line naming the file."""
    from aml.train.head_init import cached_init_head

    monkeypatch.setenv("AML_PROGRESS_INTERVAL", "0")
    paths = _random_images(tmp_path, 6)
    t = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    kw = dict(paths=paths, teacher_vectors=t, teacher_net=None, image_size=64, progress=True)
    student = create_model("resnet18", role="student", dim=512, head="linear", random_init=True)
    first = cached_init_head(student, "procrustes", cache_dir=tmp_path / "cache", key={}, **kw)
    out = capsys.readouterr()
    assert "closed-form start (procrustes): 6/6 img" in out.err and "cached" not in first
    assert "read from the cache" not in out.out
    again = cached_init_head(student, "procrustes", cache_dir=tmp_path / "cache", key={}, **kw)
    out = capsys.readouterr()
    (line,) = [x for x in out.out.splitlines() if "read from the cache" in x]
    assert again["cached"] and str(tmp_path / "cache" / "head-init-") in line and "6 images" in line
    assert "closed-form start (procrustes): " not in out.err  # nothing fitted, no bar
