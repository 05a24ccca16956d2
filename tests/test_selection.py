"""benchmarks/selection.py chooses recipe constants on validation data only: its selection trains and scores every
candidate without ever opening the synthetic set's test split (ground truth or images), and the same guard does
catch a run that scores on the test split."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

import aml.data.revisitop
import aml.train.quick_eval
from aml.data.spec import parse_data_spec
from aml.data.synth import SYNTH_NAME
from aml.data.trainset import RevisitopRef
from aml.train.config import PRESETS

sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py, the scripts' shared helpers)
import selection  # noqa: E402  (benchmarks/selection.py)

TINY_BUDGET = {**PRESETS["demo"], **common.SMOKE_TRAIN}


@pytest.fixture
def test_split_guarded(tiny_data, monkeypatch):
    """Opening the tiny set's test split (its ground truth, any of its images) raises."""
    test_dir = (Path(tiny_data) / SYNTH_NAME).resolve()

    def under_test(*parts) -> bool:
        paths = [p for p in parts if isinstance(p, str | Path)]
        return bool(paths) and Path(*paths).resolve().is_relative_to(test_dir)

    def guard(fn):
        def wrapped(*args, **kw):
            if under_test(args[0]) or under_test(*args[:2]):  # Image.open(path) or load_revisitop(root, name)
                raise AssertionError(f"the test split was read: {args}")
            return fn(*args, **kw)

        return wrapped

    for module in (aml.data.revisitop, aml.train.quick_eval):
        monkeypatch.setattr(module, "load_revisitop", guard(module.load_revisitop))
    monkeypatch.setattr(Image, "open", guard(Image.open))
    return test_dir


def test_the_selection_view_holds_no_test_split(tiny_data, tmp_path, home):
    view = selection.selection_view(Path(tiny_data), tmp_path / "view")
    bundle = parse_data_spec(view)
    assert bundle.test is None and bundle.val is not None and len(bundle.val) > 0
    assert len(bundle.train) == len(parse_data_spec(f"synth:{tiny_data}").train)


def test_selection_never_reads_the_test_split(tiny_data, tmp_path, home, one_thread, test_split_guarded):
    train = selection.selection_view(Path(tiny_data), tmp_path / "view")
    val = selection.validation_set(train)
    candidates = {n: selection.CANDIDATES[n][1] for n in ("demo", "lw0")}
    scores, chosen = selection.select(train, val, TINY_BUDGET, candidates, tmp_path / "runs")
    assert set(scores) == set(candidates) and chosen in candidates
    assert all(0 <= s.asym <= 100 and s.teacher > 0 for s in scores.values())
    # the guard bites: scoring on the test split (what only the report's last step does) is caught
    with pytest.raises(AssertionError, match="the test split was read"):
        test = RevisitopRef(str(tiny_data), SYNTH_NAME)
        selection.train_and_score(tmp_path / "test", TINY_BUDGET, {}, train, test)
