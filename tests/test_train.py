"""The trainer: batched forwards equal per-image ones, tiny runs of every loss kind, exact resume, caches."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import aml_torchrun, distill_args, tiny_cfg

from aml.errors import UserError
from aml.registry import create_model
from aml.train.batches import forward_by_size, size_buckets
from aml.train.batchnorm import set_train_mode
from aml.train.checkpoint import load_checkpoint
from aml.train.config import TrainConfig
from aml.train.loop import Trainer, distill
from aml.train.recipe import loss_function


def test_forward_by_size_equals_per_image_values_and_grads():
    net = create_model("resnet18", role="student", dim=8, random_init=True)
    set_train_mode(net)  # BatchNorm frozen: an image's vector depends on that image alone
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in [(32, 40), (40, 32), (32, 40), (24, 24), (32, 40)]]
    weights = torch.randn(len(images), 8, generator=g)

    batched = forward_by_size(net, images, torch.device("cpu"))
    (batched * weights).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    single = torch.cat([net(im[None]) for im in images])
    (single * weights).sum().backward()
    assert torch.allclose(batched, single, atol=1e-5)
    for a, p in zip(grads, net.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-4, rtol=1e-4)


def test_size_buckets_cover_every_tuple_once_and_group_sizes():
    rng = np.random.default_rng(0)
    order = rng.permutation(40)
    sizes = rng.integers(0, 3, size=40)
    batches = size_buckets(order, sizes, batch_size=4, window=10)
    assert sorted(np.concatenate(batches).tolist()) == list(range(40))
    mixed = sum(len(set(sizes[b].tolist())) > 1 for b in batches)
    assert mixed <= 2  # only where one size's run ends inside a batch


# crop: a resumed epoch draws the same views; view: and the teacher's targets of them (the teacher is built)
@pytest.mark.parametrize("augment,targets", [("none", "whole"), ("crop", "whole"), ("crop", "view")])
def test_distill_resumes_bit_for_bit_and_reuses_the_teacher_cache(augment, targets, tiny_data, tmp_path, home):
    views = dict(augment=augment, view_targets=targets)
    full = distill(tiny_cfg(tiny_data, tmp_path / "full", **views), progress=False)
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]  # epoch 0: the closed-form start
    assert {"student", "asymmetric"} <= set(log[-1]["eval"])
    assert all(np.isfinite(r["loss"]) and r["tuples"] > 0 for r in log[1:])
    assert (full / "epoch_001.pt").exists() and (full / "last.pt").exists()

    half = tiny_cfg(tiny_data, tmp_path / "half", **views)
    distill(half.replace(epochs=1), progress=False)
    trainer = Trainer(half, resume=True, progress=False)
    assert trainer.teacher.built == (targets == "view")  # else every teacher vector came from the cache
    assert trainer.start_epoch == 1
    trainer.fit()

    a = load_checkpoint(full / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "half" / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_changed_recipe(tiny_data, tmp_path, home):
    cfg = tiny_cfg(tiny_data, tmp_path / "run", epochs=1, eval_every=0)
    distill(cfg, progress=False)
    with pytest.raises(UserError, match="option 'lr' differs"):
        Trainer(cfg.replace(lr=5e-4, epochs=2), resume=True, progress=False)
    with pytest.raises(UserError, match="last.pt"):
        Trainer(cfg.replace(out=str(tmp_path / "nothing-here")), resume=True, progress=False)


@pytest.mark.parametrize("loss", ["contr", "sym", "triplet", "ms", "contr+csd", "reg", "rkd", "darkrank", "csd"])
def test_every_loss_trains_one_epoch(loss, tiny_data, tmp_path, home):
    changes = {"loss_args": {"k": 4.0}} if "csd" in loss else {}
    cfg = tiny_cfg(tiny_data, tmp_path / loss, loss=loss, epochs=1, eval_every=0, **changes)
    trainer = Trainer(cfg, progress=False)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    stats = trainer.train_epoch(0)
    assert np.isfinite(stats["loss"]) and stats["steps"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.student.parameters(), strict=True))


@pytest.mark.parametrize("loss", ["csd", "contr+csd"])
def test_csd_gets_the_labels_of_its_batch_and_references(loss, tiny_data, tmp_path, home):
    """The label-refined csd target is only as right as the ids the trainer passes: the clusters of the very
    images whose teacher vectors are the batch and the references."""
    cfg = tiny_cfg(tiny_data, tmp_path, loss=loss, epochs=1, eval_every=0, loss_args={"k": 4, "label_weight": 0.5})
    trainer = Trainer(cfg, progress=False)
    cached = torch.from_numpy(np.asarray(trainer.train_teacher, dtype=np.float32))
    cluster = np.asarray(trainer.train.cluster)
    calls = []

    def image_clusters(vectors: torch.Tensor) -> list[int]:
        rows = (vectors[:, None, :] - cached[None]).abs().amax(2).argmin(1)  # the cached image of each vector
        return cluster[rows.numpy()].tolist()

    def spy(*inputs, **kw):
        teacher = kw["anchor_teacher"] if objective.spec.kind == "tuple" else inputs[1]
        calls.append(
            (image_clusters(teacher), kw["labels"].tolist(), image_clusters(kw["ref"]), kw["ref_labels"].tolist())
        )
        return real(*inputs, **kw)

    objective = trainer.objective
    real = objective.spec.fn
    objective.spec = dataclasses.replace(objective.spec, fn=spy)
    trainer.train_epoch(0)
    assert calls and all(got == want and ref_got == ref_want for want, got, ref_want, ref_got in calls)
    assert len(set(calls[0][3])) > 1  # references of several clusters: the check can fail


def test_loss_constants_are_checked_and_margin_defaults_per_loss(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, tmp_path)
    assert "margin" not in loss_function(cfg.replace(loss="triplet"))[1]  # triplet keeps its own 0.7
    assert loss_function(cfg.replace(loss="contr", margin=0.5))[1] == {"margin": 0.5}
    with pytest.raises(UserError, match="--loss-arg alpha"):
        loss_function(cfg.replace(loss="reg", loss_args={"alpha": 1.0}))
    with pytest.raises(UserError, match="^--margin 0.5: loss 'csd' takes k, label_weight, tau_s, tau_t$"):
        loss_function(cfg.replace(loss="csd", margin=0.5))
    with pytest.raises(UserError, match="^--loss-arg ref: 'ref' is an input of loss 'csd'"):
        loss_function(cfg.replace(loss="csd", loss_args={"ref": 1.0}))
    with pytest.raises(UserError, match=r"^--loss-arg label_weight=1.5: must be in \[0, 1\]"):
        loss_function(cfg.replace(loss="csd", loss_args={"label_weight": 1.5}))
    with pytest.raises(UserError, match="--loss nope"):
        loss_function(cfg.replace(loss="nope"))


def test_amp_on_cpu_is_a_clear_error(tiny_data, tmp_path, home):
    with pytest.raises(UserError, match="--amp fp16"):
        Trainer(tiny_cfg(tiny_data, tmp_path, amp="fp16"), progress=False)


def test_ddp_two_cpu_processes(tiny_data, tmp_path, home):
    """torchrun with two gloo processes: both ranks train, rank 0 alone writes the run."""
    out = tmp_path / "ddp"
    p = aml_torchrun("distill", *distill_args(tiny_data, out, batch_size=2, eval_every=0), timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # the closed-form start (epoch 0) and epoch 1


def test_cli_distill_then_evaluate_and_export(tiny_data, tmp_path, home, run_cli):
    out = tmp_path / "run"
    env = {"AML_HOME": str(home)}
    code, stdout, stderr = run_cli("distill", *distill_args(tiny_data, out), env=env)
    assert code == 0, stderr
    assert f"run: {out}" in stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["teacher"] == "resnet18" and saved["margin"] is None and saved["epochs"] == 1
    cached = sorted(p.name for p in (home / "cache").iterdir())

    code, stdout, stderr = run_cli(
        "evaluate",
        "--dataset",
        "synth",
        "--data-root",
        tiny_data,
        "--teacher",
        "resnet18",
        "--random-init",
        "--student",
        out / "last.pt",
        "--image-size",
        "40",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        "--json",
        tmp_path / "eval.json",
        env=env,
    )
    assert code == 0, stderr
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert set(scores) >= {"teacher", "student", "asymmetric"}
    # one default cache dtype: the evaluation reads the test-set teacher vectors training cached
    assert sorted(p.name for p in (home / "cache").iterdir()) == cached

    code, stdout, stderr = run_cli(
        "export", "--checkpoint", out / "last.pt", "--out", tmp_path / "q.onnx", "--quiet", env=env
    )
    assert code == 0, stderr
    assert (tmp_path / "q.onnx").exists() and (tmp_path / "q.onnx.json").exists()


def test_cli_distill_bad_input_is_one_line(tmp_path, home, run_cli):
    code, _, stderr = run_cli(
        "distill",
        *("--teacher", "lite2", "--student", "lite0"),  # models with weights: they are checked before the data
        *("--data", f"sfm120k:{tmp_path / 'missing'}", "--out", tmp_path / "r"),
        env={"AML_HOME": str(home)},
    )
    assert code == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]


def test_config_round_trip_and_unknown_fields():
    cfg = TrainConfig(loss="triplet", loss_args={"margin": 0.2})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown field"):
        TrainConfig.from_dict({**cfg.to_dict(), "nonsense": 1})
    assert dataclasses.asdict(cfg)["loss_args"] == {"margin": 0.2}
