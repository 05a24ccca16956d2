"""`aml export`: a student checkpoint -> a verified query encoder (ONNX, TorchScript, ExecuTorch, Core ML, ORT) and its
JSON sidecar."""

from __future__ import annotations

from typing import Any

import click

from aml.commands._options import (
    image_sizes,
    out_option,
    quiet_option,
    threads_option,
    trust_pickle_option,
    whiten_option,
)
from aml.errors import UserError
from aml.sidecar import CALIB_COUNT, FORMATS, LATENCY_RUNS, MAP_TOLERANCE, MAX_INT8_RATIO, PRECISIONS


@click.command("export")
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="Student checkpoint written by `aml distill` (or any aml student checkpoint).",
)
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="onnx", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help="fp16: float16 body, float32 I/O; int8: static quantisation (onnx, ort, executorch). Default: fp32 "
    "(coreml: fp16).",
)
@whiten_option(" of the teacher, single-scale, folded into the graph (and on the retrieval check's database)")
@out_option("Output file (default: beside the checkpoint, e.g. last-fp32.onnx); sidecar is OUT.json.")
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    help="Longest image side the encoder expects (default: the checkpoint's test/training size).",
)
@click.option(
    "--db-image-size",
    type=click.IntRange(min=16),
    help="fp16 / int8: longest side of the retrieval check's teacher database (default: the encoder's size; "
    "another size is the asymmetric deployment's, e.g. the size of your index).",
)
@click.option(
    "--verify-data",
    type=click.Path(file_okay=False),
    help="Held-out revisitop-layout dataset DIR/NAME for the fp16/int8 retrieval check "
    "(default: the training data's test split).",
)
@click.option(
    "--calib-images",
    type=click.Path(dir_okay=False),
    help="int8 calibration image list, one path per line (default: the training images).",
)
@click.option(
    "--binary",
    is_flag=True,
    help="Mark the encoder's output as binary codes: only the sidecar changes (output.binary; default name gets "
    "-b); the graph still outputs float vectors, and `aml embed` with this model writes packed sign bits "
    "(bit = value > 2^-25, uint8 (N, D/8)) instead of float32 rows.",
)
@click.option(
    "--calib-count",
    type=click.IntRange(min=1),
    default=CALIB_COUNT,
    show_default=True,
    help="Calibration images drawn (seeded) from the list.",
)
@click.option(
    "--map-tolerance",
    type=click.FloatRange(min=0),
    default=MAP_TOLERANCE,
    show_default=True,
    metavar="POINTS",
    help="fp16/int8: the largest asymmetric mAP loss (points, any of E/M/H) the retrieval check accepts against "
    "the fp32 student; recorded in the sidecar. On n test queries one query moves mAP by up to 100/n points.",
)
@click.option(
    "--static-shape",
    is_flag=True,
    help="Fix the input's height and width to the image size (batch stays dynamic; default name gets -s): images "
    "are padded to it at the bottom / right, as the sidecar's preprocessing says. Not for torchscript.",
)
@threads_option
@click.option(
    "--latency-runs",
    type=click.IntRange(min=0),
    default=LATENCY_RUNS,
    show_default=True,
    help="int8: paired batch-1 fp32 / int8 runs timed at the image size (1 thread); int8 slower than "
    f"{MAX_INT8_RATIO:g}x fp32 is reported with a recommendation of fp32. 0 skips the timing.",
)
@quiet_option("Print only the result line.")
@trust_pickle_option
def command(
    checkpoint: str,
    fmt: str,
    precision: str | None,
    whiten: str | None,
    out: str | None,
    image_size: int | None,
    db_image_size: int | None,
    verify_data: str | None,
    calib_images: str | None,
    calib_count: int,
    latency_runs: int,
    binary: bool,
    map_tolerance: float,
    static_shape: bool,
    quiet: bool,
) -> None:
    """Export CHECKPOINT's student as a query encoder; verification must pass or nothing is written."""
    precision = precision or ("fp16" if fmt == "coreml" else "fp32")  # Core ML: fp16 by default (docs/MOBILE.md)
    from aml.data.images import read_image_list
    from aml.export.pipeline import ExportSettings, export_checkpoint

    if calib_images and precision != "int8":
        raise UserError(f"--calib-images is for --precision int8 (got {precision}); drop it")
    if out:
        from aml.io import check_writable_file

        check_writable_file(out, "--out")
    from aml.settings import IMAGE_SIZE

    image_size, db_size, sizes = image_sizes(
        checkpoint, query=image_size, database=db_image_size, fallback=IMAGE_SIZE, query_option="--image-size"
    )
    settings = ExportSettings(
        fmt=fmt,
        precision=precision,
        whiten=whiten,
        image_size=image_size,
        db_image_size=db_size,
        binary=binary,
        verify_data=verify_data,
        calib_images=read_image_list(calib_images, "calibration list") if calib_images else None,
        calib_count=calib_count,
        latency_runs=latency_runs,
        map_tolerance=map_tolerance,
        static_shape=static_shape,
    )
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    checked = " (the retrieval check's)" if precision != "fp32" else " (no retrieval check at fp32)"
    log(sizes.replace("database at", f"database{checked} at"))
    info = export_checkpoint(checkpoint, settings, out=out, log=log)
    if not quiet:
        _print_checks(info)
    _print_result(info, checkpoint, out)


def _print_checks(info: dict[str, Any]) -> None:
    """The verification numbers and the int8 kernel count, one line each."""
    from aml.export.verify import summary_lines

    for line in summary_lines(info["verification"]):
        click.echo(line)
    int8 = info.get("int8")
    if int8:
        k = int8["kernels"]
        click.echo(f"  int8 kernels: {k['int8_conv']} of {int8['convolutions']} convolutions; {int8['message']}")


def _print_result(info: dict[str, Any], checkpoint: str, out: str | None) -> None:
    """The result line: the file written, what it is, and fp32 advice when int8 does not pay."""
    from pathlib import Path

    from aml.sidecar import sidecar_path

    path = Path(checkpoint).with_name(info["file"]) if out is None else Path(out)
    binary = ", binary output" if (info["output"] or {}).get("binary") else ""
    int8 = info.get("int8")
    advice = f"; {int8['message']}" if int8 and int8["recommend"] == "fp32" else ""
    click.echo(
        f"{path}: {info['format']} {info['precision']}, {info['dim']}-d{binary}, image size "
        f"{info['image_size']}, verified; sidecar {sidecar_path(path)}{advice}"
    )
