"""Weighted sums of registered losses, composed from their specs: `combine("contr+csd", {"contr+": 1, "csd": 1})`.

The combination is a tuple loss when any member is one, else a batch loss.
- tuple combination `(anchor, positive, negatives, *, anchor_teacher, ref, ..., reduction="sum")`: tuple
  members get the tuple; batch members get `(anchor, anchor_teacher)`, i.e. the student and teacher vectors
  of the anchor images (so the combination reads `anchor_teacher`).
- batch combination `(student, teacher, *, ref, labels, ref_labels, ..., reduction="sum")`: every member
  gets the pair.
Each member gets only the tensor inputs its own spec reads; the combination reads their union.

Keyword constants: the union of the members' constants, each passed to every member that takes it (e.g.
`margin`, `k`, `tau_s`), plus one weight per member, `weight_<name>` with non-word characters spelled out
(`contr+` -> `weight_contr_plus`), defaulting to the weight given here.
Reductions: `sum` / `mean` combine each member's own reduction; `none` (per-tuple values) only when every
member is per-sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from aml.losses.common import check_per_sample, check_reduction
from aml.losses.spec import LossSpec, weight_name


def combine(name: str, weights: Mapping[str, float], specs: Mapping[str, LossSpec]) -> LossSpec:
    """The spec of the weighted sum of the losses `weights` names (looked up in `specs`)."""
    if not weights:
        raise ValueError("combine(): give at least one loss and its weight")
    unknown = [n for n in weights if n not in specs]
    if unknown:
        raise ValueError(f"combine(): unknown loss {unknown[0]!r}; choose from {', '.join(sorted(specs))}")
    members = [(specs[n], float(w), weight_name(n)) for n, w in weights.items()]
    proxied = [m.name for m, *_ in members if m.kind == "class"]
    if proxied:
        raise ValueError(f"combine(): loss {proxied[0]!r} classifies by proxies; combinations pass no labels/proxies")
    kind = "tuple" if any(m.kind == "tuple" for m, *_ in members) else "batch"
    defaults: dict[str, Any] = {}
    for m, *_ in members:
        for k, v in m.defaults.items():
            defaults.setdefault(k, v)
    defaults.update({wname: w for _, w, wname in members})
    inputs = frozenset().union(*(m.inputs for m, *_ in members))
    if any(m.kind != kind for m, *_ in members):  # a batch member of a tuple combination reads the anchors' teacher
        inputs |= {"anchor_teacher"}
    loss = _Combination(name, kind, members, defaults)
    return LossSpec(
        name,
        loss,
        kind,
        inputs,
        student_refs=any(m.student_refs for m, *_ in members),
        needs_labels=any(m.needs_labels for m, *_ in members),
        per_sample=loss.per_sample,
        defaults=defaults,
    )


class _Combination:
    """The combined loss function: each member called with its own constants and the inputs its spec reads."""

    def __init__(
        self, name: str, kind: str, members: list[tuple[LossSpec, float, str]], defaults: dict[str, Any]
    ) -> None:
        self.name, self.kind, self.members, self.defaults = name, kind, members, defaults
        self.per_sample = all(m.per_sample for m, *_ in members)
        self.__name__ = "+".join(f"{w:g}*{m.name}" for m, w, _ in members)
        weights = {m.name: w for m, w, _ in members}
        self.__doc__ = f"Weighted sum of losses {weights} ({kind} loss); see aml.losses.combined."

    def __call__(
        self,
        *inputs: torch.Tensor,
        anchor_teacher: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        ref: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        reduction: str = "sum",
        **constants: Any,
    ) -> torch.Tensor:
        if self.per_sample:
            check_reduction(reduction)
        else:
            check_per_sample(self.name, reduction)
        bad = sorted(set(constants) - set(self.defaults))
        if bad:
            raise TypeError(f"combined loss '{self.name}' got an unexpected keyword argument {bad[0]!r}")
        given = {"anchor_teacher": anchor_teacher, "labels": labels, "ref": ref, "ref_labels": ref_labels}
        total: torch.Tensor | float = 0.0
        for m, w, wname in self.members:
            own = {k: v for k, v in constants.items() if k in m.defaults}
            own.update({k: given[k] for k in m.inputs})
            if m.kind == self.kind:
                value = m.fn(*inputs, reduction=reduction, **own)
            else:  # a batch member of a tuple combination: the anchors' student and teacher vectors
                if anchor_teacher is None:
                    raise ValueError(
                        f"combined loss '{self.name}': member '{m.name}' needs anchor_teacher (the teacher "
                        "vectors of the anchor images)"
                    )
                value = m.fn(inputs[0], anchor_teacher, reduction=reduction, **own)
            total = total + float(constants.get(wname, w)) * value
        return total  # type: ignore[return-value]
