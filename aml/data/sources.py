"""Several training sources in one run, and what a run's data holds.

`parse_data_specs(["folder:A", "images:B", ...])` reads each `--data` spec (`aml.data.spec.parse_data_spec`)
and lays the training sets end to end in one `TrainSet`: paths concatenated in the order given, each
source's cluster ids shifted past the previous sources' (so no two sources share a label), its (query,
positive) pairs shifted with its images. Labelled terms (tuples, class batches) therefore only ever see the
labelled sources' images, and label-free terms every image. `DataBundle.sources` records, per source, its
image range in the combined set, how many labelled pairs and classes it brings and what it held out as a
test set; `describe(bundle)` is the text a command prints before it trains, and `source_shares(bundle, idx)`
the share of each source among the images an epoch used.

The run's test set is `--test-data`'s when given (the sources then hold nothing out), else the first
source's that has one (the others' are named by `describe`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from aml.data.spec import parse_data_spec, parse_test_spec
from aml.data.trainset import DataBundle, SourceInfo, TrainSet


def parse_data_specs(specs: str | Sequence[str], test: str | None = None, *, check_images: bool = True) -> DataBundle:
    """Resolve one or several `--data` specs to one DataBundle (several: combined, see the module docstring).
    `test` (`--test-data SPEC`, `aml.data.spec.parse_test_spec`) is the run's own test set: the sources then
    train on all their images, holding nothing out."""
    specs = [specs] if isinstance(specs, str) else list(specs) or ["synth"]
    bundles = [parse_data_spec(s, check_images=check_images, hold_out=test is None) for s in specs]
    if test is not None:
        bundles = [replace(b, test=None, held_out="") for b in bundles]
    if len(bundles) == 1:
        out = replace(bundles[0], sources=(source_info(specs[0], bundles[0], 0),))
    else:
        out = combine(specs, bundles)
    return out if test is None else replace(out, test=parse_test_spec(test))


def source_info(spec: str, bundle: DataBundle, start: int) -> SourceInfo:
    """What one source contributes, its images at [start, start + len) of the combined training set."""
    train = bundle.train
    labelled = int(np.unique(train.cluster[np.concatenate([train.qidxs, train.pidxs])]).size) if train.num_pairs else 0
    return SourceInfo(
        spec=spec,
        name=train.name,
        start=start,
        stop=start + len(train),
        pairs=train.num_pairs,
        labels=labelled,
        held_out=bundle.held_out,
        test=bundle.test,
    )


def combine(specs: Sequence[str], bundles: Sequence[DataBundle]) -> DataBundle:
    """Lay several sources' training (and validation) sets end to end; ids shifted so sources stay apart."""
    paths: list[str] = []
    clusters, qidxs, pidxs, infos = [], [], [], []
    next_cluster = 0
    for spec, b in zip(specs, bundles, strict=True):
        t, start = b.train, len(paths)
        shift = next_cluster - int(t.cluster.min()) if len(t) else 0
        paths += t.paths
        clusters.append(t.cluster + shift)
        qidxs.append(t.qidxs + start)
        pidxs.append(t.pidxs + start)
        next_cluster = int(clusters[-1].max()) + 1 if len(t) else next_cluster
        infos.append(source_info(spec, b, start))
    name = "+".join(b.train.name for b in bundles)
    train = TrainSet(paths, np.concatenate(clusters), np.concatenate(qidxs), np.concatenate(pidxs), name).validate()
    vals = [b.val for b in bundles if b.val is not None]
    val = None
    if vals:
        val = combine([f"{v.name}-val" for v in vals], [DataBundle(v, None, None) for v in vals]).train
    test = next((b.test for b in bundles if b.test is not None), None)
    return DataBundle(train, val, test, sources=tuple(infos))


def source_shares(bundle: DataBundle, idx: np.ndarray) -> dict[str, float]:
    """Each source's share (by its spec) of the training images `idx` (an epoch's images, repeats counted)."""
    idx = np.asarray(idx).ravel()
    n = max(idx.size, 1)
    return {s.spec: float(((idx >= s.start) & (idx < s.stop)).sum()) / n for s in bundle.sources}


def source_weights(ranges: Sequence[tuple[int, int]], images: np.ndarray) -> np.ndarray:
    """Drawing weights (summing to 1) of items that belong to training images `images` (an image, a pair's query,
    a class's first image), every source an equal share: an item's weight is inversely proportional to how many
    of the items are its source's. `ranges` are the sources' [start, stop) image ranges, end to end from 0
    (`SourceInfo`); a source without items has no share."""
    stops = np.array([stop for _, stop in ranges], dtype=np.int64)
    source = np.searchsorted(stops, np.asarray(images, dtype=np.int64), side="right")
    weights = 1.0 / np.bincount(source, minlength=len(stops))[source]
    return weights / weights.sum()


def draw_by_source(
    ranges: Sequence[tuple[int, int]], items: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """`size` distinct positions into `items` (all when fewer exist; each item is a training image index, see
    `source_weights`), every source an equal share (`--sampling sources`); a source with fewer items than its
    share gives all of them and the rest falls to the others."""
    items = np.asarray(items)
    return rng.choice(items.size, size=min(size, items.size), replace=False, p=source_weights(ranges, items))


def describe(bundle: DataBundle) -> list[str]:
    """What a run trains on and what it holds out, one line per source (printed before training)."""
    lines = []
    for s in bundle.sources:
        what = f"{s.stop - s.start} images"
        what += f", {s.labels} labels, {s.pairs} positive pairs" if s.pairs else ", unlabelled (label-free terms only)"
        if s.held_out:
            what += f"; held out as its test set: {s.held_out}"
        if s.test is not None:
            used = "the run's test set" if s.test == bundle.test else "not scored: only the first test set is"
            what += f"; test set {s.test.data_root}/{s.test.dataset_name} ({used})"
        lines.append(f"data {s.spec}: {what}")
    if bundle.test is None:
        lines.append("data: no test set (the run reports no test scores; pass --test-data or a source that has one)")
    elif all(s.test != bundle.test for s in bundle.sources):
        lines.append(f"data: test set {bundle.test.data_root}/{bundle.test.dataset_name} (--test-data)")
    return lines
