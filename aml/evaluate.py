"""Revisited Oxford / Paris evaluation: features -> search -> mAP / mP@k, and the teacher / student /
asymmetric protocol of AML (docs/REFERENCE.md §6) on top of extraction and the teacher feature cache.

Ranking depth (`topk`): by default the whole database when it has at most 100,000 images (exact mAP), else the
top 10,000. A truncated ranking drops the positives ranked below it: they still count in each query's number
of positives but contribute nothing, so the reported mAP is a lower bound; `mAP_max` (in the result whenever
the ranking is truncated) is the mAP if every dropped positive had come right after the list, an upper bound.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aml.binary import balance_warning, check_codes, code_bytes, pack_bits
from aml.cache import DEFAULT_DTYPE
from aml.data.revisitop import Revisitop
from aml.errors import UserError
from aml.exported import is_exported, open_exported
from aml.io import aml_home
from aml.scoring import KAPPAS, ProtocolScores, score_rankings, summary
from aml.search import search
from aml.settings import ExtractSettings
from aml.teacher_vectors import TeacherVectors
from aml.whiten import Lw, is_file_spec, teacher_lw

TEST_IMAGE_SIZE = 1024  # `aml evaluate`'s default longest side (cirtorch's test size)
FULL_RANKING_MAX = 100_000  # databases up to this size are ranked completely
TRUNCATED_TOPK = 10_000  # ranking depth for larger databases (R1M)
ROWS = ("teacher", "student", "asymmetric")
ROW_TITLES = {"teacher": "teacher (sym)", "student": "student (sym)", "asymmetric": "asymmetric (s->t)"}
# `binary_rows`: each float row's database as sign bits (aml.binary), searched by that row's float queries
# (asymmetric scoring) and by its binarised queries (Hamming): the teacher's database for the teacher and
# asymmetric rows, the student's own for the student row (a LayerNorm'd NormSoftmax student's binary codes).
BINARY_ROWS = {
    "teacher": ("teacher float->bits", "teacher hamming"),
    "student": ("student float->bits", "student hamming"),
    "asymmetric": ("asymmetric float->bits", "asymmetric hamming"),
}
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


@dataclass(frozen=True)
class Ranking:
    """What one evaluation ranked: (Q, k) database positions (imlist, then distractors) and their scores, best
    first, and the per-query scores of each protocol (`scores['M'].ap`: (Q,) AP, NaN without positives)."""

    ids: np.ndarray
    sims: np.ndarray
    scores: dict[str, ProtocolScores]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: `result` {"dataset", "mAP": {E, M, H}, "mP@k": {"k", E, M, H}} (+ "topk" and "mAP_max"
    when the ranking is truncated; what tables and JSON show) and the `ranking` it scored."""

    result: dict[str, Any]
    ranking: Ranking


def evaluate_search(
    dataset: Revisitop,
    queries: np.ndarray,
    db: np.ndarray,
    *,
    topk: int | None = None,
    distractors: np.ndarray | None = None,
    hamming: bool = False,
    device: str = "auto",
    check_unit: bool = False,
    names: tuple[str, str, str] = ("query features", "database features", "distractor features"),
) -> Evaluation:
    """mAP and mP@k (x100) of `queries` (qimlist order) against `db` (imlist order) + optional distractors,
    searched by the search core (`aml.search.search`): float rows, or uint8 packed sign bits (`aml.binary`)
    scored against the float queries (`hamming`: against their own bits). Shapes and finiteness are checked
    (UserError naming `names`), and unit norms too with `check_unit` (for feature files; a network's L2N leaves
    near-zero vectors, e.g. at random init, shorter)."""
    codes, unit = db.dtype == np.uint8, check_unit and db.dtype != np.uint8
    what = f"{names[1]} ({dataset.name} imlist order)"
    if codes:
        check_codes(np.asarray(db), queries.shape[1] if queries.ndim == 2 else 0, what)
        if db.shape[0] != len(dataset.imlist):
            raise UserError(f"{what}: {db.shape[0]} rows, expected {len(dataset.imlist)}")
    else:
        check_features(db, len(dataset.imlist), what, unit=unit)
    check_features(
        queries, len(dataset.qimlist), f"{names[0]} ({dataset.name} qimlist order)", dim=None if codes else db.shape[1],
        unit=unit,
    )  # fmt: skip
    if distractors is not None and codes:
        check_codes(np.asarray(distractors), queries.shape[1], names[2])
    elif distractors is not None:
        check_features(distractors, distractors.shape[0], names[2], dim=db.shape[1], unit=unit)
    parts = [db] if distractors is None else [db, distractors]
    n_db = sum(p.shape[0] for p in parts)
    k = default_topk(n_db) if topk is None else min(int(topk), n_db)
    if k < 1:
        raise UserError(f"topk={topk}: the ranking depth must be at least 1")
    sims, ranks = search(queries, parts, k, hamming=hamming, device=device)
    result, scores = _scored(dataset, ranks, n_db, k)
    return Evaluation(result, Ranking(ranks, sims, scores))


def evaluate_features(dataset: Revisitop, queries: np.ndarray, db: np.ndarray, **kw: Any) -> dict[str, Any]:
    """The result dict of `evaluate_search` (same arguments), for callers that need no ranking."""
    return evaluate_search(dataset, queries, db, **kw).result


def _scored(
    dataset: Revisitop, ranks: np.ndarray, n_db: int, k: int
) -> tuple[dict[str, Any], dict[str, ProtocolScores]]:
    """The result dict of rankings (Q, k) over a database of n_db vectors, and the per-protocol scores."""
    scores = score_rankings(ranks, dataset.gnd, n_db, KAPPAS)
    out: dict[str, Any] = {"dataset": dataset.name, **summary(scores, KAPPAS)}
    if k < n_db:
        out["topk"] = k
        out["mAP_max"] = {p: 100 * s.map_max for p, s in scores.items()}
    return out, scores


def format_table(results: Mapping[str, Any], *, title: str | None = None, layout: str = "columns") -> str:
    """The one text table of revisitop results (x100, 2 decimals).

    layout "columns" (`aml evaluate`): one `evaluate_features` result, or the teacher / student / asymmetric
    results of `evaluate_models` side by side, one line per metric (mAP, mP@k). layout "rows" (the `aml
    distill` table): `results` is {name: result}, one line per result with mAP and mP@10 for E / M / H.
    """
    if layout == "rows":
        return _rows_table(results, title or "")
    if layout != "columns":
        raise ValueError(f"layout {layout!r}; expected 'columns' or 'rows'")
    return _columns_table(results)


def _rows_table(rows: Mapping[str, Mapping[str, Any]], title: str) -> str:
    name_w = max([len(n) for n in rows] + [10])
    head = f"{'':<{name_w}}  {'mAP E':>7} {'mAP M':>7} {'mAP H':>7}   {'mP@10 E':>7} {'mP@10 M':>7} {'mP@10 H':>7}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for name, r in rows.items():
        k = r["mP@k"]["k"].index(10) if 10 in r["mP@k"]["k"] else -1
        m, p = r["mAP"], r["mP@k"]
        lines.append(
            f"{name:<{name_w}}  {m['E']:7.2f} {m['M']:7.2f} {m['H']:7.2f}   "
            f"{p['E'][k]:7.2f} {p['M'][k]:7.2f} {p['H'][k]:7.2f}"
        )
    return "\n".join(lines)


def _columns_table(results: Mapping[str, Any]) -> str:
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


def _whiten(x: np.ndarray, lw: Lw | None) -> np.ndarray:
    """`lw` applied to stored vectors (keeping their dtype), or the vectors themselves without one."""
    return x if lw is None else lw.apply_np(x, dtype=x.dtype)


Side = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # one row's (queries, database, distractors)


@dataclass(frozen=True)
class ModelsEvaluation:
    """`evaluate_models`' answer: `result` {"dataset", "settings", row: `Evaluation.result`, "binary": {name:
    result}, "warnings": [...]} (what tables and JSON show) and the `rankings` of the float rows when kept."""

    result: dict[str, Any]
    rankings: dict[str, Ranking]


def _teacher_sides(dataset: Revisitop, t: TeacherVectors, lw: Lw | None, distractors: list[str], rows: Sequence[str]):
    """{'teacher': its side} if asked, and the teacher's (database, distractors), all whitened with `lw`."""
    if "teacher" not in rows and "asymmetric" not in rows:
        return {}, (None, None)
    t_db = _whiten(t.get(dataset.db_paths()), lw)
    t_dis = _whiten(t.get(distractors), lw) if distractors else None
    if "teacher" not in rows:
        return {}, (t_db, t_dis)
    return {"teacher": (_whiten(t.get(dataset.query_paths(), dataset.bbxs), lw), t_db, t_dis)}, (t_db, t_dis)


@dataclass(frozen=True)
class StudentEncoder:
    """The student as `evaluate_models` runs it: `embed(paths, bbxs)` -> (N, D) vectors at the query settings,
    its `meta` (its own meta['Lw'], if any) and the teacher Lw key folded into an exported graph (or None)."""

    embed: Any
    meta: Mapping[str, Any]
    folded: str | None = None


def _student_sides(
    dataset: Revisitop,
    enc: StudentEncoder,
    settings: ExtractSettings,
    lw: Lw | None,
    teacher_db: tuple[np.ndarray | None, np.ndarray | None],
    distractors: list[str],
    rows: Sequence[str],
) -> tuple[dict[str, Side], str | None]:
    """The asymmetric side (student queries vs the teacher database, both whitened with the teacher's `lw`) and
    the student's symmetric side (with the student's own Lw of the same name when it has one), and the name of
    that own Lw (or None). An exported student with the teacher's Lw folded in is not whitened again."""
    sides: dict[str, Side] = {}
    s_lw = None if enc.folded else lw  # a folded Lw: the student's vectors come out whitened
    s_q = enc.embed(dataset.query_paths(), dataset.bbxs)
    if "asymmetric" in rows:
        sides["asymmetric"] = (_whiten(s_q, s_lw), *teacher_db)
    own = None
    if "student" in rows:
        lw_s = s_lw
        if s_lw is not None and s_lw.key in (enc.meta.get("Lw") or {}):
            lw_s = own = Lw.from_meta(enc.meta, settings.multiscale, s_lw.key)
        s_db = _whiten(enc.embed(dataset.db_paths(), None), lw_s)
        s_dis = _whiten(enc.embed(distractors, None), lw_s) if distractors else None
        sides["student"] = (_whiten(s_q, lw_s), s_db, s_dis)
    return sides, None if own is None else own.name


def _binary_rows(
    dataset: Revisitop, sides: Mapping[str, Side], topk: int | None
) -> tuple[dict[str, Any], str, list[str]]:
    """BINARY_ROWS of each float row's (queries, database, distractors) in `sides`: the database as sign bits,
    searched by the float queries and by their bits; what the codes are; and a warning per database whose codes
    carry little (vectors not zero-centred)."""
    out: dict[str, Any] = {}
    warnings, dims = [], set()
    packed: dict[int, np.ndarray] = {}  # the teacher and asymmetric rows share the teacher's database: pack it once

    def bits(v: np.ndarray | None) -> np.ndarray | None:
        if v is not None and id(v) not in packed:
            packed[id(v)] = pack_bits(v)
        return None if v is None else packed[id(v)]

    for row in (r for r in ROWS if r in sides):
        q, db, dis = sides[row]
        codes, dis_codes = bits(db), bits(dis)
        for name, hamming in zip(BINARY_ROWS[row], (False, True), strict=True):
            out[name] = evaluate_features(dataset, q, codes, topk=topk, distractors=dis_codes, hamming=hamming)
        dims.add(db.shape[1])
        owner = "student's" if row == "student" else "teacher's"
        warning = balance_warning(codes, db.shape[1], f"the {owner} database as sign bits")
        if warning and warning not in warnings:
            warnings.append(warning)
    info = ", ".join(f"{d} sign bits, {code_bytes(d)} bytes a vector (float32 {4 * d})" for d in sorted(dims))
    return out, f"databases as {info}", warnings


def _student_net(
    student: str, weights: str | None, random_init: bool, dim: int, settings: ExtractSettings, lw: Lw | None
) -> StudentEncoder:
    """The student at the query `settings`: an exported encoder (`aml.exported`: onnxruntime, or ExecuTorch for .pte)
    or a network (a checkpoint file, or a registry name: random-init on request, at the teacher's dim)."""
    from aml.extract import extract
    from aml.registry import create_model

    if is_exported(student):
        return _exported_student(student, settings, lw)
    is_file = os.path.isfile(student)
    net = create_model(
        student, role="student", weights=weights, random_init=random_init and not is_file, dim=None if is_file else dim
    )
    return StudentEncoder(lambda paths, bbxs: extract(net, paths, settings, bbxs=bbxs), net.meta)


def _exported_student(path: str, settings: ExtractSettings, lw: Lw | None) -> StudentEncoder:
    """An exported encoder as the student (its sidecar's normalisation and msp); one folded with the teacher's
    Lw needs the same Lw (`lw`) on the teacher's side, or the two sides would not be comparable."""
    enc = open_exported(path)
    folded = (enc.info.get("whiten") or {}).get("dataset")
    if folded and (lw is None or lw.key != folded):
        raise UserError(
            f"{path}: exported with the teacher's Lw {folded} folded in; pass --whiten {folded} so the teacher's "
            "database is whitened alike, or evaluate an export without --whiten"
        )

    def embed(paths: list[str], bbxs: Any) -> np.ndarray:
        if not paths:
            return np.empty((0, int(enc.info["dim"])), dtype=np.float32)
        return enc.embed(paths, image_size=settings.image_size, scales=settings.scales, bbxs=bbxs)

    return StudentEncoder(embed, {}, folded or None)


def _settings_info(
    settings: ExtractSettings, lw: Lw | None, whiten: str | None, query: ExtractSettings | None = None
) -> dict[str, Any]:
    """What `evaluate_models` reports it ran with: image size (the queries' too when `query` differs), scales
    and the Lw."""
    info: dict[str, Any] = {"image size": settings.image_size, "scales": list(settings.scales)}
    if query is not None and query.image_size != settings.image_size:
        info["query image size"] = query.image_size
    if lw is not None:
        info["Lw"] = lw.source if is_file_spec(whiten) else f"teacher {lw.name}"
    return info


# Over 60 lines: its signature and docstring are the 17 options of `aml evaluate models`; the body is 30 lines.
def evaluate_models(
    dataset: Revisitop,
    teacher: str,
    student: str,
    settings: ExtractSettings,
    *,
    query_settings: ExtractSettings | None = None,
    teacher_weights: str | None = None,
    student_weights: str | None = None,
    random_init: bool = False,
    whiten: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = DEFAULT_DTYPE,
    topk: int | None = None,
    distractors: Sequence[str] | None = None,
    rows: Sequence[str] = ROWS,
    keep_rankings: bool = False,
    binary_rows: bool = False,
) -> ModelsEvaluation:
    """Teacher/teacher and student/student (symmetric) and student-query/teacher-database (asymmetric) scores.

    Models are registry names or checkpoint files; `random_init` (tests) applies to names without weights.
    The teacher is extracted with `settings` (its device also runs the search), the student with
    `query_settings` (default: `settings`; another image size is the asymmetric deployment's); the student may
    also be an exported encoder (`aml.exported`, run by onnxruntime or ExecuTorch). Teacher vectors (database,
    queries, distractors) come from the feature cache in `cache_dir` (default $AML_HOME/cache) stored as
    `cache_dtype`, so a second student costs only its own extraction. `whiten` (a `--whiten` value:
    `whiten.FIRST`, a meta['Lw'] key or an Lw file) applies the teacher's learned whitening to the teacher and
    asymmetric rows (both sides) and to the student row unless the student carries its own Lw of the same name.
    `binary_rows` adds BINARY_ROWS (result["binary"], settings["binary"], and "warnings" when the codes carry
    little): each row's database as sign bits (after the Lw), searched by that row's float queries and by their
    sign bits. `keep_rankings` keeps the float rows' rankings (a full ranking is (Q, N_db))."""
    if not rows or any(r not in ROWS for r in rows):
        raise UserError(f"rows {list(rows)}: expected some of {', '.join(ROWS)}")
    distractors = list(distractors or [])
    dataset.check_images(distractors)
    cache = Path(cache_dir) if cache_dir is not None else aml_home() / "cache"
    t = TeacherVectors(
        teacher, settings, cache_dir=cache, weights=teacher_weights, random_init=random_init, dtype=cache_dtype
    )
    lw = teacher_lw(whiten, settings.multiscale, lambda: t.net().meta)
    qs = query_settings or settings
    info = _settings_info(settings, lw, whiten, qs)
    sides, teacher_db = _teacher_sides(dataset, t, lw, distractors, rows)
    if "student" in rows or "asymmetric" in rows:
        enc = _student_net(student, student_weights, random_init, t.identity["dim"], qs, lw)
        found, own = _student_sides(dataset, enc, qs, lw, teacher_db, distractors, rows)
        sides.update(found)
        if own is not None:
            info["Lw"] += f", student's own {own} on the student row"
    out: dict[str, Any] = {"dataset": dataset.name, "settings": info}
    rankings: dict[str, Ranking] = {}
    for row in (r for r in ROWS if r in sides):
        q, db, dis = sides[row]
        ev = evaluate_search(dataset, q, db, topk=topk, distractors=dis, device=settings.device)
        out[row] = ev.result
        if keep_rankings:
            rankings[row] = ev.ranking
    if binary_rows:
        out["binary"], info["binary"], warnings = _binary_rows(dataset, sides, topk)
        if warnings:
            out["warnings"] = warnings
    return ModelsEvaluation(out, rankings)


def evaluate_independent(
    dataset: Revisitop,
    old: str,
    independent: str,
    settings: ExtractSettings,
    *,
    old_weights: str | None = None,
    independent_weights: str | None = None,
    random_init: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = DEFAULT_DTYPE,
    topk: int | None = None,
) -> dict[str, Any]:
    """The independently trained new model (new*, as it is: its own head, frozen) of a compatibility report:
    {"student": new* / new*, "asymmetric": new* queries against the old model's database, or None when their
    dimensions differ}. Both models' vectors come through the teacher cache (`TeacherVectors`)."""
    cache = Path(cache_dir) if cache_dir is not None else aml_home() / "cache"
    kw = dict(cache_dir=cache, random_init=random_init, dtype=cache_dtype)
    new = TeacherVectors(independent, settings, weights=independent_weights, **kw)
    q, db = new.get(dataset.query_paths(), dataset.bbxs), new.get(dataset.db_paths())
    out: dict[str, Any] = {"student": evaluate_search(dataset, q, db, topk=topk, device=settings.device).result}
    old_db = TeacherVectors(old, settings, weights=old_weights, **kw).get(dataset.db_paths())
    same = old_db.shape[1] == q.shape[1]
    out["asymmetric"] = evaluate_search(dataset, q, old_db, topk=topk, device=settings.device).result if same else None
    return out
