"""Folder datasets: class-labelled folders, groups CSVs (`image,object`), unlabelled folders, and object-wise
train/test splits whose test part is written in revisitop layout (each test image queries the rest)."""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aml.data.images import check_unique, header_size
from aml.data.trainset import RevisitopRef, TrainSet
from aml.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
TRAIN_FRACTION = 0.6  # default object split: the first 60% of objects train (UKBench: 0-149 / 150-249)
MAX_POSITIVES = 8  # positives per image in same-label pairs (all of them in groups of up to 9)


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTS) and not os.path.basename(path).startswith(".")


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[str]:
    """All image files under `root` (by extension), sorted, as paths joined onto `root`."""
    root = str(root)
    if not recursive:
        return sorted(os.path.join(root, f) for f in os.listdir(root) if is_image(f))
    out = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        out += [os.path.join(d, f) for f in files if is_image(f)]
    return sorted(out)


def object_keys(labels: Sequence[str]) -> np.ndarray:
    """Integer object ids: the labels' values when all are integers (UKBench), else ranks in sorted order."""
    if all(re.fullmatch(r"-?\d+", s) for s in labels):
        return np.array([int(s) for s in labels], dtype=np.int64)
    names = sorted(set(labels))
    rank = {s: i for i, s in enumerate(names)}
    return np.array([rank[s] for s in labels], dtype=np.int64)


def same_label_pairs(cluster: np.ndarray, max_pos: int = MAX_POSITIVES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(query, positive) index pairs within each cluster: every image is paired with up to `max_pos` others
    of its cluster (cyclic neighbours in a seeded shuffle: all of them in clusters <= max_pos+1)."""
    cluster = np.asarray(cluster, dtype=np.int64)
    n = cluster.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(cluster[order], kind="stable")]  # grouped by cluster, shuffled within
    _, start, size = np.unique(cluster[order], return_index=True, return_counts=True)
    grp_start = np.repeat(start, size)
    grp_size = np.repeat(size, size)
    rank = np.arange(n) - grp_start
    qs, ps = [], []
    for o in range(1, max_pos + 1):
        ok = grp_size > o
        qs.append(order[ok])
        ps.append(order[grp_start[ok] + (rank[ok] + o) % grp_size[ok]])
    q, p = np.concatenate(qs), np.concatenate(ps)
    srt = np.lexsort((p, q))
    return q[srt].astype(np.int64), p[srt].astype(np.int64)


def labelled_trainset(paths: list[str], cluster: np.ndarray, name: str) -> TrainSet:
    """A TrainSet whose clusters are labels and whose positives are same-label pairs."""
    q, p = same_label_pairs(cluster)
    return TrainSet(paths=paths, cluster=cluster, qidxs=q, pidxs=p, name=name).validate()


def unlabelled_trainset(root: str | os.PathLike, name: str | None = None) -> TrainSet:
    """Any images under `root` for the label-free losses: every image its own cluster, no pairs."""
    paths = list_images(root)
    if not paths:
        raise UserError(
            f"{root}: no images found (extensions {', '.join(IMAGE_EXTS)}); point images:DIR at a folder of images"
        )
    empty = np.zeros(0, dtype=np.int64)
    return TrainSet(
        paths=paths, cluster=np.arange(len(paths)), qidxs=empty, pidxs=empty, name=name or Path(root).name
    ).validate()


def read_label_folder(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Images of a class-labelled folder `root/<label>/*` (recursively within each label): (paths, labels)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory; folder:DIR expects DIR/<label>/<images>")
    labels_dirs = sorted(d for d in os.listdir(root) if (root / d).is_dir() and not d.startswith("."))
    paths, labels = [], []
    for lab in labels_dirs:
        ims = list_images(root / lab)
        paths += ims
        labels += [lab] * len(ims)
    if not paths:
        loose = list_images(root, recursive=False)
        hint = (
            f"it holds {len(loose)} loose images: for unlabelled images use images:{root}"
            if loose
            else "it holds no images"
        )
        raise UserError(f"{root}: no labelled images found (expected {root}/<label>/<images>); {hint}")
    return paths, labels


def read_groups_csv(path: str | os.PathLike) -> tuple[list[str], list[str], list[str] | None]:
    """Rows of a groups CSV `image,object[,split]`: (paths, objects, splits or None). Relative image paths are
    resolved against the CSV's folder, or its `jpg/` subfolder (the UKBench copy) when not found there."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: groups CSV not found; expected a CSV with header image,object")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "image" not in header or "object" not in header:
        raise UserError(
            f"{path}: header {rows[0] if rows else []} lacks 'image' and 'object' columns; "
            "the first line must be image,object (optionally ,split)"
        )
    ci, co = header.index("image"), header.index("object")
    cs = header.index("split") if "split" in header else None
    numbered = [(ln, r) for ln, r in enumerate(rows[1:], start=2) if any(c.strip() for c in r)]
    body = [r for _, r in numbered]
    for ln, r in numbered:
        if len(r) < len(header) or not r[ci].strip() or not r[co].strip():
            raise UserError(
                f"{path}: line {ln}: {','.join(r)!r} has an empty or missing field; every row needs {','.join(header)}"
            )
        if cs is not None and r[cs].strip() not in ("train", "test"):
            raise UserError(f"{path}: line {ln}: split = {r[cs]!r}; use train or test")
    if not body:
        raise UserError(f"{path}: no rows after the header; add image,object lines")
    base = path.parent
    images = [r[ci].strip() for r in body]
    paths = [_resolve(base, im) for im in images]
    check_unique(paths, [ln for ln, _ in numbered], path, "image")
    splits = [r[cs].strip() for r in body] if cs is not None else None
    return paths, [r[co].strip() for r in body], splits


def _resolve(base: Path, image: str) -> str:
    if os.path.isabs(image):
        return image
    direct = base / image
    if direct.exists() or not (base / "jpg" / image).exists():
        return str(direct)
    return str(base / "jpg" / image)


def parse_ranges(text: str, labels: Sequence[str] | None = None) -> np.ndarray:
    """Object ids from a list such as `0-149` or `0-9,20,30-39` (inclusive ranges of ids: the labels' values
    when they are integers, else their ranks in sorted order); with `labels`, an entry may also be a label's
    name (`Petra,Taj_Mahal`)."""
    keys = dict(zip(labels, object_keys(labels).tolist(), strict=True)) if labels is not None else {}
    out: list[int] = []
    for part in text.split(","):
        if part.strip() in keys:
            out.append(keys[part.strip()])
            continue
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if not m:
            names = f" or label names ({', '.join(sorted(keys)[:5])}, ...)" if keys else ""
            raise UserError(f"object list {text!r}: cannot read {part!r}; use ids such as 0-149 or 0-9,20{names}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UserError(f"object range {text!r}: {part!r} ends before it starts; write low-high")
        out += range(a, b + 1)
    return np.unique(np.array(out, dtype=np.int64))


def default_split(keys: np.ndarray, train_fraction: float = TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Objects (sorted ids) split by order: the first `round(train_fraction * K)` train, the rest test."""
    objs = np.unique(keys)
    k = int(round(train_fraction * objs.size))
    return objs[:k], objs[k:]


def image_names(paths: Sequence[str]) -> list[str]:
    """Unique revisitop names (no extension, no folders) for images: file stems, or relative paths joined by
    '__' when stems collide."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = os.path.commonpath([os.path.abspath(p) for p in paths]) if len(paths) > 1 else ""
    names = [os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0].replace(os.sep, "__") for p in paths]
    return names


def query_all_gnd(cluster: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[dict]:
    """Ground truth where every database image is also a query: easy = the other images of its object, no
    hard, junk = the query itself (so it is ignored), bbx = the full image."""
    cluster = np.asarray(cluster)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cluster.tolist()):
        members.setdefault(c, []).append(i)
    return [
        {
            "bbx": [0.0, 0.0, float(w), float(h)],
            "easy": [j for j in members[c] if j != i],
            "hard": [],
            "junk": [i],
        }
        for i, (c, (w, h)) in enumerate(zip(cluster.tolist(), sizes, strict=True))
    ]


def split_by_object(
    paths: list[str],
    labels: Sequence[str],
    name: str,
    *,
    splits: Sequence[str] | None = None,
    train_objects: np.ndarray | None = None,
    test_objects: np.ndarray | None = None,
) -> tuple[TrainSet, list[str], np.ndarray]:
    """Split labelled images by object: explicit id lists win, then a CSV `split` column, then the default
    (first 60% of objects train). Returns (train TrainSet, test paths, test object ids)."""
    keys = object_keys(labels)
    if train_objects is not None or test_objects is not None:
        objs = np.unique(keys)
        tr = train_objects if train_objects is not None else np.setdiff1d(objs, test_objects)
        te = test_objects if test_objects is not None else np.setdiff1d(objs, tr)
        both = np.intersect1d(tr, te)
        if both.size:
            raise UserError(
                f"{name}: objects {both[:5].tolist()} are in both the train and the test split; "
                "train and test objects must be disjoint"
            )
        is_tr, is_te = np.isin(keys, tr), np.isin(keys, te)
    elif splits is not None:  # the user's own split: class-level data may share labels across it
        is_tr = np.array([s == "train" for s in splits])
        is_te = ~is_tr
    else:
        tr, _ = default_split(keys)
        is_tr = np.isin(keys, tr)
        is_te = ~is_tr
    if not is_tr.any():
        raise UserError(
            f"{name}: the train split is empty (objects present: {np.unique(keys)[:5].tolist()}...); "
            "choose train objects that exist"
        )
    idx = np.flatnonzero(is_tr)
    train = labelled_trainset([paths[i] for i in idx], keys[idx], f"{name}-train")
    te_idx = np.flatnonzero(is_te)
    return train, [paths[i] for i in te_idx], keys[te_idx]


def write_test_split(
    data_root: str | os.PathLike, name: str, paths: Sequence[str], cluster: np.ndarray, *, copy: bool = False
) -> RevisitopRef:
    """Write images + gnd in revisitop layout at `data_root/name/` (every image a query against the others) so
    `aml evaluate --dataset NAME --data-root DATA_ROOT` runs on it. Images are symlinked (or copied) to `jpg/`
    under their `.jpg` name; the content keeps its format (PIL reads by content)."""
    from aml.data.revisitop import write_revisitop

    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(paths)} test images are missing, first: "
            f"{', '.join(missing[:5])}; check the CSV / folder"
        )
    sizes = [header_size(p) for p in paths]  # an unreadable image: one line, before anything is written
    names = image_names(paths)
    jpg = Path(data_root) / name / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    for src, nm in zip(paths, names, strict=True):
        dst = jpg / f"{nm}.jpg"
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if copy:
            shutil.copyfile(src, dst)
        else:  # to the file itself: a source that is a link of an earlier split stays valid when that is replaced
            os.symlink(os.path.realpath(src), dst)
    write_revisitop(data_root, name, names, names, query_all_gnd(cluster, sizes))
    return RevisitopRef(str(data_root), name)


def write_object_split(
    paths: list[str],
    labels: Sequence[str],
    data_root: str | os.PathLike,
    name: str,
    *,
    splits: Sequence[str] | None = None,
    train_objects: np.ndarray | None = None,
    test_objects: np.ndarray | None = None,
    copy: bool = False,
) -> tuple[TrainSet, RevisitopRef, Path]:
    """Split labelled images by object and write the test part in revisitop layout at `data_root/name/`, plus
    `data_root/name/groups.csv` (`image,object,split`, all images): `groups:` on it trains on this split."""
    from aml.io import atomic_write, scratch_dir

    check_dataset_name(name)
    folder = Path(data_root) / name
    if folder.exists() and any(folder.iterdir()) and not (folder / "groups.csv").is_file():
        raise UserError(
            f"{folder}: exists and is not a split written by aml data split (no groups.csv); choose another --name "
            "or --out"
        )
    train, test_paths, test_keys = split_by_object(
        paths, labels, name, splits=splits, train_objects=train_objects, test_objects=test_objects
    )
    if not test_paths:
        raise UserError(f"{name}: the test split is empty; choose test objects that exist")
    with scratch_dir(folder) as tmp:  # built beside, renamed into place: never half written
        write_test_split(tmp, name, test_paths, test_keys, copy=copy)
        with atomic_write(tmp / name / "groups.csv") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["image", "object", "split"])
            for p, k in zip(train.paths, train.cluster.tolist(), strict=True):
                w.writerow([os.path.abspath(p), k, "train"])
            for nm, k in zip(image_names(test_paths), test_keys.tolist(), strict=True):
                w.writerow([f"jpg/{nm}.jpg", k, "test"])
        if folder.exists():  # an earlier split (or an empty folder): moved into the scratch folder, removed with it
            os.replace(folder, tmp / "replaced")
        os.replace(tmp / name, folder)
    return train, RevisitopRef(str(data_root), name), folder / "groups.csv"


def check_dataset_name(name: str) -> str:
    """`name` if it is a plain folder name (DATA_ROOT/NAME stays under DATA_ROOT), else a one-line UserError."""
    if not name or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name) or "\0" in name:
        raise UserError(f"--name {name!r}: not a plain name (no '/', '.' or '..'); the set is written to --out/NAME")
    return name
