"""The compatibility report of a model upgrade (aml.compat), the `bct` loss and objective, the `upgrade` preset and
`aml evaluate models --old --new --new-independent`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_evaluate import image_dataset

from aml.compat import KEEP, compat_report, format_report, reports_of, verdict
from aml.data.trainset import TrainSet
from aml.losses import LOSSES, bct, csd, normsoftmax, reg
from aml.train import recipe
from aml.train.config import PRESETS, TrainConfig
from aml.train.objective import ClassObjective, TrainData


def test_report_arithmetic_matches_hand_computed_values():
    r = compat_report(old_old=40.0, new_new=58.0, new_old=45.0, independent=60.0, independent_old=2.0)
    assert r.compatible  # 45 > 40
    assert r.update_gain == pytest.approx(5 / 20)  # (45 - 40) / (60 - 40)
    assert r.kept == pytest.approx(18 / 20)  # (58 - 40) / (60 - 40) = 0.9: the target exactly
    assert r.kept >= KEEP and r.keeps_gain and r.independent_compatible is False  # new* alone: 2 < 40
    assert not compat_report(40.0, 57.9, 45.0, independent=60.0).keeps_gain  # 17.9 < 0.9 x 20
    d = r.as_dict()
    assert d["G"] == pytest.approx(0.25) and d["kept"] == pytest.approx(0.9) and d["compatible"] is True
    line = verdict(r)
    assert "upgrade compatible on mAP M: new -> old 45.00 vs old / old 40.00" in line
    assert "G 0.250, kept 0.900" in line and "(at least 0.9)" in line and "new* alone is NOT compatible" in line


def test_an_independently_trained_new_model_is_reported_incompatible():
    # new* used as the upgrade itself: strong on its own (70 vs 40), useless against the old database (1.5)
    r = compat_report(old_old=40.0, new_new=70.0, new_old=1.5, independent=70.0, independent_old=1.5)
    assert not r.compatible and r.update_gain == pytest.approx(-38.5 / 30) and r.kept == pytest.approx(1.0)
    assert "upgrade NOT compatible" in verdict(r)
    # equal scores are not compatible (strictly above), and without new* there is no G
    assert not compat_report(40.0, 50.0, 40.0).compatible and compat_report(40.0, 50.0, 41.0).update_gain is None
    assert compat_report(40.0, 50.0, 41.0, independent=40.0).update_gain is None  # new* no better: no gain to share
    worse = compat_report(40.0, 50.0, 41.0, independent=38.0)  # new* worse than old / old: G and kept undefined
    assert worse.update_gain is None and worse.kept is None and worse.compatible and worse.keeps_gain
    assert "(new* / new* 38.00: no gain over old / old to share)" in verdict(worse)
    assert not compat_report(40.0, 38.0, 41.0, independent=38.0).keeps_gain  # 38 - 40 = -2 < 0.9 x (38 - 40) = -1.8
    assert compat_report(40.0, 38.5, 41.0, independent=38.0).keeps_gain  # -1.5 >= -1.8


def _rows(old, new, cross, h=float("nan")):
    return {
        row: {"mAP": {"E": v + 1, "M": v, "H": h}}
        for row, v in (("teacher", old), ("student", new), ("asymmetric", cross))
    }


def test_reports_of_evaluation_results_and_the_table():
    star = {"student": {"mAP": {"E": 61.0, "M": 60.0, "H": 30.0}}, "asymmetric": None}  # dims differ: no cross
    reps = reports_of(_rows(40.0, 55.0, 42.0), star)
    assert set(reps) == {"E", "M"}  # H is NaN in a row: left out
    m = reps["M"]
    assert (m.old_old, m.new_new, m.new_old, m.independent, m.independent_old) == (40.0, 55.0, 42.0, 60.0, None)
    assert m.update_gain == pytest.approx(2 / 20) and m.kept == pytest.approx(15 / 20)
    text = format_report(reps)
    assert text.splitlines()[1].split() == ["E", "M"]
    assert "new* -> old" in text and "kept 0.750 of new*'s own gain (below 0.9)" in text
    assert reports_of(_rows(40.0, 55.0, 42.0))["M"].independent is None


def test_bct_loss_is_the_weighted_sum_of_its_three_terms():
    g = torch.Generator().manual_seed(0)
    s, t = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2))
    proxies, own = (F.normalize(torch.randn(3, 8, generator=g), dim=1) for _ in range(2))
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    kw = dict(labels=y, proxies=proxies, own_proxies=own)
    want = normsoftmax(s, y, own) + 2 * normsoftmax(s, y, proxies) + 3 * reg(s, t)
    got = bct(s, t, **kw, weight_influence=2.0, weight_reg=3.0)
    assert torch.allclose(got, want)
    assert torch.allclose(bct(s, t, **kw, weight_own=0.0, weight_influence=0.0), reg(s, t))
    assert torch.allclose(bct(s, t, **kw, weight_own=0.0, weight_reg=0.0), normsoftmax(s, y, proxies))
    assert bct(s, t, **kw, reduction="none").shape == (6,)
    assert LOSSES["bct"].kind == "class" and {"proxies", "own_proxies", "ref", "ref_labels"} <= LOSSES["bct"].inputs


def test_bct_csd_term_adds_csd_of_the_batch_against_the_teachers_references():
    g = torch.Generator().manual_seed(1)
    s, t = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(2))
    ref = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    proxies, own = (F.normalize(torch.randn(3, 8, generator=g), dim=1) for _ in range(2))
    y, ref_y = torch.tensor([0, 0, 1, 1, 2, 2]), torch.randint(0, 3, (10,), generator=g)
    kw = dict(labels=y, proxies=proxies, own_proxies=own, ref=ref, ref_labels=ref_y)
    c = dict(k=5, tau_s=0.1, label_weight=0.5)
    term = csd(s, t, ref=ref, labels=y, ref_labels=ref_y, **c)
    assert term > 0
    assert torch.allclose(bct(s, t, **kw, weight_csd=2.0, **c), bct(s, t, **kw) + 2 * term)
    assert torch.equal(bct(s, t, **kw, **c), bct(s, t, **kw))  # weight_csd 0: the three terms alone
    with pytest.raises(ValueError, match="reduction 'none'"):
        bct(s, t, **kw, weight_csd=1.0, reduction="none")


def test_bct_objective_trains_its_own_proxies_from_the_teachers():
    rng = np.random.default_rng(0)
    cluster = np.repeat(np.arange(4), 3)
    teacher = rng.standard_normal((12, 8)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    train = TrainSet([f"{i}.jpg" for i in range(12)], cluster, np.array([], int), np.array([], int), "t")
    cfg = TrainConfig(loss="bct", proxies="teacher-trained", batch_size=4)
    obj = ClassObjective(LOSSES["bct"], {}, cfg, TrainData(train, teacher, torch.device("cpu")))
    assert [n for n, _ in obj.named_parameters()] == ["own_proxies"]
    assert torch.equal(obj.own_proxies.detach(), obj.proxies) and "own_proxies" in obj.checkpoint()
    with pytest.raises(Exception, match="--proxies learned: loss 'bct'"):
        recipe.check(cfg.replace(proxies="learned"))


def test_upgrade_preset_is_the_old_model_teaching_a_larger_student():
    cfg = recipe.check(TrainConfig().replace(**PRESETS["upgrade"]))
    assert (cfg.teacher, cfg.student, cfg.loss, cfg.proxies) == ("lite0", "lite2", "bct", "teacher-trained")
    assert recipe.head_init(cfg) == "local-procrustes" and recipe.warmup_epochs(cfg) == 0
    assert recipe.head_norm(cfg) == "none"
    spec, constants = recipe.loss_function(cfg)  # csd, not reg, is its asymmetric term
    assert constants["weight_csd"] > 0 and constants["weight_reg"] == 0 and {"ref", "ref_labels"} <= spec.inputs


def test_cli_prints_the_compatibility_report_and_writes_it_as_json(tmp_path, run_cli, one_thread):
    image_dataset(tmp_path)
    code, out, err = run_cli(
        "evaluate", "models", "--dataset", "imgs", "--data-root", tmp_path, "--old", "lite0", "--new", "lite2",
        "--new-independent", "lite2", "--random-init", "--image-size", "32", "--workers", "0", "--cache-dir",
        tmp_path / "cache", "--quiet", "--device", "cpu", "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    m = res["compatibility"]["M"]
    assert m["old/old"] == res["teacher"]["mAP"]["M"] and m["new/new"] == res["student"]["mAP"]["M"]
    assert m["new->old"] == res["asymmetric"]["mAP"]["M"]
    assert (
        m["new*/new*"] == res["new*"]["student"]["mAP"]["M"] and m["new*->old"] == res["new*"]["asymmetric"]["mAP"]["M"]
    )
    assert m["compatible"] == (m["new->old"] > m["old/old"])
    den = m["new*/new*"] - m["old/old"]
    assert m["G"] is None if den == 0 else math.isclose(m["G"], (m["new->old"] - m["old/old"]) / den)
    assert "compatibility (mAP x100" in out and "new* / new*" in out
    assert ("upgrade compatible" if m["compatible"] else "upgrade NOT compatible") in out


def test_bct_run_trains_and_checkpoints_its_own_proxies_and_resumes(tiny_data, tmp_path, home):
    from conftest import tiny_cfg

    from aml.train.checkpoint import load_checkpoint
    from aml.train.loop import Trainer, distill

    cfg = tiny_cfg(
        tiny_data, tmp_path / "run", loss="bct", proxies="teacher-trained", warmup_epochs=0, batch_size=4,
        per_class=2, eval_every=None, epochs=2,
    )  # fmt: skip
    distill(cfg.replace(epochs=1), progress=False)
    first = load_checkpoint(tmp_path / "run" / "last.pt")
    assert first["own_proxies"].shape == first["proxies"].shape == (6, 512)
    assert not torch.equal(first["own_proxies"], first["proxies"])  # trained from the teacher's, which stay frozen
    trainer = Trainer(cfg, resume=True, progress=False)
    torch.testing.assert_close(trainer.objective.own_proxies.detach().cpu(), first["own_proxies"], rtol=0, atol=0)
    trainer.fit()
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert torch.equal(last["proxies"], first["proxies"]) and not torch.equal(last["own_proxies"], first["own_proxies"])
