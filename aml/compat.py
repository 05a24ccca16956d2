"""The compatibility report of a model upgrade (docs/REFERENCE.md §9): old / old, new / new, new -> old and the
independently trained new* / new*, whether the upgrade is compatible, and BCT's update gain G.

Arithmetic on retrieval scores (mAP x100, one protocol), never on models: `aml evaluate models --old --new`
fills it from `aml.evaluate.evaluate_models`' rows (teacher = old / old, student = new / new, asymmetric = new
queries against the old database), the upgrade benchmark from its runs.

- compatible (Shen et al., CVPR 2020, the empirical compatibility criterion): M(new -> old) > M(old / old);
- update gain G = (M(new -> old) - M(old / old)) / (M(new* / new*) - M(old / old)): the share of the
  independently trained new model's gain that searching the old database with the new model brings (needs new*);
- kept = (M(new / new) - M(old / old)) / (M(new* / new*) - M(old / old)): the share of new*'s own gain the
  upgraded model keeps when it indexes its own database (the issue's target, `keeps_gain`: at least KEEP);
- G and kept are None when new* is no better than old / old (no gain to share).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEEP = 0.9  # the upgraded model keeps at least this share of new*'s own gain (new / new vs new* / new*)
PROTOCOL = "M"  # the protocol the verdict reads (Medium: every positive; UKBench and folders have only it)


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None when den is not positive or either is not finite (new* no better than old / old: no
    gain to share)."""
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


@dataclass(frozen=True)
class CompatReport:
    """One protocol's scores of an upgrade (x100): `old_old`, `new_new`, `new_old` (new queries, old database),
    and the independently trained new model's `independent` (new* / new*) and `independent_old` (new* -> old)
    when given."""

    old_old: float
    new_new: float
    new_old: float
    independent: float | None = None
    independent_old: float | None = None

    @property
    def compatible(self) -> bool:
        """The upgrade is compatible: new -> old above old / old."""
        return self.new_old > self.old_old

    @property
    def update_gain(self) -> float | None:
        """BCT's update gain G (None without new*, or when new* is no better than old / old)."""
        if self.independent is None:
            return None
        return _ratio(self.new_old - self.old_old, self.independent - self.old_old)

    @property
    def kept(self) -> float | None:
        """The share of new*'s own gain that the upgraded model keeps on its own (new / new)."""
        if self.independent is None:
            return None
        return _ratio(self.new_new - self.old_old, self.independent - self.old_old)

    @property
    def keeps_gain(self) -> bool | None:
        """The issue's target on its own: new / new - old / old >= KEEP x (new* / new* - old / old), read as written
        (when new* is no better than old / old, any new / new above KEEP x that shortfall meets it); None without
        new*."""
        if self.independent is None:
            return None
        return self.new_new - self.old_old >= KEEP * (self.independent - self.old_old)

    @property
    def independent_compatible(self) -> bool | None:
        """new* searched against the old database beats old / old (None when new* -> old was not measured)."""
        return None if self.independent_old is None else self.independent_old > self.old_old

    def as_dict(self) -> dict[str, Any]:
        """The scores and the verdicts, for --json and the benchmark's results."""
        return {
            "old/old": self.old_old,
            "new/new": self.new_new,
            "new->old": self.new_old,
            "new*/new*": self.independent,
            "new*->old": self.independent_old,
            "compatible": self.compatible,
            "new* compatible": self.independent_compatible,
            "G": self.update_gain,
            "kept": self.kept,
            "keeps gain": self.keeps_gain,
        }


def compat_report(
    old_old: float,
    new_new: float,
    new_old: float,
    independent: float | None = None,
    independent_old: float | None = None,
) -> CompatReport:
    """The report of one protocol's scores (x100)."""
    return CompatReport(
        float(old_old),
        float(new_new),
        float(new_old),
        None if independent is None else float(independent),
        None if independent_old is None else float(independent_old),
    )


def reports_of(models: Mapping[str, Any], independent: Mapping[str, Any] | None = None) -> dict[str, CompatReport]:
    """{protocol: report} of `evaluate_models` results: `models` of the old model (teacher) and the new one
    (student), `independent` of new* (`aml.evaluate.evaluate_independent`: its student row new* / new*, its
    asymmetric row new* -> old or None); protocols whose scores are not all finite (UKBench's Hard) are left out."""
    out = {}
    for p in models["teacher"]["mAP"]:
        values = [models[row]["mAP"][p] for row in ("teacher", "student", "asymmetric")]
        if independent is not None:
            cross = independent.get("asymmetric")  # None: new* and old differ in dimension, no cross score
            values += [independent["student"]["mAP"][p], None if cross is None else cross["mAP"][p]]
        needed, cross = values[: 4 if independent is not None else 3], values[4:]
        if all(_finite(v) for v in needed) and all(v is None or _finite(v) for v in cross):
            out[p] = compat_report(*values)
    return out


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def format_report(reports: Mapping[str, CompatReport], protocol: str = PROTOCOL) -> str:
    """The compatibility table (one column per protocol) and the verdict on `protocol`."""
    ps = list(reports)
    rows = [
        ("old / old", lambda r: _fmt(r.old_old)),
        ("new / new", lambda r: _fmt(r.new_new)),
        ("new -> old", lambda r: _fmt(r.new_old)),
        ("new* / new*", lambda r: _fmt(r.independent)),
        ("new* -> old", lambda r: _fmt(r.independent_old)),
        ("G", lambda r: _fmt(r.update_gain, ".3f")),
        ("kept", lambda r: _fmt(r.kept, ".3f")),
    ]
    lines = ["compatibility (mAP x100; G = (new->old - old/old) / (new*/new* - old/old))"]
    lines.append(f"{'':<12}" + "".join(f" {p:>8}" for p in ps))
    lines += [f"{name:<12}" + "".join(f" {get(reports[p]):>8}" for p in ps) for name, get in rows]
    if protocol in reports:
        lines.append(verdict(reports[protocol], protocol))
    return "\n".join(lines)


def verdict(r: CompatReport, protocol: str = PROTOCOL) -> str:
    """One line: compatible or not (new -> old vs old / old), and what new* brings (G, kept, new* -> old)."""
    word = "compatible" if r.compatible else "NOT compatible"
    line = f"upgrade {word} on mAP {protocol}: new -> old {r.new_old:.2f} vs old / old {r.old_old:.2f}"
    if r.independent is not None:
        line += f"; G {_fmt(r.update_gain, '.3f')}, kept {_fmt(r.kept, '.3f')} of new*'s own gain"
        if r.kept is not None:
            line += f" ({'at least' if r.kept >= KEEP else 'below'} {KEEP:g})"
        else:
            line += f" (new* / new* {r.independent:.2f}: no gain over old / old to share)"
    if r.independent_compatible is not None:
        word = "compatible" if r.independent_compatible else "NOT compatible"
        line += f"; new* alone is {word} (new* -> old {r.independent_old:.2f})"
    return line
