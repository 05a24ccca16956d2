"""SfM-120k training data (docs/REFERENCE.md §4): the `retrieval-SfM-120k.pkl` splits and the `ims/` image layout."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from aml.data.trainset import TrainSet
from aml.errors import UserError
from aml.io import atomic_path
from aml.trust import load_pickle

SFM_PICKLE = "retrieval-SfM-120k.pkl"
SPLIT_KEYS = ("cids", "cluster", "qidxs", "pidxs")


def cid_path(root: str | os.PathLike, cid: str) -> str:
    """The image file of `cid`: `root/ims/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid` (no extension)."""
    return os.path.join(root, "ims", cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def load_sfm_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Read an SfM-style pickle (`{'train': split, 'val': split}`); clear errors when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: file not found; expected the SfM pickle ({path.name}) in the data root "
            "(for SfM-120k: retrieval-SfM-120k.pkl beside ims/)"
        )
    db = load_pickle(path)  # dicts, lists, numbers, numpy arrays: nothing that runs code
    if not isinstance(db, dict):
        raise UserError(f"{path}: expected a dict with 'train' and 'val' splits, got {type(db).__name__}")
    return db


def split_trainset(
    db: dict[str, Any], split: str, root: str | os.PathLike, source: str, name: str | None = None
) -> TrainSet:
    """Validate one split of an SfM pickle (keys, types, parallel pairs, index ranges) into a TrainSet."""
    if split not in db:
        raise UserError(
            f"{source}: missing split '{split}' (found keys {sorted(map(str, db))}); "
            "an SfM pickle has 'train' and 'val' splits"
        )
    s = db[split]
    if not isinstance(s, dict):
        raise UserError(f"{source}: {split}: expected a dict with keys {list(SPLIT_KEYS)}, got {type(s).__name__}")
    for k in SPLIT_KEYS:
        if k not in s:
            raise UserError(
                f"{source}: {split}: missing key '{k}' (found {sorted(map(str, s))}); "
                f"each split needs {list(SPLIT_KEYS)}"
            )
    cids = list(s["cids"])
    for i, c in enumerate(cids):
        if not isinstance(c, str) or len(c) < 6:
            raise UserError(
                f"{source}: {split}.cids[{i}] = {c!r} is not an image id string of at least "
                "6 characters; cids name files as ims/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid"
            )
    for k in SPLIT_KEYS[1:]:
        vals = s[k]
        if isinstance(vals, np.ndarray) and vals.dtype.kind in "iu":
            continue
        bad = next(
            (i for i, v in enumerate(vals) if isinstance(v, bool) or not isinstance(v, (int, np.integer))),
            None,
        )
        if bad is not None:
            raise UserError(
                f"{source}: {split}.{k}[{bad}] = {vals[bad]!r} is not an integer; "
                "cluster ids and image indices must be integers"
            )
    ts = TrainSet(
        paths=[cid_path(root, c) for c in cids],
        cluster=np.asarray(s["cluster"]),
        qidxs=np.asarray(s["qidxs"]),
        pidxs=np.asarray(s["pidxs"]),
        name=name or split,
    )
    return ts.validate(f"{source}: {split}")


def read_sfm(
    root: str | os.PathLike,
    pickle_name: str = SFM_PICKLE,
    *,
    name: str = "sfm120k",
    check_images: bool = True,
) -> tuple[TrainSet, TrainSet | None]:
    """Read the train and (when present) val splits of an SfM-format root; missing images fail up front."""
    root = Path(root)
    source = str(root / pickle_name)
    db = load_sfm_pickle(root / pickle_name)
    train = split_trainset(db, "train", root, source, f"{name}-train")
    val = split_trainset(db, "val", root, source, f"{name}-val") if "val" in db else None
    if check_images:
        for ts in (train, val):
            if ts is not None:
                ts.check_images(f"{source}: {ts.name}")
    return train, val


def write_sfm_pickle(path: str | os.PathLike, splits: dict[str, dict[str, list]]) -> None:
    """Atomically write an SfM-format pickle; splits hold plain lists (cids, cluster, qidxs, pidxs)."""
    out = {s: {k: [x if isinstance(x, str) else int(x) for x in v[k]] for k in SPLIT_KEYS} for s, v in splits.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(out, f, protocol=4)
