"""Revisited Oxford / Paris evaluation: features -> search -> mAP / mP@k, and the teacher / student /
asymmetric protocol of AML (SPEC §6) on top of extraction and the teacher feature cache.

Ranking depth (`topk`): by default the whole database when it has at most 100,000 images (exact mAP), else the
top 10,000. A truncated ranking drops the positives ranked below it: they still count in each query's number
of positives but contribute nothing, so the reported mAP is a lower bound; `mAP_max` (in the result whenever
the ranking is truncated) is the mAP if every dropped positive had come right after the list, an upper bound.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aml.data.revisitop import Revisitop
from aml.errors import UserError
from aml.io import aml_home
from aml.scoring import KAPPAS, score_rankings, summary
from aml.search import search
from aml.teacher_vectors import TeacherVectors

FULL_RANKING_MAX = 100_000  # databases up to this size are ranked completely
TRUNCATED_TOPK = 10_000  # ranking depth for larger databases (R1M)
ROWS = ("teacher", "student", "asymmetric")
ROW_TITLES = {"teacher": "teacher (sym)", "student": "student (sym)", "asymmetric": "asymmetric (s->t)"}
FEATURE_DTYPES = (np.float16, np.float32, np.float64)


def default_topk(n_db: int) -> int:
    """The ranking depth used when none is given: all of a database up to 100k images, else 10,000."""
    return n_db if n_db <= FULL_RANKING_MAX else TRUNCATED_TOPK


def load_features(path: str | os.PathLike, what: str = "features") -> np.ndarray:
    """A memory-mapped (N, D) .npy (no pickles), or a one-line UserError naming the file (missing, empty,
    truncated, not .npy). `aml evaluate --db-features/--query-features/--distractor-features` read through this."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found; pass an .npy (N, D) array from `aml extract`")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # EOFError (an empty file) must not reach click as Ctrl-C
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if isinstance(e, EOFError) or p.stat().st_size == 0:
            why = f"the file is empty or truncated ({p.stat().st_size} bytes)"
        raise UserError(f"{p}: {what}: not a readable .npy array ({why}); write it again with numpy.save") from None


def check_features(
    x: np.ndarray,
    rows: int,
    what: str,
    *,
    dim: int | None = None,
    unit: bool = True,
    tol: float = 1e-2,
    block: int = 65536,
) -> None:
    """Raise a UserError unless `x` is (rows, dim) float16/32/64 and finite, with unit rows when `unit`."""
    if x.ndim != 2:
        raise UserError(f"{what}: expected a 2-d (N, D) array, got shape {x.shape}")
    if x.dtype not in FEATURE_DTYPES:
        raise UserError(f"{what}: dtype {x.dtype}; expected float32 or float16 vectors")
    if x.shape[0] != rows:
        raise UserError(f"{what}: {x.shape[0]} rows, expected {rows}")
    if dim is not None and x.shape[1] != dim:
        raise UserError(f"{what}: {x.shape[1]}-d vectors, but the database is {dim}-d; use one embedding")
    for s in range(0, x.shape[0], block):
        norms = np.linalg.norm(np.asarray(x[s : s + block], dtype=np.float32), axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1) <= tol) if unit else ~np.isfinite(norms))
        if bad.size:
            raise UserError(
                f"{what}: row {s + int(bad[0])} has norm {norms[bad[0]]:.4g}, not 1 ({bad.size} "
                f"of rows {s}..{s + norms.size - 1}); features must be L2-normalised and finite"
            )


def evaluate_features(
    dataset: Revisitop,
    db: np.ndarray,
    queries: np.ndarray,
    *,
    topk: int | None = None,
    distractors: np.ndarray | None = None,
    device: str = "auto",
    check_unit: bool = False,
    names: tuple[str, str, str] = ("database features", "query features", "distractor features"),
) -> dict[str, Any]:
    """mAP and mP@k (x100) of `queries` (qimlist order) against `db` (imlist order) + optional distractors.

    Returns {"dataset", "mAP": {E, M, H}, "mP@k": {"k", E, M, H}}, plus "topk" and "mAP_max" when the ranking
    is truncated. Shapes and finiteness are checked (UserError naming `names`), and unit norms too with
    `check_unit` (for feature files; a network's L2N leaves near-zero vectors, e.g. at random init, shorter).
    """
    kw = dict(unit=check_unit)
    check_features(db, len(dataset.imlist), f"{names[0]} ({dataset.name} imlist order)", **kw)
    check_features(queries, len(dataset.qimlist), f"{names[1]} ({dataset.name} qimlist order)", dim=db.shape[1], **kw)
    if distractors is not None:
        check_features(distractors, distractors.shape[0], names[2], dim=db.shape[1], **kw)
    parts = [db] if distractors is None else [db, distractors]
    n_db = sum(p.shape[0] for p in parts)
    k = default_topk(n_db) if topk is None else min(int(topk), n_db)
    if k < 1:
        raise UserError(f"topk={topk}: the ranking depth must be at least 1")
    ranks = search(parts, queries, k, device=device)
    scores = score_rankings(ranks, dataset.gnd, n_db, KAPPAS)
    out: dict[str, Any] = {"dataset": dataset.name, **summary(scores, KAPPAS)}
    if k < n_db:
        out["topk"] = k
        out["mAP_max"] = {p: 100 * s.map_max for p, s in scores.items()}
    return out


def format_table(results: Mapping[str, Any]) -> str:
    """A text table (x100, 2 decimals) of one `evaluate_features` result, or of the teacher / student /
    asymmetric results of `evaluate_models` side by side."""
    if "mAP" in results:
        cols, title = {"": results}, results.get("dataset", "")
    else:
        cols = {ROW_TITLES.get(r, r): results[r] for r in ROWS if r in results}
        title = results.get("dataset", next(iter(cols.values())).get("dataset", ""))
    settings = results.get("settings")
    if settings:
        title += "  (" + ", ".join(f"{k} {v}" for k, v in settings.items()) + ")"
    w = 7
    head1 = f"{'':<8}" + "".join(f"  {name:^{3 * w + 2}}" for name in cols)
    head2 = f"{'':<8}" + "".join(f"  {'E':>{w}} {'M':>{w}} {'H':>{w}}" for _ in cols)
    lines = [title] + ([head1] if any(cols) else []) + [head2]
    metrics = [("mAP", lambda r, p: r["mAP"][p])]
    for i, k in enumerate(next(iter(cols.values()))["mP@k"]["k"]):
        metrics.append((f"mP@{k}", lambda r, p, i=i: r["mP@k"][p][i]))
    for label, get in metrics:
        lines.append(
            f"{label:<8}" + "".join("  " + " ".join(f"{get(r, p):>{w}.2f}" for p in "EMH") for r in cols.values())
        )
    truncated = {n or "result": r for n, r in cols.items() if "topk" in r}
    for n, r in truncated.items():
        m = r["mAP_max"]
        lines.append(
            f"{n}: ranking truncated to top {r['topk']}: mAP is a lower bound; at most "
            f"E {m['E']:.2f} M {m['M']:.2f} H {m['H']:.2f} if the missing positives came next"
        )
    return "\n".join(lines)


# ---- model-based evaluation ---------------------------------------------------------------------------


def _whiten(x: np.ndarray, lw: Mapping[str, Any] | None, block: int = 65536) -> np.ndarray:
    """Apply learned whitening `l2n(P (x - m))` block by block, keeping `x`'s dtype."""
    if lw is None:
        return x
    import torch

    from aml.nn import apply_lw

    m = torch.as_tensor(np.asarray(lw["m"], dtype=np.float32).reshape(-1))
    P = torch.as_tensor(np.asarray(lw["P"], dtype=np.float32))
    out = np.empty((x.shape[0], P.shape[0]), dtype=x.dtype)
    for s in range(0, x.shape[0], block):
        out[s : s + block] = apply_lw(torch.from_numpy(np.array(x[s : s + block], np.float32)), m, P).numpy()
    return out


def learned_whitening(meta: Mapping[str, Any], scales: Sequence[float], key: str | None) -> dict[str, Any]:
    """cirtorch Lw {'m', 'P', 'name'}: `meta['Lw'][key]`, 'ms' when multi-scale (key default: the first)."""
    from aml.extract import select_lw

    key = key if key is not None else next(iter(meta.get("Lw") or {}), None)
    kind = "ms" if len(scales) > 1 else "ss"
    return {**select_lw(meta, len(scales) > 1, key), "key": key, "name": f"{key}/{kind}"}


def evaluate_models(
    dataset: Revisitop,
    teacher: str,
    student: str,
    *,
    teacher_weights: str | None = None,
    student_weights: str | None = None,
    random_init: bool = False,
    image_size: int = 1024,
    scales: Sequence[float] = (1.0,),
    whiten: bool = False,
    lw_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = "float32",
    topk: int | None = None,
    distractors: Sequence[str] | None = None,
    rows: Sequence[str] = ROWS,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Teacher/teacher and student/student (symmetric) and student-query/teacher-database (asymmetric) scores.

    Models are registry names or checkpoint files; `random_init` (tests) applies to names without weights.

    Teacher vectors (database, queries, distractors) come from the feature cache in `cache_dir` (default
    $AML_HOME/cache), so a second student costs only its own extraction. With `whiten`, the teacher's learned
    whitening is applied to the teacher and asymmetric rows (both sides) and to the student row unless the
    student carries its own Lw of the same name. Returns {"dataset", "settings", row: evaluate_features(..)}.
    """
    from aml.extract import extract
    from aml.registry import create_model

    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UserError(f"rows {list(rows)}: expected some of {', '.join(ROWS)}")
    distractors = list(distractors or [])
    dataset.check_images(distractors)
    kw = dict(
        image_size=image_size,
        scales=tuple(scales),
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
    )
    cache = Path(cache_dir) if cache_dir is not None else aml_home() / "cache"
    t = TeacherVectors(
        teacher,
        weights=teacher_weights,
        random_init=random_init,
        image_size=image_size,
        scales=scales,
        cache_dir=cache,
        dtype=cache_dtype,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
    )
    db_paths, q_paths, bbxs = dataset.db_paths(), dataset.query_paths(), dataset.bbxs
    need_student_db = "student" in rows
    need_teacher_db = "teacher" in rows or "asymmetric" in rows
    lw_t = learned_whitening(t.net().meta, scales, lw_key) if whiten else None

    settings: dict[str, Any] = {"image size": image_size, "scales": list(scales)}
    if whiten:
        settings["Lw"] = f"teacher {lw_t['name']}"
    out: dict[str, Any] = {"dataset": dataset.name, "settings": settings}
    t_db = t_dis = None
    if need_teacher_db:
        t_db = _whiten(t.get(db_paths), lw_t)
        t_dis = _whiten(t.get(distractors), lw_t) if distractors else None
    if "teacher" in rows:
        t_q = _whiten(t.get(q_paths, bbxs), lw_t)
        out["teacher"] = evaluate_features(dataset, t_db, t_q, topk=topk, distractors=t_dis, device=device)
    if "student" in rows or "asymmetric" in rows:
        is_file = os.path.isfile(student)
        s_net = create_model(
            student,
            role="student",
            weights=student_weights,
            random_init=random_init and not is_file,
            dim=None if is_file else t.identity["dim"],
        )
        lw_s = lw_t
        if whiten and lw_t["key"] in (s_net.meta.get("Lw") or {}):
            lw_s = learned_whitening(s_net.meta, scales, lw_t["key"])
            settings["Lw"] += f", student's own {lw_s['name']} on the student row"
        s_q = extract(s_net, q_paths, bbxs=bbxs, **kw)
        if "asymmetric" in rows:
            out["asymmetric"] = evaluate_features(
                dataset, t_db, _whiten(s_q, lw_t), topk=topk, distractors=t_dis, device=device
            )
        if need_student_db:
            s_db = _whiten(extract(s_net, db_paths, **kw), lw_s)
            s_dis = _whiten(extract(s_net, distractors, **kw), lw_s) if distractors else None
            out["student"] = evaluate_features(
                dataset, s_db, _whiten(s_q, lw_s), topk=topk, distractors=s_dis, device=device
            )
    return {k: out[k] for k in ("dataset", "settings", *ROWS) if k in out}
