"""`aml embed`: embed images with an exported ONNX encoder on onnxruntime alone (never imports torch)."""

from __future__ import annotations

import click

from aml.commands._options import image_options, images_options, out_option, read_images, threads_option


@click.command("embed")
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="ONNX / ORT / ExecuTorch (.pte) file written by `aml export` (its .json sidecar must sit beside it).",
)
@images_options
@image_options(size_help="Longest side in pixels (default: the sidecar's).")
@threads_option
@out_option("Output .npy, float32 (N, D); uint8 (N, D/8) packed sign bits for a --binary export.", required=True)
def command(
    model_path: str,
    images: str,
    bbx: str | None,
    image_size: int | None,
    scales: tuple[float, ...],
    out: str,
) -> None:
    """Embed the images of a list into OUT (rows in list order, L2-normalised), torch-free; an encoder exported
    with --binary gives its packed sign bits instead."""
    from pathlib import Path

    import numpy as np

    from aml.exported import open_exported
    from aml.io import atomic_write, check_writable_file

    check_writable_file(out, "--out")  # before the work: never found after embedding, never the temp file
    paths, bbxs = read_images(images, bbx)
    enc = open_exported(model_path)  # a .pte runs in ExecuTorch's Python runtime, the others in onnxruntime
    vecs = enc.embed(paths, image_size=image_size, scales=scales, bbxs=bbxs)
    what = f"{vecs.shape[0]} x {vecs.shape[1]} float32"
    if enc.binary:
        from aml.binary import pack_bits

        dim, vecs = vecs.shape[1], pack_bits(vecs)
        what = f"{vecs.shape[0]} x {vecs.shape[1]} uint8 ({dim} sign bits a row)"
    with atomic_write(out, "wb") as f:
        np.save(f, vecs)
    size = image_size or enc.info["image_size"]
    click.echo(f"{out}: {what} ({Path(model_path).name}, size {size}, scales {','.join(f'{s:g}' for s in scales)})")
