"""One spec per loss: its function, what kind of batch it takes, which inputs it reads, how it reduces.

The trainer builds each call from the spec (`kind`, `reads_anchor_teacher`, `reads_ref`, `student_refs`), never
from the loss's name or signature. The optional tensor inputs are passed by keyword, only to the losses that
read them:
- `anchor_teacher` (B, D): the teacher's vectors of the anchor images (`contr+`);
- `ref` (P, D): a reference set the student queries are scored against (pytorch-metric-learning's `ref_emb`);
  the asymmetric case is: the references are the teacher's (`csd`: the teacher vectors of the epoch's pool);
- `clusters` (B,) and `ref_clusters` (P,) (`reads_clusters`): the training set's cluster ids of the batch images
  and of `ref`'s images, compared for equality only (`csd`'s label-refined target);
- `labels` (B,) and `proxies` (C, D) (`reads_proxies`): class ids 0..C-1 of the batch images and the class
  proxies they are classified by (`normsoftmax`; the trainer owns the proxies: learned, or the teacher's).
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

KINDS = ("tuple", "batch")
# keyword inputs that are tensors, never constants
TENSOR_INPUTS = ("anchor_teacher", "ref", "clusters", "ref_clusters", "labels", "proxies")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    `kind`: "tuple" (`fn(anchor, positive, negatives, *, ...)`, anchors (B, D), positives (B, D), negatives
    (B, K, D)) or "batch" (`fn(student, teacher, *, ...)`, both (B, D), the same images).
    `reads_clusters`: it takes the cluster ids of the batch and of `ref` (`clusters`, `ref_clusters`).
    `student_refs`: positives and negatives are student vectors too (the no-teacher `sym` baseline).
    `needs_labels`: it trains on labelled images ((query, positive) pairs; class ids for `reads_proxies`).
    `reads_proxies`: a classification loss, `fn(student, teacher, *, labels, proxies, ...)`.
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
    reads_anchor_teacher: bool = False
    reads_ref: bool = False
    reads_clusters: bool = False
    student_refs: bool = False
    needs_labels: bool = False
    reads_proxies: bool = False
    per_sample: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)
    pairs: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"loss '{self.name}': kind {self.kind!r}, expected one of {KINDS}")
        clash = sorted(set(self.defaults) & set(TENSOR_INPUTS + ("reduction",)))
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
            if k in TENSOR_INPUTS or k == "reduction":
                raise UserError(
                    f"{opt}: '{k}' is an input of loss '{self.name}' that the trainer passes, not a "
                    f"constant; loss '{self.name}' takes {takes}"
                )
            raise UserError(f"{opt}: loss '{self.name}' takes {takes}")
        return dict(given)


def keyword_constants(fn: Callable, inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    """A loss function's keyword-only constants and their defaults (its tensor inputs, `inputs` and `reduction`
    excluded)."""
    skip = {*TENSOR_INPUTS, *inputs, "reduction"}
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in skip
    }


def loss_spec(
    name: str,
    fn: Callable[..., torch.Tensor],
    kind: str,
    *,
    pairs: Callable[..., torch.Tensor] | None = None,
    **flags: bool,
) -> LossSpec:
    """The spec of a loss function; its constants and defaults are read once from its own signature. `pairs`: its
    generic pair form (pair-based tuple losses). Tuple losses and classification losses (`reads_proxies`) need
    labels."""
    flags.setdefault("needs_labels", kind == "tuple" or flags.get("reads_proxies", False))
    return LossSpec(name, fn, kind, defaults=keyword_constants(fn), pairs=pairs, **flags)


def weight_name(loss: str) -> str:
    """The keyword that sets a member's weight in a combination: `contr+` -> `weight_contr_plus`."""
    return "weight_" + re.sub(r"\W", "_", loss.replace("+", "_plus")).strip("_")
