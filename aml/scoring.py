"""Revisited Oxford / Paris scores from rankings: mAP and mP@k for the Easy, Medium and Hard protocols.

Everything follows docs/REFERENCE.md §6 (revisitop's `compute_map`), vectorised over queries and ranking positions:

- a ranking is `(Q, K)` database indices, best first; `K` may be smaller than the database (truncated);
- protocol E: positives easy, ignored junk + hard; M: positives easy + hard, ignored junk;
  H: positives hard, ignored junk + easy;
- ignored images are removed from the ranking: a positive at position p moves up by the number of ignored
  images ranked before it, giving its 0-based cleaned rank r;
- AP = sum_j (P0_j + P1_j) / (2 n) over the positives found, j-th at cleaned rank r_j, with
  P0_j = 1 if r_j == 0 else j / r_j and P1_j = (j + 1) / (r_j + 1); n counts every positive of the query,
  so positives missing from a truncated ranking contribute nothing;
- P@k with 1-based cleaned ranks R: kq = min(max(R), k), P@k = #(R <= kq) / kq (0 when no positive was
  retrieved at all);
- queries without positives get NaN and are excluded from every mean.

An image listed both as positive and as ignored (never the case in the real files) is treated as revisitop
does: it counts as a positive at its own position and as removed for the positives after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

KAPPAS: tuple[int, ...] = (1, 5, 10)
# Ground-truth lists as bits of one int8 label per (query, database image).
_BITS = {"easy": 1, "hard": 2, "junk": 4}
# protocol -> (positive lists, ignored lists)
PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "E": (("easy",), ("junk", "hard")),
    "M": (("easy", "hard"), ("junk",)),
    "H": (("hard",), ("junk", "easy")),
}


@dataclass(frozen=True)
class ProtocolScores:
    """Per-query scores of one protocol (fractions, not x100); NaN rows are queries without positives."""

    ap: np.ndarray  # (Q,) average precision
    pk: np.ndarray  # (Q, len(kappas)) precision at k
    ap_max: np.ndarray  # (Q,) AP if every positive missing from a truncated ranking came right after it

    @property
    def valid(self) -> np.ndarray:
        return ~np.isnan(self.ap)

    @property
    def map(self) -> float:
        """Mean AP over the queries that have positives."""
        return float(self.ap[self.valid].mean()) if self.valid.any() else float("nan")

    @property
    def mpk(self) -> np.ndarray:
        """Mean P@k over the queries that have positives, one value per k."""
        return self.pk[self.valid].mean(0) if self.valid.any() else np.full(self.pk.shape[1], np.nan)

    @property
    def map_max(self) -> float:
        return float(self.ap_max[self.valid].mean()) if self.valid.any() else float("nan")


def _bits(names: Sequence[str]) -> int:
    return int(np.bitwise_or.reduce([_BITS[n] for n in names]))


def label_matrix(gnd: Sequence[Mapping], n_db: int) -> np.ndarray:
    """(Q, n_db) int8 labels: bit 1 easy, 2 hard, 4 junk (0: negative, e.g. every distractor); `n_db` may stop
    after the last image the ground truth names."""
    labels = np.zeros((len(gnd), n_db), dtype=np.int8)
    for key, bit in _BITS.items():
        lists = [np.asarray(g[key], dtype=np.int64).reshape(-1) for g in gnd]
        rows = np.repeat(np.arange(len(gnd)), [len(x) for x in lists])
        cols = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        labels[rows, cols] |= bit
    return labels


def _counts(labels: np.ndarray, bits: int) -> np.ndarray:
    return ((labels & bits) != 0).sum(1)


def _within_row_exclusive_cumsum(x: np.ndarray, row: np.ndarray, n_rows: int) -> np.ndarray:
    """For entries sorted by row: sum of `x` over the earlier entries of the same row."""
    cs = np.cumsum(x) - x
    start = np.searchsorted(row, np.arange(n_rows))
    base = np.concatenate([[0], np.cumsum(x)])[start]
    return cs - base[row]


def protocol_scores(
    row: np.ndarray,
    pos: np.ndarray,
    code: np.ndarray,
    n_pos: np.ndarray,
    n_kept: np.ndarray,
    positive_bits: int,
    ignored_bits: int,
    kappas: Sequence[int] = KAPPAS,
) -> ProtocolScores:
    """Scores of one protocol from the labelled entries of the rankings.

    `row, pos, code`: query, ranking position and label bits of every ranked image that has a label, sorted
    by (row, pos); `n_pos` (Q,): positives per query in the ground truth; `n_kept` (Q,): ranking length
    minus the ignored images in it (where missing positives would start, for `ap_max`).
    """
    nq = n_pos.shape[0]
    is_pos = (code & positive_bits) != 0
    is_ign = (code & ignored_bits) != 0
    ignored_before = _within_row_exclusive_cumsum(is_ign.astype(np.int64), row, nq)
    # j: 0-based order among the query's positives; r: 0-based cleaned rank
    j = _within_row_exclusive_cumsum(is_pos.astype(np.int64), row, nq)[is_pos]
    q = row[is_pos]
    r = (pos - ignored_before)[is_pos].astype(np.float64)
    n = np.maximum(n_pos, 1).astype(np.float64)

    p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1))
    p1 = (j + 1) / (r + 1)
    ap = np.bincount(q, weights=(p0 + p1) / (2 * n[q]), minlength=nq).astype(np.float64)

    # Upper bound for truncated rankings: the m missing positives of a query placed right after the list.
    found = np.bincount(q, minlength=nq)
    missing = np.maximum(n_pos - found, 0)
    mq = np.repeat(np.arange(nq), missing)
    i = np.arange(mq.size) - np.repeat(np.cumsum(missing) - missing, missing)
    jm, rm = (found[mq] + i).astype(np.float64), (n_kept[mq] + i).astype(np.float64)
    pm = np.where(rm == 0, 1.0, jm / np.maximum(rm, 1)) + (jm + 1) / (rm + 1)
    ap_max = ap + np.bincount(mq, weights=pm / (2 * n[mq]), minlength=nq).astype(np.float64)

    # mP@k: kq = min(max(R), k) per query and k; count positives with R <= kq.
    R = r + 1
    max_r = np.zeros(nq)
    np.maximum.at(max_r, q, R)
    kq = np.minimum(max_r[:, None], np.asarray(kappas, dtype=np.float64)[None, :])  # (Q, nk)
    hits = np.zeros_like(kq)
    np.add.at(hits, q, (R[:, None] <= kq[q]).astype(np.float64))
    pk = np.divide(hits, kq, out=np.zeros_like(kq), where=kq > 0)

    empty = n_pos == 0
    ap[empty], ap_max[empty], pk[empty] = np.nan, np.nan, np.nan
    return ProtocolScores(ap=ap, pk=pk, ap_max=ap_max)


def score_rankings(
    ranks: np.ndarray, gnd: Sequence[Mapping], n_db: int, kappas: Sequence[int] = KAPPAS
) -> dict[str, ProtocolScores]:
    """Scores for the E, M and H protocols of a `(Q, K)` ranking of database indices (`K <= n_db`)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
        raise ValueError(f"ranks must be (Q={len(gnd)}, K), got shape {ranks.shape}")
    idx = ranks.astype(np.intp, copy=False)
    if idx.size and (idx.max() >= n_db or idx.min() < -n_db):
        raise IndexError(f"ranks hold database indices outside [0, {n_db})")
    idx = np.where(idx < 0, idx + n_db, idx)  # numpy's indexing, as a (Q, n_db) label matrix read it
    # Only the images named by the ground truth have labels: the matrix stops after the last one (1M distractors
    # would make it 70 MB to fill and scan), every index beyond it is a negative.
    listed = [np.asarray(g[key], dtype=np.int64).reshape(-1) for g in gnd for key in _BITS]
    width = min(n_db, 1 + max((int(x.max()) for x in listed if x.size), default=-1))
    labels = label_matrix(gnd, width)
    if width == n_db:
        ranked = np.take_along_axis(labels, idx, axis=1)  # (Q, K) label bits by position
    else:
        inside = idx < width
        ranked = np.zeros(idx.shape, np.int8)
        ranked[inside] = labels[np.nonzero(inside)[0], idx[inside]]
    row, pos = np.nonzero(ranked)  # row-major: sorted by (query, position)
    code = ranked[row, pos]
    out = {}
    for name, (positive, ignored) in PROTOCOLS.items():
        pbits, ibits = _bits(positive), _bits(ignored)
        n_pos = _counts(labels, pbits)
        n_ign_ranked = np.bincount(row[(code & ibits) != 0], minlength=len(gnd))
        n_kept = ranks.shape[1] - n_ign_ranked
        out[name] = protocol_scores(row, pos, code, n_pos, n_kept, pbits, ibits, kappas)
    return out


def summary(scores: Mapping[str, ProtocolScores], kappas: Sequence[int] = KAPPAS) -> dict:
    """The JSON shape {"mAP": {"E", "M", "H"}, "mP@k": {"k": [..], "E": [..], ..}}: x100, unrounded."""
    return {
        "mAP": {p: 100 * s.map for p, s in scores.items()},
        "mP@k": {"k": [int(k) for k in kappas], **{p: (100 * s.mpk).tolist() for p, s in scores.items()}},
    }
