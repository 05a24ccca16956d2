"""`aml evaluate`: revisited Oxford / Paris mAP and mP@k, from feature files or from teacher + student."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from aml.errors import UserError

_MS_DEFAULT = "1,0.7071,0.5"


def load_features(path: str, what: str) -> np.ndarray:
    """A memory-mapped .npy matrix, or a UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found; pass an .npy (N, D) array from `aml extract`")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{p}: not a readable .npy array ({e}); save it with numpy.save") from None


def _json_safe(x: Any) -> Any:
    """NaN (a protocol with no positive in any query) -> null, so the JSON stays standard."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


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
@click.option("--teacher", help="Teacher: registry name or checkpoint (database side).")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), help="Teacher weights file.")
@click.option("--student", help="Student: registry name or checkpoint (query side).")
@click.option("--student-weights", type=click.Path(dir_okay=False), help="Student weights file.")
@click.option("--random-init", is_flag=True, help="Seeded random weights where none are given (tests).")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Longest side in pixels (queries: their crop scaled alike).",
)
@click.option(
    "--multiscale",
    is_flag=False,
    flag_value=_MS_DEFAULT,
    default=None,
    help=f"Scales, comma-separated (alone: {_MS_DEFAULT}).",
)
@click.option("--whiten", is_flag=True, help="Apply the teacher's learned whitening meta['Lw'] (both sides).")
@click.option("--lw-dataset", help="Which meta['Lw'] entry (default: the first).")
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
    type=click.Choice(["teacher", "student", "asymmetric"]),
    help="With models: which settings to run (repeatable; default all three).",
)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Teacher vector cache ($AML_HOME/cache).")
@click.option(
    "--db-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage of database vectors (float16: half the memory).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=int, default=-1, show_default=True, help="Decoding processes (-1: auto).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the scores here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
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
    multiscale: str | None,
    whiten: bool,
    lw_dataset: str | None,
    distractors: str | None,
    topk: int | None,
    rows: tuple[str, ...],
    cache_dir: str | None,
    db_dtype: str,
    batch_size: int,
    workers: int,
    device: str,
    json_out: str | None,
    quiet: bool,
) -> None:
    """mAP and mP@k (Easy / Medium / Hard, x100) on a revisitop-layout dataset.

    From features: --db-features X.npy --query-features Q.npy (L2-normalised rows in imlist / qimlist
    order). From models: --teacher T --student S reports teacher/teacher and student/student (symmetric)
    and student-query/teacher-database (asymmetric) side by side; teacher vectors are cached.
    """
    from aml.data.revisitop import load_revisitop, read_image_list
    from aml.evaluate import evaluate_features, evaluate_models, format_table
    from aml.io import write_json

    features = db_features is not None or query_features is not None
    models = teacher is not None or student is not None
    if features == models:
        raise UserError(
            "give either --db-features and --query-features, or --teacher and --student (not both, not neither)"
        )
    ds = load_revisitop(data_root, dataset)
    if features:
        if db_features is None or query_features is None:
            raise UserError("--db-features and --query-features go together; give both")
        if distractors:
            raise UserError(
                "--distractors needs models to embed them; with feature files use --distractor-features D.npy"
            )
        model_only = [
            n
            for n, v in [
                ("--whiten", whiten),
                ("--multiscale", multiscale),
                ("--row", rows),
                ("--random-init", random_init),
            ]
            if v
        ]
        if model_only:
            raise UserError(f"{', '.join(model_only)}: only for --teacher/--student evaluation")
        db = load_features(db_features, "database features")
        q = load_features(query_features, "query features")
        dis = load_features(distractor_features, "distractor features") if distractor_features else None
        if db_dtype == "float16":
            db = np.asarray(db, dtype=np.float16)
            dis = None if dis is None else np.asarray(dis, dtype=np.float16)
        n_dis = 0 if dis is None else dis.shape[0]
        result = evaluate_features(
            ds,
            db,
            q,
            topk=topk,
            distractors=dis,
            device=device,
            check_unit=True,
            names=(db_features, query_features, distractor_features or ""),
        )
    else:
        if teacher is None or student is None:
            raise UserError("--teacher and --student go together (the asymmetric setting needs both)")
        if distractor_features:
            raise UserError("--distractor-features is for feature files; with models: --distractors LIST.txt")
        if lw_dataset and not whiten:
            raise UserError("--lw-dataset given without --whiten; add --whiten")
        from aml.commands.extract import parse_scales

        dis_paths = read_image_list(distractors) if distractors else []
        n_dis = len(dis_paths)
        result = evaluate_models(
            ds,
            teacher,
            student,
            teacher_weights=teacher_weights,
            student_weights=student_weights,
            random_init=random_init,
            image_size=image_size,
            scales=parse_scales(multiscale) if multiscale else (1.0,),
            whiten=whiten,
            lw_key=lw_dataset,
            cache_dir=cache_dir,
            cache_dtype=db_dtype,
            topk=topk,
            distractors=dis_paths,
            rows=rows or ("teacher", "student", "asymmetric"),
            device=device,
            batch_size=batch_size,
            workers=workers,
            progress=not quiet and sys.stderr.isatty(),
        )
    click.echo(
        f"{dataset}: {len(ds.qimlist)} queries, {len(ds.imlist)} database images"
        + (f" + {n_dis} distractors" if n_dis else "")
    )
    click.echo(format_table(result))
    if json_out:
        write_json(json_out, _json_safe(result))
