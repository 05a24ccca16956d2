"""The training recipe, named once: AML defaults (docs/REFERENCE.md §4), presets, and (de)serialisation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from aml.cache import DEFAULT_DTYPE, DTYPES
from aml.errors import UserError
from aml.glam import parse_parts
from aml.losses import LOSSES, PAIR_BASED
from aml.settings import IMAGE_SIZE, check_device
from aml.train.head_init import HEAD_INITS
from aml.train.mixup import MIXUP_MODES, MIXUP_PAIRS

# NormSoftmax proxies (docs/REFERENCE.md §8): `teacher-mean` the teacher's L2-normalised class means of its cached
# vectors, frozen (asymmetric: the student is classified in the teacher's space); `teacher-trained` the proxies
# NormSoftmax fits to those vectors from the class means, then frozen (asymmetric); `learned` trained with the
# student from a seeded random start (symmetric: the student never sees the teacher).
PROXIES = ("teacher-mean", "teacher-trained", "learned")
HEAD_NORMS = ("auto", "none", "layernorm")  # the embedding's normalisation before its last L2N (aml.net)

# The smallest value of each numeric field, and whether the minimum itself is excluded (the `aml distill`
# option ranges are generated from this table, and `TrainConfig.validate` checks it for Python callers).
# epochs 0 is valid: the run writes the initialised student without training.
MINIMUMS: dict[str, tuple[float, bool]] = {
    "bn_images": (1, False),
    "init_images": (0, False),
    "epochs": (0, False),
    "lr": (0, False),
    "gem_lr_mult": (0, False),
    "head_lr_mult": (0, False),
    "glam_lr_mult": (0, False),
    "weight_decay": (0, False),
    "lr_decay": (0, True),
    "margin": (0, False),
    "mixup_weight": (0, False),
    "mixup_alpha": (0, True),
    "neg_num": (1, False),
    "query_size": (1, False),
    "pool_size": (1, False),
    "batch_size": (1, False),
    "update_every": (1, False),
    "image_size": (1, False),
    "test_image_size": (0, False),
    "eval_every": (0, False),
    "seed": (0, False),
    "workers": (-1, False),
    "per_class": (1, False),
    "warmup_epochs": (-1, False),
}
# The fields with a fixed set of values.
CHOICES: dict[str, tuple[str, ...]] = {
    "head_init": ("auto", *HEAD_INITS),
    "loss": tuple(LOSSES),
    "mixup": MIXUP_MODES,
    "mixup_pairs": MIXUP_PAIRS,
    "mining": ("auto", "asymmetric", "symmetric", "random"),
    "optimizer": ("adam", "sgd"),
    "amp": ("none", "bf16", "fp16"),
    "cache_dtype": DTYPES,
    "proxies": PROXIES,
    "head_norm": HEAD_NORMS,
}


@dataclass
class TrainConfig:
    """Everything that defines a distillation run; defaults are the AML paper's recipe."""

    teacher: str = "rn101"
    teacher_weights: str | None = None
    student: str = "effnet-b3"
    student_weights: str | None = None
    random_init: bool = False  # random weights for teacher and student alike (tests only)
    student_random_init: bool = False  # an ImageNet-free student: random weights, the teacher keeps its own
    bn_images: int = 128  # training images that set a random-weight student's BatchNorm statistics
    head_init: str = "auto"  # the student's start (aml.train.head_init); auto: local-procrustes, random for sym
    init_images: int = 2000  # training images the closed-form start is fitted on (0: all)
    init_flip: bool = True  # also fit on the mirrored images (map-level methods)
    loss: str = "contr+"
    loss_args: dict[str, float] = field(default_factory=dict)  # keyword constants of the loss
    mixup: str = "none"  # Metrix (docs/REFERENCE.md §8, aml.train.mixup): none | input | feature | embedding
    mixup_pairs: str = "pos-neg"  # the pairs mixed: pos-neg | anchor-neg | both
    mixup_weight: float = 0.4  # total loss = clean loss + mixup_weight x mixed loss (public code's 0.4)
    mixup_alpha: float = 2.0  # lambda ~ Beta(alpha, alpha), one per tuple (public code's 2)
    data: str = "synth"
    mining: str = "auto"  # auto | asymmetric | symmetric | random
    epochs: int = 100
    optimizer: str = "adam"
    lr: float = 1e-6
    gem_lr_mult: float = 10.0  # GeM p learns 10x faster, without weight decay
    head_lr_mult: float = 1.0  # the student's 1x1 projection (random at the start) relative to the backbone
    glam: str = "none"  # global-local attention on the student's maps (aml.glam): none | all | comma list of parts
    glam_lr_mult: float = 10.0  # GLAM (new, near-identity at the start) relative to the backbone
    weight_decay: float = 1e-6
    lr_decay: float = math.exp(-0.01)  # per epoch
    margin: float | None = None  # None: the loss's own default (contrastive and triplet 0.7)
    neg_num: int = 5
    query_size: int = 2000
    pool_size: int = 20000
    batch_size: int = 5  # tuples (or images, for batch losses) per forward
    update_every: int = 1  # forwards per optimizer step
    # Classification losses (`normsoftmax`): where the class proxies come from, class-balanced batches of
    # batch_size // per_class classes x per_class images, warm-up epochs that train only the new parameters (the
    # head, learned proxies; -1: 1 for a classification loss, else 0), and the LayerNorm that makes the embedding
    # binarisable at zero (auto: layernorm with learned proxies, the paper's; none otherwise).
    proxies: str = "teacher-mean"
    per_class: int = 2
    warmup_epochs: int = -1
    head_norm: str = "auto"
    image_size: int = IMAGE_SIZE
    test_image_size: int = 0  # 0: same as image_size
    cache_dtype: str = DEFAULT_DTYPE  # the teacher feature cache's, shared with `aml evaluate`
    eval_every: int = 1  # epochs between quick test-set evaluations (0: never)
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    workers: int = -1  # -1: automatic
    out: str | None = None

    def learns_alone(self) -> bool:
        """The student never sees the teacher: a loss on student references (the no-teacher baseline `sym`), or a
        classification loss with learned proxies."""
        spec = LOSSES.get(self.loss)
        return spec is not None and (spec.student_refs or (spec.reads_proxies and self.proxies == "learned"))

    def resolved_warmup(self) -> int:
        """The warm-up epochs -1 stands for: 1 for a classification loss (NormSoftmax's recipe), else 0."""
        if self.warmup_epochs >= 0:
            return self.warmup_epochs
        spec = LOSSES.get(self.loss)
        return 1 if spec is not None and spec.reads_proxies else 0

    def resolved_head_norm(self) -> str:
        """The head norm `auto` stands for: layernorm for a classification loss with learned proxies (the paper's
        symmetric recipe), else none (a LayerNorm'd student cannot reproduce a teacher that is not zero-centred)."""
        if self.head_norm != "auto":
            return self.head_norm
        spec = LOSSES.get(self.loss)
        return "layernorm" if spec is not None and spec.reads_proxies and self.proxies == "learned" else "none"

    def resolved_mining(self) -> str:
        """The mining mode `auto` stands for: symmetric for a loss on student references (the no-teacher
        baseline `sym`), else asymmetric."""
        if self.mining != "auto":
            return self.mining
        spec = LOSSES.get(self.loss)
        return "symmetric" if spec is not None and spec.student_refs else "asymmetric"

    def resolved_head_init(self) -> str:
        """The head init `auto` stands for: the closed form `local-procrustes`, except for a loss on student
        references (the no-teacher baseline `sym`) or with learned proxies, which starts as the AML paper does
        (`random`): it must not see the teacher."""
        if self.head_init != "auto":
            return self.head_init
        return "random" if self.learns_alone() else "local-procrustes"

    def eval_size(self) -> int:
        return self.test_image_size or self.image_size

    def validate(self) -> TrainConfig:
        """This config, or a one-line UserError naming the first out-of-range or unknown value (before any work)."""
        for name, (low, open_) in MINIMUMS.items():
            v = getattr(self, name)
            if v is not None and (v < low or (open_ and v == low)):
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} {v}: must be {'>' if open_ else '>='} {low:g}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose one of {', '.join(allowed)}")
        LOSSES[self.loss].constants(self.loss_args)
        parse_parts(self.glam)
        if self.mixup != "none" and LOSSES[self.loss].pairs is None:
            raise UserError(
                f"--mixup {self.mixup}: loss '{self.loss}' is not pair-based; use --loss "
                f"{' | '.join(PAIR_BASED)}, or --mixup none"
            )
        if LOSSES[self.loss].reads_proxies and self.batch_size < self.per_class:
            raise UserError(
                f"--batch-size {self.batch_size}: a class-balanced batch holds batch_size // per_class classes of "
                f"--per-class {self.per_class} images; use a batch size of at least {self.per_class}"
            )
        check_device(self.device)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"config: unknown field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# The embedded default: everything runs offline on a 2-core CPU within 5 minutes; the teacher and student are
# the only real ImageNet CNNs installable offline. The student starts from the closed form (its linear head
# fitted by local Procrustes; without mirrored images, which add nothing on the synthetic set), then CSD with
# the label-refined target (half the target's mass on the query's landmark, the rest the teacher's distribution
# over its 256 nearest training images) and a sharp student temperature, 3 epochs of 400 images (the
# measurements behind this recipe: docs/TRAINING.md, "The student's start", docs/RESULTS.md, "The demo's recipe").
PRESETS: dict[str, dict[str, Any]] = {
    "aml": {},
    "demo": dict(
        teacher="lite2",
        student="lite0",
        init_flip=False,
        loss="csd",
        loss_args={"tau_s": 0.03, "label_weight": 0.5},
        data="synth",
        epochs=3,
        lr=2e-5,
        lr_decay=math.exp(-0.1),
        query_size=400,
        pool_size=2000,
        batch_size=8,
        image_size=224,
    ),
}

# The no-teacher baseline of the demo: the same student and recipe with the symmetric loss, on a smaller
# budget (each sym tuple embeds 2 + neg_num images with the student, and symmetric mining embeds the whole
# pool): its asymmetric mAP is near zero whatever the budget, which is what the baseline is there to show.
DEMO_BASELINE: dict[str, Any] = dict(loss="sym", epochs=1, query_size=100, pool_size=500, loss_args={})
