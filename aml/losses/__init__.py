"""The AML losses (docs/REFERENCE.md §5) by name, on L2-normalised vectors; teacher inputs are always detached (frozen).

`LOSSES[name]` is the loss's `LossSpec` (aml/losses/spec.py): its function, kind, the inputs it reads (named by
its signature), whether it needs labels and whether it has per-sample values. A spec is called like its function.
Tuple losses: `fn(anchor, positive, negatives, *, [anchor_teacher], <constants>, reduction="sum")` with
anchor (B, D) student vectors, positive (B, D), negatives (B, K, D) teacher vectors (student vectors for
`sym`, `student_refs`), anchor_teacher (B, D) the teacher's vectors of the anchor images (only `contr+` reads it).
Batch losses: `fn(student, teacher, *, [ref], <constants>, reduction="sum")`, both (B, D), same images; `ref`
(P, D) a reference set of teacher vectors, `labels` (B,) / `ref_labels` (P,) the images' cluster ids
(only `csd` reads them).
Class losses (kind "class"): `fn(student, teacher, *, labels, proxies, <constants>, reduction)`,
labels (B,) class ids 0..C-1, proxies (C, D) (only `normsoftmax`; the teacher's vectors of the batch unread).
`reduction`: "sum" | "mean" | "none" (per tuple, or per image for `reg`, shape (B,)); `rkd`, `darkrank` and
`csd` are defined over the whole batch (`per_sample=False`): "sum" and "mean" give that scalar, "none" raises.

| name      | kind  | what                                                     | constants (defaults)       |
|-----------|-------|----------------------------------------------------------|----------------------------|
| contr     | tuple | asymmetric contrastive                                   | margin 0.7                 |
| contr+    | tuple | contr + 1/2 d(s(q), t(q))^2                              | margin 0.7                 |
| sym       | tuple | symmetric contrastive, student vectors everywhere        | margin 0.7                 |
| triplet   | tuple | squared-distance triplet, one per negative               | margin 0.7 (paper code)    |
| ms        | tuple | multi-similarity, anchor row, S = <s(q), t(.)>           | alpha 2, beta 40, lam 0.5  |
| reg       | batch | 1/2 d(s(x), t(x))^2                                      | -                          |
| rkd       | batch | RKD distance + angle                                     | w_dist 1, w_angle 2        |
| darkrank  | batch | hard DarkRank (Plackett-Luce of the teacher's top-4)     | alpha 3, beta 3, list_len 4|
|           |       |   denominator "list" (paper code's HardDarkRank) or "all" |                            |
| csd       | batch | contextual similarity distillation (KL, teacher top-K)   | k 256, tau_s 1, tau_t 0.01 |
|           |       |   label_weight w > 0: target mixed with the query's label  | label_weight 0          |
| contr+csd | tuple | combine({"contr+": 1, "csd": 1}); weight_contr_plus, weight_csd | union of both |
| csd+reg   | batch | combine({"csd": 1, "reg": 1}); weight_csd, weight_reg    | those of csd               |
| normsoftmax | class | softmax over L2N class proxies (learned, or the teacher's) | temperature 0.05   |
| bct       | class | own NormSoftmax + teacher-proxy NormSoftmax + reg (upgrade) | temperature 0.05, weight_own 1, |
|           |       |   (Shen et al.'s backward-compatible training), + csd     | weight_influence 1, weight_reg 1, |
|           |       |   against the epoch's pool when weight_csd > 0            | weight_csd 0, csd's constants |

The pair-based losses (`PAIR_BASED`: contr, contr+, sym, triplet, ms) also have their generic pair form over soft
labels, `spec.pairs` (aml/losses/pairs.py, Metrix, docs/REFERENCE.md §8), which `--mixup` trains with.
"""

from __future__ import annotations

from aml.losses.bct import bct
from aml.losses.combined import combine
from aml.losses.contrastive import contr, contr_plus, sym
from aml.losses.csd import csd
from aml.losses.darkrank import darkrank
from aml.losses.multisimilarity import ms
from aml.losses.normsoftmax import normsoftmax, normsoftmax_loss
from aml.losses.pairs import clean_refs, soft_contrastive, soft_ms, soft_triplet
from aml.losses.regression import reg
from aml.losses.rkd import rkd
from aml.losses.spec import LossSpec, loss_spec, weight_name
from aml.losses.triplet import triplet

_SPECS = (
    loss_spec("contr", contr, "tuple", pairs=soft_contrastive),
    loss_spec("contr+", contr_plus, "tuple", pairs=soft_contrastive),
    loss_spec("sym", sym, "tuple", pairs=soft_contrastive, student_refs=True),
    loss_spec("triplet", triplet, "tuple", pairs=soft_triplet),
    loss_spec("ms", ms, "tuple", pairs=soft_ms),
    loss_spec("reg", reg, "batch"),
    loss_spec("rkd", rkd, "batch", per_sample=False),
    loss_spec("darkrank", darkrank, "batch", per_sample=False),
    loss_spec("csd", csd, "batch", per_sample=False),
    loss_spec("normsoftmax", normsoftmax_loss, "class"),
    loss_spec("bct", bct, "class"),
)
LOSSES: dict[str, LossSpec] = {s.name: s for s in _SPECS}
LOSSES["contr+csd"] = combine("contr+csd", {"contr+": 1.0, "csd": 1.0}, LOSSES)
LOSSES["csd+reg"] = combine("csd+reg", {"csd": 1.0, "reg": 1.0}, LOSSES)

# The losses that train without (query, positive) labels, e.g. on `--data images:DIR`.
LABEL_FREE: tuple[str, ...] = tuple(n for n, s in LOSSES.items() if not s.needs_labels)
# The pair-based losses, those with a generic pair form over soft labels (what `--mixup` mixes).
PAIR_BASED: tuple[str, ...] = tuple(n for n, s in LOSSES.items() if s.pairs is not None)

__all__ = [
    "LOSSES",
    "LABEL_FREE",
    "PAIR_BASED",
    "LossSpec",
    "combine",
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
    "clean_refs",
    "soft_contrastive",
    "soft_ms",
    "soft_triplet",
    "normsoftmax",
    "bct",
]
