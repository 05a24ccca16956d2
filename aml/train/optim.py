"""The optimiser of a distillation: the AML/cirtorch parameter groups of the student, plus its objective's own
parameters (learned class proxies)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from aml.errors import UserError
from aml.train.config import TrainConfig


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


def make_optimizer(model: nn.Module, cfg: TrainConfig, objective: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The optimiser over `param_groups`, plus the objective's parameters last when it has any (learned proxies:
    lr x head_lr_mult, no weight decay, they are L2-normalised where used)."""
    groups = param_groups(model, cfg)
    own = list(objective)
    if own:
        groups.append({"params": own, "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    raise UserError(f"--optimizer {cfg.optimizer}: unknown; use adam or sgd")
