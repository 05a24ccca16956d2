"""The training recipe, named once: AML defaults (docs/REFERENCE.md §4), presets, and (de)serialisation.

A leaf of constants: it imports no model, loss or torch code. What a value means for the loss (the loss names,
their constants, what `auto` resolves to) is aml.train.recipe's, above the loss table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from aml.errors import UserError
from aml.settings import IMAGE_SIZE, check_device

# NormSoftmax proxies (docs/REFERENCE.md §8): `teacher-mean` the teacher's L2-normalised class means of its cached
# vectors, frozen (asymmetric: the student is classified in the teacher's space); `teacher-trained` the proxies
# NormSoftmax fits to those vectors from the class means, then frozen (asymmetric); `learned` trained with the
# student from a seeded random start (symmetric: the student never sees the teacher).
PROXIES = ("teacher-mean", "teacher-trained", "learned")
HEAD_NORMS = ("auto", "none", "layernorm")  # the embedding's normalisation before its last L2N (aml.net)
MIXUP_MODES = ("none", "input", "feature", "embedding")  # Metrix (aml.train.mixup)
MIXUP_PAIRS = ("pos-neg", "anchor-neg", "both")
# the teacher feature cache's default storage (aml.cache.DEFAULT_DTYPE; tests/test_objectives.py ties them)
CACHE_DTYPE = "float16"
# Fields whose None means auto / all / never, and the number that meant it in older runs' config.json and on the
# command line (`TrainConfig.__post_init__` maps it to None on read).
OLD_SENTINELS: dict[str, int] = {
    "init_images": 0,
    "warmup_epochs": -1,
    "test_image_size": 0,
    "eval_every": 0,
    "workers": -1,
}

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
    "crop_area": (0, True),
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
# The fields with a fixed set of values this module knows (aml.train.recipe.CHOICES adds the loss, the head init
# and the cache dtype, which their owners name).
CHOICES: dict[str, tuple[str, ...]] = {
    "mixup": MIXUP_MODES,
    "mixup_pairs": MIXUP_PAIRS,
    "mining": ("auto", "asymmetric", "symmetric", "random"),
    "optimizer": ("adam", "sgd"),
    "amp": ("none", "bf16", "fp16"),
    "proxies": PROXIES,
    "head_norm": HEAD_NORMS,
    "sampling": ("images", "sources"),
    "augment": ("none", "flip", "crop", "mix"),  # aml.train.augment.AUGMENTS (tests/test_augment.py ties them)
    "view_targets": ("whole", "view"),  # aml.train.augment.VIEW_TARGETS (tests/test_augment.py ties them)
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
    init_images: int | None = 2000  # training images the closed-form start is fitted on (None: all)
    init_flip: bool = True  # also fit on the mirrored images (map-level methods)
    loss: str = "contr+"
    loss_args: dict[str, float] = field(default_factory=dict)  # keyword constants of the loss
    mixup: str = "none"  # Metrix (docs/REFERENCE.md §8, aml.train.mixup): none | input | feature | embedding
    mixup_pairs: str = "pos-neg"  # the pairs mixed: pos-neg | anchor-neg | both
    mixup_weight: float = 0.4  # total loss = clean loss + mixup_weight x mixed loss (public code's 0.4)
    mixup_alpha: float = 2.0  # lambda ~ Beta(alpha, alpha), one per tuple (public code's 2)
    augment: str = "none"  # the view of a training image the student embeds (aml.train.augment): none|flip|crop|mix
    crop_area: float = 0.5  # the smallest fraction of an image's area a `crop` view keeps
    view_targets: str = "whole"  # a view's teacher target: whole (the cached image's) | view (the teacher's of it)
    data: list[str] = field(default_factory=lambda: ["synth"])  # one or several sources, end to end
    sampling: str = "images"  # an epoch's images, pairs or classes: images (uniform) | sources (an equal share each)
    test_data: str | None = None  # the run's own test set (then the sources hold nothing out)
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
    # head, learned proxies; None: 1 for a classification loss, else 0), and the LayerNorm that makes the embedding
    # binarisable at zero (auto: layernorm with learned proxies, the paper's; none otherwise).
    proxies: str = "teacher-mean"
    per_class: int = 2
    warmup_epochs: int | None = None
    head_norm: str = "auto"
    image_size: int = IMAGE_SIZE
    test_image_size: int | None = None  # None: same as image_size
    cache_dtype: str = CACHE_DTYPE  # the teacher feature cache's, shared with `aml evaluate`
    eval_every: int | None = 1  # epochs between quick test-set evaluations (None: never)
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    workers: int | None = None  # None: automatic
    out: str | None = None

    def __post_init__(self) -> None:
        """Older runs' (and the command line's) numbers for auto / all / never become None."""
        for name, old in OLD_SENTINELS.items():
            if getattr(self, name) == old:
                setattr(self, name, None)
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)  # older runs: one spec

    def random_student(self) -> bool:
        """The student starts from random weights (`random_init` or `student_random_init`)."""
        return self.random_init or self.student_random_init

    def eval_size(self) -> int:
        return self.test_image_size or self.image_size

    def validate(self, choices: dict[str, tuple[str, ...]] = CHOICES) -> TrainConfig:
        """This config, or a one-line UserError naming the first out-of-range value or one not in `choices`
        (before any work). What the loss makes of it is checked above, by aml.train.recipe.check."""
        for name, (low, open_) in MINIMUMS.items():
            v = getattr(self, name)
            if v is not None and (v < low or (open_ and v == low)):
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} {v}: must be {'>' if open_ else '>='} {low:g}")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose one of {', '.join(allowed)}")
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
# measurements behind this recipe: docs/TRAINING.md, "The student's start", docs/RESULTS.md, "The demo's recipe";
# the learning rate chosen on the validation split only: "The demo's constants chosen on validation").
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
        lr=4e-5,  # chosen on the synthetic validation split (benchmarks/selection.py; it was 2e-5)
        lr_decay=math.exp(-0.1),
        query_size=400,
        pool_size=2000,
        batch_size=8,
        image_size=224,
    ),
    # Real photos (`--preset real --data SOURCE [--data SOURCE ...]`): the student's linear head fitted by pooled
    # Procrustes on every training image's cached teacher vector, then six epochs of plain CSD (no label term: it
    # fits the training classes and lowers unseen ones) at student and teacher temperature 0.1 (the student
    # reproduces the teacher's similarities to the query's 64 nearest references, not only the nearest one: the
    # other views of an object) on random crops of the training images, each crop's target the teacher's vector of
    # that crop (one teacher forward per view: consistent teaching), every source an equal share of an epoch.
    # Its constants were chosen on validation folds of the training photos (benchmarks/real_selection.py;
    # docs/RESULTS.md, "Real photos").
    "real": dict(
        teacher="lite2",
        student="lite0",
        head_init="procrustes",
        init_images=None,
        loss="csd",
        # chosen on validation folds (benchmarks/real_selection.py; they were 0.03, 256 and csd's own 0.01)
        loss_args={"tau_s": 0.1, "k": 64, "tau_t": 0.1},
        sampling="sources",  # chosen on validation folds too (images: a source's share was its size)
        # chosen on validation folds too (round 6; they were none, whole and 2): crop views, each with the teacher's
        # vector of that very view as its target (one teacher forward per view), for 6 epochs
        augment="crop",
        view_targets="view",
        epochs=6,
        lr=2e-5,
        lr_decay=math.exp(-0.1),
        query_size=400,
        batch_size=8,
        image_size=224,
    ),
    # The model upgrade (backward-compatible training, docs/TRAINING.md "Model upgrades"): the old model (lite0)
    # is the frozen teacher whose database stays, the new, stronger backbone (lite2) the student, started by the
    # closed form (local Procrustes, so new -> old works from step 0), then `bct`: its own NormSoftmax (its own
    # classifier, started at the teacher's proxies) and the NormSoftmax over the teacher's trained proxies (BCT's
    # influence loss), weights 1, with the demo's label-refined csd as the asymmetric term instead of `reg`, on
    # the same class-balanced batches; no warm-up (the head starts fitted); the demo's budget. The asymmetric term
    # and the budget were chosen on the synthetic validation split (benchmarks/upgrade_selection.py; it was `reg`,
    # 2 epochs x 200 images at lr 1e-5, the closed form on 400 images).
    "upgrade": dict(
        teacher="lite0",
        student="lite2",
        init_flip=False,
        init_images=2000,
        loss="bct",
        loss_args={"weight_reg": 0.0, "weight_csd": 8.0, "tau_s": 0.03, "label_weight": 0.5},
        proxies="teacher-trained",
        warmup_epochs=0,
        epochs=3,
        lr=4e-5,
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
