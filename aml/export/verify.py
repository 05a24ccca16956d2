"""Verification of an exported encoder: vectors against the PyTorch student, and retrieval agreement.

Everything here takes runners (numpy batch -> numpy vectors) or vectors, so tests drive it on tiny data.

- Equivalence (fp32 gate): at three input sizes (square, portrait, landscape; odd sides, so both parities of
  TF "same" padding are exercised) and batch 2, every vector's cosine to the student's is >= MIN_COSINE and
  no component differs by more than MAX_ABS_DIFF.
- Retrieval (fp16 / int8 gate): asymmetric mAP (exported queries vs the teacher database) within
  `--map-tolerance` points (default MAP_TOLERANCE) of the float32 student's, for every protocol (E, M, H). The
  result says how noisy one point is on the test set (`noise`: on n queries with positives, one query's AP
  moves mAP by up to 100 / n points) and a failure says what to change (`GATE_FIXES`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from aml.data.revisitop import Revisitop
from aml.errors import UserError
from aml.evaluate import evaluate_search
from aml.net import IMAGENET_MEAN, IMAGENET_STD
from aml.probe import probe_batch
from aml.scoring import PROTOCOLS
from aml.sidecar import MAP_TOLERANCE

MIN_COSINE = 0.9999
MAX_ABS_DIFF = 1e-4
# what to change when the retrieval gate fails (or is noisy): said with every failure
GATE_FIXES = (
    "a larger test set (--verify-data DIR/NAME), more calibration images for int8 (--calib-count N), or an "
    "explicit tolerance (--map-tolerance POINTS, recorded in the sidecar)"
)
Runner = Callable[[np.ndarray], np.ndarray]


class VerificationError(UserError):
    """An export failed its verification gate; nothing was written."""


def probe_sizes(image_size: int) -> list[tuple[int, int]]:
    """(H, W) of the square, portrait and landscape probes for images of longest side `image_size`."""
    s = int(image_size)
    short = max(8, (3 * s) // 4) | 1  # odd: the other parity from an even S
    return [(s, s), (s, short), (short - 2, s)]


def agreement(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Per-vector cosine (min, mean) and the largest absolute component difference of two (B, D) arrays."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise VerificationError(f"exported encoder returned shape {out.shape}, the student {ref.shape}")
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-12)
    finite = bool(np.isfinite(out).all())
    return {
        "cosine_min": float(cos.min()) if finite else float("nan"),
        "cosine_mean": float(cos.mean()) if finite else float("nan"),
        "max_abs_diff": float(np.abs(ref - out).max()) if finite else float("inf"),
    }


def equivalence(
    reference: Runner,
    exported: Runner,
    image_size: int,
    *,
    gate: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_cosine: float | None = None,
    max_abs_diff: float | None = None,
    static_shape: bool = False,
) -> dict[str, Any]:
    """Compare `exported` to `reference` on the three probes (`static_shape`: the one square probe the model
    takes); with `gate`, `passed` applies the thresholds (default MIN_COSINE and MAX_ABS_DIFF)."""
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    max_abs_diff = MAX_ABS_DIFF if max_abs_diff is None else max_abs_diff
    rows = []
    sizes = probe_sizes(image_size)[:1] if static_shape else probe_sizes(image_size)
    for k, (h, w) in enumerate(sizes):
        x = probe_batch(h, w, seed=k, mean=mean, std=std)
        rows.append({"size": [h, w], "batch": int(x.shape[0]), **agreement(reference(x), exported(x))})
    res: dict[str, Any] = {
        "probes": rows,
        "cosine_min": min(r["cosine_min"] for r in rows),
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "gated": gate,
    }
    if gate:
        res["thresholds"] = {"cosine_min": min_cosine, "max_abs_diff": max_abs_diff}
        res["passed"] = bool(res["cosine_min"] >= min_cosine and res["max_abs_diff"] <= max_abs_diff)
    return res


def retrieval(
    dataset: Revisitop,
    db: np.ndarray,
    q_student: np.ndarray,
    q_exported: np.ndarray,
    *,
    tolerance: float = MAP_TOLERANCE,
) -> dict[str, Any]:
    """Asymmetric mAP of the float32 student's and the exported encoder's queries against the teacher `db`, and
    how noisy a point is there (`noise`, `gate_noise`)."""
    ref_eval = evaluate_search(dataset, q_student, db, names=("student queries", "teacher database", ""))
    exp_eval = evaluate_search(dataset, q_exported, db, names=("exported queries", "teacher database", ""))
    ref, exp = ref_eval.result, exp_eval.result
    diff = {p: abs(exp["mAP"][p] - ref["mAP"][p]) for p in PROTOCOLS}
    noise = gate_noise(
        {p: ref_eval.ranking.scores[p].ap for p in PROTOCOLS}, {p: exp_eval.ranking.scores[p].ap for p in PROTOCOLS}
    )
    return {
        "dataset": dataset.name,
        "n_db": int(db.shape[0]),
        "n_queries": int(q_student.shape[0]),
        "student_fp32_mAP": {p: ref["mAP"][p] for p in PROTOCOLS},
        "exported_mAP": {p: exp["mAP"][p] for p in PROTOCOLS},
        "max_mAP_difference": max(diff.values()),
        "tolerance": tolerance,
        "query_cosine": agreement(q_student, q_exported),
        "noise": noise,
        "passed": bool(max(diff.values()) <= tolerance),
    }


def gate_noise(ap_student: dict[str, np.ndarray], ap_exported: dict[str, np.ndarray]) -> dict[str, Any]:
    """How much one query moves the gate's mAP, from per-query APs (fractions, NaN without positives) per
    protocol: `queries` (the fewest with positives), `one_query_points` (100 / that: one query's AP going from 0
    to 1), `largest_query_points` (the largest single-query AP change between the two, in mAP points) and
    `queries_changed` (queries whose AP changed in any protocol)."""
    counts, largest, changed = [], 0.0, np.zeros(0, dtype=bool)
    for p, a in ap_student.items():
        b = ap_exported[p]
        valid = ~np.isnan(a) & ~np.isnan(b)
        n = int(valid.sum())
        counts.append(n)
        delta = np.where(valid, np.abs(np.nan_to_num(a) - np.nan_to_num(b)), 0.0)
        changed = delta > 1e-9 if changed.size == 0 else changed | (delta > 1e-9)
        if n:
            largest = max(largest, float(delta.max()) * 100 / n)
    n = min(counts) if counts else 0
    return {
        "queries": n,
        "one_query_points": 100.0 / n if n else None,
        "largest_query_points": largest,
        "queries_changed": int(changed.sum()),
    }


def noise_note(rt: dict[str, Any]) -> str:
    """What one point means on the gate's test set, and what to change (for messages)."""
    noise = rt.get("noise") or {}
    one, n = noise.get("one_query_points"), noise.get("queries")
    if one is None:
        return f"to decide on more evidence: {GATE_FIXES}"
    return (
        f"on {n} queries one query's AP moves mAP by up to {one:.2f} points (the largest single-query change here: "
        f"{noise['largest_query_points']:.2f} points, {noise['queries_changed']} queries changed); "
        f"{'the gate is noisy here: ' if one > rt['tolerance'] else ''}to decide on more evidence: {GATE_FIXES}"
    )


def failure_message(what: str, results: dict[str, Any]) -> str | None:
    """One line with the numbers when a gated check failed, else None."""
    eq = results.get("equivalence")
    if eq and eq.get("gated") and not eq["passed"]:
        worst = min(eq["probes"], key=lambda r: r["cosine_min"])
        t = eq["thresholds"]
        return (
            f"{what}: verification failed: cosine to the PyTorch student {eq['cosine_min']:.6f} (need >= "
            f"{t['cosine_min']}), max abs difference {eq['max_abs_diff']:.3g} (need <= "
            f"{t['max_abs_diff']:g}), worst at input {worst['size'][0]}x{worst['size'][1]}; "
            "nothing written"
        )
    rt = results.get("retrieval")
    if rt and not rt["passed"]:
        s, e = rt["student_fp32_mAP"], rt["exported_mAP"]
        nums = ", ".join(f"{p} {e[p]:.2f} vs {s[p]:.2f}" for p in PROTOCOLS)
        return (
            f"{what}: verification failed on {rt['dataset']}: asymmetric mAP exported vs fp32 student "
            f"{nums} (max difference {rt['max_mAP_difference']:.2f} > {rt['tolerance']:g} points; "
            f"query cosine min {rt['query_cosine']['cosine_min']:.4f}); nothing written; {noise_note(rt)}"
        )
    return None


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Human-readable lines of a verification result, for the CLI."""
    lines = []
    eq = results.get("equivalence")
    if eq:
        for r in eq["probes"]:
            lines.append(
                f"  {r['size'][0]:>4}x{r['size'][1]:<4} cosine min {r['cosine_min']:.6f}  "
                f"max |diff| {r['max_abs_diff']:.2e}"
            )
        if eq.get("gated"):
            t = eq["thresholds"]
            lines.append(
                f"  equivalence gate (cos >= {t['cosine_min']}, |diff| <= {t['max_abs_diff']:g}): "
                f"{'passed' if eq['passed'] else 'FAILED'}"
            )
    rt = results.get("retrieval")
    if rt:
        s, e = rt["student_fp32_mAP"], rt["exported_mAP"]
        verdict = "passed" if rt["passed"] else "FAILED"
        lines.append(
            f"  {rt['dataset']} asymmetric mAP  fp32 student E {s['E']:.2f} M {s['M']:.2f} "
            f"H {s['H']:.2f}  exported E {e['E']:.2f} M {e['M']:.2f} H {e['H']:.2f}  (max diff "
            f"{rt['max_mAP_difference']:.2f} <= {rt['tolerance']:g}: {verdict})"
        )
        one = (rt.get("noise") or {}).get("one_query_points")
        if one is not None and one > rt["tolerance"]:
            lines.append(f"  note: {noise_note(rt)}")
    return lines
