"""BatchNorm statistics for random-weight students: estimated from images, then frozen; the teacher untouched."""

from __future__ import annotations

import json

import torch
from conftest import distill_args, tiny_cfg

from aml.registry import create_model
from aml.train.batchnorm import batchnorms, estimate_batchnorm, set_train_mode
from aml.train.loop import Trainer


def _spread(net: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float(net(images).std(dim=0).mean())


def test_random_student_gives_one_vector_for_all_images_until_statistics_are_estimated():
    net = create_model("mobilenetv2", role="student", dim=16, random_init=True).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=g)
    assert _spread(net, images) < 1e-4  # activations vanish through frozen identity statistics
    seen = estimate_batchnorm(
        net, [list(images[:3]), list(images[3:]) + [torch.rand(3, 48, 64, generator=g)]], torch.device("cpu")
    )
    assert seen == 7
    assert not net.training and not any(m.training for m in batchnorms(net))
    assert _spread(net, images) > 1e-2
    assert all(m.momentum == 0.1 for m in batchnorms(net))  # restored after the cumulative average


def test_set_train_mode_freezes_batchnorm_only():
    net = create_model("resnet18", role="student", dim=8, random_init=True)
    set_train_mode(net)
    assert net.training and not any(m.training for m in batchnorms(net))


def test_student_random_init_keeps_the_teacher_and_estimates_statistics(tiny_data, tmp_path, home):
    cfg = tiny_cfg(
        tiny_data,
        tmp_path / "run",
        random_init=False,
        teacher="lite0",
        student="resnet18",
        student_random_init=True,
        bn_images=6,
        epochs=1,
        head_init="random",  # the fitted start would change the head too; this test is about the statistics
    )
    trainer = Trainer(cfg, progress=False)
    assert trainer.identity["weights"].startswith("bundled:")  # the teacher keeps its ImageNet weights
    fresh = create_model("resnet18", role="student", dim=trainer.identity["dim"], random_init=True)
    bn, bn0 = batchnorms(trainer.student)[0], batchnorms(fresh)[0]
    assert bn.num_batches_tracked > 0 and not torch.allclose(bn.running_var, bn0.running_var)
    conv = dict(trainer.student.named_parameters())
    assert all(torch.equal(conv[n], p) for n, p in fresh.named_parameters())  # only statistics changed


def test_pretrained_student_statistics_stay_imagenet(tiny_data, tmp_path, home):
    cfg = tiny_cfg(tiny_data, tmp_path / "run", random_init=False, teacher="lite0", student="lite0", epochs=1)
    trainer = Trainer(cfg, progress=False)
    fresh = create_model("lite0", role="student", dim=trainer.identity["dim"])
    for a, b in zip(batchnorms(trainer.student), batchnorms(fresh), strict=True):
        assert torch.equal(a.running_mean, b.running_mean)


def test_cli_accepts_student_random_init(tiny_data, tmp_path, home, run_cli):
    options = dict(teacher="lite0", random_init=False, student_random_init=True, query_size=4, pool_size=8)
    args = distill_args(tiny_data, tmp_path / "cli", **options, batch_size=2, head_lr_mult=5)
    code, out, err = run_cli("distill", *args)
    assert code == 0, err
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cfg["student_random_init"] is True and cfg["random_init"] is False and cfg["head_lr_mult"] == 5
