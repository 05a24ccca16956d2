"""`aml distill`: train a student into the teacher's embedding space."""

from __future__ import annotations

import click

from aml.train.config import PRESETS, TrainConfig

# CLI option -> config field, for options that map one to one (defaults come from the preset).
_FIELDS = [
    "teacher",
    "teacher_weights",
    "student",
    "student_weights",
    "student_random_init",
    "loss",
    "data",
    "mining",
    "epochs",
    "optimizer",
    "lr",
    "head_lr_mult",
    "weight_decay",
    "margin",
    "neg_num",
    "query_size",
    "pool_size",
    "batch_size",
    "update_every",
    "image_size",
    "test_image_size",
    "cache_dtype",
    "eval_every",
    "seed",
    "device",
    "amp",
    "workers",
    "out",
]


def _loss_args(values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for v in values:
        k, sep, x = v.partition("=")
        try:
            out[k.strip()] = float(x)
        except ValueError:
            raise click.BadParameter(f"'{v}': expected NAME=NUMBER, e.g. --loss-arg alpha=2") from None
        if not sep:
            raise click.BadParameter(f"'{v}': expected NAME=NUMBER")
    return out


@click.command("distill")
@click.option("--teacher", help="Teacher: registry name or checkpoint (default rn101; demo: lite2).")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), help="Local weights file for the teacher.")
@click.option("--student", help="Student: registry name (default effnet-b3; demo: lite0).")
@click.option("--student-weights", type=click.Path(dir_okay=False), help="Local ImageNet weights for the student.")
@click.option("--random-init", is_flag=True, help="Random weights for teacher and student (tests).")
@click.option(
    "--student-random-init",
    is_flag=True,
    default=None,
    help="ImageNet-free student: random weights, BatchNorm statistics set from training images.",
)
@click.option("--loss", help="contr, contr+, reg, triplet, ms, rkd, darkrank, sym, csd, ... (default contr+).")
@click.option("--loss-arg", "loss_args", multiple=True, help="Loss constant NAME=VALUE (repeatable).")
@click.option(
    "--data",
    help="synth[:DIR] | sfm120k:DIR | folder:DIR | groups:CSV (60/40 object split) | "
    "images:DIR (label-free losses only). Omit for the embedded demo.",
)
@click.option("--mining", type=click.Choice(["auto", "asymmetric", "symmetric", "random"]))
@click.option("--epochs", type=int)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]))
@click.option("--lr", type=float)
@click.option("--head-lr-mult", type=float, help="lr multiplier of the student's 1x1 projection (demo: 50).")
@click.option("--weight-decay", type=float)
@click.option("--margin", type=float, help="Margin of contr/contr+/sym/triplet (default: the loss's own, 0.7 / 0.1).")
@click.option("--neg-num", type=int)
@click.option("--query-size", type=int)
@click.option("--pool-size", type=int)
@click.option("--batch-size", type=int, help="Tuples (or images, for batch losses) per forward.")
@click.option("--update-every", type=int, help="Forwards per optimizer step.")
@click.option("--image-size", type=int, help="Longest side of training images (default 362).")
@click.option("--test-image-size", type=int, help="Longest side for the per-epoch test (default: image size).")
@click.option("--cache-dtype", type=click.Choice(["float16", "float32"]))
@click.option("--eval-every", type=int, help="Epochs between test-set evaluations (0: never).")
@click.option("--seed", type=int)
@click.option("--device", help="auto | cpu | cuda[:N].")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), help="Mixed precision (CUDA).")
@click.option("--workers", type=int, help="Image-loading workers (-1: automatic).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default runs/<date>-T-S-LOSS).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    help="Defaults to start from: aml (the paper's recipe; default with --data) or demo.",
)
@click.option(
    "--baseline/--no-baseline",
    default=None,
    help="Also train the no-teacher (sym) student and compare (default: on for the demo).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def command(
    random_init: bool,
    loss_args: tuple[str, ...],
    resume: bool,
    preset: str | None,
    baseline: bool | None,
    quiet: bool,
    **opts,
) -> None:
    """Train a student whose query vectors search the teacher's database (AML).

    With no --data, runs the embedded default: synthetic landmarks generated once into $AML_HOME,
    teacher lite2, student lite0, loss contr+, plus the no-teacher baseline, and prints the table.
    """
    from aml.train.demo import run_with_baseline
    from aml.train.loop import distill
    from aml.train.report import format_rows

    preset = preset or ("aml" if opts["data"] else "demo")
    cfg = TrainConfig().replace(**PRESETS[preset])
    given = {k: v for k, v in opts.items() if k in _FIELDS and v is not None}
    cfg = cfg.replace(**given, random_init=random_init, loss_args=_loss_args(loss_args))
    if baseline is None:
        baseline = preset == "demo" and not resume
    if baseline:
        result = run_with_baseline(cfg, progress=not quiet)
        click.echo(f"\nrun: {result['run_dir']}\nbaseline: {result['baseline_dir']}")
        if result["rows"]:
            click.echo(format_rows(result["rows"], title=f"test set {result['dataset'][1]}"))
        return
    run_dir = distill(cfg, resume=resume, progress=not quiet)
    click.echo(f"run: {run_dir}")
