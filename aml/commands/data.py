"""`aml data`: generate synthetic landmarks, write object splits in revisitop layout, inspect a spec."""

from __future__ import annotations

import time

import click

from aml.commands._options import quiet_option, trust_pickle_option
from aml.errors import UserError


@click.group("data")
def command() -> None:
    """Dataset tools: synthetic landmarks, object splits in revisitop layout, spec checks."""


@command.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New folder for the set.")
@click.option("--landmarks", default=80, show_default=True, help="Training landmarks (one cluster each).")
@click.option("--views", default=8, show_default=True, help="Views per training landmark.")
@click.option("--val-landmarks", default=10, show_default=True, help="Validation landmarks.")
@click.option("--test-landmarks", default=24, show_default=True, help="Test landmarks (with queries).")
@click.option("--queries", default=3, show_default=True, help="Queries per test landmark.")
@click.option("--db-views", default=10, show_default=True, help="Database views per test landmark.")
@click.option("--distractors", default=16, show_default=True, help="Database-only distractor landmarks.")
@click.option("--seed", default=0, show_default=True, help="Everything is a function of the seed.")
@click.option("--size", default=256, show_default=True, help="Longest image side in pixels.")
@quiet_option("No progress lines (the result line is still printed).")
def synth(
    out: str,
    landmarks: int,
    views: int,
    val_landmarks: int,
    test_landmarks: int,
    queries: int,
    db_views: int,
    distractors: int,
    seed: int,
    size: int,
    quiet: bool,
) -> None:
    """Write a synthetic landmarks set: SfM-format training data + a revisitop-layout test set (`synth`)."""
    from aml.data.synth import SYNTH_NAME, SynthConfig, generate_synth

    cfg = SynthConfig(
        landmarks=landmarks,
        views=views,
        val_landmarks=val_landmarks,
        test_landmarks=test_landmarks,
        queries=queries,
        db_views=db_views,
        distractors=distractors,
        size=size,
        seed=seed,
    )
    t0 = time.time()
    path = generate_synth(out, cfg, progress=not quiet)
    click.echo(
        f"wrote {path} in {time.time() - t0:.1f} s: train with --data synth:{path}, "
        f"evaluate with --dataset {SYNTH_NAME} --data-root {path}"
    )


def _split(
    groups: str | None,
    folder: str | None,
    out: str,
    name: str | None,
    train_objects: str | None,
    test_objects: str | None,
    copy: bool,
    test_folder: str | None = None,
) -> None:
    from pathlib import Path

    from aml.data.folders import (
        check_dataset_name,
        parse_ranges,
        read_groups_csv,
        read_label_folder,
        write_object_split,
    )

    if name is not None:
        check_dataset_name(name)  # before reading anything
    if (groups is None) == (folder is None):
        raise UserError("aml data split: give exactly one of --groups CSV or --folder DIR")
    if test_folder is not None and (groups is not None or train_objects or test_objects):
        raise UserError("aml data split: --test-folder goes with --folder (its images train, the test folder's test)")
    if groups is not None:
        paths, labels, splits = read_groups_csv(groups)
        default = Path(groups).resolve().parent.name
    else:
        paths, labels = read_label_folder(folder)
        splits, default = None, Path(folder).resolve().name
    if test_folder is not None:  # class-level data: the two folders share labels
        test_paths, test_labels = read_label_folder(test_folder)
        paths, labels = paths + test_paths, labels + test_labels
        splits = ["train"] * (len(paths) - len(test_paths)) + ["test"] * len(test_paths)
    name = name or default
    tr = parse_ranges(train_objects, labels) if train_objects else None
    te = parse_ranges(test_objects, labels) if test_objects else None
    train, ref, csv_path = write_object_split(
        paths, labels, out, name, splits=splits, train_objects=tr, test_objects=te, copy=copy
    )
    n_test = sum(1 for _ in Path(ref.data_root, name, "jpg").iterdir())
    click.echo(
        f"test: {n_test} images of {name} in revisitop layout under {Path(out) / name} "
        f"(evaluate with --dataset {name} --data-root {out})"
    )
    click.echo(
        f"train: {len(train)} images, {train.num_clusters} objects, {train.num_pairs} pairs "
        f"(train with --data groups:{csv_path})"
    )


@command.command("split")
@click.option("--groups", type=click.Path(dir_okay=False), help="Groups CSV: image,object[,split].")
@click.option("--folder", type=click.Path(file_okay=False), help="Class-labelled folder DIR/<label>/<images>.")
@click.option(
    "--test-folder",
    type=click.Path(file_okay=False),
    help="With --folder: a second labelled folder that is the test set (labels may be shared: class-level data).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Data root to write NAME/ into.")
@click.option("--name", help="Dataset name (default: the CSV's or folder's folder name).")
@click.option(
    "--train-objects",
    help="Train objects: ids (0-149; labels that are not integers are numbered in sorted order) or label names "
    "(Petra,Taj_Mahal). Default: the first 60%, or the split column.",
)
@click.option("--test-objects", help="Test objects, as --train-objects (default: the other objects).")
@click.option("--copy", is_flag=True, help="Copy images into NAME/jpg/ instead of symlinking them.")
def split(**options) -> None:
    """Split labelled images by object (or take a test folder); write the test part in revisitop layout."""
    _split(**options)


@command.command("ukbench")
@click.option("--groups", required=True, type=click.Path(dir_okay=False), help="UKBench groups.csv.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Data root to write ukbench/ into.")
@click.option("--train-objects", default="0-149", show_default=True)
@click.option("--test-objects", default="150-249", show_default=True)
@click.option("--copy", is_flag=True, help="Copy images instead of symlinking them.")
def ukbench(groups: str, out: str, train_objects: str, test_objects: str, copy: bool) -> None:
    """UKBench: objects 0-149 train, 150-249 test (each test image a query against the other 399)."""
    _split(groups, None, out, "ukbench", train_objects, test_objects, copy)


@command.command("info")
@click.argument("specs", nargs=-1, required=True)
@click.option("--test-data", help="The run's own test set (folder:DIR, groups:CSV, revisitop:DATA_ROOT/NAME).")
@trust_pickle_option
def info(specs: tuple[str, ...], test_data: str | None) -> None:
    """Resolve data specs and check them (pickle, labels, missing images) without training: what each source
    trains on and what it holds out."""
    from aml.data.sources import describe, parse_data_specs

    b = parse_data_specs(specs, test_data)
    for line in describe(b):
        click.echo(line)
    for part in (b.train, b.val):
        if part is not None:
            click.echo(f"{part.name}: {len(part)} images, {part.num_clusters} clusters, {part.num_pairs} pairs")
    if b.test is not None:
        click.echo(f"test: --dataset {b.test.dataset_name} --data-root {b.test.data_root}")


@command.command("lists")
@click.argument("spec")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the lists into.")
@trust_pickle_option
def lists(spec: str, out: str) -> None:
    """Write a test set's image lists in the order `aml evaluate` uses: OUT/db.txt (imlist order), OUT/queries.txt
    (qimlist order) and OUT/queries.bbx (a query box per line, empty: the whole image), one absolute path a
    line, for `aml index build --images`, `aml search --images --bbx`, `aml embed` or another tool. SPEC:
    folder:DIR, groups:CSV (as `--test-data` takes them) or revisitop:DATA_ROOT/NAME."""
    from pathlib import Path

    from aml.data.revisitop import load_revisitop
    from aml.data.spec import parse_test_spec
    from aml.io import atomic_write, check_writable_dir

    check_writable_dir(out, "--out")
    ref = parse_test_spec(spec)
    ds = load_revisitop(ref.data_root, ref.dataset_name)
    ds.check_images()
    boxes = ["" if b is None else " ".join(f"{float(v):g}" for v in b) for b in ds.bbxs]
    files = {"db.txt": ds.db_paths(), "queries.txt": ds.query_paths(), "queries.bbx": boxes}
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with atomic_write(Path(out) / name) as f:
            f.write("".join(f"{r}\n" for r in rows))
    click.echo(
        f"{out}: db.txt ({len(ds.imlist)} database images), queries.txt ({len(ds.qimlist)} queries), queries.bbx; "
        f"the order of `aml evaluate --dataset {ref.dataset_name} --data-root {ref.data_root}`"
    )
