"""Per-epoch checks: the student's symmetric and asymmetric mAP against cached teacher vectors, on the run's test
set (reported) and on its validation data (what `best.pt` is chosen on: `aml.train.checkpoint.Keeper`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from aml.data.revisitop import load_revisitop
from aml.data.spec import cached_test_split
from aml.data.trainset import RevisitopRef, TrainSet
from aml.evaluate import evaluate_features
from aml.extract import extract
from aml.settings import ExtractSettings
from aml.teacher_vectors import TeacherVectors

VAL_IMAGES = 1000  # validation images scored per check at most (whole labels, drawn under the run's seed)


class QuickEval:
    """Holds a revisitop-layout set (the test set, or the validation data) and its teacher vectors (cached once);
    `run(student)` embeds only the student side with `settings` (the teacher's image size and scales; no
    progress bar)."""

    def __init__(self, test: tuple[str, str], teacher: TeacherVectors, settings: ExtractSettings) -> None:
        self.ds = load_revisitop(*test)
        self.settings = settings.replace(progress=False)
        self.db_teacher = teacher.get(self.ds.db_paths())
        self.q_teacher = teacher.get(self.ds.query_paths(), self.ds.bbxs)

    def teacher(self) -> dict[str, Any]:
        """The teacher's own symmetric scores (the reference line)."""
        return evaluate_features(self.ds, self.q_teacher, self.db_teacher)

    def run(self, student: nn.Module) -> dict[str, Any]:
        """The student's symmetric and asymmetric (student queries, teacher database) scores."""
        student.eval()
        q = extract(student, self.ds.query_paths(), self.settings, bbxs=self.ds.bbxs)
        db = extract(student, self.ds.db_paths(), self.settings)
        return {
            "student": evaluate_features(self.ds, q, db),
            "asymmetric": evaluate_features(self.ds, q, self.db_teacher),
        }


def validation_set(val: TrainSet, seed: int, limit: int = VAL_IMAGES) -> RevisitopRef | None:
    """The validation split's labelled images (of labels with at least two) as a revisitop-layout set, every image
    a query against the others (`cached_test_split`); at most `limit` images, whole labels drawn under `seed`.
    None when no label has two labelled images."""
    labelled = np.zeros(len(val), dtype=bool)
    labelled[val.qidxs] = True
    labelled[val.pidxs] = True
    idx = np.flatnonzero(labelled)
    labels, counts = np.unique(val.cluster[idx], return_counts=True)
    labels = labels[counts >= 2]
    if labels.size == 0:
        return None
    order = np.random.default_rng([seed, 4]).permutation(labels)
    sizes = np.array([np.count_nonzero(val.cluster[idx] == lab) for lab in order])
    take = order[: max(1, int(np.searchsorted(np.cumsum(sizes), limit, side="right")))]
    idx = idx[np.isin(val.cluster[idx], take)]
    return cached_test_split(val.name, [val.paths[i] for i in idx], val.cluster[idx])


def quick_check(
    ref: TrainSet | None, teacher_at: Callable[[int], TeacherVectors], size: int, device: str
) -> QuickEval | None:
    """`QuickEval` of reference set `ref` at image size `size` (None without one), its teacher vectors from
    `teacher_at(size)` (cached): the run's test-set check."""
    if ref is None:
        return None
    teacher = teacher_at(size)
    check = QuickEval(ref, teacher, ExtractSettings(size, device=device))
    teacher.release()
    return check


def validation_eval(
    val: TrainSet | None, teacher_at: Callable[[int], TeacherVectors], size: int, device: str, seed: int
) -> QuickEval | None:
    """The run's validation check (None without validation data): `quick_check` of `validation_set(val, seed)`."""
    return quick_check(validation_set(val, seed) if val is not None else None, teacher_at, size, device)
