"""`aml whiten`: learn cirtorch's whitening (Lw) on the teacher's vectors of a training set's matching pairs.

Writes a whitening file in the layout of cirtorch's `meta['Lw']` (`{'Lw': {KEY: {'ss': {m, P}, 'ms': ...}}}`) that
`aml evaluate --whiten FILE` and `aml export --whiten FILE` apply to both sides (the teacher's Lw: the
asymmetric protocol). The teacher's vectors come from the feature cache that training and evaluation share.
"""

from __future__ import annotations

import click

from aml.commands._options import (
    cache_dtype_option,
    extract_settings,
    extraction_options,
    model_options,
    out_option,
    quiet_option,
    random_init_option,
    trust_pickle_option,
)


@click.command("whiten")
@model_options("teacher", required=True)
@random_init_option()
@click.option("--data", "data_spec", required=True, help="Training data with matching pairs (a --data spec).")
@extraction_options(required=True)
@click.option(
    "--method",
    type=click.Choice(["lw", "pca"]),
    default="lw",
    show_default=True,
    help="lw: cirtorch whitenlearn on the (query, positive) pairs; pca: pcawhitenlearn on all images (no labels).",
)
@click.option("--key", help="Dataset key of the Lw in the file (default: the training set's name).")
@cache_dtype_option("Teacher feature cache storage (shared with training and evaluation).")
@out_option("Whitening file to write (e.g. LW.pt).", required=True)
@trust_pickle_option
@quiet_option()
def command(
    teacher: str,
    teacher_weights: str | None,
    random_init: bool,
    data_spec: str,
    image_size: int,
    scales: tuple[float, ...],
    batch_size: int,
    workers: int,
    device: str,
    backend: str,
    method: str,
    key: str | None,
    cache_dtype: str | None,
    out: str,
    quiet: bool,
) -> None:
    """Learn the teacher's whitening on a training set and write it as a whitening file."""
    from aml.cache import DEFAULT_DTYPE
    from aml.data.spec import parse_data_spec
    from aml.io import aml_home, check_writable_file
    from aml.teacher_vectors import TeacherVectors
    from aml.whiten import learn_teacher_lw

    check_writable_file(out, "--out")  # before the teacher's vectors are extracted
    train = parse_data_spec(data_spec).train
    variants = {"ss": (1.0,)}
    if scales != (1.0,):
        variants["ms"] = scales
    lws = []
    for variant, s in variants.items():
        settings = extract_settings(image_size, s, batch_size, workers, device, quiet, backend)
        vectors = TeacherVectors(
            teacher,
            settings,
            cache_dir=aml_home() / "cache",
            weights=teacher_weights,
            random_init=random_init,
            dtype=cache_dtype or DEFAULT_DTYPE,
        ).get(train.paths)
        lws.append(learn_teacher_lw(vectors, train, method, key=key or train.name, variant=variant))
    lws[0].save(out, *lws[1:])
    pairs = f"{len(train.qidxs)} pairs of " if method == "lw" else ""
    click.echo(
        f"{out}: Lw '{lws[0].key}' ({', '.join(lw.variant for lw in lws)}), {method} on {pairs}{len(train.paths)} "
        f"{teacher} vectors ({lws[0].in_dim}-d), size {image_size}"
    )
