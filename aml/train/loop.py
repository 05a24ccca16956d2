"""The distillation loop: epochs of its objective's steps, atomic checkpoints, logs, DDP, AMP, warm-up."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aml.data.sources import describe, parse_data_specs, source_shares
from aml.errors import UserError
from aml.extract import auto_workers, extract, resolve_device
from aml.io import aml_home, write_json
from aml.progress import progress_bar, write_line
from aml.registry import model_identity
from aml.settings import ExtractSettings
from aml.teacher_vectors import TeacherVectors
from aml.train import recipe
from aml.train.augment import Views
from aml.train.batches import Embedder, ImageTensors, StepImages, TeacherEmbedder
from aml.train.batchnorm import set_train_mode
from aml.train.checkpoint import Keeper, load_checkpoint, restore, save_checkpoint
from aml.train.config import TrainConfig
from aml.train.distributed import Dist, average_grads, gather_rows, init_distributed, shutdown
from aml.train.divergence import diverged, no_steps, non_finite_weight
from aml.train.objective import Step, TrainData, build_objective
from aml.train.optim import make_optimizer
from aml.train.quick_eval import quick_check, validation_eval
from aml.train.run_dir import append_log, check_run_dir, default_run_dir, merge_resumed, run_lock
from aml.train.student import build_student, start_student
from aml.train.warmup import Warmup


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
        if not resume:  # a resumed run's loss and recipe are its checkpoint's: checked once merged
            recipe.check(cfg)
        self.run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
        checkpoint = None
        if resume:
            self.checkpoint_path = self.run_dir / "last.pt"
            checkpoint = load_checkpoint(self.checkpoint_path)
            try:
                saved = TrainConfig.from_dict(checkpoint["config"])
            except UserError as e:
                raise UserError(f"{self.checkpoint_path}: {e}") from None
            cfg = recipe.check(merge_resumed(cfg, saved, given))
        model_identity(cfg.teacher, cfg.teacher_weights, cfg.random_init, weights_option="--teacher-weights")
        self._set_device(cfg)
        self.cfg = cfg.replace(out=str(self.run_dir))
        if cfg.amp != "none" and self.device.type != "cuda":
            raise UserError(f"--amp {cfg.amp}: mixed precision needs CUDA; use --amp none on the CPU")
        self._load_data(fresh=checkpoint is None)
        self._build_student(fresh=checkpoint is None)
        self.init_info = self._init_head() if checkpoint is None else checkpoint.get("init")
        self.optimizer = make_optimizer(self.student, cfg, self.objective.parameters())
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.lr_decay)
        self.start_epoch = 0
        self.keeper = Keeper(self.run_dir, resume=checkpoint is not None)
        if checkpoint is not None:
            parts = dict(student=self.student, optimizer=self.optimizer, scheduler=self.scheduler)
            self.start_epoch = restore(checkpoint, self.checkpoint_path, objective=self.objective, **parts)
        self._wrap_model()

    # ----------------------------------------------------------------------------------------- setup
    def _set_device(self, cfg: TrainConfig) -> None:
        """The device and the distributed group (one CUDA device per local rank); before any data work, the
        student resolves to weights (nothing is built)."""
        model_identity(cfg.student, cfg.student_weights, cfg.random_student(), weights_option="--student-weights")
        self.device = resolve_device(cfg.device)
        self.dist: Dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)

    def _teacher_at(self, size: int) -> TeacherVectors:
        """The teacher's cached vectors at one image size."""
        cfg = self.cfg
        return TeacherVectors(
            cfg.teacher,
            ExtractSettings(size, device=str(self.device), progress=self.progress and self.dist.main),
            cache_dir=aml_home() / "cache",
            weights=cfg.teacher_weights,
            random_init=cfg.random_init,
            dtype=cfg.cache_dtype,
            dist=self.dist,
        )

    def _load_data(self, *, fresh: bool) -> None:
        """The training set, the teacher's cached vectors of its images, the objective on them, and the quick
        test-set evaluator."""
        cfg = self.cfg
        self.bundle = bundle = parse_data_specs(cfg.data, cfg.test_data)
        if self.progress and self.dist.main:
            for line in describe(bundle):
                write_line(line)
        self.train = bundle.train
        recipe.check_data(cfg, self.train)
        self.teacher = self._teacher_at(cfg.image_size)
        self.identity = self.teacher.identity
        self.train_teacher = self.teacher.get(self.train.paths)  # (N, D) teacher vectors of the training images
        ranges = tuple((s.start, s.stop) for s in bundle.sources)
        data = TrainData(self.train, self.train_teacher, self.device, ranges)
        self.objective = build_objective(cfg, data, fresh=fresh)
        checks, size, device = cfg.eval_every is not None, cfg.eval_size(), str(self.device)
        self.evaluator = quick_check(bundle.test if checks else None, self._teacher_at, size, device)  # reported
        self.validator = validation_eval(bundle.val if checks else None, self._teacher_at, size, device, cfg.seed)
        self.teacher.release()

    def _build_student(self, *, fresh: bool) -> None:
        """The student with a projection head to the teacher's dimension (`student.build_student`)."""
        self.student = build_student(self.cfg, self.identity, self.train.paths, self.device, fresh=fresh)

    def _init_head(self) -> dict[str, Any] | None:
        """Fit the fresh student's head to the teacher in closed form (`student.start_student`), before epoch 1.

        Under DDP only rank 0 fits: DistributedDataParallel copies rank 0's weights to every rank."""
        if not self.dist.main:
            return None
        info = start_student(self.cfg, self.student, self.identity, self.train.paths, self.train_teacher,
                             self.teacher.net, self.device, progress=self.progress)  # fmt: skip
        self.teacher.release()
        return info

    def _wrap_model(self) -> None:
        """The module the steps run (DDP across ranks) and how a step embeds with it (and the teacher its views,
        `--view-targets view`), the AMP scaler and the loader workers; the warm-up (`Warmup`: the student's head
        and GLAM, and the objective's parameters, train alone)."""
        cfg = self.cfg
        self.warmup = Warmup(self.student, recipe.warmup_epochs(cfg), self.dist.world)
        self.model: nn.Module = self.student
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # BatchNorm stays in eval mode, so buffers never change: no per-forward broadcast, which would deadlock
            # when ranks run different numbers of forwards in a step (one per image size, `forward_by_size`).
            self.model = DistributedDataParallel(self.student, device_ids=ids, broadcast_buffers=False)
        self.embed = Embedder(self.model, self.student, self.device, cfg.amp)
        self.teacher_embed = None  # the frozen teacher on the step's views (`--view-targets view`)
        if recipe.teacher_views(cfg):
            net = self.teacher.net()
            self.teacher_embed = TeacherEmbedder(net, self.student.mean, self.student.std, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self.workers = cfg.workers if cfg.workers is not None else auto_workers(1 << 30, cfg.batch_size, self.device)

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

    def _step(self) -> None:
        """One optimiser step on the accumulated gradients (frozen ones dropped, the objective's averaged)."""
        self.warmup.drop_grads()
        average_grads(self.dist, self.objective.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    # ---------------------------------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch of the objective's steps (this rank's share); returns its log record."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        warmup = self.warmup.apply(epoch)
        ep = self.objective.epoch(rng, self._student_vectors)
        if not ep.batches:
            raise no_steps(cfg.data, epoch, self.train, ep.plan.dropped)
        usable = len(ep.batches) // self.dist.world * self.dist.world or len(ep.batches)
        batches = ep.batches[:usable][self.dist.rank :: self.dist.world]
        images = ImageTensors(self.train.paths, cfg.image_size, self.student.mean, self.student.std)
        views = Views(cfg.augment, cfg.crop_area, cfg.seed, epoch, self.dist.rank)
        loader = torch.utils.data.DataLoader(
            StepImages(images, [self.objective.images(ep, b) for b in batches], views),
            batch_size=None,  # each item is already one step's list of image tensors (default_convert keeps it)
            num_workers=self.workers,
        )
        set_train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        show = self.progress and self.dist.main
        bar = progress_bar(len(batches), f"epoch {epoch + 1}/{cfg.epochs}", "step", enabled=show, terminal_only=True,
                           position=1, leave=False)  # fmt: skip
        total, n_images, t1 = 0.0, 0, time.perf_counter()
        for step, (b, imgs) in enumerate(zip(batches, loader, strict=True)):
            last = (step + 1) % cfg.update_every == 0 or step + 1 == len(batches)
            sync = self.model.no_sync() if (self.dist.world > 1 and not last) else contextlib.nullcontext()
            with sync:
                targets = self.teacher_embed(imgs[: len(b)]) if self.teacher_embed else None  # the anchors' views
                loss = self.objective(Step(ep, b, targets), imgs, self.embed)
                self.scaler.scale(loss / cfg.update_every).backward()
            value = float(loss.detach())
            # fp16: the scaler skips such steps itself; under DDP the weights check below stops every rank alike
            if not math.isfinite(value) and cfg.amp != "fp16" and self.dist.world == 1:
                raise diverged(self.run_dir, cfg.lr, epoch, step, f"the loss is {value}")
            if last:
                self._step()
                if bad := non_finite_weight(self.student):  # every rank holds the same weights: all stop alike
                    raise diverged(self.run_dir, cfg.lr, epoch, step, f"the student's weights hold NaN or inf ({bad})")
            total += value
            n_images += len(imgs)
            lr, speed = self.optimizer.param_groups[0]["lr"], n_images / (time.perf_counter() - t1)
            bar.set_postfix_str(f"loss {total / (step + 1):.4f} lr {lr:.2e} {speed:.1f} img/s", refresh=False)
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
            "dropped_tuples": ep.plan.dropped,
            "images_per_s": n_images / max(dt, 1e-9),
            "mining_s": ep.mining_s,
            "train_s": dt,
            "gem_p": float(self.student.pool.p.detach().cpu()),
            "warmup": warmup,
            "sources": source_shares(self.bundle, ep.plan.anchors),
        }

    def checkpoint_state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds: the student, its objective's state (top-level keys), optimiser, scheduler,
        config, the epoch's metrics and the closed-form start's record."""
        return {
            **self.objective.checkpoint(),
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
        show = self.progress and self.dist.main
        epochs = progress_bar(
            cfg.epochs, "distill", "epoch", enabled=show, terminal_only=True, initial=self.start_epoch
        )
        try:
            if self.start_epoch == 0 and self.dist.main:
                self._log_start()
            for epoch in range(self.start_epoch, cfg.epochs):
                stats = self.train_epoch(epoch)
                last = epoch + 1 == cfg.epochs
                if self.dist.main and cfg.eval_every is not None and ((epoch + 1) % cfg.eval_every == 0 or last):
                    self._check(stats, test=True)
                if self.dist.main:
                    path = save_checkpoint(self.run_dir, epoch + 1, self.checkpoint_state(stats))
                    self.keeper.update(epoch + 1, path, stats)
                    append_log(self.run_dir, stats, show=self.progress)
                epochs.update()
                self.dist.barrier()
            if self.dist.main:
                self.keeper.finish()
        finally:
            epochs.close()
            shutdown(self.dist)
        return self.run_dir

    def _check(self, stats: dict[str, Any], *, test: bool) -> None:
        """The student's scores into `stats`: `val` on the validation data (best.pt's choice) and, with `test`,
        `eval` on the test set (reported, never chosen on)."""
        if test and self.evaluator is not None:
            stats["eval"] = self.evaluator.run(self.student)
        if self.validator is not None:
            stats["val"] = self.validator.run(self.student)

    def _log_start(self) -> None:
        """Epoch 0: the closed-form start, its residual and (unless random) its test-set scores; a zero-epoch run
        saves this student as its checkpoint."""
        stats: dict[str, Any] = {"epoch": 0, "init": self.init_info, **self.objective.start_info()}
        self._check(stats, test=recipe.head_init(self.cfg) != "random" or self.cfg.epochs == 0)
        self.keeper.start(self.checkpoint_state(stats))
        if self.cfg.epochs == 0:
            save_checkpoint(self.run_dir, 0, self.checkpoint_state(stats))
        append_log(self.run_dir, stats, show=self.progress)


def distill(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    given: frozenset[str] | None = None,
) -> Path:
    """Run a distillation and return its run directory (checkpoints, log.jsonl, config.json); `overwrite` and
    `given` as in `Trainer`. The run folder is locked (`run_lock`): a second run into it is refused."""
    cfg = cfg.replace(out=cfg.out or str(default_run_dir(cfg)))
    with run_lock(Path(cfg.out)):
        return Trainer(cfg, resume=resume, progress=progress, overwrite=overwrite, given=given).fit()
