"""`aml extract`: embed a list of images with a model or checkpoint into an .npy file."""

from __future__ import annotations

import click

from aml.commands._options import (
    extract_settings,
    extraction_options,
    images_options,
    model_options,
    out_option,
    quiet_option,
    random_init_option,
    read_images,
    trust_pickle_option,
    whiten_option,
)


@click.command("extract")
@model_options("model", required=True)
@random_init_option("Seeded random weights (tests).")
@images_options
@extraction_options(required=True)
@whiten_option(" (the model's, after the scale combination)")
@out_option("Output .npy, float32 (N, D); with --binary uint8 (N, D/8).", required=True)
@click.option(
    "--binary",
    is_flag=True,
    help="Write OUT as packed sign bits instead of float32 vectors: uint8 (N, D/8), bit = value > 2^-25 of each "
    "(whitened, if --whiten) vector, numpy.packbits order (aml.binary.pack_bits); warns when almost every bit "
    "is 1 (or 0).",
)
@quiet_option("No progress bar.")
@trust_pickle_option
def command(
    model_name: str,
    weights: str | None,
    random_init: bool,
    images: str,
    bbx: str | None,
    image_size: int,
    scales: tuple[float, ...],
    batch_size: int,
    workers: int,
    device: str,
    backend: str,
    whiten: str | None,
    out: str,
    binary: bool,
    quiet: bool,
) -> None:
    """Embed the images of a list into OUT (rows in list order, L2-normalised)."""
    import numpy as np

    from aml.extract import extract
    from aml.io import atomic_write, check_writable_file
    from aml.registry import create_model
    from aml.whiten import Lw

    check_writable_file(out, "--out")
    paths, bbxs = read_images(images, bbx)
    settings = extract_settings(image_size, scales, batch_size, workers, device, quiet, backend)
    model = create_model(model_name, weights=weights, random_init=random_init)
    lw = Lw.from_spec(whiten, settings.multiscale, lambda: model.meta) if whiten is not None else None
    vecs = extract(model, paths, settings, bbxs=bbxs, lw=lw)
    what = f"{vecs.shape[0]} x {vecs.shape[1]} float32"
    if binary:
        from aml.binary import balance_warning, bits_set, pack_bits

        dim, vecs = vecs.shape[1], pack_bits(vecs)
        what = f"{vecs.shape[0]} x {vecs.shape[1]} uint8 ({dim} sign bits a row, {100 * bits_set(vecs, dim):.1f}% set)"
        warning = balance_warning(vecs, dim, out)
        if warning:
            click.echo(warning, err=True)
    with atomic_write(out, "wb") as f:
        np.save(f, vecs)
    click.echo(
        f"{out}: {what} ({model.meta['aml']['name']}, "
        f"size {image_size}, scales {','.join(f'{s:g}' for s in scales)}{f', Lw {lw.name}' if lw else ''})"
    )
