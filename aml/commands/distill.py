"""`aml distill`: train a student into the teacher's embedding space.

Every `TrainConfig` field is an option (`--field-name`), derived from `dataclasses.fields(TrainConfig)`;
the defaults come from the preset (`--preset`, default `aml` with --data, else `demo`) and the help shows
them from `TrainConfig()` and `PRESETS`, never typed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from aml.commands._options import device_callback, quiet_option, threads_option, trust_pickle_option
from aml.io import atomic_write
from aml.train.config import MINIMUMS, PRESETS, TrainConfig
from aml.train.recipe import CHOICES, check

# What each field's option says; the type comes from the field, the defaults from TrainConfig() and PRESETS.
# A field missing here is an error at import (a test imports this module), so a new field gets an option.
_HELP: dict[str, str] = {
    "teacher": "Teacher: registry name or checkpoint",
    "teacher_weights": "Local weights file for the teacher",
    "student": "Student: registry name",
    "student_weights": "Local ImageNet weights for the student",
    "random_init": "Random weights for teacher and student (tests)",
    "student_random_init": "ImageNet-free student: random weights, BatchNorm statistics set from training images",
    "bn_images": "Training images that set a random-weight student's BatchNorm statistics",
    "head_init": "The student's start: its head fitted to the teacher in closed form (random: the AML paper's; "
    "auto: local-procrustes, random for the no-teacher sym)",
    "init_images": "Training images the closed-form start is fitted on (0: all)",
    "init_flip": "Also fit the start on mirrored images",
    "loss": "The loss",
    "loss_args": "Loss constant NAME=VALUE (repeatable)",
    "mixup": "Metrix mixup of the pair-based losses: mix inputs (pixels), the student's feature maps, or "
    "embeddings (in the asymmetric case the teacher's cached vectors); none: off",
    "mixup_pairs": "Which pairs Metrix mixes: positive-negative, anchor-negative, or both",
    "mixup_weight": "Weight of the mixed loss (total = clean + weight x mixed)",
    "mixup_alpha": "Metrix's lambda ~ Beta(alpha, alpha)",
    "augment": "The view of a training image the student embeds (its teacher target: --view-targets): "
    "none; flip: mirrored half the time; crop: a random crop of --crop-area to all of its area, resized back, "
    "then flip; mix: a crop view blended with the next image's (mixup, lam ~ U(0, 1); needs --view-targets view)",
    "crop_area": "The smallest fraction of an image's area a crop view keeps (at most 1)",
    "view_targets": "The teacher target of a view: whole: the teacher's cached vector of the whole image; view: the "
    "teacher's vector of the same view (one teacher forward per view, the consistent teaching of Beyer et al.)",
    "data": "Training source, repeatable (sources are laid end to end; labelled terms train on the labelled ones, "
    "label-free terms on every image): synth[:DIR] | sfm120k:DIR | folder:DIR | groups:CSV (60/40 object split "
    "unless --test-data) | images:DIR (unlabelled); omit for the embedded demo",
    "sampling": "How an epoch draws from several sources (a batch loss its images, a tuple loss its pairs, a "
    "classification loss its classes): images: every one alike (a source's share is its size); sources: every "
    "source an equal share (a few hundred photos of your own domain beside SfM-120k)",
    "test_data": "The run's own test set: folder:DIR | groups:CSV (its test rows) | revisitop:DATA_ROOT/NAME; the "
    "sources then hold nothing out (class-level data: test labels may be training labels)",
    "mining": "Negative mining (auto: symmetric for sym, else asymmetric)",
    "epochs": "Training epochs",
    "optimizer": "Optimizer",
    "lr": "Learning rate of the backbone",
    "gem_lr_mult": "lr multiplier of GeM's p (no weight decay)",
    "head_lr_mult": "lr multiplier of the student's 1x1 projection",
    "glam": "Global-local attention (GLAM) on the student's maps: none, all, or a comma list of local-channel, "
    "local-spatial, global-channel, global-spatial",
    "glam_lr_mult": "lr multiplier of GLAM",
    "weight_decay": "Weight decay",
    "lr_decay": "lr factor per epoch (exponential decay)",
    "margin": "Margin of contr/contr+/sym/triplet (unset: the loss's own default)",
    "neg_num": "Negatives per tuple",
    "query_size": "Training tuples (queries) per epoch",
    "pool_size": "Negative pool per epoch",
    "batch_size": "Tuples (or images, for batch losses) per forward",
    "update_every": "Forwards per optimizer step",
    "proxies": "Class proxies of normsoftmax: the teacher's class means, frozen (asymmetric); proxies fitted by "
    "normsoftmax to the teacher's cached vectors, frozen (asymmetric); or learned (symmetric: the student never "
    "sees the teacher)",
    "per_class": "Images per class in normsoftmax's class-balanced batches (batch-size // per-class classes)",
    "warmup_epochs": "Epochs training only the new parameters: head and learned proxies, backbone and GeM p "
    "frozen (-1: 1 for normsoftmax, else 0)",
    "head_norm": "LayerNorm (no affine) before the embedding's last L2N, so that it binarises at zero "
    "(auto: layernorm for normsoftmax with learned proxies)",
    "image_size": "Longest side of training images",
    "test_image_size": "Longest side for the per-epoch test (0: the image size)",
    "cache_dtype": "Teacher feature cache storage (shared with `aml evaluate`)",
    "eval_every": "Epochs between test-set evaluations (0: never)",
    "seed": "Seed of everything random",
    "device": "auto | cpu | cuda[:N]",
    "amp": "Mixed precision (CUDA only)",
    "workers": "Image-loading workers (-1: automatic)",
    "out": "Run directory (unset: runs/<date>-T-S-LOSS)",
}
_TYPES = {"int": int, "float": float, "str": str}


def _show(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _defaults_help(name: str) -> str:
    """'. Default X; demo Y' from TrainConfig() and the demo preset (unset and empty values are not shown)."""
    default, demo = getattr(TrainConfig(), name), PRESETS["demo"].get(name)
    shown = default is not None and not isinstance(default, bool | dict)
    parts = [f"Default {_show(default)}"] if shown else []
    if demo is not None and demo != default:
        parts.append(f"demo {_show(demo)}" if parts else f"Demo {_show(demo)}")
    return ". " + "; ".join(parts) if parts else ""


def _field_option(field: dataclasses.Field) -> Callable:
    """The click option of one TrainConfig field (`--field-name`); its value None means: keep the preset's."""
    name, flag = field.name, "--" + field.name.replace("_", "-")
    text = _HELP[name] + _defaults_help(name) + "."
    base = field.type.replace(" | None", "")
    if name == "loss_args":
        return click.option("--loss-arg", "loss_args", multiple=True, help=text)
    if base == "bool":
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=text)
    if name in CHOICES:
        return click.option(flag, name, type=click.Choice(CHOICES[name]), help=text)
    if name == "device":
        return click.option(flag, name, callback=device_callback, help=text)
    if name == "data":
        return click.option(flag, name, multiple=True, help=text)
    if name == "out":
        return click.option(flag, name, type=click.Path(file_okay=False), help=text)
    if name.endswith("_weights"):
        return click.option(flag, name, type=click.Path(dir_okay=False), help=text)
    if name in MINIMUMS:
        low, open_ = MINIMUMS[name]
        kind = click.IntRange(min=int(low)) if base == "int" else click.FloatRange(min=low, min_open=open_)
        return click.option(flag, name, type=kind, help=text)
    return click.option(flag, name, type=_TYPES[base], help=text)


def _config_options(f: Callable) -> Callable:
    for field in reversed(dataclasses.fields(TrainConfig)):
        f = _field_option(field)(f)
    return f


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


def config_from_options(preset: str, opts: dict[str, Any]) -> TrainConfig:
    """The preset's TrainConfig with every given option (not None) replacing its field."""
    given = {f.name: opts[f.name] for f in dataclasses.fields(TrainConfig) if opts.get(f.name) not in (None, ())}
    given["loss_args"] = _loss_args(given.get("loss_args", ()))
    if not given["loss_args"]:
        given.pop("loss_args")
        if "loss" in given:  # another loss than the preset's: the preset's constants are for its own loss
            given["loss_args"] = {}
    return TrainConfig().replace(**PRESETS[preset]).replace(**given)


def given_fields(ctx: click.Context) -> frozenset[str]:
    """The TrainConfig fields the user set on the command line (or through click's environment variables)."""
    user = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if ctx.get_parameter_source(f.name) in user)


@click.command("distill")
@_config_options
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last checkpoint (its configuration; given options must match).",
)
@click.option("--overwrite", is_flag=True, help="Delete the checkpoints and log of a run already in --out first.")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    help="Defaults to start from: aml (the paper's recipe; default with --data), demo, or real (lite2 -> lite0 on "
    "real photos: the closed-form start, then two epochs of csd; give it your sources with --data).",
)
@click.option(
    "--baseline/--no-baseline",
    default=None,
    help="Also train the no-teacher (sym) student and compare (default: on for the demo).",
)
@threads_option
@quiet_option()
@trust_pickle_option
def command(resume: bool, overwrite: bool, preset: str | None, baseline: bool | None, quiet: bool, **opts: Any) -> None:
    """Train a student whose query vectors search the teacher's database (AML).

    With no --data, runs the embedded default: synthetic landmarks generated once into $AML_HOME,
    the demo preset's teacher, student and recipe (closed-form start, then csd), plus the no-teacher baseline,
    and prints the table.
    """
    from aml.evaluate import format_table
    from aml.train.demo import run_with_baseline
    from aml.train.loop import distill

    preset = preset or ("aml" if opts["data"] else "demo")
    cfg = config_from_options(preset, opts)
    # before any work; a resumed run's loss is its checkpoint's, so what the loss makes of it is checked once merged
    cfg = cfg.validate(CHOICES) if resume else check(cfg)
    given = given_fields(click.get_current_context())
    if baseline is None:
        baseline = preset == "demo" and not resume
    if baseline:
        result = run_with_baseline(cfg, progress=not quiet, overwrite=overwrite)
        click.echo(f"\nrun: {result['run_dir']}\nbaseline: {result['baseline_dir']}")
        if result["rows"]:
            table = format_table(result["rows"], title=f"test set {result['dataset'][1]}", layout="rows")
            click.echo(table)
            with atomic_write(Path(result["run_dir"]) / "table.txt") as f:  # what the README quotes
                f.write(table + "\n")
        return
    run_dir = distill(cfg, resume=resume, progress=not quiet, overwrite=overwrite, given=given)
    click.echo(f"run: {run_dir}")
    if resume:  # the run's own configuration (its data, teacher, sizes), not the preset's defaults it replaced
        cfg = TrainConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    next_step = evaluate_command(cfg, Path(run_dir))
    if next_step:
        click.echo(f"evaluate on its test set: {next_step}")


def evaluate_command(cfg: TrainConfig, run_dir: Path) -> str | None:
    """The `aml evaluate models` command that scores a finished run on its test set (None: it has none)."""
    from aml.data.sources import parse_data_specs

    test = parse_data_specs(cfg.data, cfg.test_data, check_images=False).test
    if test is None:
        return None
    weights = f" --teacher-weights {cfg.teacher_weights}" if cfg.teacher_weights else ""
    return (
        f"aml evaluate models --teacher {cfg.teacher}{weights} --student {run_dir / 'last.pt'} "
        f"--dataset {test.dataset_name} --data-root {test.data_root} --image-size {cfg.eval_size()}"
    )
