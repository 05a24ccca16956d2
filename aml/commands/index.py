"""`aml index`: build, extend and describe a faiss index of a teacher's vectors (build | add | info)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from aml.commands._options import (
    _stack,
    cache_dtype_option,
    collect,
    json_option,
    model_options,
    quiet_option,
    random_init_option,
    runtime_options,
    settings_options,
    whiten_option,
    write_json_out,
)
from aml.commands._push import command as push
from aml.index import KINDS


@click.group("index")
def command() -> None:
    """Build, extend and describe a faiss index of a teacher's vectors."""


def _teacher(teacher, weights, random_init, settings, cache_dtype, cache_dir):
    from aml.cache import DEFAULT_DTYPE
    from aml.io import aml_home
    from aml.teacher_vectors import TeacherVectors

    cache = cache_dir or aml_home() / "cache"
    return TeacherVectors(
        teacher, settings, cache_dir=cache, weights=weights, random_init=random_init, dtype=cache_dtype or DEFAULT_DTYPE
    )


def _check_images(paths: list[str], where: str) -> None:
    from aml.errors import UserError

    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(
            f"{where}: {len(missing)} of {len(paths)} images are missing (first: {missing[0]}); fix the list"
        )


def _ivfpq_options(f):
    """--nlist, --m, --nbits, --nprobe, handed to the command as one `params` dict (None: the default)."""
    return _stack(
        click.option("--nlist", type=click.IntRange(min=1), help="ivfpq: inverted lists (default ~4 sqrt(N))."),
        click.option("--m", type=click.IntRange(min=1), help="ivfpq: sub-quantizers (must divide D; default D/32)."),
        click.option("--nbits", type=click.IntRange(1, 16), help="ivfpq: bits per sub-quantizer code (default 8)."),
        click.option("--nprobe", type=click.IntRange(min=1), help="ivfpq: lists searched per query (default 32)."),
        collect("params", lambda **p: p, "nlist", "m", "nbits", "nprobe"),
    )(f)


@command.command("build")
@model_options("teacher", required=True)
@random_init_option()
@click.option("--images", required=True, type=click.Path(dir_okay=False), help="Database image list.")
@settings_options(required=True)
@whiten_option(" (the teacher's), applied to the database and to every query")
@click.option("--type", "kind", type=click.Choice(KINDS), default="flat", show_default=True, help="Index type.")
@_ivfpq_options
@cache_dtype_option("Teacher cache dtype (default float16, shared with `aml evaluate`).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Teacher cache folder (default $AML_HOME/cache).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace the aml index in --out (its own files only).")
def build(
    teacher, teacher_weights, random_init, images, settings, whiten, kind, params, cache_dtype, cache_dir, out,
    overwrite,
) -> None:  # fmt: skip
    """Index the teacher's vectors of an image list (under torchrun: sharded across ranks, rank 0 writes)."""
    from aml.binary import balance_warning
    from aml.data.images import read_image_list
    from aml.index import build_from_images, check_out
    from aml.io import check_writable_dir
    from aml.whiten import teacher_lw

    check_writable_dir(out, "--out")
    check_out(out, overwrite)  # before any work; again under the lock before extracting
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and settings.device == "auto":
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        settings = settings.replace(device=device)
    paths = read_image_list(images)
    _check_images(paths, images)
    t = _teacher(teacher, teacher_weights, random_init, settings, cache_dtype, cache_dir)
    lw = teacher_lw(whiten, settings.multiscale, lambda: t.net().meta)
    index = build_from_images(t, paths, kind, out, lw=lw, params=params, overwrite=overwrite, rank=rank, world=world,
                              quiet=not settings.progress)  # fmt: skip
    if index is not None:
        click.echo(f"{out}: {len(index)} x {index.dim} {kind} index of {t.identity['name']} ({settings.image_size} px)")
        if kind == "binary" and (warning := balance_warning(index.stored(), index.dim, f"{out} (binary index)")):
            click.echo(warning, err=True)


@command.command("add")
@click.argument("db", type=click.Path(file_okay=False))
@click.option("--images", required=True, type=click.Path(dir_okay=False), help="Image list to append.")
@runtime_options
@click.option("--teacher-weights", type=click.Path(dir_okay=False), help="Weights file (when the index names one).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Teacher cache folder (default $AML_HOME/cache).")
@click.option("--skip-existing", is_flag=True, help="Skip images the index already holds (default: refuse the list).")
@quiet_option()
def add(db, images, batch_size, workers, device, backend, teacher_weights, cache_dir, skip_existing, quiet) -> None:
    """Append images to an index with the teacher settings its manifest records (atomically; one writer at a time,
    a second waits). Images it already holds (same absolute path) are refused, or skipped with --skip-existing."""
    from aml.data.images import read_image_list
    from aml.index import add_images, read_manifest

    read_manifest(Path(db))  # a missing or damaged index: said before the list is read
    paths = read_image_list(images)
    _check_images(paths, images)
    index, n, skipped = add_images(db, paths, skip_existing=skip_existing, where=images, quiet=quiet,
                                   batch_size=batch_size, workers=workers, device=device, backend=backend,
                                   weights=teacher_weights, cache_dir=cache_dir, progress=not quiet)  # fmt: skip
    note = f" ({skipped} already in the index, skipped)" if skipped else ""
    click.echo(f"{db}: +{n} images{note}, {len(index)} in all")


@command.command("info")
@click.argument("db", type=click.Path(file_okay=False))
@json_option("the manifest")
def info(db, json_out) -> None:
    """Describe an index: teacher identity, type, parameters, counts."""
    from aml.identity import describe
    from aml.index import index_identity, read_manifest

    man = read_manifest(Path(db))
    if json_out:
        write_json_out(json_out, man)
        if json_out == "-":
            return
    click.echo(f"{db}: {man['type']} index, {man['count']} x {man['dim']} vectors, params {man.get('params') or {}}")
    click.echo(f"teacher: {describe(index_identity(man))}, scales {man.get('scales')}")
    click.echo(
        f"format {man['format']} v{man['version']}, faiss {man.get('faiss')}, generation {man.get('generation')}"
    )


command.add_command(push)  # `aml index push` (aml/commands/_push.py)
