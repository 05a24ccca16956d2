"""What a `TrainConfig` means once the loss is known: its full option choices, its checks, and the values its
`auto` / None fields stand for. The one place that reads the loss table for the recipe (aml.train.config is a leaf
of constants below it)."""

from __future__ import annotations

from typing import Any

from aml.cache import DTYPES
from aml.data.trainset import TrainSet
from aml.errors import UserError
from aml.glam import parse_parts
from aml.losses import LABEL_FREE, LOSSES, PAIR_BASED, LossSpec
from aml.train import config
from aml.train.config import TrainConfig
from aml.train.head_init import HEAD_INITS

# Every field with a fixed set of values: config's own, and those whose owners name them.
CHOICES: dict[str, tuple[str, ...]] = {
    **config.CHOICES,
    "head_init": ("auto", *HEAD_INITS),
    "loss": tuple(LOSSES),
    "cache_dtype": DTYPES,
}


def _spec(cfg: TrainConfig) -> LossSpec | None:
    return LOSSES.get(cfg.loss)


def loss_function(cfg: TrainConfig) -> tuple[LossSpec, dict[str, Any]]:
    """The configured loss's spec and its keyword constants (`--margin`, `--loss-arg`), checked against the spec."""
    if cfg.loss not in LOSSES:
        raise UserError(f"--loss {cfg.loss}: unknown; choose one of {', '.join(sorted(LOSSES))}")
    spec = LOSSES[cfg.loss]
    constants = spec.constants(cfg.loss_args)
    if cfg.margin is not None and "margin" not in constants:
        constants.update(spec.constants({"margin": cfg.margin}, where=f"--margin {cfg.margin}"))
    w = constants.get("label_weight", 0.0)
    if not 0.0 <= w <= 1.0:
        raise UserError(f"--loss-arg label_weight={w:g}: must be in [0, 1] (0: CSD itself, 1: the label target alone)")
    return spec, constants


def check(cfg: TrainConfig) -> TrainConfig:
    """`cfg`, or a one-line UserError naming its first out-of-range or unknown value, or a loss constant
    (`loss_function`), GLAM part, mixup or class batch the loss refuses (before any work)."""
    cfg.validate(CHOICES)
    spec, _ = loss_function(cfg)
    parse_parts(cfg.glam)
    if cfg.crop_area > 1:
        raise UserError(f"--crop-area {cfg.crop_area:g}: a fraction of the image's area, at most 1")
    if cfg.view_targets == "view" and cfg.augment == "none":
        raise UserError("--view-targets view: the views are the whole images (--augment none), whose targets the "
                        "cache already holds; give --augment flip or crop, or --view-targets whole")  # fmt: skip
    if cfg.augment == "mix" and cfg.view_targets != "view":
        raise UserError("--augment mix: a blend of two photos has no cached target (the cache holds whole photos); "
                        "give --view-targets view (the teacher's vector of each blend), or --augment crop")  # fmt: skip
    if cfg.augment == "mix" and spec.kind != "batch":
        raise UserError(f"--augment mix: loss '{cfg.loss}' trains on {spec.kind}s, whose images a blend of two "
                        "would confuse; give a batch loss (csd, reg, rkd, darkrank), or --augment crop")  # fmt: skip
    if cfg.mixup != "none" and spec.pairs is None:
        raise UserError(
            f"--mixup {cfg.mixup}: loss '{cfg.loss}' is not pair-based; use --loss "
            f"{' | '.join(PAIR_BASED)}, or --mixup none"
        )
    if "own_proxies" in spec.inputs and cfg.proxies == "learned":
        raise UserError(
            f"--proxies learned: loss '{cfg.loss}' classifies by the teacher's proxies beside its own; use --proxies "
            "teacher-trained or teacher-mean"
        )
    if spec.kind == "class" and cfg.batch_size < cfg.per_class:
        raise UserError(
            f"--batch-size {cfg.batch_size}: a class-balanced batch holds batch_size // per_class classes of "
            f"--per-class {cfg.per_class} images; use a batch size of at least {cfg.per_class}"
        )
    return cfg


def check_data(cfg: TrainConfig, train: TrainSet) -> None:
    """Before the teacher's vectors: a loss that needs labels refuses a training set without (query, positive)
    pairs."""
    if LOSSES[cfg.loss].needs_labels and len(train.qidxs) == 0:
        raise UserError(
            f"--data {' --data '.join(cfg.data)}: no (query, positive) pairs; loss '{cfg.loss}' needs labels, "
            f"use a label-free loss ({', '.join(LABEL_FREE)})"
        )


def learns_alone(cfg: TrainConfig) -> bool:
    """The student never sees the teacher: a loss on student references (the no-teacher baseline `sym`), or a
    classification loss with learned proxies."""
    spec = _spec(cfg)
    return spec is not None and (spec.student_refs or (spec.kind == "class" and cfg.proxies == "learned"))


def teacher_views(cfg: TrainConfig) -> bool:
    """Whether the teacher embeds each step's views (`--view-targets view`): not when the student never sees the
    teacher (`learns_alone`: the no-teacher baseline on a preset with view targets trains on the views alone)."""
    return cfg.view_targets == "view" and not learns_alone(cfg)


def warmup_epochs(cfg: TrainConfig) -> int:
    """The warm-up epochs (None stands for 1 with a classification loss, NormSoftmax's recipe, else 0)."""
    if cfg.warmup_epochs is not None:
        return cfg.warmup_epochs
    spec = _spec(cfg)
    return 1 if spec is not None and spec.kind == "class" else 0


def head_norm(cfg: TrainConfig) -> str:
    """The head norm (`auto` stands for layernorm with a classification loss with learned proxies, the paper's
    symmetric recipe, else none: a LayerNorm'd student cannot reproduce a teacher that is not zero-centred)."""
    if cfg.head_norm != "auto":
        return cfg.head_norm
    spec = _spec(cfg)
    return "layernorm" if spec is not None and spec.kind == "class" and cfg.proxies == "learned" else "none"


def mining(cfg: TrainConfig) -> str:
    """The mining mode (`auto` stands for symmetric with a loss on student references, the no-teacher baseline
    `sym`, else asymmetric)."""
    if cfg.mining != "auto":
        return cfg.mining
    spec = _spec(cfg)
    return "symmetric" if spec is not None and spec.student_refs else "asymmetric"


def head_init(cfg: TrainConfig) -> str:
    """The head init (`auto` stands for the closed form `local-procrustes`, except for a student that learns
    alone, which starts as the AML paper does, `random`: it must not see the teacher)."""
    if cfg.head_init != "auto":
        return cfg.head_init
    return "random" if learns_alone(cfg) else "local-procrustes"
