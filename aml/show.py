"""Search results a person can look at: each query (its box drawn) beside its top hits with their scores.

`draw_results(out, queries, bbxs, hits, scores, labels=None, captions=None)` writes a PNG (PIL) or an HTML
page (relative image paths), chosen by the suffix. `labels` (Q, k) of 'positive' / 'junk' / 'negative' frame
each hit green / grey / red; `gnd_labels(gnd, ids)` makes them from revisitop ground truth and database
positions, `name_ids` maps result names onto a dataset's imlist. `aml search --show` draws its results with
them; `aml evaluate --show` draws an evaluation's worst and best queries (`worst_and_best`, `draw_extremes`).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from aml.io import atomic_path, atomic_write

COLOURS = {"positive": (0, 170, 0), "junk": (150, 150, 150), "negative": (210, 0, 0), None: (255, 255, 255)}
THUMB = 112


def gnd_labels(gnd: Sequence[dict[str, Any]], ids: np.ndarray) -> list[list[str | None]]:
    """(Q, k) labels of database positions `ids` (-1: unknown) from revisitop ground truth, one dict per query."""
    out = []
    for g, row in zip(gnd, ids, strict=True):
        pos, junk = {*g.get("easy", []), *g.get("hard", [])}, set(g.get("junk", []))
        out.append([None if i < 0 else "positive" if i in pos else "junk" if i in junk else "negative" for i in row])
    return out


def name_ids(names: Sequence[str], imlist: Sequence[str]) -> np.ndarray:
    """Positions in `imlist` of image paths / names (matched by file stem; -1 when absent)."""
    where = {n: i for i, n in enumerate(imlist)}
    return np.array([where.get(Path(n).stem, -1) for n in names], dtype=np.int64)


def worst_and_best(ap: np.ndarray, n: int) -> np.ndarray:
    """Query positions: the `n` lowest-AP queries (worst first), then the `n` highest (best first), each once;
    queries with AP NaN (no positives) are left out. Ties by position."""
    valid = np.flatnonzero(~np.isnan(ap))
    order = valid[np.argsort(ap[valid], kind="stable")]
    return np.concatenate([order[:n], order[::-1][: max(0, min(n, order.size - n))]])


def draw_extremes(
    out: str | os.PathLike,
    dataset: Any,
    db_paths: Sequence[str],
    ids: np.ndarray,
    sims: np.ndarray,
    ap: np.ndarray,
    *,
    n: int = 3,
    k: int = 8,
) -> tuple[Path, np.ndarray]:
    """Draw the `n` worst and `n` best queries by `ap` of a revisitop `dataset` (its `query_paths()`, `bbxs`,
    `gnd`) with their top-`k` hits (`ids`, `sims`: the evaluation's (Q, >=k) ranking; `db_paths` the images of
    its positions) framed positive / junk / negative; returns (out, the queries drawn)."""
    sel = worst_and_best(ap, n)
    top = ids[sel, :k]
    queries = [dataset.query_paths()[q] for q in sel]
    captions = [f"AP {100 * ap[q]:.1f} {Path(p).stem}" for q, p in zip(sel, queries, strict=True)]
    labels = gnd_labels([dataset.gnd[q] for q in sel], top)
    hits = [[db_paths[i] for i in row] for row in top]
    bbxs = [dataset.bbxs[q] for q in sel]
    return draw_results(out, queries, bbxs, hits, sims[sel, :k], labels, captions=captions), sel


def _thumb(path: str, bbx: Sequence[float] | None, size: int) -> Image.Image:
    from aml.data.images import _open_rgb

    img = _open_rgb(path)
    if bbx is not None:
        ImageDraw.Draw(img).rectangle(list(bbx), outline=(255, 210, 0), width=max(2, max(img.size) // 100))
    img.thumbnail((size, size))
    return img


def draw_results(
    out: str | os.PathLike,
    queries: Sequence[str],
    bbxs: Sequence[Sequence[float] | None] | None,
    hits: Sequence[Sequence[str]],
    scores: np.ndarray,
    labels: Sequence[Sequence[str | None]] | None = None,
    thumb: int = THUMB,
    captions: Sequence[str] | None = None,
) -> Path:
    """Write `out` (.png or .html): one row per query, its hits (image paths) with scores and label frames;
    under each query its caption (default: the file name)."""
    out = Path(out)
    bbxs = bbxs or [None] * len(queries)
    captions = captions or [Path(q).stem for q in queries]
    if out.suffix.lower() in (".html", ".htm"):
        return _html(out, queries, bbxs, hits, scores, labels, thumb, captions)
    k = max((len(h) for h in hits), default=0)
    pad, text = 6, 14
    cell = thumb + 2 * pad
    canvas = Image.new("RGB", ((k + 1) * cell + pad, max(len(queries), 1) * (cell + text)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, q in enumerate(queries):
        y = r * (cell + text)
        im = _thumb(q, bbxs[r], thumb)
        canvas.paste(im, (pad, y + pad))
        draw.text((pad, y + cell - 2), captions[r][: cell // 6], fill=(0, 0, 0))
        for c, h in enumerate(hits[r]):
            x = (c + 1) * cell + pad
            label = labels[r][c] if labels is not None else None
            draw.rectangle([x - 4, y + pad - 4, x + thumb + 3, y + pad + thumb + 3], fill=COLOURS[label])
            im = _thumb(h, None, thumb)
            canvas.paste(im, (x + (thumb - im.width) // 2, y + pad + (thumb - im.height) // 2))
            draw.text((x, y + cell - 2), f"{scores[r][c]:.3f}", fill=(0, 0, 0))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out


def _html(out, queries, bbxs, hits, scores, labels, thumb, captions) -> Path:
    def img(path: str, border: tuple[int, int, int], title: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), out.parent.resolve())
        colour = "#{:02x}{:02x}{:02x}".format(*border)
        return (
            f'<figure><img src="{html.escape(rel)}" style="max-width:{thumb}px;max-height:{thumb}px;'
            f'border:4px solid {colour}"><figcaption>{html.escape(title)}</figcaption></figure>'
        )

    rows = []
    for r, q in enumerate(queries):
        box = f" box {tuple(round(v) for v in bbxs[r])}" if bbxs[r] is not None else ""
        cells = [img(q, (255, 210, 0), captions[r] + box)]
        for c, h in enumerate(hits[r]):
            label = labels[r][c] if labels is not None else None
            cells.append(img(h, COLOURS[label], f"{scores[r][c]:.3f} {Path(h).stem}"))
        rows.append(f'<div class="row">{"".join(cells)}</div>')
    style = "figure{display:inline-block;margin:4px;font:11px sans-serif;text-align:center}.row{white-space:nowrap}"
    with atomic_write(out) as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>\n")
        f.write("\n".join(rows))
        f.write("\n</body></html>\n")
    return out
