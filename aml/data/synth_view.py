"""Photographing a synthetic landmark: a pinhole camera looking at the facade plane (perspective, scale, crop,
roll), a street around it (sky, ground, clutter buildings), foreground occluders (trees, buses, people, lamps,
scaffolding, a nearby building's edge), lighting (exposure, white balance, cast shadow, haze, night), blur,
noise and JPEG. Every view also reports what it shows: the fraction of the landmark visible, the fraction
occluded, how much of the image it covers and its box, from which easy / hard / junk are decided."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from aml.data.synth_scene import GLASS, GROUND, MATERIALS, Draw, jitter, pick

SKIES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "clear": ((70, 128, 200), (184, 212, 236)),
    "overcast": ((146, 150, 158), (206, 206, 210)),
    "sunset": ((62, 60, 118), (242, 156, 92)),
    "night": ((8, 10, 26), (40, 40, 70)),
}


@dataclass(frozen=True)
class Scene:
    """A rendered landmark: RGBA pixels, its box on the canvas, a grid of points on the building."""

    rgba: np.ndarray
    box: tuple[float, float, float, float]
    points: np.ndarray  # (M, 2) x, y on the building, for visibility measurement

    @classmethod
    def from_rgba(cls, rgba: np.ndarray, stride: int = 4) -> Scene:
        a = rgba[..., 3] > 0
        ys, xs = np.nonzero(a)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        gy, gx = np.nonzero(a[::stride, ::stride])
        return cls(rgba=rgba, box=box, points=np.stack([gx, gy], 1).astype(np.float64) * stride + stride / 2)


@dataclass(frozen=True)
class ViewSpec:
    """How a photograph is taken: camera pose and framing, surroundings, light and degradations."""

    yaw: float
    pitch: float
    roll: float
    dist: float  # camera distance in landmark sizes: smaller = stronger perspective
    scale: float  # the landmark's projected size / the image's longest side
    cx: float  # where the landmark's centre lands, fractions of width / height
    cy: float
    aspect: float  # width / height
    sky: str
    clutter: int
    occluders: int
    occ_size: float  # occluder size, fraction of the image height
    exposure: float
    warmth: float
    shadow: float
    haze: float
    blur: float
    noise: float
    quality: int
    harsh: bool  # lighting strong enough to make the view hard on its own


@dataclass(frozen=True)
class ViewInfo:
    """What a view shows of its landmark."""

    visible: float  # fraction of the building's surface in frame and not occluded
    occluded: float  # fraction of the in-frame building hidden by occluders
    coverage: float  # fraction of the image covered by the visible building
    bbx: list[float]  # the building's box in the image [x1, y1, x2, y2], clipped to the image


# Over 60 lines on purpose: one straight sequence of seeded draws, in the order that makes a seed give the same
# set byte for byte; split into helpers, the draw order would be easy to change by accident.
def sample_view(rng: np.random.Generator, level: str) -> ViewSpec:
    """Draw a view of the given difficulty: `query` (clean, frontal), `easy`, `hard` (strong viewpoint, crop,
    occlusion, distance or light; two of them) or `junk` (too little of the landmark: extreme zoom, out of
    frame, tiny, or buried)."""
    u = rng.uniform
    p = dict(
        yaw=u(-25, 25),
        pitch=u(-10, 10),
        roll=u(-6, 6),
        dist=u(1.8, 4.0),
        scale=u(0.45, 0.95),
        cx=0.5 + u(-0.12, 0.12),
        cy=0.5 + u(-0.1, 0.1),
        aspect=pick(rng, (4 / 3, 3 / 4, 1.0, 3 / 2)),
        sky=pick(rng, ("clear", "clear", "overcast", "sunset")),
        clutter=int(rng.integers(1, 5)),
        occluders=int(rng.integers(0, 3)),
        occ_size=u(0.15, 0.35),
        exposure=u(0.75, 1.25),
        warmth=u(-0.1, 0.1),
        shadow=u(0, 0.35),
        haze=u(0, 0.15),
        blur=u(0, 1.0),
        noise=u(0, 5),
        quality=int(rng.integers(75, 96)),
        harsh=False,
    )
    if level == "query":
        p.update(
            yaw=u(-15, 15),
            pitch=u(-6, 6),
            roll=u(-3, 3),
            dist=u(2.2, 4.0),
            scale=u(0.6, 0.85),
            cx=0.5 + u(-0.05, 0.05),
            cy=0.5 + u(-0.05, 0.05),
            occluders=int(rng.integers(0, 2)),
            occ_size=u(0.12, 0.25),
            sky=pick(rng, ("clear", "overcast")),
            exposure=u(0.85, 1.15),
            shadow=u(0, 0.2),
            haze=u(0, 0.08),
            blur=u(0, 0.5),
            noise=u(0, 3),
            quality=int(rng.integers(85, 96)),
        )
    elif level == "hard":  # one strong change, sometimes two
        for f in rng.choice(5, size=1 if rng.random() < 0.8 else 2, replace=False):
            if f == 0:  # strong viewpoint change
                p.update(yaw=pick(rng, (-1, 1)) * u(33, 50), pitch=u(-12, 12), dist=u(1.6, 2.5))
            elif f == 1:  # close-up: only part of the landmark in frame
                p.update(scale=u(1.25, 1.7), cx=0.5 + u(-0.25, 0.25), cy=0.5 + u(-0.2, 0.2))
            elif f == 2:  # heavy occlusion
                p.update(occluders=int(rng.integers(2, 4)), occ_size=u(0.3, 0.5))
            elif f == 3:  # harsh light: night, dusk, cast shadow, haze
                p.update(
                    sky=pick(rng, ("night", "sunset", "overcast")),
                    exposure=u(0.45, 0.75),
                    shadow=u(0.4, 0.65),
                    haze=u(0.12, 0.3),
                    warmth=u(-0.2, 0.25),
                    harsh=True,
                )
            else:  # far away in a cluttered street
                p.update(scale=u(0.3, 0.42), clutter=int(rng.integers(3, 7)), cx=u(0.3, 0.7))
    elif level == "junk":
        f = int(rng.integers(4))
        if f == 0:  # extreme zoom on a detail
            p.update(scale=u(3.0, 5.0), cx=0.5 + u(-1.2, 1.2), cy=0.5 + u(-1.0, 1.0))
        elif f == 1:  # mostly out of frame
            p.update(scale=u(0.7, 1.2), cx=pick(rng, (-1, 1)) * u(0.55, 0.75) + 0.5)
        elif f == 2:  # tiny in the distance
            p.update(scale=u(0.08, 0.15), clutter=int(rng.integers(4, 8)), cx=u(0.15, 0.85))
        else:  # buried behind occluders
            p.update(occluders=int(rng.integers(5, 8)), occ_size=u(0.6, 0.9), scale=u(0.5, 0.8))
    return ViewSpec(**p)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    a, b, c = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _apply(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    p = np.c_[xy, np.ones(len(xy))] @ h.T
    return p[:, :2] / p[:, 2:3]


def homography(box: tuple[float, float, float, float], spec: ViewSpec, w: int, h: int) -> np.ndarray:
    """3x3 map from scene pixels to image pixels: the facade plane seen by a rotated pinhole camera, then
    scaled and shifted so the landmark's box has the requested size and centre."""
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0)
    norm = np.array([[1 / size, 0, -(x0 + x1) / (2 * size)], [0, 1 / size, -(y0 + y1) / (2 * size)], [0, 0, 1]])
    r = _rotation(spec.yaw, spec.pitch, spec.roll)
    cam = np.diag([spec.dist, spec.dist, 1.0]) @ np.c_[r[:, 0], r[:, 1], [0, 0, spec.dist]]
    hn = cam @ norm
    corners = _apply(hn, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    lo, hi = corners.min(0), corners.max(0)
    k = spec.scale * max(w, h) / max(hi - lo)
    c = (lo + hi) / 2
    place = np.array([[k, 0, spec.cx * w - k * c[0]], [0, k, spec.cy * h - k * c[1]], [0, 0, 1]])
    return place @ hn


def _background(w: int, h: int, spec: ViewSpec, ground_y: float, rng: np.random.Generator) -> Image.Image:
    """Sky with clouds, the street below the landmark's ground line and unrelated buildings."""
    top, bottom = (np.asarray(c, np.float32) for c in SKIES[spec.sky])
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = top * (1 - t) + bottom * t + np.zeros((1, w, 1), np.float32)
    if spec.sky in ("clear", "overcast"):
        lo = rng.normal(0, 1, (4, 6)).astype(np.float32)
        cloud = np.asarray(Image.fromarray(lo).resize((w, h), Image.BICUBIC), np.float32)
        a = np.clip(cloud - 0.3, 0, 1)[..., None] * (0.6 if spec.sky == "clear" else 0.3)
        sky = sky * (1 - a) + 235 * a
    img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8)).convert("RGBA")
    d = Draw(img)
    gy = int(np.clip(ground_y, h * 0.3, h))
    for _ in range(spec.clutter):  # unrelated buildings, same vocabulary: windows in a grid
        bw, bh = rng.uniform(0.15, 0.5) * w, rng.uniform(0.25, 0.8) * h
        bx = rng.uniform(-0.1 * w, w)
        wall = jitter(rng, MATERIALS[pick(rng, list(MATERIALS))], 25)
        glass = jitter(rng, pick(rng, GLASS), 15)
        d.rectangle((bx, gy - bh, bx + bw, gy), fill=wall)
        nx, ny = int(rng.integers(2, 7)), int(rng.integers(2, 9))
        cw, ch = bw / nx, bh / ny
        ww, wh = rng.uniform(0.3, 0.6) * cw, rng.uniform(0.3, 0.6) * ch
        for i in range(nx):
            for j in range(ny - 1):
                x, y = bx + (i + 0.5) * cw, gy - bh + (j + 0.5) * ch
                d.rectangle((x - ww / 2, y - wh / 2, x + ww / 2, y + wh / 2), fill=glass)
    if gy < h:
        pave = jitter(rng, pick(rng, ((118, 118, 120), (150, 142, 130), (90, 92, 96))), 10)
        d.rectangle((0, gy, w, h), fill=pave)
        for y in np.linspace(gy, h, 5)[1:]:
            d.line((0, y, w, y), fill=jitter(rng, pave, 12), width=1)
    return img


def _occluders(
    w: int, h: int, spec: ViewSpec, box: np.ndarray, ground_y: float, rng: np.random.Generator
) -> Image.Image:
    """A transparent layer of foreground objects placed over the landmark's box."""
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = Draw(layer)
    gy = float(np.clip(ground_y, 0.5 * h, h)) + rng.uniform(0, 0.05 * h)
    bx0, bx1 = float(np.clip(box[0], 0, w)), float(np.clip(box[2], 0, w))
    for _ in range(spec.occluders):
        s = spec.occ_size * h * rng.uniform(0.7, 1.3)
        x = rng.uniform(bx0 - 0.1 * w, max(bx0, bx1) + 0.1 * w)
        kind = pick(rng, ("tree", "tree", "bus", "people", "lamp", "scaffold", "edge", "car"))
        if kind == "tree":
            d.rectangle((x - 0.04 * s, gy - 0.5 * s, x + 0.04 * s, gy), fill=(80, 60, 40))
            green = jitter(rng, (60, 104, 50), 20)
            for _ in range(6):
                ox, oy, r = rng.normal(0, 0.22 * s), rng.uniform(-1.1, -0.55) * s, rng.uniform(0.2, 0.35) * s
                d.ellipse((x + ox - r, gy + oy - r, x + ox + r, gy + oy + r), fill=jitter(rng, green, 12))
        elif kind in ("bus", "car"):
            ln, ht = (1.6 * s, 0.55 * s) if kind == "bus" else (0.8 * s, 0.3 * s)
            body = jitter(rng, pick(rng, ((200, 40, 40), (230, 230, 225), (40, 70, 140), (230, 190, 40))), 20)
            d.rectangle((x - ln / 2, gy - ht, x + ln / 2, gy - 0.12 * ht), fill=body)
            for wx in np.arange(x - ln / 2 + 0.05 * ln, x + ln / 2 - 0.1 * ln, 0.16 * ln):
                d.rectangle((wx, gy - 0.9 * ht, wx + 0.11 * ln, gy - 0.55 * ht), fill=(40, 50, 60))
            for wx in (x - 0.3 * ln, x + 0.3 * ln):
                d.ellipse((wx - 0.12 * ht, gy - 0.25 * ht, wx + 0.12 * ht, gy), fill=(20, 20, 20))
        elif kind == "people":
            for _ in range(int(rng.integers(2, 6))):
                px, ph = x + rng.normal(0, 0.3 * s), 0.5 * s * rng.uniform(0.8, 1.1)
                coat = jitter(rng, (90, 80, 90), 50)
                d.rectangle((px - 0.07 * ph, gy - 0.82 * ph, px + 0.07 * ph, gy), fill=coat)
                d.ellipse(
                    (px - 0.06 * ph, gy - ph, px + 0.06 * ph, gy - 0.82 * ph),
                    fill=jitter(rng, (200, 160, 130)),
                )
        elif kind == "lamp":
            d.rectangle((x - 0.015 * s, gy - 1.4 * s, x + 0.015 * s, gy), fill=(40, 42, 40))
            d.rectangle((x - 0.06 * s, gy - 1.5 * s, x + 0.06 * s, gy - 1.38 * s), fill=(250, 230, 170))
        elif kind == "scaffold":
            x0, x1, y0 = x - 0.5 * s, x + 0.5 * s, gy - 1.5 * s
            for xx in np.linspace(x0, x1, 5):
                d.line((xx, y0, xx, gy), fill=(120, 120, 125), width=max(1, int(0.015 * s)))
            for yy in np.linspace(y0, gy, 7):
                d.line((x0, yy, x1, yy), fill=(120, 120, 125), width=max(1, int(0.015 * s)))
            d.rectangle((x0, y0 + 0.3 * s, x1, y0 + 0.7 * s), fill=jitter(rng, (40, 120, 60), 30))  # banner
        else:  # the edge of a nearby building, from one side of the frame
            ew = 0.45 * s
            xa = 0.0 if rng.random() < 0.5 else w - ew
            d.rectangle((xa, 0, xa + ew, h), fill=jitter(rng, MATERIALS[pick(rng, list(MATERIALS))], 25))
            for yy in np.arange(rng.uniform(0, 0.1 * h), h, 0.12 * h):
                d.rectangle((xa + 0.2 * ew, yy, xa + 0.8 * ew, yy + 0.06 * h), fill=(40, 50, 60))
    return layer


def _light(img: np.ndarray, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    """Exposure, white balance, a soft cast shadow, haze, sensor noise (vectorised over the image)."""
    h, w = img.shape[:2]
    x = img.astype(np.float32) / 255
    if spec.shadow > 0:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        d = np.cos(a) * (xx - w * rng.uniform(0.2, 0.8)) + np.sin(a) * (yy - h * rng.uniform(0.2, 0.8))
        x = x * (1 - spec.shadow * np.clip(d / (0.04 * max(w, h)), 0, 1))[..., None]
    x = x * spec.exposure * np.array([1 + spec.warmth, 1, 1 - spec.warmth], np.float32)
    if spec.sky == "night":
        x = x * 0.45
    hz = np.asarray(SKIES[spec.sky][1], np.float32) / 255
    x = x * (1 - spec.haze) + hz * spec.haze
    x = x + rng.normal(0, spec.noise / 255, x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_view(scene: Scene, spec: ViewSpec, size: int, rng: np.random.Generator) -> tuple[Image.Image, ViewInfo]:
    """Photograph `scene` as `spec` says, longest side `size`; the RGB image and what it shows."""
    w, h = (size, int(round(size / spec.aspect))) if spec.aspect >= 1 else (int(round(size * spec.aspect)), size)
    hm = homography(scene.box, spec, w, h)
    px = scene.rgba.shape[1]
    ground = _apply(hm, np.array([[(scene.box[0] + scene.box[2]) / 2, GROUND * px]]))[0, 1]
    img = _background(w, h, spec, ground, rng)
    inv = np.linalg.inv(hm)
    inv = inv / inv[2, 2]
    warped = Image.fromarray(scene.rgba).transform(
        (w, h), Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]), resample=Image.Resampling.BILINEAR
    )
    img.alpha_composite(warped)
    walpha = np.asarray(warped)[..., 3] > 127
    pts = _apply(hm, scene.points)
    full_box = np.r_[pts.min(0), pts.max(0)]
    occ = _occluders(w, h, spec, full_box, ground, rng)
    img.alpha_composite(occ)
    occ_mask = np.asarray(occ)[..., 3] > 0
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    ip = pts[inside].astype(np.int64)
    hidden = occ_mask[ip[:, 1], ip[:, 0]]
    visible = float((~hidden).sum()) / len(pts)
    occluded = float(hidden.mean()) if len(ip) else 1.0
    coverage = float((walpha & ~occ_mask).mean())
    ys, xs = np.nonzero(walpha)
    bbx = (
        [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        if len(xs)
        else [0.0, 0.0, float(w), float(h)]
    )
    out = Image.fromarray(_light(np.asarray(img.convert("RGB")), spec, rng))
    if spec.blur > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(spec.blur))
    return out, ViewInfo(visible=visible, occluded=occluded, coverage=coverage, bbx=bbx)


def classify(spec: ViewSpec, info: ViewInfo) -> str:
    """easy / hard / junk from what the view measurably shows (not from what was asked for)."""
    if info.visible < 0.25 or info.coverage < 0.03:
        return "junk"
    if abs(spec.yaw) >= 32 or info.visible < 0.65 or info.occluded > 0.3 or spec.harsh or spec.scale < 0.42:
        return "hard"
    return "easy"


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    """The image as JPEG bytes (deterministic for the same pixels and quality)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
