"""Verification of an exported encoder: vectors against the PyTorch student, and retrieval agreement.

Everything here takes runners (numpy batch -> numpy vectors) or vectors, so tests drive it on tiny data.

- Equivalence (fp32 gate): at three input sizes (square, portrait, landscape; odd sides, so both parities of
  TF "same" padding are exercised) and batch 2, every vector's cosine to the student's is >= MIN_COSINE and
  no component differs by more than MAX_ABS_DIFF.
- Retrieval (fp16 / int8 gate): asymmetric mAP (exported queries vs the teacher database) within
  MAP_TOLERANCE points of the float32 student's, for every protocol (E, M, H).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from aml.data.revisitop import Revisitop
from aml.errors import UserError
from aml.evaluate import evaluate_features
from aml.net import IMAGENET_MEAN, IMAGENET_STD
from aml.probe import probe_batch
from aml.scoring import PROTOCOLS

MIN_COSINE = 0.9999
MAX_ABS_DIFF = 1e-4
MAP_TOLERANCE = 1.0
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
) -> dict[str, Any]:
    """Compare `exported` to `reference` on the three probes; with `gate`, `passed` applies the thresholds
    (default MIN_COSINE and MAX_ABS_DIFF)."""
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    max_abs_diff = MAX_ABS_DIFF if max_abs_diff is None else max_abs_diff
    rows = []
    for k, (h, w) in enumerate(probe_sizes(image_size)):
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
    """Asymmetric mAP of the float32 student's and the exported encoder's queries against the teacher `db`."""
    ref = evaluate_features(dataset, q_student, db, names=("student queries", "teacher database", ""))
    exp = evaluate_features(dataset, q_exported, db, names=("exported queries", "teacher database", ""))
    diff = {p: abs(exp["mAP"][p] - ref["mAP"][p]) for p in PROTOCOLS}
    return {
        "dataset": dataset.name,
        "n_db": int(db.shape[0]),
        "n_queries": int(q_student.shape[0]),
        "student_fp32_mAP": {p: ref["mAP"][p] for p in PROTOCOLS},
        "exported_mAP": {p: exp["mAP"][p] for p in PROTOCOLS},
        "max_mAP_difference": max(diff.values()),
        "tolerance": tolerance,
        "query_cosine": agreement(q_student, q_exported),
        "passed": bool(max(diff.values()) <= tolerance),
    }


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
            f"query cosine min {rt['query_cosine']['cosine_min']:.4f}); nothing written"
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
    return lines
