"""Search results a person can look at: each query (its box drawn) beside its top hits with their scores.

`draw_results(out, queries, bbxs, hits, scores, labels=None, captions=None)` writes a PNG (PIL) or an HTML page,
chosen by the suffix (`check_show_path` checks it before the work), each with a legend of the frames. The page links
its images relatively where they lie below its folder (the folder can move as a whole), else by absolute `file://`
URI (`image_url`: URL-quoted, so `#`, `?`, `%` in names are kept). `labels` (Q, k) of 'positive' / 'junk' /
'negative' frame each hit green / grey / red; `gnd_labels(gnd, ids)` makes them from revisitop ground truth and
database positions, `name_ids` maps result names onto a dataset's imlist. `aml search --show` draws its results with
them; `aml evaluate --show` draws an evaluation's worst and best queries (`worst_and_best`, `draw_extremes`).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw

from aml.errors import UserError
from aml.io import atomic_path, atomic_write, check_writable_file

COLOURS = {"positive": (0, 170, 0), "junk": (150, 150, 150), "negative": (210, 0, 0), None: (255, 255, 255)}
QUERY_COLOUR = (255, 210, 0)  # the query's frame and its box
SUFFIXES = (".png", ".html", ".htm")
LEGEND = (  # (colour, meaning) as the legend of a drawing shows them
    (QUERY_COLOUR, "query (its box drawn)"),
    (COLOURS["positive"], "positive"),
    (COLOURS["junk"], "junk (ignored)"),
    (COLOURS["negative"], "negative"),
    (COLOURS[None], "no ground truth"),
)
THUMB = 112


def check_show_path(path: str | os.PathLike, option: str = "--show") -> None:
    """Before the work: `path` is a writable .png / .html file, or a one-line UserError naming it."""
    if Path(path).suffix.lower() not in SUFFIXES:
        raise UserError(f"{option} {path}: expected a .png or .html file")
    check_writable_file(path, option)


def image_url(path: str | os.PathLike, page_dir: str | os.PathLike) -> str:
    """The link from an HTML page in `page_dir` to image `path`: relative (URL-quoted) where the image lies
    below `page_dir`, else its absolute `file://` URI; never HTML-escaped (the caller escapes)."""
    target, base = Path(os.path.abspath(path)), Path(os.path.abspath(page_dir))
    if target.is_relative_to(base):
        return quote(target.relative_to(base).as_posix())
    return target.as_uri()


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
        ImageDraw.Draw(img).rectangle(list(bbx), outline=QUERY_COLOUR, width=max(2, max(img.size) // 100))
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
    legend = _legend(labels is not None)
    width = max((k + 1) * cell + pad, 110 * len(legend) + pad)
    canvas = Image.new("RGB", (width, text + 2 * pad + max(len(queries), 1) * (cell + text)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, meaning) in enumerate(legend):  # the legend: one swatch and its meaning each
        x = pad + 110 * i
        draw.rectangle([x, pad, x + 10, pad + 10], fill=colour, outline=(0, 0, 0))
        draw.text((x + 14, pad), meaning, fill=(0, 0, 0))
    for r, q in enumerate(queries):
        y = text + 2 * pad + r * (cell + text)
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


def _legend(labelled: bool) -> tuple[tuple[tuple[int, int, int], str], ...]:
    """The legend entries of a drawing: the query's frame, and the label frames where hits are labelled."""
    return LEGEND if labelled else ((QUERY_COLOUR, "query (its box drawn)"), (COLOURS[None], "hit (no ground truth)"))


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def _html(out, queries, bbxs, hits, scores, labels, thumb, captions) -> Path:
    def img(path: str, border: tuple[int, int, int], title: str) -> str:
        url = html.escape(image_url(path, out.parent), quote=True)
        return (
            f'<figure><a href="{url}"><img src="{url}" alt="{html.escape(Path(path).name, quote=True)}" '
            f'style="max-width:{thumb}px;max-height:{thumb}px;border:4px solid {_hex(border)}"></a>'
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )

    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{_hex(c)}"></span>{html.escape(m)}</span>'
        for c, m in _legend(labels is not None)
    )
    rows = [f'<div class="legend">Frames: {legend}; under each hit its score and name.</div>']
    for r, q in enumerate(queries):
        box = f" box {tuple(round(v) for v in bbxs[r])}" if bbxs[r] is not None else ""
        cells = [img(q, QUERY_COLOUR, captions[r] + box)]
        for c, h in enumerate(hits[r]):
            label = labels[r][c] if labels is not None else None
            cells.append(img(h, COLOURS[label], f"{scores[r][c]:.3f} {Path(h).stem}"))
        rows.append(f'<div class="row">{"".join(cells)}</div>')
    style = (
        "figure{display:inline-block;margin:4px;font:11px sans-serif;text-align:center}.row{white-space:nowrap}"
        ".legend{font:12px sans-serif;margin:4px}.key{margin-right:12px}.swatch{display:inline-block;width:10px;"
        "height:10px;border:1px solid #000;margin-right:4px}"
    )
    with atomic_write(out) as f:
        f.write(f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>\n")
        f.write("\n".join(rows))
        f.write("\n</body></html>\n")
    return out
