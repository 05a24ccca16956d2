"""The AML losses (SPEC §5) by name, on L2-normalised vectors; teacher inputs are always detached (frozen).

Tuple losses: `fn(anchor, positive, negatives, anchor_teacher=None, *, <constants>, reduction="sum")` with
anchor (B, D) student vectors, positive (B, D), negatives (B, K, D) teacher vectors (student vectors for
`sym`), anchor_teacher (B, D) the teacher's vectors of the anchor images (used by `contr+`).
Batch losses: `fn(student, teacher, *, <constants>, reduction="sum")`, both (B, D), same images.
`reduction`: "sum" | "mean" | "none" (per tuple, or per image for `reg`, shape (B,)); `rkd`, `darkrank` and
`csd` are defined over the whole batch and return a scalar for every reduction.

| name      | kind  | what                                                     | constants (defaults)       |
|-----------|-------|----------------------------------------------------------|----------------------------|
| contr     | tuple | asymmetric contrastive                                   | margin 0.7                 |
| contr+    | tuple | contr + 1/2 d(s(q), t(q))^2                              | margin 0.7                 |
| sym       | tuple | symmetric contrastive, student vectors everywhere        | margin 0.7                 |
| triplet   | tuple | squared-distance triplet, one per negative               | margin 0.1                 |
| ms        | tuple | multi-similarity, anchor row, S = <s(q), t(.)>           | alpha 2, beta 40, lam 0.5  |
| reg       | batch | 1/2 d(s(x), t(x))^2                                      | -                          |
| rkd       | batch | RKD distance + angle                                     | w_dist 1, w_angle 2        |
| darkrank  | batch | hard DarkRank (Plackett-Luce of the teacher's top-4)     | alpha 3, beta 3, list_len 4|
| csd       | batch | contextual similarity distillation (KL, teacher top-K)   | k 256, tau_s 1, tau_t 0.01 |
| contr+csd | tuple | combined({"contr+": 1, "csd": 1}); weight_contr_plus, weight_csd | union of both |
"""

from __future__ import annotations

from collections.abc import Callable

from aml.losses.combined import combined, weight_name
from aml.losses.contrastive import contr, contr_plus, sym
from aml.losses.csd import csd
from aml.losses.darkrank import darkrank
from aml.losses.multisimilarity import ms
from aml.losses.regression import reg
from aml.losses.rkd import rkd
from aml.losses.triplet import triplet

_BASE: dict[str, Callable] = {
    "contr": contr,
    "contr+": contr_plus,
    "sym": sym,
    "triplet": triplet,
    "ms": ms,
    "reg": reg,
    "rkd": rkd,
    "darkrank": darkrank,
    "csd": csd,
}
_BASE_KIND = {name: ("batch" if name in ("reg", "rkd", "darkrank", "csd") else "tuple") for name in _BASE}

LOSSES: dict[str, Callable] = dict(_BASE)
LOSSES["contr+csd"] = combined({"contr+": 1.0, "csd": 1.0}, _BASE, _BASE_KIND)

LOSS_KIND: dict[str, str] = {**_BASE_KIND, "contr+csd": "tuple"}

# Tuple losses that read `anchor_teacher` (the trainer must pass the teacher's vectors of the anchors).
NEEDS_ANCHOR_TEACHER: frozenset[str] = frozenset({"contr+", "contr+csd"})
# Tuple losses whose positive and negatives are student vectors (no teacher at all).
STUDENT_TUPLES: frozenset[str] = frozenset({"sym"})

__all__ = [
    "LOSSES",
    "LOSS_KIND",
    "NEEDS_ANCHOR_TEACHER",
    "STUDENT_TUPLES",
    "combined",
    "weight_name",
    "contr",
    "contr_plus",
    "sym",
    "triplet",
    "ms",
    "reg",
    "rkd",
    "darkrank",
    "csd",
]
