"""The distillation loop: epochs of mined tuples (or image batches), atomic checkpoints, logs, DDP, AMP."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aml.data.images import header_size, size_key
from aml.data.spec import parse_data_spec
from aml.errors import UserError, first_line
from aml.extract import auto_workers, extract, resolve_device
from aml.io import TMP_TAG, aml_home, atomic_write, check_writable_dir, write_json
from aml.losses import LABEL_FREE, LOSSES, LossSpec
from aml.losses.normsoftmax import TEMPERATURE, class_labels, class_proxies, fit_proxies
from aml.progress import progress_bar, write_line
from aml.registry import create_model, load_into, model_identity
from aml.settings import ExtractSettings
from aml.teacher_vectors import TeacherVectors
from aml.train.batches import ImageTensors, forward_by_size, size_buckets
from aml.train.batchnorm import estimate_batchnorm, set_train_mode
from aml.train.checkpoint import load_checkpoint, save_checkpoint
from aml.train.config import TrainConfig
from aml.train.distributed import Dist, gather_rows, init_distributed, shutdown
from aml.train.epoch import EpochPlan, check_classes, plan_classes, plan_images, plan_tuples
from aml.train.head_init import cached_init_head, head_for
from aml.train.mixup import Metrix
from aml.train.quick_eval import QuickEval

# Fields a resumed run may change; anything else must match the checkpoint's config.
RESUMABLE_CHANGES = {"epochs", "device", "workers", "out", "eval_every"}
# The files a run writes into its folder (what `overwrite=True` removes; anything else there is kept).
RUN_FILES = ("last.pt", "log.jsonl", "config.json", "epoch_[0-9][0-9][0-9]*.pt")


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Before any work: a new run never mixes with a finished one in `run_dir` (refused unless `overwrite`, which
    removes aml's own run files first); the folder must be writable."""
    existing = [p for p in (run_dir / "last.pt", run_dir / "log.jsonl") if p.exists()]
    if existing and not resume:
        if not overwrite:
            raise UserError(
                f"{run_dir}: holds a run ({existing[0].name}); pass --resume to continue it, a new --out, or "
                "--overwrite to delete its checkpoints and log first"
            )
        for pattern in RUN_FILES:
            for f in run_dir.glob(pattern):
                f.unlink(missing_ok=True)  # DDP: every rank runs this check
            for f in run_dir.glob(f".{pattern}{TMP_TAG}*"):
                f.unlink(missing_ok=True)  # DDP: every rank runs this check
    if resume and overwrite:
        raise UserError("--resume and --overwrite both given; pass one of them")
    check_writable_dir(run_dir, "--out")


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.teacher}-{cfg.student}-{cfg.loss}".replace("/", "_")


def _group(name: str) -> str:
    """The optimisation group of a parameter, by its name."""
    if name.endswith("pool.p"):
        return "gem"
    if name.startswith(("proj.", "fc.")):
        return "head"
    return "glam" if name.startswith("glam.") else "backbone"


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AML/cirtorch optimisation groups: backbone at lr; the projection head at lr x head_lr_mult; GeM p at
    lr x gem_lr_mult without weight decay; GLAM, when the student has it, at lr x glam_lr_mult (a fourth group
    only then, so the optimizer state of a run without GLAM keeps its three groups)."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": [], "gem": [], "glam": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups[_group(n)].append(p)
    out = [
        {"params": groups["backbone"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": groups["head"], "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": cfg.weight_decay},
        {"params": groups["gem"], "lr": cfg.lr * cfg.gem_lr_mult, "weight_decay": 0.0},
    ]
    if groups["glam"]:
        out.append({"params": groups["glam"], "lr": cfg.lr * cfg.glam_lr_mult, "weight_decay": cfg.weight_decay})
    return out


def make_optimizer(model: nn.Module, cfg: TrainConfig, proxies: nn.Parameter | None = None) -> torch.optim.Optimizer:
    """The optimiser over `param_groups`, plus learned class proxies last (lr x head_lr_mult, no weight decay: they
    are L2-normalised where used)."""
    groups = param_groups(model, cfg)
    if proxies is not None:
        groups.append({"params": [proxies], "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    raise UserError(f"--optimizer {cfg.optimizer}: unknown; use adam or sgd")


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


class _StepImages(torch.utils.data.Dataset):
    """Loads, per training step, the images the student must embed (with grad)."""

    def __init__(self, images: ImageTensors, batches: list[np.ndarray]) -> None:
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [self.images[j] for j in self.batches[i]]


def _raw_sizes(paths: list[str], idx: np.ndarray) -> np.ndarray:
    """A sortable size key per image (header read only), used to make batches single-size."""
    return size_key([header_size(paths[i]) for i in idx])


class Trainer:
    """One distillation run: set up from a config (or a checkpoint), then `fit()`."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        overwrite: bool = False,
        given: frozenset[str] | None = None,
    ) -> None:
        """`given`: the config fields the user set (command-line options); with `resume`, only those are compared
        with the checkpoint's config (None: every field). `overwrite`: clear a finished run in `cfg.out` first."""
        self.progress = progress
        cfg.validate()
        self.run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
        checkpoint = None
        if resume:
            self.checkpoint_path = self.run_dir / "last.pt"
            checkpoint = load_checkpoint(self.checkpoint_path)
            cfg = self._merge_resumed(cfg, TrainConfig.from_dict(checkpoint["config"]), given)
        self._check_models(cfg)
        self._set_device(cfg)
        self.cfg = cfg.replace(out=str(self.run_dir))
        self.loss, self.loss_constants = loss_function(cfg)
        self.metrix = Metrix.from_config(cfg, self.loss, self.loss_constants)  # None without --mixup
        if cfg.amp != "none" and self.device.type != "cuda":
            raise UserError(f"--amp {cfg.amp}: mixed precision needs CUDA; use --amp none on the CPU")
        self._load_data()
        self._build_student(fresh=checkpoint is None)
        self.init_info = self._init_head() if checkpoint is None else checkpoint.get("init")
        self._build_proxies(fresh=checkpoint is None)
        learned = self.proxies if isinstance(self.proxies, nn.Parameter) else None
        self.optimizer = make_optimizer(self.student, cfg, learned)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.lr_decay)
        self.start_epoch = self._resume_state(checkpoint)
        self._wrap_model()

    # ----------------------------------------------------------------------------------------- setup
    def _set_device(self, cfg: TrainConfig) -> None:
        """The device and the distributed group (one CUDA device per local rank)."""
        self.device = resolve_device(cfg.device)
        self.dist: Dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)

    @staticmethod
    def _check_models(cfg: TrainConfig) -> None:
        """Before any data work: the teacher and the student resolve to weights (nothing is built)."""
        model_identity(cfg.teacher, cfg.teacher_weights, cfg.random_init, weights_option="--teacher-weights")
        student_random = cfg.random_init or cfg.student_random_init
        model_identity(cfg.student, cfg.student_weights, student_random, weights_option="--student-weights")

    def _load_data(self) -> None:
        """The training set, the teacher's cached vectors of its images, and the quick test-set evaluator."""
        cfg, progress = self.cfg, self.progress
        bundle = parse_data_spec(cfg.data)
        self.train = bundle.train
        if self.loss.needs_labels and len(self.train.qidxs) == 0:
            raise UserError(
                f"--data {cfg.data}: no (query, positive) pairs; loss '{cfg.loss}' needs labels, "
                f"use a label-free loss ({', '.join(LABEL_FREE)})"
            )

        def teacher_at(size: int) -> TeacherVectors:
            return TeacherVectors(
                cfg.teacher,
                ExtractSettings(size, device=str(self.device), progress=progress and self.dist.main),
                cache_dir=aml_home() / "cache",
                weights=cfg.teacher_weights,
                random_init=cfg.random_init,
                dtype=cfg.cache_dtype,
                dist=self.dist,
            )

        self.teacher = teacher_at(cfg.image_size)
        self.identity = self.teacher.identity
        self.train_teacher = self.teacher.get(self.train.paths)  # (N, D) teacher vectors of the training images
        if self.loss.reads_proxies:  # class ids of the training images, checked for class-balanced batches now
            self.labels, self.num_classes = class_labels(self.train.cluster)
            check_classes(self.labels, max(cfg.batch_size // cfg.per_class, 1), cfg.per_class)
        self.evaluator = None
        if bundle.test is not None and cfg.eval_every > 0:
            eval_teacher = self.teacher if cfg.eval_size() == cfg.image_size else teacher_at(cfg.eval_size())
            self.evaluator = QuickEval(
                bundle.test, eval_teacher, ExtractSettings(cfg.eval_size(), device=str(self.device))
            )
            eval_teacher.release()
        self.teacher.release()

    def _build_student(self, *, fresh: bool) -> None:
        """The student with a projection head to the teacher's dimension; a fresh random-weight student gets
        its BatchNorm statistics from training images."""
        cfg = self.cfg
        random_student = cfg.random_init or cfg.student_random_init
        student = create_model(
            cfg.student,
            role="student",
            weights=cfg.student_weights,
            dim=self.identity["dim"],
            head=head_for(cfg.resolved_head_init()),
            glam=cfg.glam,
            layernorm=cfg.resolved_head_norm() == "layernorm",
            random_init=random_student,
            weights_option="--student-weights",
        )
        student.meta["aml"]["teacher"] = self.identity
        self.student = student.to(self.device).to(memory_format=torch.channels_last)
        if random_student and fresh:
            self._estimate_batchnorm()

    def _init_head(self) -> dict[str, Any] | None:
        """Fit the fresh student's head to the teacher in closed form (`cfg.resolved_head_init()`), before epoch 1.

        Under DDP only rank 0 fits: DistributedDataParallel copies rank 0's weights to every rank."""
        cfg = self.cfg
        if not self.dist.main:
            return None
        student_identity = model_identity(
            cfg.student, weights=cfg.student_weights, random_init=cfg.random_init or cfg.student_random_init
        )
        key = {"student": student_identity, "teacher": self.identity, "bn_images": cfg.bn_images}
        if self.student.glam is not None:  # the fit reads the maps through GLAM's (seeded) start
            key["glam"] = list(self.student.glam_parts)
        info = cached_init_head(
            self.student,
            cfg.resolved_head_init(),
            cache_dir=aml_home() / "cache",
            key=key,
            paths=self.train.paths,
            teacher_vectors=self.train_teacher,
            teacher_net=self.teacher.net,
            image_size=cfg.image_size,
            count=cfg.init_images,
            flip=cfg.init_flip,
            seed=cfg.seed,
            device=self.device,
        )
        self.teacher.release()
        self.student.to(memory_format=torch.channels_last)
        return info

    def _build_proxies(self, *, fresh: bool) -> None:
        """The class proxies of a classification loss (`cfg.proxies`): the teacher's L2-normalised class means of
        its cached training vectors, frozen; the proxies NormSoftmax fits to those vectors, frozen (`proxy_fit`
        records the fit; both are checkpointed, and a resumed run takes them from the checkpoint instead of
        fitting again); or learned, a trainable (C, D) parameter from a seeded random start (in the optimiser and
        the checkpoint). None for the other losses."""
        cfg = self.cfg
        self.proxies: torch.Tensor | None = None
        self.proxy_fit: dict[str, float] | None = None
        if not self.loss.reads_proxies:
            return
        if cfg.proxies == "teacher-mean":
            self.proxies = class_proxies(self.train_teacher, self.labels, self.num_classes).to(self.device)
            return
        if cfg.proxies == "teacher-trained":
            if not fresh:  # filled from the checkpoint by _resume_state
                self.proxies = torch.zeros(self.num_classes, self.identity["dim"], device=self.device)
                return
            temperature = self.loss_constants.get("temperature", TEMPERATURE)
            self.proxies, self.proxy_fit = fit_proxies(
                self.train_teacher,
                self.labels,
                self.num_classes,
                temperature=temperature,
                seed=cfg.seed,
                device=self.device,
            )
            return
        g = torch.Generator().manual_seed(cfg.seed)
        start = torch.randn(self.num_classes, self.identity["dim"], generator=g)
        self.proxies = nn.Parameter(nn.functional.normalize(start, dim=1).to(self.device))

    def _resume_state(self, checkpoint: dict[str, Any] | None) -> int:
        """Student, optimizer and scheduler state from a checkpoint; returns the epoch to start from."""
        if checkpoint is None:
            return 0
        path = self.checkpoint_path
        sd = checkpoint["state_dict"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise UserError(f"{path}: state_dict: not a dict of tensors; the checkpoint is damaged, start a new run")
        load_into(self.student, sd, path)
        if self.saves_proxies():
            saved = checkpoint.get("proxies")
            if not torch.is_tensor(saved) or saved.shape != self.proxies.shape:
                raise UserError(
                    f"{path}: proxies: missing or not ({self.num_classes}, {self.proxies.shape[1]}) {self.cfg.proxies} "
                    "class proxies; the checkpoint is damaged or from another run, start a new run"
                )
            with torch.no_grad():
                self.proxies.copy_(saved)
            self.proxy_fit = checkpoint.get("proxy_fit")
        for key, target in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
            try:
                target.load_state_dict(checkpoint[key])
            except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
                raise UserError(
                    f"{path}: {key}: state does not fit this run ({first_line(e)}); the checkpoint is damaged or "
                    "from another version, start a new run"
                ) from None
        try:
            return int(checkpoint["epoch"])
        except (TypeError, ValueError):
            raise UserError(f"{path}: epoch: {checkpoint['epoch']!r} is not a number; start a new run") from None

    def _wrap_model(self) -> None:
        """The module the steps run (DDP across ranks), the AMP scaler and the loader workers; the parameters that
        a warm-up freezes (all the student's but its head's and GLAM's)."""
        cfg = self.cfg
        new = ("proj.", "fc.", "glam.")
        self._old_params = [p for n, p in self.student.named_parameters() if p.requires_grad and not n.startswith(new)]
        self._frozen = False
        self.model: nn.Module = self.student
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # BatchNorm stays in eval mode, so buffers never change: no per-forward broadcast, which would deadlock
            # when ranks run different numbers of forwards in a step (one per image size, `forward_by_size`).
            self.model = DistributedDataParallel(self.student, device_ids=ids, broadcast_buffers=False)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self.workers = cfg.workers if cfg.workers >= 0 else auto_workers(1 << 30, cfg.batch_size, self.device)

    def _apply_warmup(self, epoch: int) -> bool:
        """During the warm-up epochs (`cfg.resolved_warmup()`) only the new parameters train (the head, GLAM,
        learned proxies): the backbone and GeM p get no gradient, so Adam leaves them and their state alone. On one
        process they stop requiring grad (no backward through the backbone); under DDP, which expects a gradient
        for every parameter it was built with, their gradients are dropped before each step
        (`_drop_frozen_grads`). Returns whether `epoch` is a warm-up epoch."""
        on = epoch < self.cfg.resolved_warmup()
        if on != self._frozen and self.dist.world == 1:
            for p in self._old_params:
                p.requires_grad_(not on)
        self._frozen = on
        return on

    def _drop_frozen_grads(self) -> None:
        if self._frozen and self.dist.world > 1:
            for p in self._old_params:
                p.grad = None

    def _sync_proxies(self) -> None:
        """Average learned proxies' gradients across ranks (DDP averages the student's; the proxies are not in it)."""
        if isinstance(self.proxies, nn.Parameter) and self.dist.world > 1 and self.proxies.grad is not None:
            tdist.all_reduce(self.proxies.grad)
            self.proxies.grad /= self.dist.world

    @staticmethod
    def _merge_resumed(given: TrainConfig, saved: TrainConfig, names: frozenset[str] | None = None) -> TrainConfig:
        """The checkpoint's config with the resumable options; `names` (the options the user gave, None: all)
        are the only ones compared, and must equal the saved values unless in RESUMABLE_CHANGES."""
        compared = set(given.to_dict()) if names is None else set(names) | {"out"}
        diff = sorted(k for k in compared if k not in RESUMABLE_CHANGES and getattr(given, k) != getattr(saved, k))
        if diff:
            k = diff[0]
            raise UserError(
                f"--resume: option '{k}' differs from the checkpoint's config "
                f"({getattr(given, k)!r} vs {getattr(saved, k)!r}); only {sorted(RESUMABLE_CHANGES)} "
                "may change when resuming"
            )
        return saved.replace(**{k: getattr(given, k) for k in RESUMABLE_CHANGES & compared})

    # ---------------------------------------------------------------------------------------- pieces
    def _student_vectors(self, idx: np.ndarray) -> np.ndarray:
        """Current student vectors of training images (no grad, eval mode), sharded across ranks."""
        mine = idx[self.dist.rank :: self.dist.world]
        self.student.eval()
        part = extract(
            self.student,
            [self.train.paths[i] for i in mine],
            ExtractSettings(self.cfg.image_size, workers=self.workers, device=str(self.device), progress=False),
        )
        return gather_rows(self.dist, part, len(idx))

    def _estimate_batchnorm(self) -> None:
        """A random-weight student has no BatchNorm statistics: set them from `bn_images` training images."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1])
        idx = rng.permutation(len(self.train.paths))[: cfg.bn_images]
        images = ImageTensors(self.train.paths, cfg.image_size, self.student.mean, self.student.std)
        batches = size_buckets(np.arange(len(idx)), _raw_sizes(self.train.paths, idx), cfg.batch_size)
        estimate_batchnorm(self.student, ([images[i] for i in idx[b]] for b in batches), self.device)

    def _plan(self, epoch: int, rng: np.random.Generator) -> EpochPlan:
        if self.loss.reads_proxies:
            return plan_classes(self.cfg, self.train, self.labels, rng)
        if self.loss.kind == "tuple":
            return plan_tuples(self.cfg, self.train, rng, self.train_teacher, self._student_vectors)
        return plan_images(self.cfg, self.train, rng)

    def _teacher_rows(self, idx: np.ndarray) -> torch.Tensor:
        """The teacher's cached vectors of training images `idx`, as float32 on the device."""
        return torch.from_numpy(np.asarray(self.train_teacher[idx], dtype=np.float32)).to(self.device)

    def _clusters(self, idx: np.ndarray) -> torch.Tensor:
        """The training set's cluster ids of images `idx`, on the device."""
        return torch.from_numpy(np.asarray(self.train.cluster[idx], dtype=np.int64)).to(self.device)

    def _autocast(self):
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _step_loss(
        self,
        plan: EpochPlan,
        b: np.ndarray,
        images: list[torch.Tensor],
        pool: dict[str, torch.Tensor],
        lam: np.ndarray | None = None,
    ) -> torch.Tensor:
        """The loss of one step, called as its spec says: tuple or batch inputs, and only the tensors it reads
        (`pool`: the epoch's pool inputs, `ref` and `ref_clusters`, made once per epoch); with `--mixup`, plus
        Metrix's weighted mixed loss (`lam`: the epoch's lambdas; the tail of `images` holds the mixed examples'
        images)."""
        mixed_images = images[len(images) - self.metrix.n_images(len(b)) :] if self.metrix else []
        with self._autocast():
            s = forward_by_size(self.model, images[: len(images) - len(mixed_images)], self.device)
        B = len(b)
        tensors: dict[str, torch.Tensor | None] = dict(pool)
        if self.loss.reads_anchor_teacher:
            tensors["anchor_teacher"] = self._teacher_rows(plan.anchors[b])
        if self.loss.reads_clusters:
            tensors["clusters"] = self._clusters(plan.anchors[b])
        if self.loss.reads_proxies:
            tensors["labels"] = torch.from_numpy(self.labels[plan.anchors[b]]).to(self.device)
            tensors["proxies"] = self.proxies
        if self.loss.kind == "batch":
            return self.loss.fn(s, self._teacher_rows(plan.anchors[b]), **tensors, **self.loss_constants)
        if self.loss.student_refs:  # every tuple image went through the student (the no-teacher baseline)
            positive, negatives = s[B : 2 * B], s[2 * B :].reshape(B, -1, s.shape[1])
        else:
            positive = self._teacher_rows(plan.positives[b])
            negatives = self._teacher_rows(plan.negatives[b].reshape(-1)).reshape(B, -1, s.shape[1])
        loss = self.loss.fn(s[:B], positive, negatives, **tensors, **self.loss_constants)
        if self.metrix is None:
            return loss
        return loss + self.metrix.loss(
            s[:B],
            positive,
            negatives,
            anchor_ref=s[:B] if self.loss.student_refs else self._teacher_rows(plan.anchors[b]),
            anchor_teacher=tensors.get("anchor_teacher"),
            lam=lam[b],
            images=mixed_images,
            model=self.model,
            net=self.student,
            autocast=self._autocast,
        )

    def _images_of(self, plan: EpochPlan, b: np.ndarray) -> np.ndarray:
        """The training images the student embeds (with grad) in one step: anchors, or whole tuples; then those of
        Metrix's mixed examples."""
        if self.loss.student_refs:
            idx = np.concatenate([plan.anchors[b], plan.positives[b], plan.negatives[b].reshape(-1)])
        else:
            idx = plan.anchors[b]
        if self.metrix is None:
            return idx
        return np.concatenate([idx, self.metrix.images(plan.anchors[b], plan.positives[b], plan.negatives[b])])

    # ---------------------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        warmup = self._apply_warmup(epoch)
        t0 = time.perf_counter()
        plan = self._plan(epoch, rng)
        t_mine = time.perf_counter() - t0
        if plan.batches is not None:
            batches = list(plan.batches)
        else:
            order = rng.permutation(len(plan.anchors))
            batches = size_buckets(order, _raw_sizes(self.train.paths, plan.anchors), cfg.batch_size)
        usable = len(batches) // self.dist.world * self.dist.world or len(batches)
        batches = batches[:usable][self.dist.rank :: self.dist.world]
        lam = self.metrix.lambdas(rng, len(plan.anchors)) if self.metrix else None  # drawn last: same tuples
        pool: dict[str, torch.Tensor] = {}  # the epoch's pool, once: the teacher's references and their clusters
        if self.loss.reads_ref:
            pool["ref"] = self._teacher_rows(plan.pool)
        if self.loss.reads_clusters:
            pool["ref_clusters"] = self._clusters(plan.pool)

        images = ImageTensors(self.train.paths, cfg.image_size, self.student.mean, self.student.std)
        loader = torch.utils.data.DataLoader(
            _StepImages(images, [self._images_of(plan, b) for b in batches]),
            batch_size=None,  # each item is already one step's list of image tensors (default_convert keeps it)
            num_workers=self.workers,
        )
        set_train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        bar = progress_bar(
            len(batches),
            f"epoch {epoch + 1}/{cfg.epochs}",
            "step",
            enabled=self.progress and self.dist.main,
            terminal_only=True,
            position=1,
            leave=False,
        )
        total, n_images, t1 = 0.0, 0, time.perf_counter()
        for step, (b, imgs) in enumerate(zip(batches, loader, strict=True)):
            last = (step + 1) % cfg.update_every == 0 or step + 1 == len(batches)
            sync = self.model.no_sync() if (self.dist.world > 1 and not last) else contextlib.nullcontext()
            with sync:
                loss = self._step_loss(plan, b, imgs, pool, lam)
                self.scaler.scale(loss / cfg.update_every).backward()
            if last:
                self._drop_frozen_grads()
                self._sync_proxies()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
            n_images += len(imgs)
            bar.set_postfix_str(
                f"loss {total / (step + 1):.4f} lr {self.optimizer.param_groups[0]['lr']:.2e}"
                f" {n_images / (time.perf_counter() - t1):.1f} img/s",
                refresh=False,
            )
            bar.update()
        bar.close()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        dt = time.perf_counter() - t1
        return {
            "epoch": epoch + 1,
            "loss": total / max(len(batches), 1),
            "lr": lr,
            "steps": len(batches),
            "tuples": int(len(batches) and sum(len(b) for b in batches)),
            "dropped_tuples": plan.dropped,
            "images_per_s": n_images / max(dt, 1e-9),
            "mining_s": t_mine,
            "train_s": dt,
            "gem_p": float(self.student.pool.p.detach().cpu()),
            "warmup": warmup,
        }

    def saves_proxies(self) -> bool:
        """Whether the checkpoint holds the proxies: learned ones, and fitted ones (so that resume reuses them)."""
        return self.proxies is not None and self.cfg.proxies != "teacher-mean"

    def checkpoint_state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        extra = {"proxies": self.proxies.detach().cpu(), "proxy_fit": self.proxy_fit} if self.saves_proxies() else {}
        return {
            **extra,
            "state_dict": self.student.state_dict(),
            "meta": self.student.meta,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
            "metrics": metrics,
            "init": self.init_info,
        }

    def fit(self) -> Path:
        """Train from the start (or the resumed epoch) to `cfg.epochs`; returns the run directory."""
        cfg = self.cfg
        if self.dist.main:
            write_json(self.run_dir / "config.json", cfg.to_dict())
        epochs = progress_bar(
            cfg.epochs,
            "distill",
            "epoch",
            enabled=self.progress and self.dist.main,
            terminal_only=True,
            initial=self.start_epoch,
        )
        try:
            if self.start_epoch == 0 and self.dist.main:
                self._log_start()
            for epoch in range(self.start_epoch, cfg.epochs):
                stats = self.train_epoch(epoch)
                if (
                    self.evaluator is not None
                    and self.dist.main
                    and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
                ):
                    stats["eval"] = self.evaluator.run(self.student)
                if self.dist.main:
                    save_checkpoint(self.run_dir, epoch + 1, self.checkpoint_state(stats))
                    self._log(stats)
                epochs.update()
                self.dist.barrier()
        finally:
            epochs.close()
            shutdown(self.dist)
        return self.run_dir

    def _log_start(self) -> None:
        """Epoch 0: the closed-form start, its residual and (unless random) its test-set scores; a zero-epoch run
        saves this student as its checkpoint."""
        stats: dict[str, Any] = {"epoch": 0, "init": self.init_info}
        if self.proxy_fit is not None:
            stats["proxy_fit"] = self.proxy_fit
        if self.evaluator is not None and (self.cfg.resolved_head_init() != "random" or self.cfg.epochs == 0):
            stats["eval"] = self.evaluator.run(self.student)
        if self.cfg.epochs == 0:
            save_checkpoint(self.run_dir, 0, self.checkpoint_state(stats))
        self._log(stats)

    def _log(self, stats: dict[str, Any]) -> None:
        path = self.run_dir / "log.jsonl"
        old = path.read_text() if path.exists() else ""
        with atomic_write(path) as f:
            f.write(old + json.dumps(stats, sort_keys=True) + "\n")
        if self.progress:
            ev = stats.get("eval")
            if "loss" in stats:
                line = f"epoch {stats['epoch']}: loss {stats['loss']:.4f}, {stats['images_per_s']:.1f} img/s"
            else:
                init = stats.get("init") or {}
                line = f"epoch 0: head init {init.get('method')}"
                if "residual" in init:
                    line += (
                        f" on {init['images']} images ({init['pairs']} pairs), residual {init['residual']:.4f},"
                        f" {init['seconds']:.1f} s"
                    )
            if ev:
                line += f", asym mAP M {ev['asymmetric']['mAP']['M']:.2f}, sym mAP M {ev['student']['mAP']['M']:.2f}"
            write_line(line)


def distill(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    given: frozenset[str] | None = None,
) -> Path:
    """Run a distillation and return its run directory (checkpoints, log.jsonl, config.json); `overwrite` and
    `given` as in `Trainer`."""
    return Trainer(cfg, resume=resume, progress=progress, overwrite=overwrite, given=given).fit()
