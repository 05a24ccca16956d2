"""NormSoftmax in the trainer: class-balanced batches, teacher proxies frozen, warm-up, exact resume, DDP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import aml_torchrun, distill_args, tiny_cfg

from aml.errors import UserError
from aml.losses.normsoftmax import class_labels, class_proxies, fit_proxies
from aml.train.checkpoint import load_checkpoint
from aml.train.config import TrainConfig
from aml.train.epoch import class_balanced_batches, plan_classes
from aml.train.loop import Trainer, distill
from aml.train.recipe import check, head_norm, warmup_epochs


def ns_cfg(data, out, **changes) -> TrainConfig:
    base = dict(loss="normsoftmax", batch_size=4, per_class=2, eval_every=0)
    return tiny_cfg(data, out, **{**base, **changes})


def test_class_balanced_batches_are_classes_times_distinct_images_and_seeded():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4 + [4] * 2)
    batches = class_balanced_batches(labels, 20, classes=3, per_class=2, rng=np.random.default_rng(7))
    seen = set()
    for b in batches:
        assert len(b) == 6 and len(set(b.tolist())) == 6  # distinct images
        cls = labels[b]
        assert [len(set(cls[i : i + 2].tolist())) for i in range(0, 6, 2)] == [1, 1, 1]  # K of each class in turn
        assert len(set(cls.tolist())) == 3 and 2 not in cls  # distinct classes; a 1-image class never drawn
        seen |= set(cls.tolist())
    assert seen == {0, 1, 3, 4}
    again = class_balanced_batches(labels, 20, classes=3, per_class=2, rng=np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    with pytest.raises(UserError, match="2 classes have at least --per-class 4 images, a batch needs 3"):
        class_balanced_batches(labels, 1, classes=3, per_class=4, rng=np.random.default_rng(0))


def test_epoch_plan_fixes_its_batches(tiny_data, tmp_path):
    from aml.data.spec import parse_data_spec

    cfg = ns_cfg(tiny_data, tmp_path, query_size=9)
    train = parse_data_spec(cfg.data).train
    labels, _ = class_labels(train.cluster)
    plan = plan_classes(cfg, train, labels, np.random.default_rng([cfg.seed, 1]))
    assert len(plan.batches) == 2 and all(len(b) == 4 for b in plan.batches)  # 9 // 4 batches of 2 x 2
    for b in plan.batches:
        cls = labels[plan.anchors[b]]
        assert cls[0] == cls[1] and cls[2] == cls[3] and cls[0] != cls[2]
    same = plan_classes(cfg, train, labels, np.random.default_rng([cfg.seed, 1]))  # a function of (seed, epoch)
    assert np.array_equal(plan.anchors, same.anchors)


def test_teacher_proxies_are_frozen_class_means_and_warmup_freezes_the_backbone(tiny_data, tmp_path, home):
    trainer = Trainer(ns_cfg(tiny_data, tmp_path / "run", epochs=2), progress=False)
    cfg = trainer.cfg
    assert (cfg.proxies, warmup_epochs(cfg), head_norm(cfg)) == ("teacher-mean", 1, "none")
    want = class_proxies(trainer.train_teacher, trainer.objective.labels, trainer.objective.num_classes)
    torch.testing.assert_close(trainer.objective.proxies, want)
    assert not trainer.objective.proxies.requires_grad and len(trainer.optimizer.param_groups) == 3
    proxies = trainer.objective.proxies.clone()

    def split():
        sd = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
        return {k: v for k, v in sd.items() if k.startswith(("proj.", "fc."))}, {
            k: v for k, v in sd.items() if not k.startswith(("proj.", "fc."))
        }

    head0, body0 = split()
    stats = trainer.train_epoch(0)
    head1, body1 = split()
    assert stats["warmup"] and np.isfinite(stats["loss"]) and stats["steps"] == 2
    assert all(torch.equal(body0[k], body1[k]) for k in body0)  # backbone and GeM p untouched
    assert any(not torch.equal(head0[k], head1[k]) for k in head0)  # the head trained
    frozen = [p for n, p in trainer.student.named_parameters() if not n.startswith(("proj.", "fc."))]
    assert all(p not in trainer.optimizer.state for p in frozen)  # no Adam state either
    stats = trainer.train_epoch(1)
    _, body2 = split()
    assert not stats["warmup"] and any(not torch.equal(body1[k], body2[k]) for k in body1)
    assert torch.equal(trainer.objective.proxies, proxies)  # the teacher's proxies never move


def test_learned_proxies_resume_bit_for_bit(tiny_data, tmp_path, home):
    cfg = ns_cfg(tiny_data, tmp_path / "full", proxies="learned", epochs=2)
    full = distill(cfg, progress=False)
    a = load_checkpoint(full / "last.pt")
    assert a["config"]["proxies"] == "learned" and a["proxies"].shape == (6, 512)
    assert a["meta"]["layernorm"] is True and a["init"]["method"] == "random"  # symmetric: never sees the teacher

    half = cfg.replace(out=str(tmp_path / "half"))
    distill(half.replace(epochs=1), progress=False)
    first = load_checkpoint(tmp_path / "half" / "last.pt")
    trainer = Trainer(half, resume=True, progress=False)
    torch.testing.assert_close(trainer.objective.proxies.detach().cpu(), first["proxies"], rtol=0, atol=0)
    trainer.fit()
    b = load_checkpoint(tmp_path / "half" / "last.pt")
    assert torch.equal(a["proxies"], b["proxies"]) and not torch.equal(a["proxies"], first["proxies"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_teacher_trained_proxies_are_fitted_frozen_checkpointed_and_reused_on_resume(
    tiny_data, tmp_path, home, monkeypatch
):
    cfg = ns_cfg(tiny_data, tmp_path / "run", proxies="teacher-trained", epochs=2)
    trainer = Trainer(cfg, progress=False)
    want, fit = fit_proxies(
        trainer.train_teacher, trainer.objective.labels, trainer.objective.num_classes, seed=cfg.seed
    )
    torch.testing.assert_close(trainer.objective.proxies, want, rtol=0, atol=0)
    assert trainer.objective.fit == fit and fit["loss_after"] < fit["loss_before"]
    assert not trainer.objective.proxies.requires_grad and len(trainer.optimizer.param_groups) == 3  # not optimised
    assert not torch.allclose(
        want, class_proxies(trainer.train_teacher, trainer.objective.labels, trainer.objective.num_classes)
    )
    distill(cfg.replace(epochs=1), progress=False)
    first = load_checkpoint(tmp_path / "run" / "last.pt")
    assert torch.equal(first["proxies"], want) and first["proxy_fit"] == fit
    log0 = (tmp_path / "run" / "log.jsonl").read_text().splitlines()[0]
    assert '"proxy_fit"' in log0
    with monkeypatch.context() as m:  # a resumed run takes the fitted proxies from the checkpoint, never refits
        m.setattr("aml.train.objective.fit_proxies", lambda *a, **k: pytest.fail("refitted on resume"))
        resumed = Trainer(cfg, resume=True, progress=False)
    assert torch.equal(resumed.objective.proxies, want) and resumed.objective.fit == fit
    resumed.fit()
    assert torch.equal(load_checkpoint(tmp_path / "run" / "last.pt")["proxies"], want)  # frozen throughout


def test_too_few_classes_for_a_batch_is_refused_before_training(tiny_data, tmp_path, home):
    with pytest.raises(UserError, match="--per-class 4 images"):
        Trainer(ns_cfg(tiny_data, tmp_path / "r", batch_size=8, per_class=4), progress=False)
    with pytest.raises(UserError, match="--batch-size 1: a class-balanced batch"):
        check(ns_cfg(tiny_data, tmp_path / "r", batch_size=1))


def test_ddp_two_cpu_processes_learned_proxies_and_warmup(tiny_data, tmp_path, home):
    """torchrun, two gloo ranks: warm-up rebuilds DDP over the head alone, then over everything; proxies averaged."""
    out = tmp_path / "ddp"
    ns = dict(loss="normsoftmax", proxies="learned", epochs=2, batch_size=4, per_class=2, eval_every=0)
    p = aml_torchrun("distill", *distill_args(tiny_data, out, **ns, pool_size=None, neg_num=None), timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and torch.isfinite(ckpt["proxies"]).all()
    assert ckpt["metrics"]["warmup"] is False and ckpt["metrics"]["steps"] == 1  # 2 batches, one per rank
