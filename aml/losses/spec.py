"""One spec per loss: its function, what kind of batch it takes, which inputs it reads, how it reduces.

The training objective of the spec's `kind` (aml.train.objective) makes each call; the inputs a loss reads are
the `STEP_INPUTS` its own signature names (`LossSpec.inputs`, read from the signature once), passed by keyword,
only to the losses that name them (pytorch-metric-learning's `forward(embeddings, labels, indices_tuple, ref_emb,
ref_labels)`):
- `anchor_teacher` (B, D): the teacher's vectors of the anchor images (`contr+`);
- `labels` (B,): the labels of the anchor images: the training set's cluster ids (`csd`'s label-refined target,
  compared for equality only), class ids 0..C-1 for a classification loss (`normsoftmax`);
- `ref` (P, D): a reference set the student queries are scored against (pytorch-metric-learning's `ref_emb`);
  the asymmetric case is: the references are the teacher's (`csd`: the teacher vectors of the epoch's pool);
- `ref_labels` (P,): the labels of `ref`'s images (`ref_labels`);
- `proxies` (C, D): the class proxies a classification loss classifies by (`normsoftmax`; its objective owns
  them: learned, or the teacher's);
- `own_proxies` (C, D): the student's own trainable proxies beside the teacher's `proxies` (`bct`'s new
  classifier; its objective owns them, started at the teacher's).
A new loss that reads one of these needs its own file and its line in the spec table, nothing in the trainer.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from aml.errors import UserError

KINDS = ("tuple", "batch", "class")
# the keyword inputs a training step provides by name (tensors, never constants)
STEP_INPUTS = ("anchor_teacher", "labels", "ref", "ref_labels", "proxies", "own_proxies")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    `kind`: "tuple" (`fn(anchor, positive, negatives, *, ...)`, anchors (B, D), positives (B, D), negatives
    (B, K, D)), "batch" (`fn(student, teacher, *, ...)`, both (B, D), the same images) or "class" (a batch
    loss on class-balanced batches that classifies by `proxies`, `fn(student, teacher, *, labels, proxies, ...)`).
    `inputs`: the `STEP_INPUTS` it reads (by keyword).
    `student_refs`: positives and negatives are student vectors too (the no-teacher `sym` baseline).
    `needs_labels`: it trains on labelled images ((query, positive) pairs; class ids for a "class" loss).
    `per_sample`: `reduction="none"` gives one value per
    tuple or image; a loss defined over the whole batch (False) refuses it.
    `defaults`: its keyword constants and their defaults (`--loss-arg NAME=VALUE`, `--margin`).
    `pairs`: a pair-based tuple loss in Metrix's generic form over soft labels, `pairs(anchor (B, D), refs
    (B, M, D), labels (B, M), *, mixed=None, <constants>) -> (B,)` (aml/losses/pairs.py; the same constants);
    None for the losses that are not pair-based (`--mixup` refuses them).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str
    inputs: frozenset[str] = frozenset()
    student_refs: bool = False
    needs_labels: bool = False
    per_sample: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)
    pairs: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"loss '{self.name}': kind {self.kind!r}, expected one of {KINDS}")
        clash = sorted(set(self.defaults) & set(STEP_INPUTS + ("reduction",)))
        if clash:
            raise ValueError(f"loss '{self.name}': '{clash[0]}' is an input, not a constant")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        if self.pairs is not None and keyword_constants(self.pairs, ("mixed",)) != dict(self.defaults):
            raise ValueError(f"loss '{self.name}': its generic pair form takes other constants than the loss")

    def __call__(self, *inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Call the loss function itself."""
        return self.fn(*inputs, **kwargs)

    def constants(self, given: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
        """`given` checked against the loss's constants: a one-line UserError naming the accepted names.

        `where` names the option in the message (default `--loss-arg NAME`).
        """
        for k in given:
            if k in self.defaults:
                continue
            takes = ", ".join(sorted(self.defaults)) or "no constants"
            opt = where or f"--loss-arg {k}"
            if k in STEP_INPUTS or k == "reduction":
                raise UserError(
                    f"{opt}: '{k}' is an input of loss '{self.name}' that the trainer passes, not a "
                    f"constant; loss '{self.name}' takes {takes}"
                )
            raise UserError(f"{opt}: loss '{self.name}' takes {takes}")
        return dict(given)


def keyword_constants(fn: Callable, inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """A loss function's keyword-only constants and their defaults (its tensor inputs, `inputs` and `reduction`
    excluded)."""
    skip = {*STEP_INPUTS, *inputs, "reduction"}
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in skip
    }


def step_inputs(fn: Callable) -> frozenset[str]:
    """The `STEP_INPUTS` a loss function's signature names (what its objective passes it)."""
    return frozenset(n for n in inspect.signature(fn).parameters if n in STEP_INPUTS)


def loss_spec(
    name: str,
    fn: Callable[..., torch.Tensor],
    kind: str,
    *,
    pairs: Callable[..., torch.Tensor] | None = None,
    **flags: bool,
) -> LossSpec:
    """The spec of a loss function; the inputs it reads, its constants and their defaults are read once from its
    own signature. `pairs`: its generic pair form (pair-based tuple losses). Tuple and class losses need labels."""
    flags.setdefault("needs_labels", kind in ("tuple", "class"))
    return LossSpec(name, fn, kind, step_inputs(fn), defaults=keyword_constants(fn), pairs=pairs, **flags)


def weight_name(loss: str) -> str:
    """The keyword that sets a member's weight in a combination: `contr+` -> `weight_contr_plus`."""
    return "weight_" + re.sub(r"\W", "_", loss.replace("+", "_plus")).strip("_")
