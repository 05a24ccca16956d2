"""`aml evaluate`: revisited Oxford / Paris mAP and mP@k, from feature files or from teacher + student."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click
import numpy as np

from aml.commands._options import (
    cache_dtype_option,
    extract_settings,
    extraction_options,
    json_option,
    model_options,
    quiet_option,
    random_init_option,
    trust_pickle_option,
    whiten_option,
)
from aml.errors import UserError
from aml.evaluate import BINARY_ROWS, ROWS, TEST_IMAGE_SIZE


def _json_safe(x: Any) -> Any:
    """NaN (a protocol with no positive in any query) -> null, so the JSON stays standard."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _features_only(db_features: str | None, query_features: str | None, distractors: str | None, **model_only: Any):
    """UserError for options that need models, given with feature files."""
    if db_features is None or query_features is None:
        raise UserError("--db-features and --query-features go together; give both")
    if distractors:
        raise UserError("--distractors needs models to embed them; with feature files use --distractor-features D.npy")
    given = [f"--{n.replace('_', '-')}" for n, v in model_only.items() if v]
    if given:
        raise UserError(f"{', '.join(given)}: only for --teacher/--student evaluation")


def _from_features(
    ds: Any,
    db_features: str,
    query_features: str,
    distractor_features: str | None,
    cache_dtype: str | None,
    topk: int | None,
    device: str,
    binary: bool = False,
    show: bool = False,
) -> tuple[dict[str, Any], int, Any]:
    """Scores of feature files (float16 storage of the database with --cache-dtype float16), the number of
    distractors and the ranking (an aml.evaluate.Ranking; None for uint8 codes); with `binary`, also (or only,
    for uint8 codes from `aml extract --binary`) the database as sign bits."""
    from aml.evaluate import evaluate_features, load_features

    db = load_features(db_features, "database features")
    q = load_features(query_features, "query features")
    dis = load_features(distractor_features, "distractor features") if distractor_features else None
    if db.dtype == np.uint8 and not binary:
        raise UserError(f"{db_features}: uint8 packed sign bits (aml extract --binary); evaluate them with --binary")
    if show and db.dtype == np.uint8:
        raise UserError(f"--show: {db_features}: uint8 sign bits have no float ranking to draw; drop --show")
    if binary:
        return _binary_features(ds, db, q, dis, topk, (db_features, query_features, distractor_features or ""))
    if cache_dtype == "float16":
        db = np.asarray(db, dtype=np.float16)
        dis = None if dis is None else np.asarray(dis, dtype=np.float16)
    result, ranking = evaluate_features(
        ds,
        db,
        q,
        topk=topk,
        distractors=dis,
        device=device,
        check_unit=True,
        names=(db_features, query_features, distractor_features or ""),
        return_ranking=True,
    )
    return result, 0 if dis is None else dis.shape[0], ranking


def _binary_features(
    ds: Any, db: np.ndarray, q: np.ndarray, dis: np.ndarray | None, topk: int | None, names: tuple[str, str, str]
) -> tuple[dict[str, Any], int, Any]:
    """--binary with feature files: float databases are binarised (and scored as floats too, with their ranking),
    uint8 ones are codes (no ranking)."""
    from aml.binary import balance_warning, pack_bits
    from aml.evaluate import evaluate_binary, evaluate_features

    out: dict[str, Any] = {"dataset": ds.name}
    ranking = None
    if db.dtype != np.uint8:
        found, ranking = evaluate_features(
            ds, db, q, topk=topk, distractors=dis, check_unit=True, names=names, return_ranking=True
        )
        out.update(found)
    codes = db if db.dtype == np.uint8 else pack_bits(db)
    dis_codes = None if dis is None else dis if dis.dtype == np.uint8 else pack_bits(dis)
    warning = balance_warning(codes, q.shape[1], f"{names[0]} as sign bits")
    if warning:
        click.echo(warning, err=True)
    out["binary"] = {
        name: evaluate_binary(ds, codes, q, hamming=hamming, topk=topk, distractors=dis_codes, names=names)
        for name, hamming in (("float->bits", False), ("hamming", True))
    }
    return out, 0 if dis is None else dis.shape[0], ranking


def _check_pair(teacher: str, teacher_weights: str | None, student: str, random_init: bool, force: bool) -> None:
    """Before any work: a student checkpoint distilled for another teacher is refused (`--force`: a warning)."""
    from aml.identity import check_compatible, recorded_teacher
    from aml.registry import list_models, model_identity, read_torch_file

    if student in {m["name"] for m in list_models()} or not Path(student).is_file():
        return  # a registered backbone records no teacher; a missing file is reported when the student loads
    ident = model_identity(teacher, teacher_weights, random_init, weights_option="--teacher-weights")
    obj = read_torch_file(student)
    have, fields = recorded_teacher(obj.get("meta") if isinstance(obj, dict) else None)
    warning = check_compatible(
        have,
        ident,
        what=f"--student {student} was distilled for teacher",
        where="--teacher is",
        fix="pass the student's own teacher",
        force=force,
        fields=fields,
    )
    if warning:
        click.echo(warning, err=True)


def _from_models(
    ds: Any, teacher: str | None, student: str | None, distractors: str | None, force: bool = False, **kw: Any
):
    """Teacher / student / asymmetric scores of two models (teacher vectors through the cache), the distractor
    paths, and the rankings of the rows when `return_rankings` (else {})."""
    from aml.data.images import read_image_list
    from aml.evaluate import evaluate_models

    if teacher is None or student is None:
        raise UserError("--teacher and --student go together (the asymmetric setting needs both)")
    _check_pair(teacher, kw["teacher_weights"], student, kw["random_init"], force)
    dis_paths = read_image_list(distractors, "distractor list") if distractors else []
    out = evaluate_models(ds, teacher, student, distractors=dis_paths, **kw)
    result, rankings = out if kw.get("return_rankings") else (out, {})
    return result, rankings, dis_paths


def _check_show(show: str | None, ds: Any, row: str | None, rows: tuple[str, ...], features: bool, dis: Any) -> str:
    """Before any work: the --show file and what it draws (the row; every database item needs its image)."""
    from aml.io import check_writable_file

    if show is None:
        return ""
    if Path(show).suffix.lower() not in (".png", ".html", ".htm"):
        raise UserError(f"--show {show}: expected a .png or .html file")
    check_writable_file(show, "--show")
    if features and dis:
        raise UserError("--show: distractor features have no images to draw; drop --distractor-features or --show")
    row = "" if features else row or "asymmetric"
    if row and rows and row not in rows:
        raise UserError(f"--show-row {row}: not among the rows run ({', '.join(rows)}); add --row {row}")
    ds.check_images()
    return row


@click.command("evaluate")
@click.option("--dataset", required=True, help="Dataset name: reads DATA_ROOT/NAME/gnd_NAME.pkl and jpg/.")
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Folder holding NAME/.")
@click.option("--db-features", type=click.Path(dir_okay=False), help="(N_db, D) .npy in imlist order.")
@click.option("--query-features", type=click.Path(dir_okay=False), help="(N_q, D) .npy in qimlist order.")
@click.option(
    "--distractor-features",
    type=click.Path(dir_okay=False),
    help="(N_dis, D) .npy of R1M-style distractors, appended after imlist.",
)
@model_options("teacher")
@model_options("student")
@random_init_option()
@extraction_options(default=TEST_IMAGE_SIZE)
@whiten_option(" of the teacher, on both sides (the student row: its own Lw of that name if it has one)")
@click.option(
    "--distractors",
    type=click.Path(dir_okay=False),
    help="Text file of distractor image paths (relative to the file), appended after imlist.",
)
@click.option(
    "--topk",
    type=click.IntRange(min=1),
    help="Ranking depth (default: whole database up to 100k images, else 10000; truncation makes mAP a lower bound).",
)
@click.option(
    "--row",
    "rows",
    multiple=True,
    type=click.Choice(ROWS),
    help="With models: which settings to run (repeatable; default all).",
)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Teacher vector cache ($AML_HOME/cache).")
@cache_dtype_option(
    "Storage of the teacher cache with models (default: aml.cache.DEFAULT_DTYPE, shared with `aml distill`); "
    "of the database held in memory with feature files (default: as stored; float16 halves the memory)."
)
@json_option
@click.option(
    "--show",
    type=click.Path(dir_okay=False),
    help="Also draw the worst and best queries (by AP, medium protocol) with their top hits framed positive / "
    "junk / negative from the ground truth: a .png or .html file.",
)
@click.option("--show-n", type=click.IntRange(min=1), default=3, show_default=True, help="Worst and best drawn, each.")
@click.option("--show-k", type=click.IntRange(min=1), default=8, show_default=True, help="Hits drawn per query.")
@click.option(
    "--show-row",
    type=click.Choice(ROWS),
    help="With models: the row --show draws (default asymmetric: student queries, teacher database).",
)
@click.option(
    "--binary",
    is_flag=True,
    help="Also evaluate each row's database as sign bits (the teacher's; the student's own for the student row): "
    "float queries against the bits (asymmetric) and binarised queries (Hamming); rows "
    f"{', '.join(n for names in BINARY_ROWS.values() for n in names)}. Feature "
    "files: a float database is binarised, a uint8 one (aml extract --binary) is taken as codes.",
)
@click.option("--force", is_flag=True, help="Evaluate a student distilled for another teacher anyway (warns).")
@quiet_option()
@trust_pickle_option
def command(
    dataset: str,
    data_root: str,
    db_features: str | None,
    query_features: str | None,
    distractor_features: str | None,
    teacher: str | None,
    teacher_weights: str | None,
    student: str | None,
    student_weights: str | None,
    random_init: bool,
    image_size: int,
    scales: tuple[float, ...],
    batch_size: int,
    workers: int,
    device: str,
    backend: str,
    whiten: str | None,
    distractors: str | None,
    topk: int | None,
    rows: tuple[str, ...],
    cache_dir: str | None,
    cache_dtype: str | None,
    json_out: str | None,
    show: str | None,
    show_n: int,
    show_k: int,
    show_row: str | None,
    binary: bool,
    force: bool,
    quiet: bool,
) -> None:
    """mAP and mP@k (Easy / Medium / Hard, x100) on a revisitop-layout dataset.

    From features: --db-features X.npy --query-features Q.npy (L2-normalised rows in imlist / qimlist
    order). From models: --teacher T --student S reports teacher/teacher and student/student (symmetric)
    and student-query/teacher-database (asymmetric) side by side; teacher vectors are cached.
    """
    from aml.cache import DEFAULT_DTYPE
    from aml.data.revisitop import load_revisitop
    from aml.evaluate import format_table
    from aml.io import check_writable_file, write_json

    if json_out:
        check_writable_file(json_out, "--json")
    features = db_features is not None or query_features is not None
    models = teacher is not None or student is not None
    if features == models:
        raise UserError(
            "give either --db-features and --query-features, or --teacher and --student (not both, not neither)"
        )
    ds = load_revisitop(data_root, dataset)
    if features:
        _features_only(
            db_features,
            query_features,
            distractors,
            whiten=whiten,
            multiscale=scales != (1.0,),
            row=rows,
            random_init=random_init,
            show_row=show_row,
        )
    elif distractor_features:
        raise UserError("--distractor-features is for feature files; with models: --distractors LIST.txt")
    row = _check_show(show, ds, show_row, rows, features, distractor_features)
    dis_paths: list[str] = []
    if features:
        result, n_dis, ranking = _from_features(
            ds, db_features, query_features, distractor_features, cache_dtype, topk, device, binary, bool(show)
        )
    else:
        result, rankings, dis_paths = _from_models(
            ds,
            teacher,
            student,
            distractors,
            force,
            settings=extract_settings(image_size, scales, batch_size, workers, device, quiet, backend),
            teacher_weights=teacher_weights,
            student_weights=student_weights,
            random_init=random_init,
            whiten=whiten,
            cache_dir=cache_dir,
            cache_dtype=cache_dtype or DEFAULT_DTYPE,
            topk=topk,
            rows=rows or ROWS,
            return_rankings=bool(show),
            binary=binary,
        )
        n_dis, ranking = len(dis_paths), rankings.get(row)
        for warning in result.get("warnings", []):
            click.echo(warning, err=True)
    click.echo(
        f"{dataset}: {len(ds.qimlist)} queries, {len(ds.imlist)} database images"
        + (f" + {n_dis} distractors" if n_dis else "")
    )
    if "mAP" in result or any(r in result for r in ROWS):
        click.echo(format_table(result))
    if "binary" in result:
        click.echo(format_table(result["binary"], title="database as sign bits (aml.binary)", layout="rows"))
    if json_out:
        write_json(json_out, _json_safe(result))
    if show:
        from aml.show import draw_extremes

        ap = ranking.scores["M"].ap
        _, drawn = draw_extremes(show, ds, ds.db_paths() + dis_paths, ranking.ids, ranking.sims, ap, n=show_n, k=show_k)
        what = f"the {row} row" if row else "the features"
        click.echo(f"{show}: {len(drawn)} queries of {what} drawn (worst and best by AP, medium protocol)")
