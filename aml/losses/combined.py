"""Weighted sums of registered losses, e.g. `combined({"contr+": 1.0, "csd": 0.5})`.

The combination is a tuple loss when any member is one, else a batch loss.
- tuple combination `(anchor, positive, negatives, anchor_teacher=None, *, ..., reduction="sum")`: tuple
  members get the tuple; batch members get `(anchor, anchor_teacher)`, i.e. the student and teacher vectors
  of the anchor images (so `anchor_teacher` is then required), plus `teacher_ref` when they take one.
- batch combination `(student, teacher, *, ..., reduction="sum")`: every member gets the pair.

Keyword constants: the union of the members' keyword arguments, each passed to every member that takes it
(e.g. `margin`, `k`, `tau_s`, `teacher_ref`), plus one weight per member, `weight_<name>` with non-word
characters spelled out (`contr+` -> `weight_contr_plus`), defaulting to the weight given here.
Reductions: `sum` / `mean` combine each member's own reduction; `none` returns (B,) values whose sum is the
`sum` value (a whole-batch member's scalar is spread evenly over the B entries).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping

import torch

from aml.losses.common import check_reduction


def weight_name(loss: str) -> str:
    """The keyword that sets a member's weight in a combination: `contr+` -> `weight_contr_plus`."""
    return "weight_" + re.sub(r"\W", "_", loss.replace("+", "_plus")).strip("_")


def _keywords(fn: Callable) -> dict[str, inspect.Parameter]:
    return {
        n: p
        for n, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "reduction"
    }


def combined(
    weights: Mapping[str, float], losses: Mapping[str, Callable] | None = None, kinds: Mapping[str, str] | None = None
) -> Callable[..., torch.Tensor]:
    """A loss that is the weighted sum of registered losses (default registry: `aml.losses`)."""
    if losses is None or kinds is None:
        from aml.losses import LOSS_KIND, LOSSES

        losses, kinds = losses or LOSSES, kinds or LOSS_KIND
    if not weights:
        raise ValueError("combined(): give at least one loss and its weight")
    unknown = [n for n in weights if n not in losses]
    if unknown:
        raise ValueError(f"combined(): unknown loss {unknown[0]!r}; choose from {', '.join(sorted(losses))}")
    members = [(name, float(w), losses[name], kinds[name]) for name, w in weights.items()]
    kind = "tuple" if any(k == "tuple" for *_, k in members) else "batch"
    member_kw = {name: _keywords(fn) for name, _, fn, _ in members}
    shared: dict[str, inspect.Parameter] = {}
    for kw in member_kw.values():
        for n, p in kw.items():
            shared.setdefault(n, p)
    wnames = {name: weight_name(name) for name, *_ in members}

    def loss(*args: torch.Tensor, reduction: str = "sum", **kw) -> torch.Tensor:
        check_reduction(reduction)
        bad = sorted(set(kw) - set(shared) - set(wnames.values()))
        if bad:
            raise TypeError(f"combined loss got an unexpected keyword argument {bad[0]!r}")
        if kind == "tuple":
            anchor, positive, negatives, *rest = args
            anchor_teacher = rest[0] if rest else None
        else:
            anchor, anchor_teacher = args
        B = anchor.shape[0]
        total: torch.Tensor | float = 0.0
        for name, w, fn, k in members:
            own = {n: v for n, v in kw.items() if n in member_kw[name]}
            w = float(kw.get(wnames[name], w))
            if k == "tuple":
                value = fn(anchor, positive, negatives, anchor_teacher, reduction=reduction, **own)
            else:
                if anchor_teacher is None:
                    raise ValueError(
                        f"combined loss: member '{name}' needs anchor_teacher (the teacher "
                        "vectors of the anchor images)"
                    )
                value = fn(anchor, anchor_teacher, reduction=reduction, **own)
                if reduction == "none" and value.dim() == 0:
                    value = value.expand(B) / B
            total = total + w * value
        return total  # type: ignore[return-value]

    first = ["anchor", "positive", "negatives"] if kind == "tuple" else ["student", "teacher"]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in first]
    if kind == "tuple":
        params.append(inspect.Parameter("anchor_teacher", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    params += list(shared.values())
    params += [inspect.Parameter(wnames[name], inspect.Parameter.KEYWORD_ONLY, default=w) for name, w, *_ in members]
    params.append(inspect.Parameter("reduction", inspect.Parameter.KEYWORD_ONLY, default="sum"))
    loss.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    loss.__name__ = "+".join(f"{w:g}*{name}" for name, w, *_ in members)
    loss.__doc__ = f"Weighted sum of losses {dict(weights)} ({kind} loss); see aml.losses.combined."
    loss.kind = kind  # type: ignore[attr-defined]
    return loss
