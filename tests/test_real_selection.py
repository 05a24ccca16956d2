"""benchmarks/real_selection.py chooses the real-photo recipe on validation folds of the training photos only: no
fold trains on or scores a photo of a real test split (wonders7-test, vn5-test, UKBench objects 150-249), and no
fold trains on the photos it is scored on. Needs ../shared/data (skips without it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import REPO, shared_path

from aml.data.sources import parse_data_specs
from aml.data.spec import parse_test_spec

sys.path.insert(0, str(REPO / "benchmarks"))
import real_selection  # noqa: E402  (benchmarks/real_selection.py)


def _files(folder: Path) -> set[str]:
    return {os.path.realpath(p) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def test_photos() -> set[str]:
    """Every photo of the real test splits, resolved."""
    landmarks = shared_path("real", "landmarks")
    ukbench = shared_path("ukbench", "jpg")
    photos = _files(landmarks / "wonders7-test") | _files(landmarks / "vn5-test")
    photos |= {os.path.realpath(ukbench / f"ukbench{i:05d}.jpg") for i in range(600, 1000)}
    assert len(photos) == 70 + 54 + 400
    return photos


@pytest.mark.parametrize("per_class", [10, 0])
def test_no_fold_reads_a_test_split_or_trains_on_its_validation(per_class, test_photos, tmp_path, home):
    folds = real_selection.folds(tmp_path / "data", per_class)
    assert set(folds) == {"noUKB", "noVN", "inUKB", "inUKB4"}
    for name, fold in folds.items():
        train = {os.path.realpath(p) for p in parse_data_specs(fold.sources, fold.val, check_images=False).train.paths}
        ref = parse_test_spec(fold.val)
        val = _files(Path(ref.data_root) / ref.dataset_name / "jpg")
        assert len(val) == {"noUKB": 600, "noVN": 208, "inUKB": 200, "inUKB4": 400}[name]
        assert len(train) > 1500
        assert not train & test_photos, f"{name} trains on a test photo"
        assert not val & test_photos, f"{name} is scored on a test photo"
        assert not train & val, f"{name} trains on the photos it is scored on"
