"""`aml evaluate features|models`: revisited Oxford / Paris mAP and mP@k, from feature files or teacher + student.

The earlier form without a subcommand (`aml evaluate --teacher T --student S ...`, `aml evaluate --db-features X
--query-features Q ...`) still runs: the group picks `models` or `features` from the options given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from aml.cache import DEFAULT_DTYPE
from aml.commands._options import (
    _stack,
    cache_dtype_option,
    collect,
    extract_settings,
    image_options,
    image_sizes,
    json_option,
    model_options,
    quiet_option,
    random_init_option,
    runtime_options,
    search_device_option,
    size_options,
    threads_option,
    trust_pickle_option,
    whiten_option,
    write_json_out,
)
from aml.errors import UserError
from aml.evaluate import BINARY_ROWS, ROWS, TEST_IMAGE_SIZE
from aml.exported import is_exported

FEATURE_OPTIONS = ("--db-features", "--query-features", "--distractor-features", "--database-dtype")
MODEL_OPTIONS = ("--teacher", "--student", "--old", "--new")


class _Evaluate(click.Group):
    """`aml evaluate`: a group whose earlier, subcommand-less form runs `features` or `models` by its options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            given = {a.split("=")[0] for a in args if a.startswith("--")}
            features, models = given & set(FEATURE_OPTIONS), given & set(MODEL_OPTIONS)
            if features and models:
                raise UserError(
                    "give either --db-features and --query-features, or --teacher and --student (not both); "
                    "see `aml evaluate features --help` and `aml evaluate models --help`"
                )
            args = ["features" if features else "models", *args]
        return super().parse_args(ctx, args)


@click.group("evaluate", cls=_Evaluate)
def command() -> None:
    """mAP and mP@k (Easy / Medium / Hard, x100) on a revisitop-layout dataset: of feature files (`features`) or
    of a teacher and a student (`models`: teacher/teacher, student/student and student-query/teacher-database)."""


@dataclass(frozen=True)
class _Report:
    """What every evaluation prints and writes besides its table: --json PATH and the --show drawing."""

    json_out: str | None
    show: str | None
    show_n: int
    show_k: int

    def check_json(self) -> None:
        """Before any work: the --json file can be written."""
        from aml.io import check_writable_file

        if self.json_out and self.json_out != "-":
            check_writable_file(self.json_out, "--json")


def _json_safe(x: Any) -> Any:
    """NaN (a protocol with no positive in any query) -> null, so the JSON stays standard."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _common(f: Any) -> Any:
    """The options both subcommands take: dataset, depth, extra rows, and what is written besides the table."""
    return _stack(
        click.option("--dataset", required=True, help="Dataset name: reads DATA_ROOT/NAME/gnd_NAME.pkl and jpg/."),
        click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Folder holding NAME/."),
        click.option(
            "--topk",
            type=click.IntRange(min=1),
            help="Ranking depth (default: whole database up to 100k images, else 10000; truncation makes mAP a "
            "lower bound).",
        ),
        click.option(
            "--binary-rows",
            is_flag=True,
            help="Add rows for the database as sign bits (aml.binary): float queries against the bits (asymmetric) "
            f"and binarised queries (Hamming); with models {', '.join(n for v in BINARY_ROWS.values() for n in v)}.",
        ),
        json_option("the scores"),
        click.option(
            "--show",
            type=click.Path(dir_okay=False),
            help="Also draw the worst and best queries (by AP, medium protocol) with their top hits framed positive "
            "/ junk / negative from the ground truth: a .png or .html file.",
        ),
        click.option(
            "--show-n", type=click.IntRange(min=1), default=3, show_default=True, help="Worst and best drawn."
        ),
        click.option(
            "--show-k", type=click.IntRange(min=1), default=8, show_default=True, help="Hits drawn per query."
        ),
        collect("report", _Report, "json_out", "show", "show_n", "show_k"),
        trust_pickle_option,
    )(f)


def _check_show(show: str | None, ds: Any, row: str, rows: tuple[str, ...], dis: Any = None) -> None:
    """Before any work: the --show file and what it draws (the row; every database item needs its image)."""
    from aml.show import check_show_path

    if show is None:
        return
    check_show_path(show, "--show")
    if dis:
        raise UserError("--show: distractor features have no images to draw; drop --distractor-features or --show")
    if row and rows and row not in rows:
        raise UserError(f"--show-row {row}: not among the rows run ({', '.join(rows)}); add --row {row}")
    ds.check_images()


def _report(ds: Any, result: dict[str, Any], n_dis: int, ranking: Any, what: str, db_paths: list[str], r: _Report):
    """Print the tables, write --json, draw --show (the ranking of `what`)."""
    from aml.evaluate import format_table

    click.echo(
        f"{ds.name}: {len(ds.qimlist)} queries, {len(ds.imlist)} database images"
        + (f" + {n_dis} distractors" if n_dis else "")
    )
    if "mAP" in result or any(row in result for row in ROWS):
        click.echo(format_table(result))
    if "binary" in result:
        click.echo(format_table(result["binary"], title="database as sign bits (aml.binary)", layout="rows"))
    if result.get("compatibility"):
        from aml.compat import format_report

        click.echo(format_report({p: _compat(r) for p, r in result["compatibility"].items()}))
    if r.json_out:
        write_json_out(r.json_out, _json_safe(result))
    if r.show:
        from aml.show import draw_extremes

        ap = ranking.scores["M"].ap
        _, drawn = draw_extremes(r.show, ds, db_paths, ranking.ids, ranking.sims, ap, n=r.show_n, k=r.show_k)
        click.echo(f"{r.show}: {len(drawn)} queries of {what} drawn (worst and best by AP, medium protocol)")


def _compat(d: dict[str, Any]) -> Any:
    """A report back from its `as_dict` form."""
    from aml.compat import compat_report

    return compat_report(d["old/old"], d["new/new"], d["new->old"], d["new*/new*"], d["new*->old"])


# ------------------------------------------------------------------------------------------------ features
def _from_features(
    ds: Any, paths: tuple[str, str, str | None], database_dtype: str | None, topk: int | None, device: str, bits: bool,
    show: str | None,
) -> tuple[dict[str, Any], int, Any]:  # fmt: skip
    """Scores of the (queries, database, distractors) feature files (the database held as `database_dtype`), the
    number of distractors and the float ranking (None for uint8 codes); with `bits`, also (or only, for uint8
    codes from `aml extract --binary`) the database as sign bits."""
    from aml.binary import balance_warning, pack_bits
    from aml.evaluate import evaluate_features, evaluate_search, load_features

    q = load_features(paths[0], "query features")
    db = load_features(paths[1], "database features")
    dis = load_features(paths[2], "distractor features") if paths[2] else None
    names = (paths[0], paths[1], paths[2] or "")
    if db.dtype == np.uint8 and not bits:
        raise UserError(f"{paths[1]}: uint8 packed sign bits (aml extract --binary); evaluate them with --binary-rows")
    if show and db.dtype == np.uint8:
        raise UserError(f"--show: {paths[1]}: uint8 sign bits have no float ranking to draw; drop --show")
    if database_dtype and db.dtype != np.uint8:
        db = np.asarray(db, dtype=database_dtype)
        dis = None if dis is None else np.asarray(dis, dtype=database_dtype)
    out: dict[str, Any] = {"dataset": ds.name}
    ranking = None
    kw = dict(topk=topk, check_unit=True, names=names)
    if db.dtype != np.uint8:
        ev = evaluate_search(ds, q, db, distractors=dis, device=device, **kw)
        out, ranking = ev.result, ev.ranking
    if bits:
        codes = db if db.dtype == np.uint8 else pack_bits(db)
        dis_codes = None if dis is None else dis if dis.dtype == np.uint8 else pack_bits(dis)
        warning = balance_warning(codes, q.shape[1], f"{paths[1]} as sign bits")
        if warning:
            click.echo(warning, err=True)
        out = {**out, "binary": {}}
        for name, hamming in (("float->bits", False), ("hamming", True)):
            out["binary"][name] = evaluate_features(ds, q, codes, distractors=dis_codes, hamming=hamming, **kw)
    return out, 0 if dis is None else dis.shape[0], ranking


@command.command("features")
@_common
@click.option("--query-features", required=True, type=click.Path(dir_okay=False), help="(N_q, D) .npy, qimlist order.")
@click.option("--db-features", required=True, type=click.Path(dir_okay=False), help="(N_db, D) .npy, imlist order.")
@click.option("--distractor-features", type=click.Path(dir_okay=False), help="(N_dis, D) .npy, after the database.")
@click.option(
    "--database-dtype",
    type=click.Choice(("float16", "float32")),
    help="The database held in memory as (default: as stored; float16 halves the memory).",
)
@search_device_option("auto, cpu, cuda or cuda:N (the search core, aml.search).")
@threads_option
def features(
    dataset, data_root, topk, binary_rows, report, query_features, db_features, distractor_features, database_dtype,
    search_device,
) -> None:  # fmt: skip
    """Scores of feature files: L2-normalised rows in qimlist (queries) and imlist (database) order."""
    from aml.data.revisitop import load_revisitop

    report.check_json()
    ds = load_revisitop(data_root, dataset)
    _check_show(report.show, ds, "", (), distractor_features)
    paths = (query_features, db_features, distractor_features)
    result, n_dis, ranking = _from_features(ds, paths, database_dtype, topk, search_device, binary_rows, report.show)
    _report(ds, result, n_dis, ranking, "the features", ds.db_paths(), report)


# ------------------------------------------------------------------------------------------------ models
def _check_pair(teacher: str, teacher_weights: str | None, student: str, random_init: bool, force: bool) -> None:
    """Before any work: a student checkpoint distilled for another teacher is refused (`--force`: a warning)."""
    from aml.identity import check_compatible, recorded_teacher
    from aml.registry import list_models, model_identity, read_torch_file

    if student in {m["name"] for m in list_models()} or not Path(student).is_file():
        return  # a registered backbone records no teacher; a missing file is reported when the student loads
    ident = model_identity(teacher, teacher_weights, random_init, weights_option="--teacher-weights")
    if is_exported(student):  # an exported encoder: its sidecar records the teacher
        from aml.sidecar import read_sidecar

        meta = {"aml": {"teacher": read_sidecar(student).get("teacher")}}
    else:
        obj = read_torch_file(student)
        meta = obj.get("meta") if isinstance(obj, dict) else None
    have, fields = recorded_teacher(meta)
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


@command.command("models")
@_common
@model_options("teacher", required=True, alias="--old", default_help="--old: an upgrade's old model")
@model_options("student", required=True, alias="--new", default_help="--new: an upgrade's new model")
@model_options("independent")
@random_init_option()
@image_options(
    size_help="Longest side of queries and database alike (default: the size the student records, else "
    f"{TEST_IMAGE_SIZE})."
)
@runtime_options
@size_options(both=False)
@quiet_option()
@whiten_option(" of the teacher, on both sides (the student row: its own Lw of that name if it has one)")
@click.option(
    "--distractors",
    type=click.Path(dir_okay=False),
    help="Text file of distractor image paths (relative to the file), appended after imlist.",
)
@click.option("--row", "rows", multiple=True, type=click.Choice(ROWS), help="Rows to run (repeatable; default all).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Teacher vector cache ($AML_HOME/cache).")
@cache_dtype_option("Storage of the teacher cache (default: aml.cache.DEFAULT_DTYPE, shared with `aml distill`).")
@click.option(
    "--show-row",
    type=click.Choice(ROWS),
    default="asymmetric",
    show_default=True,
    help="The row --show draws (asymmetric: student queries, teacher database).",
)
@click.option("--force", is_flag=True, help="Evaluate a student distilled for another teacher anyway (warns).")
def models(
    dataset, data_root, topk, binary_rows, report, teacher, teacher_weights, student, student_weights,
    new_independent, new_independent_weights, random_init, image_size, scales, batch_size, workers, device, backend,
    query_image_size, db_image_size, quiet, whiten, distractors, rows, cache_dir, cache_dtype, show_row, force,
) -> None:  # fmt: skip
    """Teacher/teacher and student/student (symmetric) and student-query/teacher-database (asymmetric) side by
    side, and the compatibility report of the upgrade old (teacher) -> new (student), with new* when given
    (aml.compat); the teacher's vectors are cached, --device runs the extraction and the search. The student is a
    registry name, a checkpoint or an exported encoder (.onnx, .ort, .pte); queries default to the size it
    records, the database to the queries' size."""
    from aml.data.images import read_image_list
    from aml.data.revisitop import load_revisitop
    from aml.evaluate import evaluate_models

    report.check_json()
    ds = load_revisitop(data_root, dataset)
    _check_show(report.show, ds, show_row, rows)
    _check_pair(teacher, teacher_weights, student, random_init, force)
    q_size, db_size, sizes = image_sizes(
        student, query=query_image_size, database=db_image_size, both=image_size, fallback=TEST_IMAGE_SIZE
    )
    click.echo(sizes, err=True)
    settings = extract_settings(db_size, scales, batch_size, workers, device, quiet, backend)
    dis_paths = read_image_list(distractors, "distractor list") if distractors else []
    ev = evaluate_models(
        ds, teacher, student, settings, query_settings=settings.replace(image_size=q_size),
        teacher_weights=teacher_weights, student_weights=student_weights, random_init=random_init, whiten=whiten,
        cache_dir=cache_dir, cache_dtype=cache_dtype or DEFAULT_DTYPE, topk=topk, distractors=dis_paths,
        rows=rows or ROWS, keep_rankings=bool(report.show), binary_rows=binary_rows,
    )  # fmt: skip
    for warning in ev.result.get("warnings", []):
        click.echo(warning, err=True)
    result = _with_compat(ev.result, ds, teacher, teacher_weights, new_independent, new_independent_weights, dict(
        settings=settings, random_init=random_init, cache_dir=cache_dir, cache_dtype=cache_dtype or DEFAULT_DTYPE,
        topk=topk))  # fmt: skip
    ranking = ev.rankings.get(show_row)
    _report(ds, result, len(dis_paths), ranking, f"the {show_row} row", ds.db_paths() + dis_paths, report)


def _with_compat(
    result: dict[str, Any], ds: Any, old: str, old_weights: str | None, new_star: str | None,
    new_star_weights: str | None, kw: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """`result` with the upgrade's compatibility report ("compatibility": {protocol: report}) and new*'s scores
    ("new*") when every row ran and `new_star` (--new-independent) is given; the report is printed after the
    table (`_report`)."""
    from aml.compat import reports_of
    from aml.evaluate import evaluate_independent

    if any(row not in result for row in ROWS):
        return result
    star = None
    if new_star:
        settings = kw.pop("settings")
        star = evaluate_independent(
            ds, old, new_star, settings, old_weights=old_weights, independent_weights=new_star_weights, **kw
        )
    out = {**result, "compatibility": {p: r.as_dict() for p, r in reports_of(result, star).items()}}
    if star is not None:
        out["new*"] = {"model": new_star, **star}
    return out
