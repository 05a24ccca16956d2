"""Plain-text tables of revisitop results, one row per model/setting."""

from __future__ import annotations

from typing import Any


def format_rows(rows: dict[str, dict[str, Any]], title: str = "") -> str:
    """A table with mAP and mP@k (x100, 2 decimals) for Easy / Medium / Hard, one line per named result."""
    name_w = max([len(n) for n in rows] + [10])
    head = f"{'':<{name_w}}  {'mAP E':>7} {'mAP M':>7} {'mAP H':>7}   {'mP@10 E':>7} {'mP@10 M':>7} {'mP@10 H':>7}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for name, r in rows.items():
        k = r["mP@k"]["k"].index(10) if 10 in r["mP@k"]["k"] else -1
        m, p = r["mAP"], r["mP@k"]
        lines.append(
            f"{name:<{name_w}}  {m['E']:7.2f} {m['M']:7.2f} {m['H']:7.2f}   "
            f"{p['E'][k]:7.2f} {p['M'][k]:7.2f} {p['H'][k]:7.2f}"
        )
    return "\n".join(lines)
