"""Training objectives: one per kind of batch (mined tuples, image batches, class-balanced batches), built from the
loss spec once. Each owns what its loss reads and the state it keeps (NormSoftmax's proxies are the class
objective's parameter or buffer, checkpointed through its state_dict), so the trainer only asks it for an epoch's
plan, the images of a step, and the loss of the student's vectors of those images (given the step's record, `Step`).

The loss of a step is called with the tensors its signature names (`LossSpec.inputs`, aml/losses/spec.py), taken
from one record of the step, `Step`: `anchor_teacher`, `labels`, `ref`, `ref_labels` (pytorch-metric-learning's
embeddings / labels / ref_emb / ref_labels), plus the objective's own `proxies`. A new loss that reads one of them
is its own file and a line in the spec table; neither this module nor the trainer changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aml.data.trainset import TrainSet
from aml.errors import UserError
from aml.losses import LossSpec
from aml.losses.normsoftmax import TEMPERATURE, class_labels, class_proxies, fit_proxies
from aml.train.batches import Embedder, raw_sizes, size_buckets
from aml.train.config import TrainConfig
from aml.train.epoch import EpochPlan, check_classes, plan_classes, plan_images, plan_tuples
from aml.train.mixup import Metrix
from aml.train.recipe import loss_function, mining


@dataclass(frozen=True)
class TrainData:
    """What every objective reads: the training set, the teacher's cached vectors of its images (N, D), the
    device the step's tensors go to, and each source's [start, stop) image range (`--sampling sources`)."""

    train: TrainSet
    teacher: np.ndarray
    device: torch.device
    sources: tuple[tuple[int, int], ...] = ()

    def teacher_rows(self, idx: np.ndarray) -> torch.Tensor:
        """The teacher's cached vectors of training images `idx`, as float32 on the device."""
        return torch.from_numpy(np.asarray(self.teacher[idx], dtype=np.float32)).to(self.device)


@dataclass
class Epoch:
    """One epoch of an objective: its plan, its steps (positions into `plan.anchors`), the seconds planning took,
    Metrix's lambdas (one per tuple), and `labels` (one per training image: what `Step.labels` reads)."""

    plan: EpochPlan
    batches: list[np.ndarray]
    mining_s: float
    data: TrainData
    labels: np.ndarray
    lam: np.ndarray | None = None
    _pool: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def on_device(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """An epoch-wide tensor, made once on its first read (the reference set and its labels)."""
        if name not in self._pool:
            self._pool[name] = make()
        return self._pool[name]


class Step:
    """The record of one step, `b` (positions into the epoch's anchors): each tensor is made on its first read,
    and a loss reads those its signature names (`read`). `targets`: the teacher's vectors of the anchors as the
    step showed them (`--view-targets view`), else None: their cached vectors."""

    def __init__(self, epoch: Epoch, b: np.ndarray, targets: torch.Tensor | None = None) -> None:
        self.epoch, self.b, self.data, self.targets = epoch, b, epoch.data, targets
        self.anchors = epoch.plan.anchors[b]

    def _labels(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.epoch.labels[idx], dtype=np.int64)).to(self.data.device)

    @cached_property
    def anchor_teacher(self) -> torch.Tensor:
        """(B, D) the teacher's vectors of the anchor images (of their views, when the step has `targets`)."""
        return self.targets if self.targets is not None else self.data.teacher_rows(self.anchors)

    @cached_property
    def labels(self) -> torch.Tensor:
        """(B,) the objective's labels of the anchor images (cluster ids; class ids for a class objective)."""
        return self._labels(self.anchors)

    @property
    def ref(self) -> torch.Tensor:
        """(P, D) the teacher's vectors of the epoch's pool (the reference set; made once per epoch)."""
        return self.epoch.on_device("ref", lambda: self.data.teacher_rows(self.epoch.plan.pool))

    @property
    def ref_labels(self) -> torch.Tensor:
        """(P,) the labels of the pool's images (once per epoch)."""
        return self.epoch.on_device("ref_labels", lambda: self._labels(self.epoch.plan.pool))

    @cached_property
    def positive(self) -> torch.Tensor:
        """(B, D) the teacher's vectors of the tuples' positives."""
        return self.data.teacher_rows(self.epoch.plan.positives[self.b])

    @cached_property
    def negatives(self) -> torch.Tensor:
        """(B, K, D) the teacher's vectors of the tuples' negatives."""
        neg = self.epoch.plan.negatives[self.b]
        return self.data.teacher_rows(neg.reshape(-1)).reshape(*neg.shape, -1)

    def read(self, names: Iterable[str], **own: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keyword inputs `names`: the objective's `own` tensors, else this record's."""
        return {n: own[n] if n in own else getattr(self, n) for n in names}


class Objective(nn.Module):
    """A loss and the kind of batch it trains on; subclasses plan the epoch and call the loss."""

    def __init__(self, spec: LossSpec, constants: dict[str, Any], cfg: TrainConfig, data: TrainData) -> None:
        super().__init__()
        self.spec, self.constants, self.cfg, self.data = spec, constants, cfg, data
        self.labels = np.asarray(data.train.cluster)  # what `Step.labels` reads: the training set's cluster ids

    def plan(self, rng: np.random.Generator, student_vectors: Callable[[np.ndarray], np.ndarray]) -> EpochPlan:
        """What the epoch trains on (`student_vectors(idx)`: the current student's vectors, for mining)."""
        raise NotImplementedError

    def epoch(self, rng: np.random.Generator, student_vectors: Callable[[np.ndarray], np.ndarray]) -> Epoch:
        """The epoch's plan, then its steps: the plan's own batches, or its anchors shuffled and grouped by image
        size (`size_buckets`)."""
        t0 = time.perf_counter()
        plan = self.plan(rng, student_vectors)
        mining_s = time.perf_counter() - t0
        if plan.batches is not None:
            batches = list(plan.batches)
        else:
            order = rng.permutation(len(plan.anchors))
            batches = size_buckets(order, raw_sizes(self.data.train.paths, plan.anchors), self.cfg.batch_size)
        return Epoch(plan, batches, mining_s, self.data, self.labels)

    def images(self, epoch: Epoch, b: np.ndarray) -> np.ndarray:
        """The training images the student embeds (with grad) in step `b`: its anchors first (every objective)."""
        return epoch.plan.anchors[b]

    def forward(self, step: Step, images: list[torch.Tensor], embed: Embedder) -> torch.Tensor:
        """The loss of `step`, `images` its `images(step.epoch, step.b)` tensors, embedded with `embed`: a batch loss
        `fn(student, teacher, **inputs)` on the anchors' student and teacher vectors."""
        s = embed(images)
        return self.spec.fn(s, step.anchor_teacher, **step.read(self.spec.inputs), **self.constants)

    def checkpoint(self) -> dict[str, Any]:
        """What the checkpoint keeps of this objective: its state_dict's entries, top-level keys."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Load `checkpoint`'s entries of this objective's state_dict (a resumed run)."""
        own = self.state_dict()
        for k, want in own.items():
            saved = checkpoint.get(k)
            if not torch.is_tensor(saved) or saved.shape != want.shape:
                raise UserError(
                    f"{path}: {k}: missing or not {tuple(want.shape)} as this run's {self.cfg.loss} objective "
                    "keeps; the checkpoint is damaged or from another run, start a new run"
                )
        self.load_state_dict({k: checkpoint[k] for k in own})

    def start_info(self) -> dict[str, Any]:
        """What epoch 0's log line records of this objective."""
        return {}


class BatchObjective(Objective):
    """A batch (label-free) loss on random images: the student's and the teacher's vectors of the same images."""

    def plan(self, rng: np.random.Generator, student_vectors: Callable[[np.ndarray], np.ndarray]) -> EpochPlan:
        return plan_images(self.cfg, self.data.train, rng, self.data.sources)


class TupleObjective(Objective):
    """A tuple loss on mined (query, positive, negatives) tuples: student anchors against the teacher's positive and
    negatives (the student's for `student_refs`, every tuple image then embedded); with `metrix`, plus the mixed
    loss of Metrix (whose mixed examples' images follow the clean ones)."""

    def __init__(
        self, spec: LossSpec, constants: dict[str, Any], cfg: TrainConfig, data: TrainData, metrix: Metrix | None
    ) -> None:
        super().__init__(spec, constants, cfg, data)
        self.metrix = metrix

    def plan(self, rng: np.random.Generator, student_vectors: Callable[[np.ndarray], np.ndarray]) -> EpochPlan:
        d = self.data
        return plan_tuples(self.cfg, d.train, rng, d.teacher, student_vectors, mining(self.cfg), d.sources)

    def epoch(self, rng: np.random.Generator, student_vectors: Callable[[np.ndarray], np.ndarray]) -> Epoch:
        """As `Objective.epoch`, then Metrix's lambdas (drawn last: the tuples are those of the run without it)."""
        epoch = super().epoch(rng, student_vectors)
        if self.metrix is not None:
            epoch.lam = self.metrix.lambdas(rng, len(epoch.plan.anchors))
        return epoch

    def images(self, epoch: Epoch, b: np.ndarray) -> np.ndarray:
        """The anchors (whole tuples for `student_refs`), then the images of Metrix's mixed examples."""
        plan = epoch.plan
        if self.spec.student_refs:
            idx = np.concatenate([plan.anchors[b], plan.positives[b], plan.negatives[b].reshape(-1)])
        else:
            idx = plan.anchors[b]
        if self.metrix is None:
            return idx
        return np.concatenate([idx, self.metrix.images(plan.anchors[b], plan.positives[b], plan.negatives[b])])

    def forward(self, step: Step, images: list[torch.Tensor], embed: Embedder) -> torch.Tensor:
        """`fn(anchor, positive, negatives, **inputs)`; with Metrix, plus its weighted mixed loss."""
        B = len(step.b)
        n_mixed = self.metrix.n_images(B) if self.metrix else 0
        s = embed(images[: len(images) - n_mixed])
        if self.spec.student_refs:  # every tuple image went through the student (the no-teacher baseline)
            positive, negatives = s[B : 2 * B], s[2 * B :].reshape(B, -1, s.shape[1])
        else:
            positive, negatives = step.positive, step.negatives
        loss = self.spec.fn(s[:B], positive, negatives, **step.read(self.spec.inputs), **self.constants)
        if self.metrix is None:
            return loss
        lam = step.epoch.lam[step.b]
        return loss + self.metrix.loss(
            s[:B],
            positive,
            negatives,
            anchor_ref=s[:B] if self.spec.student_refs else step.anchor_teacher,
            anchor_teacher=step.anchor_teacher if "anchor_teacher" in self.spec.inputs else None,
            lam=lam,
            mixed=self.metrix.embed_mixes(images[len(images) - n_mixed :], lam, embed),
        )


class ClassObjective(Objective):
    """A classification loss (NormSoftmax) on class-balanced batches, classified by the objective's own class
    proxies (`cfg.proxies`, docs/REFERENCE.md §8): the teacher's L2-normalised class means of its cached training
    vectors, a frozen buffer (not checkpointed: remade from the cache); the proxies NormSoftmax fits to those
    vectors, a frozen buffer, checkpointed with the fit's record (`fit`) so that a resumed run reuses them
    (`fresh=False`: no fit); or learned, a trainable (C, D) parameter from a seeded random start (optimised and
    checkpointed)."""

    def __init__(
        self, spec: LossSpec, constants: dict[str, Any], cfg: TrainConfig, data: TrainData, *, fresh: bool = True
    ) -> None:
        super().__init__(spec, constants, cfg, data)
        self.labels, self.num_classes = class_labels(data.train.cluster)
        check_classes(self.labels, max(cfg.batch_size // cfg.per_class, 1), cfg.per_class)
        self.fit: dict[str, float] | None = None
        dim = data.teacher.shape[1]
        if cfg.proxies == "learned":
            start = torch.randn(self.num_classes, dim, generator=torch.Generator().manual_seed(cfg.seed))
            self.proxies = nn.Parameter(nn.functional.normalize(start, dim=1).to(data.device))
            return
        if cfg.proxies == "teacher-mean":
            proxies = class_proxies(data.teacher, self.labels, self.num_classes).to(data.device)
        elif fresh:
            temperature = constants.get("temperature", TEMPERATURE)
            proxies, self.fit = fit_proxies(
                data.teacher, self.labels, self.num_classes, temperature=temperature, seed=cfg.seed, device=data.device
            )
        else:  # filled from the checkpoint by `restore`
            proxies = torch.zeros(self.num_classes, dim, device=data.device)
        self.register_buffer("proxies", proxies, persistent=cfg.proxies != "teacher-mean")
        if "own_proxies" in spec.inputs:  # `bct`: the student's own classifier, trained, started at the teacher's
            self.own_proxies = nn.Parameter(proxies.clone())

    def plan(self, rng: np.random.Generator, student_vectors: Callable[[np.ndarray], np.ndarray]) -> EpochPlan:
        return plan_classes(self.cfg, self.data.train, self.labels, rng, self.data.sources)

    def forward(self, step: Step, images: list[torch.Tensor], embed: Embedder) -> torch.Tensor:
        """`fn(student, teacher, labels=class ids, proxies=self.proxies)`."""
        s = embed(images)
        own = {"own_proxies": self.own_proxies} if "own_proxies" in self.spec.inputs else {}
        kw = step.read(self.spec.inputs, proxies=self.proxies, **own)
        return self.spec.fn(s, step.anchor_teacher, **kw, **self.constants)

    def checkpoint(self) -> dict[str, Any]:
        """The saved proxies (learned, fitted) and the fit's record."""
        state = super().checkpoint()
        return {**state, "proxy_fit": self.fit} if state else {}

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        super().restore(checkpoint, path)
        if self.state_dict():
            self.fit = checkpoint.get("proxy_fit")

    def start_info(self) -> dict[str, Any]:
        return {} if self.fit is None else {"proxy_fit": self.fit}


def build_objective(cfg: TrainConfig, data: TrainData, *, fresh: bool = True) -> Objective:
    """The objective of `cfg.loss` (its spec and constants, `recipe.loss_function`) on `data`; `fresh`: a new run (a
    resumed one takes its state from the checkpoint, `Objective.restore`)."""
    spec, constants = loss_function(cfg)
    if spec.kind == "class":
        return ClassObjective(spec, constants, cfg, data, fresh=fresh)
    if spec.kind == "tuple":
        return TupleObjective(spec, constants, cfg, data, Metrix.from_config(cfg, spec, constants))
    return BatchObjective(spec, constants, cfg, data)
