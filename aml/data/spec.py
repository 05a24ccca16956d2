"""`--data SPEC`: one string names the training data (and the test set that goes with it).

Accepted forms:
- `synth`          the default synthetic landmarks set, generated once into `$AML_HOME/datasets/` (~20 s);
- `synth:DIR`      a set written by `aml data synth --out DIR` (SfM format + its revisitop test set);
- `sfm120k:DIR`    SfM-120k: `DIR/retrieval-SfM-120k.pkl` and `DIR/ims/` (no test set attached);
- `folder:DIR`     class-labelled folder `DIR/<label>/<images>`; labels are objects;
- `groups:CSV`     a groups CSV `image,object[,split]` (e.g. UKBench's groups.csv);
- `images:DIR`     any images under DIR, unlabelled (for the label-free losses, `aml.losses.LABEL_FREE`).

`folder:` and `groups:` are split by object: the CSV's `split` column when it has one, else the first 60% of
objects (numeric ids in order, else labels in sorted order) train and the rest test; UKBench gives objects
0-149 / 150-249. The test part is written once in revisitop layout (every test image a query against the
others, itself junk) under `$AML_HOME/datasets/<name>-<hash>/<name>` and evaluated like ROxf / RPar."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np

from aml.data.folders import (
    TRAIN_FRACTION,
    image_names,
    object_keys,
    read_groups_csv,
    read_label_folder,
    split_by_object,
    unlabelled_trainset,
    write_test_split,
)
from aml.data.revisitop import gnd_file, load_revisitop
from aml.data.sfm120k import read_sfm
from aml.data.synth import SYNTH_NAME, SYNTH_PICKLE, ensure_default_synth
from aml.data.trainset import DataBundle, RevisitopRef
from aml.errors import UserError
from aml.io import aml_home, temp_dir

FORMS = "synth, synth:DIR, sfm120k:DIR, folder:DIR, groups:CSV, images:DIR"
TEST_FORMS = "folder:DIR, groups:CSV, revisitop:DATA_ROOT/NAME"


def parse_data_spec(spec: str, *, check_images: bool = True, hold_out: bool = True) -> DataBundle:
    """Resolve a data spec to its training set, validation set (SfM formats) and test set (if any).
    `hold_out=False` (a run given its own test set): `folder:` and a `groups:` CSV without a split column
    train on all their images instead of holding 40% of their objects out as a test set."""
    kind, sep, arg = (spec or "").partition(":")
    kind = kind.strip().lower()
    if kind == "synth" and not sep:
        return _synth(ensure_default_synth(), check_images)
    if kind not in ("synth", "sfm120k", "folder", "groups", "images") or not arg.strip():
        raise UserError(f"data spec {spec!r}: not recognised; accepted forms: {FORMS}")
    path = Path(arg.strip()).expanduser()
    if kind == "synth":
        return _synth(path, check_images)
    if kind == "sfm120k":
        train, val = read_sfm(path, name="sfm120k", check_images=check_images)
        return DataBundle(train, val, None)
    if kind == "images":
        if not path.is_dir():
            raise UserError(f"{path}: not a directory; images:DIR expects a folder of images")
        ts = unlabelled_trainset(path)
        if check_images:
            ts.check_images()
        return DataBundle(ts, None, None)
    if kind == "folder":
        paths, labels = read_label_folder(path)
        splits = None if hold_out else ["train"] * len(paths)
        return _split(path.resolve().name, str(path.resolve()), paths, labels, splits, check_images)
    paths, labels, splits = read_groups_csv(path)
    if splits is None and not hold_out:
        splits = ["train"] * len(paths)
    name = _groups_name(path.resolve())
    return _split(name, str(path.resolve()), paths, labels, splits, check_images, beside=path.resolve().parent)


def _synth(root: Path, check_images: bool) -> DataBundle:
    if not (root / SYNTH_PICKLE).is_file():
        raise UserError(
            f"{root / SYNTH_PICKLE}: not found; synth:DIR expects a set written by "
            f"`aml data synth --out {root}` (or use plain `synth` for the default set)"
        )
    train, val = read_sfm(root, SYNTH_PICKLE, name="synth", check_images=check_images)
    test = RevisitopRef(str(root), SYNTH_NAME) if gnd_file(root, SYNTH_NAME).is_file() else None
    return DataBundle(train, val, test)


def _groups_name(csv_path: Path) -> str:
    """A groups CSV's dataset name: its folder's for the generic file names (groups / train / test.csv)."""
    return csv_path.parent.name if csv_path.stem in ("groups", "train", "test") else csv_path.stem


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "data"


def _split(
    name: str,
    source: str,
    paths: list[str],
    labels: list[str],
    splits: list[str] | None,
    check_images: bool,
    beside: Path | None = None,
) -> DataBundle:
    """Object-wise split; the test part is materialised in revisitop layout in the cache on first use, unless
    the CSV sits in a revisitop folder holding exactly that test set (as `aml data split` writes it)."""
    name = _safe(name)
    train, test_paths, test_keys = split_by_object(paths, labels, name, splits=splits)
    if check_images:
        train.check_images(source)
    if not test_paths:
        return DataBundle(train, None, None)
    held = held_out_text(train.cluster, test_keys, splits is not None)
    if beside is not None and gnd_file(beside.parent, beside.name).is_file():
        ds = load_revisitop(beside.parent, beside.name)
        if ds.imlist == image_names(test_paths) and ds.qimlist == ds.imlist:
            return DataBundle(train, None, RevisitopRef(str(beside.parent), beside.name), held_out=held)
    return DataBundle(train, None, cached_test_split(name, test_paths, test_keys), held_out=held)


def held_out_text(train_keys: np.ndarray, test_keys: np.ndarray, by_column: bool) -> str:
    """What an object-wise split kept out of training, in words (`aml distill` prints it before training)."""
    n_tr, n_te = np.unique(train_keys).size, np.unique(test_keys).size
    rule = "the CSV's split column" if by_column else f"the last {100 - round(100 * TRAIN_FRACTION)}% of objects"
    return f"{test_keys.size} images of {n_te} of {n_tr + n_te} labels ({rule})"


def cached_test_split(name: str, paths: list[str], keys: np.ndarray) -> RevisitopRef:
    """Write (once, atomically) a revisitop-layout test set for these images under `$AML_HOME/datasets/`,
    keyed by the image paths and objects; returns its (data_root, name)."""
    h = hashlib.sha256()
    for p, k in zip(paths, keys.tolist(), strict=True):
        h.update(f"{os.path.abspath(p)}\t{k}\n".encode())
    root = aml_home() / "datasets" / f"{name}-{h.hexdigest()[:8]}"
    if gnd_file(root, name).is_file():
        return RevisitopRef(str(root), name)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root)
    try:
        write_test_split(tmp, name, paths, keys)
        try:
            os.replace(tmp, root)
        except OSError:
            if not gnd_file(root, name).is_file():  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return RevisitopRef(str(root), name)


def parse_test_spec(spec: str) -> RevisitopRef:
    """A run's own test set (`--test-data SPEC`): `folder:DIR` (all its images, labels by folder), `groups:CSV`
    (its `test` rows, or all rows without a split column) -- every image a query against the others,
    positives the same label, written once in revisitop layout under `$AML_HOME/datasets/` -- or
    `revisitop:DATA_ROOT/NAME` (a revisitop-layout set: `NAME/gnd_NAME.pkl` and `NAME/jpg/`)."""
    kind, _, arg = (spec or "").partition(":")
    kind = kind.strip().lower()
    if kind not in ("folder", "groups", "revisitop") or not arg.strip():
        raise UserError(f"test data spec {spec!r}: not recognised; accepted forms: {TEST_FORMS}")
    path = Path(arg.strip()).expanduser().resolve()
    if kind == "revisitop":
        if not gnd_file(path.parent, path.name).is_file():
            raise UserError(
                f"{gnd_file(path.parent, path.name)}: not found; revisitop:DATA_ROOT/NAME expects "
                "NAME/gnd_NAME.pkl and NAME/jpg/ (as `aml data split` writes them)"
            )
        return RevisitopRef(str(path.parent), path.name)
    if kind == "folder":
        paths, labels = read_label_folder(path)
        name = path.name
    else:
        paths, labels, splits = read_groups_csv(path)
        if splits is not None:
            paths = [p for p, s in zip(paths, splits, strict=True) if s == "test"]
            labels = [lab for lab, s in zip(labels, splits, strict=True) if s == "test"]
        name = _groups_name(path)
        if not paths:
            raise UserError(f"{path}: no test rows; mark test images with split = test, or drop the split column")
    return cached_test_split(_safe(name), paths, object_keys(labels))
