"""`aml embed`: embed images with an exported ONNX encoder on onnxruntime alone (never imports torch)."""

from __future__ import annotations

import click


@click.command("embed")
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="ONNX file written by `aml export` (its .json sidecar must sit beside it).",
)
@click.option(
    "--images",
    required=True,
    type=click.Path(dir_okay=False),
    help="Text file, one image path per line (relative to the file's folder).",
)
@click.option("--image-size", type=click.IntRange(min=1), help="Longest side in pixels (default: the sidecar's).")
@click.option(
    "--multiscale",
    is_flag=False,
    flag_value="1,0.7071,0.5",
    default=None,
    help="Scales, comma-separated (alone: 1,0.7071,0.5).",
)
@click.option("--bbx", type=click.Path(dir_okay=False), help="Boxes 'x1 y1 x2 y2' per image line (empty: none).")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads (default: its own).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npy, float32 (N, D).")
def command(
    model_path: str,
    images: str,
    image_size: int | None,
    multiscale: str | None,
    bbx: str | None,
    threads: int | None,
    out: str,
) -> None:
    """Embed the images of a list into OUT (rows in list order, L2-normalised), torch-free."""
    from pathlib import Path

    import numpy as np

    from aml.commands.extract import parse_scales, read_bbxs, read_image_list
    from aml.io import atomic_write
    from aml.onnx_embed import OnnxEncoder

    paths = read_image_list(Path(images))
    bbxs = read_bbxs(Path(bbx), len(paths)) if bbx else None
    scales = parse_scales(multiscale) if multiscale else (1.0,)
    enc = OnnxEncoder(model_path, threads=threads)
    vecs = enc.embed(paths, image_size=image_size, scales=scales, bbxs=bbxs)
    with atomic_write(out, "wb") as f:
        np.save(f, vecs)
    size = image_size or enc.info["image_size"]
    click.echo(
        f"{out}: {vecs.shape[0]} x {vecs.shape[1]} float32 ({Path(model_path).name}, size {size}, "
        f"scales {','.join(f'{s:g}' for s in scales)})"
    )
