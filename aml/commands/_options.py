"""Click options shared by the commands, with defaults taken from the library (never typed twice).

Decorators: `model_options(role)`, `random_init_option`, `image_options` (--image-size, --multiscale),
`runtime_options` (--batch-size, --workers, --device, --backend, --threads), `extraction_options` (both),
`threads_option`, `whiten_option`, `images_options` (--images, --bbx), `cache_dtype_option` (the teacher cache's
storage, only), `out_option`, `json_option` (--json PATH, '-' for stdout), `search_device_option`, `quiet_option`,
`trust_pickle_option`, `settings_options` (extraction_options + --quiet as one ExtractSettings); and the helpers
that turn their values into library values (`read_images`, `extract_settings`, `write_json_out`, `collect`).
Torch-free: `aml embed` uses some of them, and the library constants are imported from torch-free modules only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from aml.data.images import read_image_list
from aml.errors import UserError
from aml.settings import (
    BACKENDS,
    BATCH_SIZE,
    CPU_BATCH,
    DEVICES,
    MAX_SCALE,
    MULTISCALE,
    ORT_MIN_IMAGES,
    ExtractSettings,
    check_device,
    check_scales,
)
from aml.whiten import FIRST

F = TypeVar("F", bound=Callable[..., Any])
MULTISCALE_TEXT = ",".join(f"{s:.4g}" for s in MULTISCALE)  # what `--multiscale` alone stands for


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Apply option decorators so that they show in the order given."""

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


# ------------------------------------------------------------------------------------------------ parsing
def parse_scales(text: str) -> tuple[float, ...]:
    """'1,0.7071,0.5' -> scales; a value within 1e-4 of 1/sqrt(2) means exactly 1/sqrt(2) (cirtorch's)."""
    try:
        scales = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"'{text}': expected comma-separated numbers, e.g. {MULTISCALE_TEXT}") from None
    if not _checked(check_scales, scales):
        raise click.BadParameter(
            f"'{text}': expected scales in (0, {MAX_SCALE:g}] (above 1 upsamples the image; memory grows with its "
            f"square), e.g. {MULTISCALE_TEXT}"
        )
    return tuple(2**-0.5 if math.isclose(s, 2**-0.5, abs_tol=1e-4) else s for s in scales)


def read_bbxs(path: Path, n: int) -> list[tuple[float, float, float, float] | None]:
    """One 'x1 y1 x2 y2' per listed image (an empty line: no box)."""
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


def read_images(images: str, bbx: str | None) -> tuple[list[str], list | None]:
    """(paths, boxes or None) from `--images LIST` and `--bbx FILE`."""
    paths = read_image_list(Path(images))
    return paths, read_bbxs(Path(bbx), len(paths)) if bbx else None


def extract_settings(
    image_size: int,
    scales: tuple[float, ...],
    batch_size: int,
    workers: int | None,
    device: str,
    quiet: bool,
    backend: str = "auto",
) -> ExtractSettings:
    """The `ExtractSettings` of `extraction_options` (progress shown unless --quiet: `aml.progress`)."""
    return ExtractSettings(image_size, scales, batch_size, workers, device, not quiet, backend)


def collect(name: str, build: Callable[..., Any], *keys: str) -> Callable[[F], F]:
    """Hand the command the values of the options `keys` as one value, `name` = build(**those values): a command
    takes settings, not a long list of loose options."""

    def wrap(f: F) -> F:
        @functools.wraps(f)
        def inner(*args: Any, **kw: Any) -> Any:
            kw[name] = build(**{k: kw.pop(k) for k in keys})
            return f(*args, **kw)

        return inner  # type: ignore[return-value]

    return wrap


def settings_options(*, default: int | None = None, required: bool = False) -> Callable[[F], F]:
    """`extraction_options` + `--quiet`, handed to the command as one `settings` value (`extract_settings`)."""
    keys = ("image_size", "scales", "batch_size", "workers", "device", "quiet", "backend")
    return _stack(
        extraction_options(default=default, required=required),
        quiet_option(),
        collect("settings", extract_settings, *keys),
    )


# ------------------------------------------------------------------------------------------------ options
_ROLES = {
    "model": ("--model", "model_name", "--weights", "Registry name (see `aml models`) or checkpoint file."),
    "teacher": ("--teacher", "teacher", "--teacher-weights", "Teacher: registry name or checkpoint (database side)."),
    "student": ("--student", "student", "--student-weights", "Student: registry name or checkpoint (query side)."),
    "independent": (
        "--new-independent",
        "new_independent",
        "--new-independent-weights",
        "An upgrade's independently trained new model (new*, as it is: its own head): registry name or checkpoint; "
        "adds new* / new*, new* -> old and G to the compatibility report.",
    ),
}


def model_options(
    role: str, *, required: bool = False, default_help: str = "", alias: str | None = None
) -> Callable[[F], F]:
    """`--ROLE NAME|CHECKPOINT` and `--ROLE-weights FILE` (role: model, teacher or student); `alias` is a second
    name of both (`--old`: `--old` and `--old-weights`)."""
    name, dest, weights, text = _ROLES[role]
    extra = f" ({default_help})" if default_help else ""
    names, weight_names = (name, alias) if alias else (name,), (weights, f"{alias}-weights") if alias else (weights,)
    return _stack(
        click.option(*names, dest, required=required, help=text[:-1] + extra + "."),
        click.option(
            *weight_names, weights.lstrip("-").replace("-", "_"), type=click.Path(dir_okay=False),
            help=f"Local weights file for {name}.",
        ),
    )  # fmt: skip


def random_init_option(help: str = "Seeded random weights where none are given (tests).") -> Callable[[F], F]:
    """`--random-init`."""
    return click.option("--random-init", is_flag=True, help=help)


def _scales(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    return parse_scales(value) if value else (1.0,)


def image_options(*, default: int | None = None, required: bool = False, size_help: str = "") -> Callable[[F], F]:
    """`--image-size` (longest side) and `--multiscale [SCALES]` (passed as the tuple `scales`)."""
    return _stack(
        click.option(
            "--image-size",
            type=click.IntRange(min=1),
            default=default,
            required=required,
            show_default=default is not None,
            help=size_help or "Longest side in pixels (queries: their crop scaled alike).",
        ),
        click.option(
            "--multiscale",
            "scales",
            is_flag=False,
            flag_value=MULTISCALE_TEXT,
            default=None,
            callback=_scales,
            help=f"Scales, comma-separated (alone: {MULTISCALE_TEXT}; default: 1).",
        ),
    )


def device_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback of `--device`: `aml.settings.check_device`, before any work."""
    if value is not None and not _checked(check_device, value):
        raise click.BadParameter(f"'{value}': unknown device; use {DEVICES}")
    return value


def _checked(check: Callable[[str], Any], value: str) -> bool:
    try:
        check(value)
    except UserError:
        return False
    return True


def _threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    from aml.threads import apply_threads

    apply_threads(value)


def threads_option(f: F) -> F:
    """`--threads N`: intra-op threads of torch, onnxruntime and faiss, applied as the options are read
    (`aml.threads.apply_threads`; unset: $AML_THREADS, $OMP_NUM_THREADS, else the cores this process may use)."""
    from aml.threads import HELP

    return click.option("--threads", type=click.IntRange(min=1), expose_value=False, callback=_threads, help=HELP)(f)


def runtime_options(f: F) -> F:
    """`--batch-size` (images per forward), `--workers`, `--device`, `--backend` (what runs the network),
    `--threads`."""
    return _stack(
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=BATCH_SIZE,
            show_default=True,
            help=f"Images per forward; at most {CPU_BATCH} on the CPU (faster there).",
        ),
        click.option("--workers", type=int, help="Decoding processes (default, or -1: automatic)."),
        click.option(
            "--device", default="auto", show_default=True, callback=device_callback, help="auto | cpu | cuda[:N]."
        ),
        click.option(
            "--backend",
            type=click.Choice(BACKENDS),
            default="auto",
            show_default=True,
            help="What runs the network: onnxruntime runs a cached fp32 ONNX export on the CPU (same vectors "
            f"within 1e-5); auto: onnxruntime on the CPU for {ORT_MIN_IMAGES}+ images, else torch.",
        ),
        threads_option,
    )(f)


def extraction_options(*, default: int | None = None, required: bool = False) -> Callable[[F], F]:
    """`image_options` + `runtime_options`: what `extract_settings` needs (with --quiet)."""
    return _stack(image_options(default=default, required=required), runtime_options)


def whiten_option(side: str) -> Callable[[F], F]:
    """`--whiten [KEY|FILE]`: apply learned whitening Lw. Alone: the `side` model's own meta['Lw'], its first
    dataset; KEY: that dataset of meta['Lw']; FILE: a whitening file written by `aml.whiten.Lw.save`."""
    return click.option(
        "--whiten",
        is_flag=False,
        flag_value=FIRST,
        default=None,
        metavar="[KEY|FILE]",
        help=f"Apply learned whitening Lw{side}: alone, the model's own meta['Lw'] (first dataset); KEY: that "
        "meta['Lw'] dataset; FILE: a whitening file ({'Lw': {KEY: {'ss', 'ms'}}}).",
    )


def images_options(f: F) -> F:
    """`--images LIST` (one path per line) and `--bbx FILE` (a box per listed image)."""
    return _stack(
        click.option(
            "--images",
            required=True,
            type=click.Path(dir_okay=False),
            help="Text file, one image path per line (relative to the file's folder; '#' starts a comment).",
        ),
        click.option("--bbx", type=click.Path(dir_okay=False), help="Box 'x1 y1 x2 y2' per image line (empty: none)."),
    )(f)


def cache_dtype_option(help: str) -> Callable[[F], F]:
    """`--cache-dtype float16|float32` (no default here: the library's DEFAULT_DTYPE applies)."""
    from aml.cache import DTYPES

    return click.option("--cache-dtype", type=click.Choice(DTYPES), help=help)


def out_option(help: str, *, required: bool = False, file: bool = True) -> Callable[[F], F]:
    """`--out PATH`."""
    return click.option("--out", required=required, type=click.Path(dir_okay=not file, file_okay=file), help=help)


def json_option(what: str) -> Callable[[F], F]:
    """`--json PATH`, one meaning on every command: also write `what` as JSON to PATH ('-': standard output);
    `write_json_out` writes it."""
    return click.option(
        "--json",
        "json_out",
        type=click.Path(dir_okay=False, allow_dash=True),
        help=f"Write {what} as JSON (-: stdout).",
    )


def write_json_out(path: str, obj: Any) -> None:
    """The `--json PATH` writer: indented, sorted JSON to standard output for '-', else atomically to the file."""
    from aml.io import json_text, write_json

    if path == "-":
        click.echo(json_text(obj, indent=2))
        return
    write_json(path, obj)


def search_device_option(help: str) -> Callable[[F], F]:
    """`--search-device`: where the search runs (`aml.settings.parse_device`; cuda:all where the command takes
    every GPU), checked before any work; `help` says what it accepts."""

    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        from aml.settings import parse_device

        try:
            parse_device(value, "--search-device", many="cuda:all" in help)
        except UserError as e:
            raise click.BadParameter(str(e).partition(": ")[2]) from None
        return value

    return click.option("--search-device", default="auto", show_default=True, callback=check, help=help)


def _trust(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        from aml.trust import set_trust_pickle

        set_trust_pickle(True)


def trust_pickle_option(f: F) -> F:
    """`--trust-pickle`: load weights, checkpoints and pickles with full unpickling (`aml.trust.set_trust_pickle`);
    eager, so it applies before any other option's callback reads a file."""
    return click.option(
        "--trust-pickle",
        is_flag=True,
        is_eager=True,
        expose_value=False,
        callback=_trust,
        help="Trust the given weights/checkpoint/pickle files: load them fully (that runs any code they hold).",
    )(f)


def quiet_option(help: str = "No progress output (errors and the result are still printed).") -> Callable[[F], F]:
    """`--quiet`."""
    return click.option("--quiet", is_flag=True, help=help)


# ------------------------------------------------------------------------------------------------ image sizes
def size_options(*, both: bool = True) -> Callable[[F], F]:
    """`--query-image-size` and `--db-image-size` (the asymmetric deployment: each side at its own size); with
    `both`, `--image-size` sets the two at once. Unset: `image_sizes` picks them from the artefacts."""
    opts = [
        click.option(
            "--query-image-size",
            type=click.IntRange(min=1),
            help="Longest side of the query images (default: the size the student records).",
        ),
        click.option(
            "--db-image-size",
            type=click.IntRange(min=1),
            help="Longest side of the database images (default: the index's, else the queries' size).",
        ),
    ]
    if both:
        opts.insert(
            0,
            click.option(
                "--image-size",
                type=click.IntRange(min=1),
                help="Longest side of queries and database alike (default: the size the student records).",
            ),
        )
    return _stack(*opts)


def image_sizes(
    student: str,
    *,
    query: int | None = None,
    database: int | None = None,
    both: int | None = None,
    index_size: int | None = None,
    fallback: int,
    fallback_from: str = "the default",
    query_option: str = "--query-image-size",
) -> tuple[int, int, str]:
    """(query size, database size, the line saying where each came from). Queries: --query-image-size, else
    --image-size (`both`), else the size `student` records (`aml.identity.recorded_image_size`), else `fallback`
    (`fallback_from` says what it is; `query_option`: the option that gave `query`);
    the database: --db-image-size, else --image-size, else the index's (`index_size`), else the queries'."""
    from aml.identity import recorded_image_size

    if query:
        q, q_from = query, query_option
    elif both:
        q, q_from = both, "--image-size"
    else:
        recorded, where = recorded_image_size(student)
        q, q_from = (recorded, f"from {where}") if recorded else (fallback, fallback_from)
    if database:
        d, d_from = database, "--db-image-size"
    elif both:
        d, d_from = both, "--image-size"
    elif index_size:
        d, d_from = int(index_size), "from the index"
    else:
        d, d_from = q, "as the queries"
    return q, d, f"queries at {q} px ({q_from}), database at {d} px ({d_from})"
