"""Views of the student's training images (aml.train.augment): the right views, drawn deterministically, of the
images the step embeds; their teacher targets the cached whole images' (`whole`) or the teacher's vectors of the
same views (`view`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from aml.errors import UserError
from aml.extract import extract
from aml.registry import create_model
from aml.settings import ExtractSettings
from aml.train.augment import AUGMENTS, VIEW_TARGETS, Views, crop_box, resize_to
from aml.train.batches import ImageTensors, TeacherEmbedder
from aml.train.config import CHOICES
from aml.train.loop import Trainer
from aml.train.objective import Step
from aml.train.recipe import check, teacher_views


def _image(h: int = 30, w: int = 44) -> torch.Tensor:
    return torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w) / (3 * h * w)


def test_the_config_offers_every_view_and_target():
    assert CHOICES["augment"] == AUGMENTS
    assert CHOICES["view_targets"] == VIEW_TARGETS


def test_none_is_the_image_and_flip_is_it_or_its_mirror_both_drawn():
    x = _image()
    assert Views("none", 0.5, 0, 0)(x, 0, 0) is x
    flips = [Views("flip", 0.5, seed=3, epoch=1)(x, step, k) for step in range(4) for k in range(4)]
    assert all(torch.equal(v, x) or torch.equal(v, x.flip(-1)) for v in flips)
    assert sum(torch.equal(v, x) for v in flips) not in (0, len(flips))  # both happen


def test_views_are_deterministic_and_differ_across_steps_epochs_and_ranks():
    x = _image()
    a = Views("crop", 0.5, seed=0, epoch=2)
    assert torch.equal(a(x, 5, 1), a(x, 5, 1))
    others = [a(x, 6, 1), a(x, 5, 2), Views("crop", 0.5, 0, 3)(x, 5, 1), Views("crop", 0.5, 0, 2, 1)(x, 5, 1)]
    assert all(not torch.equal(a(x, 5, 1), o) for o in others)


@pytest.mark.parametrize("area", [0.1, 0.5, 1.0])
def test_crop_boxes_lie_in_the_image_and_keep_their_area(area):
    rng = np.random.default_rng(0)
    h, w = 30, 44
    for _ in range(500):
        top, left, ch, cw = crop_box(rng, h, w, area)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        # the area drawn in [area, 1]; clipping one side to the image keeps at least sqrt(3/4) of it
        assert ch * cw >= np.sqrt(3 / 4) * area * h * w - (h + w)


def test_a_crop_view_keeps_the_size_and_shows_part_of_the_image():
    x = torch.rand(3, 30, 44)
    views = [Views("crop", 0.5, seed=1, epoch=0)(x, 0, k) for k in range(8)]
    assert all(v.shape == x.shape and v.dtype == x.dtype for v in views)
    assert all(not torch.equal(v, x) and not torch.equal(v, x.flip(-1)) for v in views)
    flat = torch.full((3, 30, 44), 0.25)  # a constant image stays constant whatever the crop
    assert torch.allclose(Views("crop", 0.3, seed=1, epoch=0)(flat, 0, 0), flat)


def test_bad_view_options_are_clear_errors(tiny_data, tmp_path):
    with pytest.raises(UserError, match="--crop-area 1.5"):
        check(tiny_cfg(tiny_data, tmp_path, crop_area=1.5))
    with pytest.raises(UserError, match="--augment"):
        check(tiny_cfg(tiny_data, tmp_path, augment="rotate"))
    with pytest.raises(UserError, match="--view-targets view: the views are the whole images"):
        check(tiny_cfg(tiny_data, tmp_path, view_targets="view"))
    with pytest.raises(UserError, match="--augment mix: a blend of two photos has no cached target"):
        check(tiny_cfg(tiny_data, tmp_path, augment="mix"))
    with pytest.raises(UserError, match="--augment mix: loss 'contr[+]' trains on tuples"):
        check(tiny_cfg(tiny_data, tmp_path, augment="mix", view_targets="view", loss="contr+"))


def test_a_loss_that_never_reads_the_teacher_trains_on_views_without_it(tiny_data, tmp_path):
    views = dict(augment="crop", view_targets="view")
    assert teacher_views(check(tiny_cfg(tiny_data, tmp_path, loss="csd", **views)))
    assert not teacher_views(check(tiny_cfg(tiny_data, tmp_path, loss="sym", **views)))  # the no-teacher baseline
    assert not teacher_views(check(tiny_cfg(tiny_data, tmp_path, loss="csd", augment="crop")))


@pytest.mark.parametrize("student_norm", ["teacher's", "other"])
def test_the_teacher_embeds_a_steps_images_as_its_cache_does(student_norm, tiny_data, tmp_path):
    """Unviewed images: the teacher's vectors of a step's tensors are the extraction's (what the cache holds), also
    when the student normalises its inputs otherwise (renormalised to the teacher's)."""
    torch.manual_seed(0)
    net = create_model("resnet18", role="teacher", random_init=True).eval()
    paths = sorted(str(p) for p in tiny_data.rglob("*.jpg"))[:5]
    want = extract(net, paths, ExtractSettings(40, device="cpu", progress=False))
    mean, std = (net.mean, net.std) if student_norm == "teacher's" else ([0.5] * 3, [0.25] * 3)
    images = [ImageTensors(paths, 40, mean, std)[i] for i in range(len(paths))]
    got = TeacherEmbedder(net, mean, std, torch.device("cpu"))(images)
    assert not got.requires_grad
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_a_steps_views_are_its_images_views_and_mix_blends_each_crop_with_the_next():
    images = [torch.rand(3, 30, 44), torch.rand(3, 30, 44), torch.rand(3, 24, 40)]
    for kind in ("none", "flip", "crop"):  # one view per image, as drawn alone
        views = Views(kind, 0.5, seed=2, epoch=1)
        drawn = [views(x, 4, k) for k, x in enumerate(images)]
        assert all(torch.equal(a, b) for a, b in zip(views.step(images, 4), drawn, strict=True))
    mix, crop = Views("mix", 0.5, seed=2, epoch=1), Views("crop", 0.5, seed=2, epoch=1)
    mixed, crops = mix.step(images, 4), crop.step(images, 4)
    assert torch.equal(mix.step(images, 4)[0], mixed[0]) and not torch.equal(mix.step(images, 5)[0], mixed[0])
    lams = []
    for k, (x, c) in enumerate(zip(mixed, crops, strict=True)):
        assert x.shape == images[k].shape  # the next crop (the last's: the first) resized to this one's size
        nxt = resize_to(crops[(k + 1) % len(crops)], c.shape[-2:])
        lam = float(((x - nxt) * (c - nxt)).sum() / ((c - nxt) ** 2).sum())  # x = lam c + (1 - lam) nxt
        torch.testing.assert_close(x, lam * c + (1 - lam) * nxt)
        lams.append(lam)
    assert all(0 < lam < 1 for lam in lams) and len(set(np.round(lams, 6))) == len(lams)  # one lam per image
    assert mix.step(images[:1], 4)[0].equal(crop(images[0], 4, 0))  # a lone image has nothing to mix with


@pytest.mark.parametrize("kind,targets", [("none", "whole"), ("crop", "whole"), ("crop", "view"), ("mix", "view")])
def test_the_student_embeds_the_views_of_its_steps_images_against_their_targets(
    kind, targets, tiny_data, tmp_path, home
):
    cfg = tiny_cfg(tiny_data, tmp_path, loss="csd", loss_args={"k": 4.0}, epochs=1, eval_every=0, augment=kind,
                   view_targets=targets)  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    assert (trainer.teacher_embed is None) == (targets == "whole")
    seen: list[list[torch.Tensor]] = []
    used: list[torch.Tensor] = []  # the teacher vectors each step's loss read for its anchors
    embed, forward = trainer.embed, trainer.objective.forward

    def recording(images: list[torch.Tensor]) -> torch.Tensor:
        seen.append([x.clone() for x in images])
        return embed(images)

    def reading(step: Step, images: list[torch.Tensor], embed) -> torch.Tensor:
        used.append(step.anchor_teacher.clone())
        return forward(step, images, embed)

    trainer.embed, trainer.objective.forward = recording, reading
    teacher = np.array(trainer.train_teacher, dtype=np.float32)
    trainer.train_epoch(0)
    assert np.array_equal(np.asarray(trainer.train_teacher, dtype=np.float32), teacher)  # the cache unchanged

    # the same epoch's steps, replayed: the images each step embedded are the views of its clean images
    rng = np.random.default_rng([cfg.seed, 0])
    ep = trainer.objective.epoch(rng, trainer._student_vectors)
    clean = ImageTensors(trainer.train.paths, cfg.image_size, trainer.student.mean, trainer.student.std)
    views = Views(kind, cfg.crop_area, cfg.seed, 0)
    assert len(seen) == len(ep.batches) == len(used)
    teacher_net = TeacherEmbedder(trainer.teacher.net(), trainer.student.mean, trainer.student.std, trainer.device)
    changed = 0
    for step, (b, imgs, t) in enumerate(zip(ep.batches, seen, used, strict=True)):
        idx = trainer.objective.images(ep, b)
        assert len(imgs) == len(idx)
        for i, x, v in zip(idx, imgs, views.step([clean[i] for i in idx], step), strict=True):
            assert torch.equal(x, v)
            changed += not torch.equal(x, clean[i])
        cached = torch.from_numpy(teacher[idx])
        if targets == "whole":  # the cached vectors of the whole images
            assert torch.equal(t, cached)
        else:  # the teacher's vectors of the very views the student embedded, not the whole images'
            torch.testing.assert_close(t, teacher_net(imgs), atol=1e-5, rtol=0)
            assert not torch.allclose(t, cached, atol=1e-3)
    assert (changed == 0) == (kind == "none")
