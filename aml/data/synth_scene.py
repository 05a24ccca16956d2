"""Synthetic landmarks: a procedural facade grammar (blocks, floors, windows, doors, roofs, ornaments,
textures) sampled per landmark and rendered once, flat and frontal, as an RGBA image (alpha = the building).

Landmarks share one building vocabulary and one palette of materials, so they are confusable the way real
facades are (many beige buildings with rows of arched windows); what makes each one distinct is its layout:
archetype, block proportions, floor and column counts, window kinds per floor, roof, texture and ornaments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

GROUND = 0.94  # ground line, as a fraction of the canvas height

MATERIALS: dict[str, tuple[int, int, int]] = {
    "limestone": (214, 204, 178),
    "sandstone": (200, 166, 118),
    "brick": (158, 72, 52),
    "dark-brick": (112, 62, 48),
    "marble": (228, 226, 218),
    "granite": (150, 148, 146),
    "slate-stone": (96, 98, 104),
    "ochre": (208, 152, 74),
    "rose": (212, 162, 150),
    "cream": (232, 214, 160),
    "blue-grey": (122, 136, 150),
    "terracotta": (182, 96, 64),
}
ROOFS: tuple[tuple[int, int, int], ...] = (
    (70, 74, 84),
    (110, 140, 124),
    (150, 70, 50),
    (60, 60, 64),
    (120, 96, 80),
)
TRIMS: tuple[tuple[int, int, int], ...] = (
    (238, 234, 224),
    (190, 180, 160),
    (80, 80, 84),
    (140, 110, 80),
    (226, 206, 150),
)
GLASS: tuple[tuple[int, int, int], ...] = (
    (40, 52, 70),
    (28, 30, 36),
    (70, 90, 110),
    (52, 64, 58),
    (90, 80, 70),
)
WINDOWS = ("rect", "arch", "gothic", "round", "twin", "shutter", "tall")
TEXTURES = ("brick", "ashlar", "stripes", "plain", "panels")
ROOF_KINDS = ("flat", "gable", "mansard", "dome", "crenel", "spire", "stepped")
ARCHETYPES = ("palace", "church", "tower", "domed", "row", "temple")

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Block:
    """One box of a building: extent and top (canvas fractions), floors x window columns, styles."""

    x0: float
    x1: float
    top: float
    floors: int
    cols: int
    windows: tuple[str, ...]  # window kind per floor, ground floor first
    win_w: float  # window width / column width
    win_h: float  # window height / floor height
    door: str  # none | rect | arch | arcade
    roof: str
    roof_h: float  # roof height, canvas fraction
    wall: RGB
    wall2: RGB  # second tone (stripes, quoins, ground floor)
    trim: RGB
    roof_col: RGB
    texture: str
    tex_scale: float  # texture period, canvas fraction
    bands: bool
    pilasters: bool
    blind: tuple[int, ...]  # window positions (floor * cols + col) walled up: a landmark's fingerprint
    ornament: str  # none | rose | clock | banner | niches | columns


@dataclass(frozen=True)
class Landmark:
    """A landmark = a few blocks drawn in order, a glass colour and a seed for its texture details."""

    archetype: str
    blocks: tuple[Block, ...]
    glass: RGB
    seed: int


class Draw(ImageDraw.ImageDraw):
    """ImageDraw that accepts boxes with corners in any order (procedural boxes can come out flipped)."""

    @staticmethod
    def _sorted(xy):
        x0, y0, x1, y1 = xy
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    def rectangle(self, xy, *args, **kwargs):
        return super().rectangle(self._sorted(xy), *args, **kwargs)

    def ellipse(self, xy, *args, **kwargs):
        return super().ellipse(self._sorted(xy), *args, **kwargs)

    def pieslice(self, xy, *args, **kwargs):
        return super().pieslice(self._sorted(xy), *args, **kwargs)


def jitter(rng: np.random.Generator, rgb: RGB, amount: float = 18) -> RGB:
    """`rgb` with Gaussian noise of std `amount` per channel, clipped to 0..255."""
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def pick(rng: np.random.Generator, seq):
    """A uniformly random element of a sequence."""
    return seq[int(rng.integers(len(seq)))]


def sample_block(
    rng: np.random.Generator,
    x0: float,
    x1: float,
    top: float,
    *,
    roof: str | None = None,
    palette: tuple[RGB, RGB, RGB, RGB] | None = None,
    ornament: str = "none",
) -> Block:
    """A random block spanning [x0, x1] from `top` down to the ground, in the shared vocabulary."""
    height = GROUND - top
    floors = int(np.clip(round(height / rng.uniform(0.07, 0.12)), 1, 9))
    cols = int(np.clip(round((x1 - x0) / rng.uniform(0.05, 0.11)), 1, 13))
    upper = pick(rng, WINDOWS)
    windows = [upper] * floors
    if floors > 2 and rng.random() < 0.6:  # piano nobile / attic storey in another style
        windows[1] = pick(rng, WINDOWS)
    if floors > 3 and rng.random() < 0.5:
        windows[-1] = pick(rng, ("round", "rect", "twin"))
    windows[0] = pick(rng, ("rect", "arch", "tall", upper))
    if palette is None:
        names = list(MATERIALS)
        wall = jitter(rng, MATERIALS[pick(rng, names)])
        wall2 = jitter(rng, MATERIALS[pick(rng, names)])
        palette = (wall, wall2, jitter(rng, pick(rng, TRIMS), 10), jitter(rng, pick(rng, ROOFS), 12))
    n_blind = int(rng.integers(0, max(1, floors * cols // 4) + 1))
    blind = tuple(sorted(set(rng.integers(0, floors * cols, n_blind).tolist())))
    return Block(
        x0=x0,
        x1=x1,
        top=top,
        floors=floors,
        cols=cols,
        windows=tuple(windows),
        win_w=rng.uniform(0.38, 0.7),
        win_h=rng.uniform(0.42, 0.72),
        door=pick(rng, ("none", "rect", "arch", "arcade")),
        roof=roof or pick(rng, ROOF_KINDS),
        roof_h=rng.uniform(0.05, 0.16),
        wall=palette[0],
        wall2=palette[1],
        trim=palette[2],
        roof_col=palette[3],
        texture=pick(rng, TEXTURES),
        tex_scale=rng.uniform(0.012, 0.03),
        bands=bool(rng.random() < 0.6),
        pilasters=bool(rng.random() < 0.4),
        blind=blind,
        ornament=ornament,
    )


def _palace(rng: np.random.Generator) -> list[Block]:
    """A wide block with a flat or mansard roof, often a central pavilion."""
    u = rng.uniform
    w = u(0.6, 0.9)
    x0 = 0.5 - w / 2
    blocks = [sample_block(rng, x0, x0 + w, u(0.38, 0.6), roof=pick(rng, ("flat", "mansard")))]
    if rng.random() < 0.7:  # central pavilion
        pw = w * u(0.2, 0.35)
        blocks.append(
            sample_block(
                rng,
                0.5 - pw / 2,
                0.5 + pw / 2,
                blocks[0].top - u(0.04, 0.12),
                roof=pick(rng, ("gable", "dome", "mansard")),
                ornament=pick(rng, ("clock", "columns", "none")),
            )
        )
    return blocks


def _church(rng: np.random.Generator) -> list[Block]:
    """A gabled nave with a rose window and one or two towers in its materials."""
    u = rng.uniform
    w = u(0.35, 0.55)
    blocks = [sample_block(rng, 0.5 - w / 2, 0.5 + w / 2, u(0.3, 0.5), roof="gable", ornament="rose")]
    tw = u(0.1, 0.16)
    roof = pick(rng, ("spire", "crenel", "dome"))
    sides = (-1, 1) if rng.random() < 0.6 else (pick(rng, (-1, 1)),)
    for s in sides:
        xc = 0.5 + s * (w / 2 + tw / 2 - 0.01)
        blocks.append(
            sample_block(
                rng,
                xc - tw / 2,
                xc + tw / 2,
                u(0.12, 0.25),
                roof=roof,
                palette=(blocks[0].wall, blocks[0].wall2, blocks[0].trim, blocks[0].roof_col),
                ornament=pick(rng, ("clock", "none")),
            )
        )
    return blocks


def _tower(rng: np.random.Generator) -> list[Block]:
    """A tall clock tower, usually between two low wings."""
    u = rng.uniform
    blocks = []
    for s in (-1, 1):
        if rng.random() < 0.8:
            ww = u(0.15, 0.3)
            xa = 0.5 + s * 0.05
            blocks.append(sample_block(rng, min(xa, xa + s * ww), max(xa, xa + s * ww), u(0.55, 0.72)))
    tw = u(0.14, 0.24)
    blocks.append(
        sample_block(
            rng,
            0.5 - tw / 2,
            0.5 + tw / 2,
            u(0.1, 0.22),
            roof=pick(rng, ("spire", "dome", "crenel", "flat")),
            ornament="clock",
        )
    )
    return blocks


def _domed(rng: np.random.Generator) -> list[Block]:
    """A flat-roofed hall under a central dome."""
    u = rng.uniform
    w = u(0.5, 0.85)
    blocks = [
        sample_block(
            rng,
            0.5 - w / 2,
            0.5 + w / 2,
            u(0.45, 0.62),
            roof="flat",
            ornament=pick(rng, ("columns", "niches", "none")),
        )
    ]
    dw = w * u(0.3, 0.5)
    blocks.append(sample_block(rng, 0.5 - dw / 2, 0.5 + dw / 2, blocks[0].top - u(0.1, 0.16), roof="dome"))
    return blocks


def _row(rng: np.random.Generator) -> list[Block]:
    """A row of two to four narrow houses side by side."""
    u = rng.uniform
    n = int(rng.integers(2, 5))
    widths = rng.uniform(0.14, 0.24, n)
    x = 0.5 - widths.sum() / 2
    blocks = []
    for wi in widths:
        blocks.append(
            sample_block(
                rng,
                x,
                x + wi,
                u(0.3, 0.55),
                roof=pick(rng, ("stepped", "gable", "flat")),
                ornament=pick(rng, ("banner", "none", "none")),
            )
        )
        x += wi
    return blocks


def _temple(rng: np.random.Generator) -> list[Block]:
    """A temple or museum with a gabled portico."""
    u = rng.uniform
    w = u(0.55, 0.85)
    return [
        sample_block(
            rng,
            0.5 - w / 2,
            0.5 + w / 2,
            u(0.42, 0.6),
            roof="gable",
            ornament=pick(rng, ("columns", "niches")),
        )
    ]


# One block-layout builder per archetype (each draws from the generator in a fixed order: the set's bytes).
ARCHETYPE_BLOCKS: dict[str, Callable[[np.random.Generator], list[Block]]] = dict(
    zip(ARCHETYPES, (_palace, _church, _tower, _domed, _row, _temple), strict=True)
)


def sample_landmark(rng: np.random.Generator) -> Landmark:
    """A landmark: an archetype (palace, church, tower, domed hall, row of houses, temple), random layout."""
    kind = pick(rng, ARCHETYPES)
    blocks = ARCHETYPE_BLOCKS[kind](rng)
    return Landmark(
        archetype=kind,
        blocks=tuple(blocks),
        glass=jitter(rng, pick(rng, GLASS), 10),
        seed=int(rng.integers(2**31)),
    )


def texture_gain(kind: str, h: int, w: int, period: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (gain around 1, second-tone weight in [0, 1]) maps of a wall texture, vectorised."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    p = max(period, 2.0)
    table = rng.normal(0, 1, 4096).astype(np.float32)
    tone = np.zeros((h, w), np.float32)
    if kind in ("brick", "ashlar"):
        bh, bw = (p, 2.2 * p) if kind == "brick" else (1.8 * p, 3.2 * p)
        row = np.floor(yy / bh)
        xo = xx + (row % 2) * bw / 2
        col = np.floor(xo / bw)
        mortar = (yy % bh < max(1.0, 0.14 * bh)) | (xo % bw < max(1.0, 0.08 * bw))
        jit = table[((row * 131 + col * 71) % 4096).astype(np.int64)]
        gain = np.where(mortar, 0.78 if kind == "brick" else 0.86, 1 + (0.09 if kind == "brick" else 0.05) * jit)
    elif kind == "stripes":
        tone = ((yy // (1.6 * p)) % 2).astype(np.float32)
        gain = 1 + 0.03 * table[(yy.astype(np.int64) * 7 + xx.astype(np.int64) * 13) % 4096]
    elif kind == "panels":
        gain = np.where((xx % (4 * p)) < 0.25 * p, 0.86, 1.0) * np.where((yy % (6 * p)) < 0.2 * p, 0.9, 1.0)
    else:
        gain = np.ones((h, w), np.float32)
    # weathering: vertical streaks and low-frequency blotches, common to all textures
    lo = rng.normal(0, 1, (max(2, h // 24), max(2, w // 12))).astype(np.float32)
    lo_img = Image.fromarray(lo).resize((w, h), Image.BICUBIC)
    gain = gain * (1 + 0.05 * np.asarray(lo_img, np.float32))
    return gain.astype(np.float32), tone


def _window(d: Draw, box: tuple[float, float, float, float], kind: str, glass: RGB, trim: RGB, wall2: RGB) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    fw = max(1.0, 0.12 * w)
    if kind == "round":
        r = min(w, h) / 2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=trim)
        d.ellipse((cx - r + fw, cy - r + fw, cx + r - fw, cy + r - fw), fill=glass)
        d.line((cx - r + fw, cy, cx + r - fw, cy), fill=trim, width=max(1, int(fw / 2)))
        return
    if kind == "twin":
        g = 0.18 * w
        _window(d, (x0, y0, x0 + (w - g) / 2, y1), "arch", glass, trim, wall2)
        _window(d, (x1 - (w - g) / 2, y0, x1, y1), "arch", glass, trim, wall2)
        return
    if kind == "shutter":
        sw = 0.3 * w
        d.rectangle((x0 - sw, y0, x0, y1), fill=wall2)
        d.rectangle((x1, y0, x1 + sw, y1), fill=wall2)
    top = y0
    if kind in ("arch", "tall"):
        top = y0 + w / 2
        d.pieslice((x0, y0, x1, y0 + w), 180, 360, fill=trim)
        d.pieslice((x0 + fw, y0 + fw, x1 - fw, y0 + w - fw), 180, 360, fill=glass)
    elif kind == "gothic":
        top = y0 + 0.6 * w
        d.polygon([(x0, top), ((x0 + x1) / 2, y0), (x1, top)], fill=trim)
        d.polygon([(x0 + fw, top), ((x0 + x1) / 2, y0 + 1.6 * fw), (x1 - fw, top)], fill=glass)
    d.rectangle((x0, top, x1, y1), fill=trim)
    d.rectangle((x0 + fw, top, x1 - fw, y1 - fw), fill=glass)
    d.line(((x0 + x1) / 2, top, (x0 + x1) / 2, y1), fill=trim, width=max(1, int(fw / 2)))
    if kind != "tall":
        d.line((x0, (top + y1) / 2, x1, (top + y1) / 2), fill=trim, width=max(1, int(fw / 2)))
    else:  # balcony
        d.rectangle((x0 - fw, y1 - 0.25 * h, x1 + fw, y1), outline=trim, width=max(1, int(fw / 2)))


def _roof(d: Draw, b: Block, px: int, rng: np.random.Generator, glass: RGB) -> None:
    x0, x1, top = b.x0 * px, b.x1 * px, b.top * px
    w, rh = x1 - x0, b.roof_h * px
    cx = (x0 + x1) / 2
    cor = max(2.0, 0.012 * px)
    if b.roof == "flat":
        d.rectangle((x0 - cor, top - cor, x1 + cor, top + cor / 2), fill=b.trim)
        if rng.random() < 0.6:  # balustrade
            n = max(3, int(w / (0.02 * px)))
            for x in np.linspace(x0, x1, n):
                d.rectangle((x - cor / 3, top - 3 * cor, x + cor / 3, top - cor), fill=b.trim)
            d.rectangle((x0, top - 3.4 * cor, x1, top - 2.8 * cor), fill=b.trim)
    elif b.roof == "gable":
        d.polygon([(x0 - cor, top), (cx, top - rh), (x1 + cor, top)], fill=b.trim)
        d.polygon(
            [(x0 + 2 * cor, top - cor / 2), (cx, top - rh + 2 * cor), (x1 - 2 * cor, top - cor / 2)],
            fill=b.wall,
        )
    elif b.roof == "mansard":
        d.polygon([(x0, top), (x0 + 0.08 * w, top - rh), (x1 - 0.08 * w, top - rh), (x1, top)], fill=b.roof_col)
        for x in np.linspace(x0 + 0.18 * w, x1 - 0.18 * w, max(1, b.cols // 2)):
            ww = 0.35 * w / max(1, b.cols)
            _window(d, (x - ww / 2, top - 0.75 * rh, x + ww / 2, top - 0.1 * rh), "arch", glass, b.trim, b.wall2)
        d.rectangle((x0 - cor, top - cor / 2, x1 + cor, top + cor / 2), fill=b.trim)
    elif b.roof == "dome":
        dh = max(rh, 0.45 * w)
        d.rectangle((x0 + 0.05 * w, top - 0.2 * dh, x1 - 0.05 * w, top), fill=b.wall2)
        d.pieslice((x0 + 0.05 * w, top - 1.2 * dh, x1 - 0.05 * w, top + 0.6 * dh), 180, 360, fill=b.roof_col)
        for x in np.linspace(x0 + 0.2 * w, x1 - 0.2 * w, 4):
            d.line(
                (x, top - 0.28 * dh, cx + (x - cx) * 0.3, top - 0.85 * dh),
                fill=b.trim,
                width=max(1, int(cor / 2)),
            )
        d.rectangle((cx - 0.06 * w, top - 1.0 * dh, cx + 0.06 * w, top - 0.8 * dh), fill=b.trim)
        d.line((cx, top - 1.15 * dh, cx, top - 0.95 * dh), fill=b.roof_col, width=max(1, int(cor)))
    elif b.roof == "crenel":
        n = max(3, int(w / (0.03 * px)) | 1)
        mw = w / n
        for i in range(0, n, 2):
            d.rectangle((x0 + i * mw, top - 0.4 * rh, x0 + (i + 1) * mw, top), fill=b.wall)
    elif b.roof == "spire":
        d.polygon([(x0, top), (cx, top - 3.0 * rh - 0.4 * w), (x1, top)], fill=b.roof_col)
        d.line(
            (cx, top - 3.0 * rh - 0.4 * w - 2 * cor, cx, top - 3.0 * rh - 0.4 * w),
            fill=b.trim,
            width=max(1, int(cor / 2)),
        )
    else:  # stepped gable
        steps = 4
        pts = [(x0, top)]
        for i in range(steps):
            y = top - (i + 1) * rh / steps
            pts += [(x0 + i * w / (2 * steps + 1), y), (x0 + (i + 1) * w / (2 * steps + 1), y)]
        pts += [(x1 - p[0] + x0, p[1]) for p in reversed(pts)]
        d.polygon(pts, fill=b.wall)
        d.ellipse((cx - 0.08 * w, top - 0.55 * rh, cx + 0.08 * w, top - 0.55 * rh + 0.16 * w), fill=b.trim)


def _ornament(d: Draw, b: Block, px: int, rng: np.random.Generator, glass: RGB) -> None:
    x0, x1, top = b.x0 * px, b.x1 * px, b.top * px
    w, cx = x1 - x0, (x0 + x1) / 2
    if b.ornament in ("rose", "clock"):
        r = 0.22 * w if b.ornament == "rose" else 0.3 * w
        cy = top + 1.3 * r if b.ornament == "rose" else top + 1.2 * r
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=b.trim)
        d.ellipse(
            (cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r),
            fill=glass if b.ornament == "rose" else (238, 236, 226),
        )
        n = 12 if b.ornament == "rose" else 2
        ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, np.pi)
        lens = np.full(n, 0.85 * r) if b.ornament == "rose" else np.array([0.75 * r, 0.5 * r])
        for a, ln in zip(ang, lens, strict=True):
            d.line(
                (cx, cy, cx + ln * np.cos(a), cy + ln * np.sin(a)),
                fill=b.trim if b.ornament == "rose" else (30, 30, 30),
                width=max(1, int(0.06 * r)),
            )
    elif b.ornament == "banner":
        y = top + 0.1 * (GROUND * px - top)
        bh = 0.06 * (GROUND * px - top) + 4
        col = jitter(rng, pick(rng, ((160, 30, 30), (30, 60, 120), (30, 100, 60), (200, 170, 40))), 20)
        d.rectangle((x0 + 0.1 * w, y, x1 - 0.1 * w, y + bh), fill=col)
        for x in np.arange(x0 + 0.14 * w, x1 - 0.14 * w, 0.06 * w):
            if rng.random() < 0.8:  # glyphs of a sign
                d.rectangle((x, y + 0.25 * bh, x + 0.035 * w, y + 0.75 * bh), fill=(240, 236, 220))
    elif b.ornament == "columns":
        g = GROUND * px
        ch = 0.55 * (g - top)
        n = int(rng.integers(4, 9))
        cw = 0.6 * w / (n * 1.8)
        pw = w * 0.8
        for x in np.linspace(cx - pw / 2 + cw, cx + pw / 2 - cw, n):
            d.rectangle((x - cw / 2, g - ch, x + cw / 2, g), fill=b.trim)
            d.line((x - cw / 4, g - ch, x - cw / 4, g), fill=jitter(rng, b.trim, 0), width=1)
        d.rectangle((cx - pw / 2, g - ch - 0.05 * ch, cx + pw / 2, g - ch), fill=b.trim)
        d.polygon(
            [(cx - pw / 2, g - ch - 0.05 * ch), (cx, g - ch - 0.3 * ch), (cx + pw / 2, g - ch - 0.05 * ch)],
            fill=b.wall2,
        )
    elif b.ornament == "niches":
        fh = (GROUND * px - top) / b.floors
        for x in np.linspace(x0 + 0.12 * w, x1 - 0.12 * w, 2):
            y = top + 0.2 * fh
            d.pieslice((x - 0.04 * w, y, x + 0.04 * w, y + 0.08 * w), 180, 360, fill=b.wall2)
            d.rectangle((x - 0.04 * w, y + 0.04 * w, x + 0.04 * w, y + 0.6 * fh), fill=b.wall2)
            d.ellipse((x - 0.015 * w, y + 0.05 * w, x + 0.015 * w, y + 0.08 * w), fill=b.trim)  # statue
            d.rectangle((x - 0.02 * w, y + 0.08 * w, x + 0.02 * w, y + 0.55 * fh), fill=b.trim)


def _facade(img: Image.Image, b: Block, px: int, rng: np.random.Generator, glass: RGB) -> None:
    """Textured wall, bands, pilasters, windows and door of one block, drawn onto `img`."""
    x0, x1 = int(round(b.x0 * px)), int(round(b.x1 * px))
    y0, y1 = int(round(b.top * px)), int(round(GROUND * px))
    h, w = max(1, y1 - y0), max(1, x1 - x0)
    gain, tone = texture_gain(b.texture, h, w, b.tex_scale * px, rng)
    shade = np.linspace(1.04, 0.9, h, dtype=np.float32)[:, None]  # darker towards the street
    rgb = np.asarray(b.wall, np.float32) * (1 - tone[..., None]) + np.asarray(b.wall2, np.float32) * tone[..., None]
    rgb = np.clip(rgb * (gain * shade)[..., None], 0, 255).astype(np.uint8)
    img.paste(Image.fromarray(np.dstack([rgb, np.full((h, w), 255, np.uint8)])), (x0, y0))
    d = Draw(img)
    fh, cw = h / b.floors, w / b.cols
    if b.pilasters:
        for i in range(b.cols + 1):
            x = x0 + i * cw
            d.rectangle((x - 0.06 * cw, y0, x + 0.06 * cw, y1), fill=b.trim)
    for f in range(b.floors):
        fy1 = y1 - f * fh
        fy0 = fy1 - fh
        if b.bands and f > 0:
            d.rectangle((x0, fy1 - 0.06 * fh, x1, fy1), fill=b.trim)
            d.rectangle((x0, fy1, x1, fy1 + 0.04 * fh), fill=_shade(b.wall, 0.7))
        for c in range(b.cols):
            cx = x0 + (c + 0.5) * cw
            ww, wh = b.win_w * cw, b.win_h * fh
            box = (cx - ww / 2, fy0 + (fh - wh) * 0.55, cx + ww / 2, fy0 + (fh - wh) * 0.55 + wh)
            if f == 0 and b.door != "none" and (c == b.cols // 2 or b.door == "arcade"):
                dw = min(cw * 0.8, ww * 1.5)
                kind = "rect" if b.door == "rect" else "arch"
                _window(
                    d,
                    (cx - dw / 2, fy0 + 0.12 * fh, cx + dw / 2, fy1),
                    kind,
                    _shade(glass, 0.6),
                    b.trim,
                    b.wall2,
                )
            elif f * b.cols + c in b.blind:
                d.rectangle(box, fill=_shade(b.wall, 0.85))
            else:
                _window(d, box, b.windows[f], glass, b.trim, b.wall2)


def _shade(rgb: RGB, k: float) -> RGB:
    return tuple(int(c * k) for c in rgb)  # type: ignore[return-value]


def render_landmark(lm: Landmark, px: int) -> np.ndarray:
    """Render a landmark frontally on a transparent square canvas of side `px`: (px, px, 4) uint8 RGBA."""
    rng = np.random.default_rng(lm.seed)
    img = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    for b in lm.blocks:
        _roof(Draw(img), b, px, rng, lm.glass)
        _facade(img, b, px, rng, lm.glass)
        _ornament(Draw(img), b, px, rng, lm.glass)
    return np.asarray(img)
