"""Per-epoch test-set check: the student's symmetric and asymmetric mAP against cached teacher vectors."""

from __future__ import annotations

from typing import Any

from torch import nn

from aml.data.revisitop import load_revisitop
from aml.evaluate import evaluate_features
from aml.extract import extract
from aml.settings import ExtractSettings
from aml.teacher_vectors import TeacherVectors


class QuickEval:
    """Holds the test set and its teacher vectors (cached once); `run(student)` embeds only the student side
    with `settings` (the teacher's image size and scales; no progress bar)."""

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
