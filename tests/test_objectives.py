"""Training objectives own their inputs: a new loss reading one more input trains with nothing added to the trainer;
the class objective's proxies are its state; the config is a leaf whose old sentinels load as None."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_cfg

from aml.cache import DEFAULT_DTYPE
from aml.losses import LOSSES
from aml.losses.common import dist, reduce
from aml.losses.contrastive import MARGIN, contrastive_terms
from aml.losses.spec import loss_spec
from aml.train import config, recipe
from aml.train.config import TrainConfig
from aml.train.loop import Trainer
from aml.train.objective import BatchObjective, ClassObjective, TupleObjective


def pool_contrastive(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    labels: torch.Tensor,
    ref: torch.Tensor,
    ref_labels: torch.Tensor,
    margin: float = MARGIN,
    reduction: str = "sum",
) -> torch.Tensor:
    """A throw-away tuple loss that reads what no tuple loss reads: `contr`, plus the epoch's reference set (the
    teacher's pool vectors) as extra negatives where their label differs from the anchor's."""
    other = (labels[:, None] != ref_labels[None, :]).to(anchor.dtype)  # (B, P)
    extra = 0.5 * (margin - dist(anchor[:, None, :], ref.detach()[None])).clamp_min(0).pow(2)
    return reduce(contrastive_terms(anchor, positive.detach(), negatives.detach(), margin) + (other * extra).sum(1),
                  reduction)  # fmt: skip


@pytest.fixture
def registered(monkeypatch):
    """`pool_contrastive` registered as the loss `contr-pool`: a line of the spec table (and so of its choices)."""
    monkeypatch.setitem(LOSSES, "contr-pool", loss_spec("contr-pool", pool_contrastive, "tuple"))
    monkeypatch.setitem(recipe.CHOICES, "loss", (*recipe.CHOICES["loss"], "contr-pool"))
    return LOSSES["contr-pool"]


def test_a_new_loss_reading_more_inputs_trains_with_nothing_added_to_the_trainer(registered, tiny_data, tmp_path, home):
    assert registered.inputs == {"labels", "ref", "ref_labels"} and registered.defaults == {"margin": MARGIN}
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path, loss="contr-pool", epochs=1, eval_every=None), progress=False)
    objective = trainer.objective
    assert isinstance(objective, TupleObjective)
    cached = torch.from_numpy(np.asarray(trainer.train_teacher, dtype=np.float32))
    cluster = torch.as_tensor(np.asarray(trainer.train.cluster), dtype=torch.int64)
    calls = []

    def spy(anchor, positive, negatives, **kw):
        calls.append(kw)
        return pool_contrastive(anchor, positive, negatives, **kw)

    objective.spec = dataclasses.replace(registered, fn=spy)  # the inputs its signature named, read once
    before = [p.detach().clone() for p in trainer.student.parameters()]
    stats = trainer.train_epoch(0)
    assert calls and np.isfinite(stats["loss"]) and stats["steps"] == len(calls)
    for kw in calls:
        assert set(kw) == {"labels", "ref", "ref_labels"}
        rows = (kw["ref"][:, None, :] - cached[None]).abs().amax(2).argmin(1)  # the cached image of each reference
        assert torch.equal(kw["ref"], cached[rows]) and torch.equal(kw["ref_labels"], cluster[rows])
        assert len(set(kw["ref_labels"].tolist())) > 1  # references of several labels: the check can fail
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.student.parameters(), strict=True))


def test_each_kind_of_loss_gets_its_objective(tiny_data, tmp_path, home):
    kinds = {"reg": BatchObjective, "contr+": TupleObjective, "normsoftmax": ClassObjective}
    for loss, kind in kinds.items():
        cfg = tiny_cfg(tiny_data, tmp_path / loss, loss=loss, epochs=0, eval_every=None, batch_size=4, per_class=2)
        trainer = Trainer(cfg, progress=False)
        assert type(trainer.objective) is kind
        assert list(trainer.objective.parameters()) == [] and trainer.objective.checkpoint() == {}


def test_class_objective_keeps_its_proxies_as_state(tiny_data, tmp_path, home):
    cfg = tiny_cfg(tiny_data, tmp_path, loss="normsoftmax", proxies="learned", epochs=0, eval_every=None,
                   batch_size=4, per_class=2)  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    objective = trainer.objective
    assert [n for n, _ in objective.named_parameters()] == ["proxies"]
    assert objective.proxies in trainer.optimizer.param_groups[-1]["params"]
    saved = objective.checkpoint()
    assert set(saved) == {"proxies", "proxy_fit"} and saved["proxies"].shape == (objective.num_classes, 512)
    with torch.no_grad():
        objective.proxies.zero_()
    objective.restore(saved, tmp_path / "x.pt")
    assert torch.equal(objective.proxies.detach().cpu(), saved["proxies"])
    with pytest.raises(Exception, match="proxies: missing"):
        objective.restore({}, tmp_path / "x.pt")


def test_old_sentinels_load_as_none_and_the_config_is_a_leaf():
    old = {**TrainConfig().to_dict(), "workers": -1, "warmup_epochs": -1, "test_image_size": 0, "eval_every": 0,
           "init_images": 0}  # fmt: skip
    cfg = TrainConfig.from_dict(old)
    assert (cfg.workers, cfg.warmup_epochs, cfg.test_image_size, cfg.eval_every, cfg.init_images) == (None,) * 5
    assert cfg == TrainConfig(workers=None, eval_every=None, init_images=None)
    assert cfg.eval_size() == cfg.image_size and recipe.warmup_epochs(cfg) == 0
    assert recipe.warmup_epochs(cfg.replace(loss="normsoftmax")) == 1
    leaf = "('torch', 'aml.losses', 'aml.cache', 'aml.train.head_init', 'aml.train.mixup')"
    code = f"import sys, aml.train.config; print(sorted(m for m in {leaf} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert config.CACHE_DTYPE == DEFAULT_DTYPE  # the leaf's copy of the cache's default
