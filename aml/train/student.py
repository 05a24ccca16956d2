"""The run's student: built with its projection head to the teacher's dimension (a random-weight one gets its
BatchNorm statistics from training images), then its head fitted to the teacher in closed form before epoch 1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from aml.registry import create_model
from aml.train import recipe
from aml.train.batchnorm import estimate_on_images
from aml.train.config import TrainConfig
from aml.train.head_init import head_for, run_start


def build_student(
    cfg: TrainConfig, identity: dict[str, Any], paths: Sequence[str], device: torch.device, *, fresh: bool
) -> nn.Module:
    """The student with a projection head to the teacher's dimension, on `device` (channels-last); a fresh
    random-weight student gets its BatchNorm statistics from `cfg.bn_images` training images."""
    student = create_model(
        cfg.student,
        role="student",
        weights=cfg.student_weights,
        dim=identity["dim"],
        head=head_for(recipe.head_init(cfg)),
        glam=cfg.glam,
        layernorm=recipe.head_norm(cfg) == "layernorm",
        random_init=cfg.random_student(),
        weights_option="--student-weights",
    )
    student.meta["aml"]["teacher"] = identity
    student = student.to(device).to(memory_format=torch.channels_last)
    if cfg.random_student() and fresh:  # no BatchNorm statistics: set from `bn_images` training images
        estimate_on_images(student, paths, count=cfg.bn_images, size=cfg.image_size, batch_size=cfg.batch_size,
                           seed=cfg.seed, device=device)  # fmt: skip
    return student


def start_student(
    cfg: TrainConfig,
    student: nn.Module,
    identity: dict[str, Any],
    paths: Sequence[str],
    teacher_vectors: np.ndarray,
    teacher_net: nn.Module | None,
    device: torch.device,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the fresh student's head to the teacher in closed form (`recipe.head_init`, `head_init.run_start`) with
    a progress bar unless `progress` is False; returns the start's record (checkpoint `init`, log.jsonl's epoch 0)."""
    info = run_start(
        student,
        recipe.head_init(cfg),
        student_name=cfg.student,
        student_weights=cfg.student_weights,
        random_student=cfg.random_student(),
        teacher_identity=identity,
        bn_images=cfg.bn_images,
        paths=paths,
        teacher_vectors=teacher_vectors,
        teacher_net=teacher_net,
        image_size=cfg.image_size,
        count=cfg.init_images,
        flip=cfg.init_flip,
        seed=cfg.seed,
        device=device,
        progress=progress,
    )
    student.to(memory_format=torch.channels_last)
    return info
