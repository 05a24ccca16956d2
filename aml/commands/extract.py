"""`aml extract`: embed a list of images with a model or checkpoint into an .npy file."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
import numpy as np

from aml.errors import UserError

_MS_DEFAULT = "1,0.7071,0.5"


def read_image_list(path: Path) -> list[str]:
    """Paths listed one per line; relative ones are relative to the list's folder. Blank lines skipped."""
    if not path.is_file():
        raise UserError(f"{path}: image list not found; give a text file with one image path per line")
    lines = [s.strip() for s in path.read_text().splitlines()]
    paths = [str(p if (p := Path(s)).is_absolute() else path.parent / p) for s in lines if s]
    if not paths:
        raise UserError(f"{path}: no image paths in the list")
    return paths


def read_bbxs(path: Path, n: int) -> list[tuple[float, float, float, float] | None]:
    """One 'x1 y1 x2 y2' per image line (an empty line: no box)."""
    if not path.is_file():
        raise UserError(f"{path}: bounding-box file not found")
    lines = path.read_text().splitlines()
    if len(lines) != n:
        raise UserError(f"{path}: {len(lines)} lines for {n} images; one 'x1 y1 x2 y2' (or empty) line per image")
    out: list[tuple[float, float, float, float] | None] = []
    for i, s in enumerate(lines, 1):
        if not s.strip():
            out.append(None)
            continue
        try:
            x1, y1, x2, y2 = (float(v) for v in s.replace(",", " ").split())
        except ValueError:
            raise UserError(f"{path}: line {i}: '{s.strip()}' is not 'x1 y1 x2 y2'") from None
        if not (x2 > x1 and y2 > y1):
            raise UserError(f"{path}: line {i}: box {s.strip()} is empty; need x1 < x2 and y1 < y2")
        out.append((x1, y1, x2, y2))
    return out


def parse_scales(text: str) -> tuple[float, ...]:
    """'1,0.7071,0.5' -> scales; a value within 1e-4 of 1/sqrt(2) means exactly 1/sqrt(2) (cirtorch's)."""
    try:
        scales = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"'{text}': expected comma-separated numbers, e.g. {_MS_DEFAULT}") from None
    if not scales or any(s <= 0 for s in scales):
        raise click.BadParameter(f"'{text}': expected positive scales, e.g. {_MS_DEFAULT}")
    return tuple(2**-0.5 if math.isclose(s, 2**-0.5, abs_tol=1e-4) else s for s in scales)


@click.command("extract")
@click.option("--model", "model_name", required=True, help="Registry name (see `aml models`) or checkpoint file.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local weights file for a registry name.")
@click.option("--random-init", is_flag=True, help="Seeded random weights (tests).")
@click.option(
    "--images",
    "images",
    required=True,
    type=click.Path(dir_okay=False),
    help="Text file, one image path per line (relative to the file's folder).",
)
@click.option("--image-size", type=click.IntRange(min=1), required=True, help="Longest side in pixels.")
@click.option(
    "--multiscale",
    is_flag=False,
    flag_value=_MS_DEFAULT,
    default=None,
    help=f"Scales, comma-separated (alone: {_MS_DEFAULT}).",
)
@click.option("--whiten", is_flag=True, help="Apply the checkpoint's learned whitening meta['Lw'].")
@click.option("--lw-dataset", help="Which meta['Lw'] entry to use (default: the first).")
@click.option("--bbx", type=click.Path(dir_okay=False), help="Box 'x1 y1 x2 y2' per line (empty: none).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npy, float32 (N, D).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=int, default=-1, show_default=True, help="Decoding processes (-1: auto).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(
    model_name: str,
    weights: str | None,
    random_init: bool,
    images: str,
    image_size: int,
    multiscale: str | None,
    whiten: bool,
    lw_dataset: str | None,
    bbx: str | None,
    out: str,
    batch_size: int,
    workers: int,
    device: str,
    quiet: bool,
) -> None:
    """Embed the images of a list into OUT (rows in list order, L2-normalised)."""
    from aml.extract import extract, select_lw
    from aml.io import atomic_write
    from aml.registry import create_model

    paths = read_image_list(Path(images))
    bbxs = read_bbxs(Path(bbx), len(paths)) if bbx else None
    scales = parse_scales(multiscale) if multiscale else (1.0,)
    if lw_dataset and not whiten:
        raise UserError("--lw-dataset given without --whiten; add --whiten")
    model = create_model(model_name, weights=weights, random_init=random_init)
    lw = select_lw(model.meta, len(scales) > 1, lw_dataset) if whiten else None
    vecs = extract(
        model,
        paths,
        image_size=image_size,
        scales=scales,
        bbxs=bbxs,
        lw=lw,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=not quiet and sys.stderr.isatty(),
    )
    with atomic_write(out, "wb") as f:
        np.save(f, vecs)
    click.echo(
        f"{out}: {vecs.shape[0]} x {vecs.shape[1]} float32 ({model.meta['aml']['name']}, "
        f"size {image_size}, scales {','.join(f'{s:g}' for s in scales)}{', Lw' if lw else ''})"
    )
