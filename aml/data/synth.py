"""Synthetic landmarks, the embedded default data: a training set in SfM-120k format and a test set in
revisitop layout, procedural and deterministic under a seed (numpy + PIL only).

Layout of a generated set `DIR`:
- `DIR/ims/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid` and `DIR/retrieval-SfM-synth.pkl` (`train` and `val` splits
  with `cids`, `cluster`, `qidxs`, `pidxs`): each training landmark is one cluster, its views are photographs
  from different cameras, positives are all ordered pairs of its views that show enough of it;
- `DIR/synth/jpg/*.jpg` and `DIR/synth/gnd_synth.pkl`: test landmarks (disjoint from training ones) with clean
  query photographs (`bbx` = the landmark's box) and database views whose `easy` / `hard` / `junk` labels are
  measured from what each view shows, plus database-only distractor landmarks;
- `DIR/synth-meta.json`: the configuration, the landmark keys of every split and label counts.

Landmark k of split s is drawn from the random stream (seed, s, k), so test landmarks are the same whatever
the training set size, and train / val / test landmarks are independent draws that never coincide."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aml.data.revisitop import write_revisitop
from aml.data.sfm120k import cid_path, write_sfm_pickle
from aml.data.synth_scene import render_landmark, sample_landmark
from aml.data.synth_view import Scene, classify, jpeg_bytes, render_view, sample_view
from aml.errors import UserError
from aml.io import aml_home, temp_dir

SYNTH_VERSION = 1  # bump when the generator's output changes: cached default sets are keyed by it
SYNTH_PICKLE = "retrieval-SfM-synth.pkl"
SYNTH_NAME = "synth"
# Bounds of `aml data synth` (SynthConfig.check): peak memory at MAX_SIZE measured 0.57 GB (one landmark),
# MAX_IMAGES is about SfM-120k's image count.
MAX_SIZE = 2048
MAX_IMAGES = 200_000
META = "synth-meta.json"
SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "distractor": 3}
TRAIN_PLAN = (
    "query",
    "easy",
    "hard",
    "easy",
    "hard",
    "easy",
    "hard",
    "hard",
)  # cycled over a landmark's views
DB_PLAN = ("easy", "hard", "easy", "hard", "junk", "easy", "hard", "easy", "hard", "junk")


@dataclass(frozen=True)
class SynthConfig:
    """Size of a synthetic set. The default (80 x 8 training views, 24 test landmarks x (3 queries + 10
    views) + 16 x 5 distractor views, 256 px, ~1100 images) trains a demo in minutes and is generated in well
    under a minute on a laptop CPU."""

    landmarks: int = 80
    views: int = 8
    val_landmarks: int = 10
    test_landmarks: int = 24
    queries: int = 3
    db_views: int = 10
    distractors: int = 16
    distractor_views: int = 5
    size: int = 256
    seed: int = 0

    def check(self) -> None:
        for k, v in asdict(self).items():
            if k != "seed" and (not isinstance(v, int) or v < (0 if k in ("val_landmarks", "distractors") else 1)):
                raise UserError(f"synth: {k} = {v!r}; must be a positive integer")
        if self.views < 2:
            raise UserError(f"synth: views = {self.views}; need at least 2 views per landmark to form pairs")
        if self.size < 32:
            raise UserError(f"synth: size = {self.size}; use at least 32 px")
        if self.size > MAX_SIZE:
            raise UserError(
                f"synth: size = {self.size}; at most {MAX_SIZE} px (a scene is drawn at 1.5x the size, memory grows "
                f"with its square: 0.57 GB at {MAX_SIZE} px)"
            )
        if self.images() > MAX_IMAGES:
            raise UserError(
                f"synth: {self.images()} images; at most {MAX_IMAGES} (SfM-120k's size: a set this large is real "
                "data's job, and generating it would take days); lower --landmarks / --views / --db-views"
            )

    def images(self) -> int:
        """How many images the set holds (training, validation, test queries and database, distractors)."""
        return (
            (self.landmarks + self.val_landmarks) * self.views
            + self.test_landmarks * (self.queries + self.db_views)
            + self.distractors * self.distractor_views
        )


def _rng(cfg: SynthConfig, split: str, k: int, view: int = -1) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLIT_CODE[split], k, view + 1])


def _scene(cfg: SynthConfig, split: str, k: int) -> Scene:
    lm = sample_landmark(_rng(cfg, split, k))
    return Scene.from_rgba(render_landmark(lm, int(round(1.5 * cfg.size))))


def _views(cfg: SynthConfig, scene: Scene, split: str, k: int, plan: list[str]) -> list[tuple[bytes, str, list]]:
    """Render the planned views of one landmark: (jpeg bytes, measured label, bbx) each. Queries are redrawn
    (deterministically) until clean: easy and at least 90% visible."""
    out = []
    for v, level in enumerate(plan):
        rng = _rng(cfg, split, k, v)
        for _ in range(20):
            spec = sample_view(rng, level)
            img, info = render_view(scene, spec, cfg.size, rng)
            label = classify(spec, info)
            if level != "query" or (label == "easy" and info.visible >= 0.9):
                break
        out.append((jpeg_bytes(img, 90 if split in ("train", "val") else spec.quality), label, info.bbx))
    return out


def _cid(cfg: SynthConfig, split: str, k: int, v: int) -> str:
    return hashlib.md5(f"synth-{cfg.seed}-{split}-{k}-{v}".encode()).hexdigest()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _train_split(cfg: SynthConfig, out: Path, split: str, n: int) -> tuple[dict[str, list], dict[str, int]]:
    """Render `n` landmarks x `cfg.views` views into `out/ims`; pairs = ordered pairs of non-junk views."""
    cids: list[str] = []
    cluster: list[int] = []
    qidxs: list[int] = []
    pidxs: list[int] = []
    counts = {"easy": 0, "hard": 0, "junk": 0}
    plan = [TRAIN_PLAN[v % len(TRAIN_PLAN)] for v in range(cfg.views)]
    for k in range(n):
        views = _views(cfg, _scene(cfg, split, k), split, k, plan)
        base = len(cids)
        for v, (data, label, _) in enumerate(views):
            cid = _cid(cfg, split, k, v)
            _write(Path(cid_path(out, cid)), data)
            cids.append(cid)
            cluster.append(k)
            counts[label] += 1
        ok = base + np.flatnonzero([label != "junk" for _, label, _ in views])
        q, p = np.meshgrid(ok, ok, indexing="ij")
        keep = q != p
        qidxs += q[keep].tolist()
        pidxs += p[keep].tolist()
    return {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}, counts


def _test_split(cfg: SynthConfig, out: Path) -> dict[str, int]:
    """Render the revisitop-layout test set: queries + labelled database views + distractor landmarks."""
    jpg = out / SYNTH_NAME / "jpg"
    db: list[tuple[str, int]] = []  # (name, landmark or -1)
    labels: list[str] = []
    queries: list[tuple[str, int, list]] = []
    plan = [DB_PLAN[v % len(DB_PLAN)] for v in range(cfg.db_views)]
    for k in range(cfg.test_landmarks):
        views = _views(cfg, _scene(cfg, "test", k), "test", k, ["query"] * cfg.queries + plan)
        for v, (data, label, bbx) in enumerate(views):
            if v < cfg.queries:
                name = f"lm{k:03d}_q{v}"
                queries.append((name, k, bbx))
            else:
                name = f"lm{k:03d}_{v - cfg.queries:02d}"
                db.append((name, k))
                labels.append(label)
            _write(jpg / f"{name}.jpg", data)
    for k in range(cfg.distractors):
        views = _views(
            cfg,
            _scene(cfg, "distractor", k),
            "distractor",
            k,
            [("easy", "hard")[v % 2] for v in range(cfg.distractor_views)],
        )
        for v, (data, _, _) in enumerate(views):
            name = f"dx{k:03d}_{v:02d}"
            db.append((name, -1))
            labels.append("none")
            _write(jpg / f"{name}.jpg", data)
    order = np.random.default_rng([cfg.seed, 99]).permutation(len(db))  # database in no particular order
    imlist = [db[i][0] for i in order]
    lm = np.array([db[i][1] for i in order])
    lab = np.array([labels[i] for i in order])
    gnd = [
        {
            "bbx": bbx,
            **{kind: np.flatnonzero((lm == k) & (lab == kind)).tolist() for kind in ("easy", "hard", "junk")},
        }
        for _, k, bbx in queries
    ]
    write_revisitop(out, SYNTH_NAME, imlist, [q[0] for q in queries], gnd)
    return {kind: int(((lm >= 0) & (lab == kind)).sum()) for kind in ("easy", "hard", "junk")}


def generate_synth(out: str | os.PathLike, cfg: SynthConfig | None = None, progress: bool = False) -> Path:
    """Write a complete synthetic set to `out` (which must not exist or be empty). It is generated into a
    temporary folder beside `out` and renamed at the end, so a half-written set is never seen."""
    cfg = cfg or SynthConfig()
    cfg.check()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty; choose a new --out folder or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out)
    try:
        t0 = time.time()
        splits, counts = {}, {}
        for split, n in (("train", cfg.landmarks), ("val", cfg.val_landmarks)):
            if n:
                splits[split], counts[split] = _train_split(cfg, tmp, split, n)
            if progress:
                print(f"synth: {split}: {n} landmarks ({time.time() - t0:.1f} s)", file=sys.stderr)
        write_sfm_pickle(tmp / SYNTH_PICKLE, splits)
        counts["test"] = _test_split(cfg, tmp)
        meta = {
            "version": SYNTH_VERSION,
            "config": asdict(cfg),
            "labels": counts,
            "landmarks": {
                s: [[cfg.seed, SPLIT_CODE[s], k] for k in range(n)]
                for s, n in (
                    ("train", cfg.landmarks),
                    ("val", cfg.val_landmarks),
                    ("test", cfg.test_landmarks),
                    ("distractor", cfg.distractors),
                )
            },
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        if progress:
            print(f"synth: wrote {out} in {time.time() - t0:.1f} s", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


DEFAULT_SYNTH = SynthConfig()  # the embedded default set


def default_synth_dir(cfg: SynthConfig | None = None) -> Path:
    """Where the default synthetic set lives in the cache, keyed by generator version and configuration."""
    cfg = cfg or DEFAULT_SYNTH
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return aml_home() / "datasets" / f"synth-v{SYNTH_VERSION}-{key}"


def ensure_default_synth(cfg: SynthConfig | None = None) -> Path:
    """The default synthetic set, generated into the cache on first use and reused afterwards."""
    cfg = cfg or DEFAULT_SYNTH
    out = default_synth_dir(cfg)
    if (out / META).is_file():
        return out
    print(f"synth: generating the default synthetic landmarks set into {out} (once)", file=sys.stderr)
    if out.exists():  # an empty folder left by someone else; generation needs it absent or empty
        try:
            out.rmdir()
        except OSError as e:
            raise UserError(f"{out}: exists without {META} (an incomplete set?); remove the folder") from e
    try:
        return generate_synth(out, cfg, progress=True)
    except (UserError, OSError):
        if (out / META).is_file():  # another process finished it first
            return out
        raise
