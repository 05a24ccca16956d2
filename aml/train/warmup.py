"""Warm-up epochs: only the parameters new to the student train (its head, GLAM; an objective's learned proxies)."""

from __future__ import annotations

from torch import nn

NEW = ("proj.", "fc.", "glam.")  # the student's parameters a warm-up trains


class Warmup:
    """During the first `epochs` epochs the backbone and GeM p get no gradient, so Adam leaves them and their state
    alone. On one process they stop requiring grad (no backward through the backbone); under DDP (`world` > 1),
    which expects a gradient for every parameter it was built with, their gradients are dropped before each
    optimiser step (`drop_grads`)."""

    def __init__(self, student: nn.Module, epochs: int, world: int) -> None:
        self.old = [p for n, p in student.named_parameters() if p.requires_grad and not n.startswith(NEW)]
        self.epochs, self.world, self.frozen = epochs, world, False

    def apply(self, epoch: int) -> bool:
        """Freeze or thaw for `epoch`; returns whether it is a warm-up epoch."""
        on = epoch < self.epochs
        if on != self.frozen and self.world == 1:
            for p in self.old:
                p.requires_grad_(not on)
        self.frozen = on
        return on

    def drop_grads(self) -> None:
        """Under DDP in a warm-up epoch: drop the frozen parameters' gradients before the optimiser step."""
        if self.frozen and self.world > 1:
            for p in self.old:
                p.grad = None
