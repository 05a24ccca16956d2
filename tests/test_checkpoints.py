"""Checkpoints a user can trust: `start.pt` (epoch 0), `best.pt` chosen on the validation data (never the test
set), and a warning naming best.pt when a run ends below its start."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_cfg

from aml.train.checkpoint import Keeper, load_checkpoint, validation_score
from aml.train.loop import distill


def _val(score):
    return {"val": {"asymmetric": {"mAP": {"E": score, "M": score, "H": score}}}}


def test_a_run_keeps_its_start_and_its_best_epoch_on_validation(tiny_data, tmp_path, home):
    run = distill(tiny_cfg(tiny_data, tmp_path / "run", epochs=2), progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and all("val" in r and "eval" in r for r in log)
    start = load_checkpoint(run / "start.pt")
    assert start["epoch"] == 0 and start["init"]["method"] == "local-procrustes"
    val = [r["val"]["asymmetric"]["mAP"]["M"] for r in log]
    best = int(max(range(3), key=lambda e: (val[e], -e)))  # the first epoch of the best validation score
    record = json.loads((run / "best.json").read_text())
    assert record["best_epoch"] == best and record["best"] == pytest.approx(val[best])
    assert record["start"] == pytest.approx(val[0]) and record["last_epoch"] == 2
    kept = load_checkpoint(run / "best.pt")
    assert kept["epoch"] == best and validation_score(kept["metrics"]) == pytest.approx(val[best])
    # chosen on the validation data: the images scored are the validation split's, none of the test set's
    ds = load_checkpoint(run / "last.pt")["metrics"]
    assert ds["val"]["asymmetric"]["dataset"] != ds["eval"]["asymmetric"]["dataset"]


def test_best_follows_the_validation_score_and_the_end_warns_below_the_start(tmp_path, capsys):
    keeper = Keeper(tmp_path, resume=False)
    keeper.start({"metrics": _val(50.0), "state_dict": {"w": torch.zeros(1)}})
    assert (tmp_path / "start.pt").is_file() and torch.load(tmp_path / "best.pt")["epoch"] == 0
    for epoch, score in ((1, 55.0), (2, 52.0), (3, 40.0)):
        path = tmp_path / f"epoch_{epoch:03d}.pt"
        torch.save({"epoch": epoch}, path)
        keeper.update(epoch, path, _val(score))
    assert torch.load(tmp_path / "best.pt")["epoch"] == 1  # the best, not the last
    line = keeper.warning()
    assert line.startswith("warning:") and "40.00" in line and "50.00" in line and str(tmp_path / "best.pt") in line
    assert "epoch 1, 55.00" in line
    keeper.finish()
    assert capsys.readouterr().err.strip() == line
    again = Keeper(tmp_path, resume=True)  # a resumed run compares with the same start and best
    assert again.record == keeper.record
    torch.save({"epoch": 4}, tmp_path / "epoch_004.pt")
    again.update(4, tmp_path / "epoch_004.pt", _val(51.0))
    assert again.warning() is None and torch.load(tmp_path / "best.pt")["epoch"] == 1


def test_without_validation_data_there_is_no_best_and_no_warning(tmp_path):
    keeper = Keeper(tmp_path, resume=False)
    keeper.start({"metrics": {"eval": {"asymmetric": {"mAP": {"M": 90.0}}}}})  # a test-set score is never used
    torch.save({"epoch": 1}, tmp_path / "epoch_001.pt")
    keeper.update(1, tmp_path / "epoch_001.pt", {"eval": {"asymmetric": {"mAP": {"M": 10.0}}}})
    assert (tmp_path / "start.pt").is_file() and not (tmp_path / "best.pt").exists()
    assert keeper.warning() is None and validation_score({"eval": 1}) is None
