"""Several training sources in one run, what a run's data says it holds, and validation carved from training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import distill_args
from PIL import Image

from aml.data.revisitop import load_revisitop
from aml.data.sources import describe, draw_by_source, parse_data_specs, source_shares, source_weights
from aml.data.spec import parse_test_spec
from aml.data.trainset import TrainSet
from aml.data.validation import validation_split
from aml.errors import UserError
from aml.mining import sample_epoch
from aml.train.config import PRESETS, TrainConfig
from aml.train.epoch import class_balanced_batches, plan_images
from aml.train.recipe import check, head_init


def _img(path, colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), colour).save(path)


@pytest.fixture
def sources(tmp_path, home):
    """A labelled folder (5 labels x 4 images: 3 train, 2 held out as the test set) and an unlabelled one."""
    for lab in "abcde":
        for i in range(4):
            _img(tmp_path / "lab" / lab / f"{lab}{i}.png", (ord(lab), i * 40, 7))
    for i in range(6):
        _img(tmp_path / "free" / f"f{i}.png", (i * 30, 9, 9))
    return tmp_path


def test_one_spec_is_the_spec_itself_with_its_source_recorded(sources):
    b = parse_data_specs([f"folder:{sources / 'lab'}"])
    assert len(b.train) == 12 and b.test is not None
    (s,) = b.sources
    assert (s.start, s.stop, s.labels) == (0, 12, 3)
    assert "8 images of 2 of 5 labels" in b.held_out


def test_sources_laid_end_to_end_with_their_ids_apart(sources):
    lab, free = parse_data_specs([f"folder:{sources / 'lab'}"]), parse_data_specs([f"images:{sources / 'free'}"])
    b = parse_data_specs([f"images:{sources / 'free'}", f"folder:{sources / 'lab'}"])
    t = b.train
    assert t.paths == free.train.paths + lab.train.paths
    assert [(s.start, s.stop) for s in b.sources] == [(0, 6), (6, 18)]
    # pairs only among the labelled source's images, shifted with them, and still same-label pairs
    assert t.num_pairs == lab.train.num_pairs and t.qidxs.min() >= 6
    assert np.array_equal(t.qidxs - 6, lab.train.qidxs) and np.array_equal(t.pidxs - 6, lab.train.pidxs)
    assert (t.cluster[t.qidxs] == t.cluster[t.pidxs]).all()
    # no label of one source equals a label of another
    assert not set(t.cluster[:6].tolist()) & set(t.cluster[6:].tolist())
    assert b.test == lab.test  # the first source that has a test set
    shares = source_shares(b, np.array([0, 1, 6, 7, 8, 9]))
    free_spec, lab_spec = f"images:{sources / 'free'}", f"folder:{sources / 'lab'}"
    assert shares == {free_spec: pytest.approx(2 / 6), lab_spec: pytest.approx(4 / 6)}


def test_describe_names_what_is_trained_and_held_out(sources):
    b = parse_data_specs([f"folder:{sources / 'lab'}", f"images:{sources / 'free'}"])
    text = "\n".join(describe(b))
    assert "12 images, 3 labels" in text and "6 images, unlabelled" in text
    assert "held out as its test set: 8 images of 2 of 5 labels" in text
    assert f"{b.test.data_root}/{b.test.dataset_name} (the run's test set)" in text
    alone = parse_data_specs([f"images:{sources / 'free'}"])
    assert "no test set" in describe(alone)[-1]


def test_validation_keeps_enough_images_of_every_label_for_training(sources):
    # 4 training images per label: 0.2 of them is 1 image, which alone could not be scored: none held out
    b = parse_data_specs([f"folder:{sources / 'lab'}"])
    with pytest.raises(UserError, match="nothing to hold out"):
        validation_split(b.train, fraction=0.2)
    reduced, held, labels = validation_split(b.train, fraction=0.5)  # 2 of 4: both kept >= MIN_LEFT
    assert np.bincount(labels).tolist() == [2, 2, 2] and len(reduced) == 6


def test_validation_never_takes_unlabelled_or_test_images(sources, tmp_path):
    for lab in "pq":
        for i in range(10):
            _img(tmp_path / "big" / lab / f"{lab}{i}.png", (ord(lab), i * 20, 1))
    b = parse_data_specs([f"groups:{_csv(tmp_path)}", f"images:{sources / 'free'}"])
    reduced, held, labels = validation_split(b.train, fraction=0.3, seed=0)
    assert validation_split(b.train, fraction=0.3, seed=0)[1] == held  # seeded
    assert validation_split(b.train, fraction=0.3, seed=1)[1] != held
    assert len(held) == 6 and sorted(np.unique(labels).tolist()) == sorted(np.unique(b.train.cluster[:20]).tolist())
    free = set(b.train.paths[20:])
    assert not free & set(held) and free <= set(reduced.paths)
    assert not set(held) & set(reduced.paths)
    assert len(reduced) + len(held) == len(b.train)
    # the reduced set's pairs are the original pairs among the images it keeps, re-indexed
    kept = {(b.train.paths[q], b.train.paths[p]) for q, p in zip(b.train.qidxs, b.train.pidxs, strict=True)}
    after = {(reduced.paths[q], reduced.paths[p]) for q, p in zip(reduced.qidxs, reduced.pidxs, strict=True)}
    assert after == {(q, p) for q, p in kept if q not in held and p not in held}
    test_images = {line.split(",")[0] for line in _csv(tmp_path).read_text().splitlines() if line.endswith("test")}
    assert not test_images & set(held)


def _csv(tmp_path):
    """A groups CSV: labels p, q (10 images each) train; label r's images are the test split."""
    path = tmp_path / "groups.csv"
    if not path.exists():
        for i in range(4):
            _img(tmp_path / "big" / "r" / f"r{i}.png", (200, i * 50, 3))
        rows = ["image,object,split"]
        rows += [f"big/{lab}/{lab}{i}.png,{lab},train" for lab in "pq" for i in range(10)]
        rows += [f"big/r/r{i}.png,r,test" for i in range(4)]
        path.write_text("\n".join(rows) + "\n")
    return path


def test_validation_split_refuses_a_set_with_nothing_to_hold_out(sources):
    b = parse_data_specs([f"images:{sources / 'free'}"])
    with pytest.raises(UserError, match="nothing to hold out"):
        validation_split(b.train)
    with pytest.raises(UserError, match="must be in"):
        validation_split(b.train, fraction=1.5)


def test_test_data_is_the_runs_test_set_and_sources_hold_nothing_out(sources, tmp_path):
    for lab in "ab":  # the test folder shares labels a, b with the training folder (class-level data)
        for i in range(3):
            _img(tmp_path / "test" / lab / f"t{lab}{i}.png", (ord(lab), 255 - i * 40, 70))
    b = parse_data_specs([f"folder:{sources / 'lab'}", f"images:{sources / 'free'}"], f"folder:{tmp_path / 'test'}")
    assert len(b.train) == 20 + 6 and b.held_out == "" and not any(s.held_out for s in b.sources)
    ds = load_revisitop(b.test.data_root, b.test.dataset_name)
    assert len(ds.imlist) == 6 and ds.qimlist == ds.imlist
    assert sorted(ds.gnd[0]["easy"]) == [1, 2] and ds.gnd[0]["junk"] == [0]
    assert describe(b)[-1] == f"data: test set {b.test.data_root}/{b.test.dataset_name} (--test-data)"
    again = parse_test_spec(f"revisitop:{b.test.data_root}/{b.test.dataset_name}")
    assert again == b.test
    with pytest.raises(UserError, match="accepted forms"):
        parse_test_spec(f"images:{tmp_path / 'test'}")
    with pytest.raises(UserError, match="gnd_nope.pkl: not found"):
        parse_test_spec(f"revisitop:{tmp_path}/nope")


def test_groups_split_column_may_share_labels_across_train_and_test(tmp_path, home):
    rows = ["image,object,split"]
    for lab in "pq":
        for i in range(4):
            _img(tmp_path / f"{lab}{i}.png", (ord(lab), i * 50, 5))
            rows.append(f"{lab}{i}.png,{lab},{'test' if i == 3 else 'train'}")
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    b = parse_data_specs(f"groups:{tmp_path / 'groups.csv'}")
    assert len(b.train) == 6
    ds = load_revisitop(b.test.data_root, b.test.dataset_name)
    assert len(ds.imlist) == 2
    ref = parse_test_spec(f"groups:{tmp_path / 'groups.csv'}")
    assert ref == b.test


def test_data_split_with_a_test_folder_and_objects_by_name(sources, tmp_path, run_cli):
    for lab in "ab":
        for i in range(3):
            _img(tmp_path / "test" / lab / f"t{lab}{i}.png", (ord(lab), 255 - i * 40, 70))
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "data", "split", "--folder", sources / "lab", "--test-folder", tmp_path / "test", "--out", out, "--name", "lm"
    )
    assert code == 0, err
    assert "test: 6 images of lm" in stdout and "train: 20 images, 5 objects" in stdout
    b = parse_data_specs(f"groups:{out / 'lm' / 'groups.csv'}")
    assert len(b.train) == 20 and b.test.dataset_name == "lm"
    code, stdout, err = run_cli(
        "data", "split", "--folder", sources / "lab", "--test-objects", "b,d", "--out", out, "--name", "byname"
    )
    assert code == 0, err
    assert "test: 8 images of byname" in stdout
    code, _, err = run_cli("data", "split", "--folder", sources / "lab", "--test-objects", "zz", "--out", out)
    assert code == 2 and "cannot read 'zz'" in err and "label names (a, b, c, d, e" in err
    code, stdout, err = run_cli("data", "info", f"folder:{sources / 'lab'}", f"images:{sources / 'free'}")
    assert code == 0, err
    assert "held out as its test set: 8 images of 2 of 5 labels" in stdout and "unlabelled" in stdout


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "loss, unlabelled_queries, sampling",
    [("contr+", False, "images"), ("csd", True, "images"), ("csd", True, "sources")],
)
def test_mixed_sources_train_the_right_terms_on_the_right_images(tiny_data, home, tmp_path, run_cli, loss,
                                                                 unlabelled_queries, sampling):  # fmt: skip
    """Labelled + unlabelled sources in one run: a labelled loss's queries are only the labelled source's images,
    a label-free loss's are every source's (`--sampling sources`: half of them the 6 unlabelled images, not a
    share by size); the run says what each source holds before training."""
    for i in range(6):
        _img(tmp_path / "free" / f"f{i}.png", (i * 40, 90, 30))
    out = tmp_path / "run"
    args = distill_args(tiny_data, out, loss=loss, epochs=1, quiet=False, sampling=sampling)
    args += ["--data", f"images:{tmp_path / 'free'}"]
    code, stdout, err = run_cli("distill", *args)
    assert code == 0, err
    text = stdout + err
    assert "data images:" in text and "6 images, unlabelled (label-free terms only)" in text
    ends = stdout.strip().splitlines()[-1]  # the next step, ready to paste
    assert ends.startswith("evaluate on its test set: aml evaluate models --teacher resnet18 --student ")
    assert f"{out / 'last.pt'} --dataset " in ends and ends.endswith("--image-size 40")
    shares = [r for r in _log(out) if r.get("epoch") == 1 and "sources" in r][0]["sources"]
    free = f"images:{tmp_path / 'free'}"
    assert set(shares) == {f"synth:{tiny_data}", free} and sum(shares.values()) == pytest.approx(1)
    assert (shares[free] > 0) == unlabelled_queries
    if sampling == "sources":
        assert shares[free] >= 3 / 8  # 8 queries of 6 + 18 images: 2 by size, 4 by source (3 at least)
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"] == [f"synth:{tiny_data}", f"images:{tmp_path / 'free'}"]


def test_real_preset_is_a_checked_recipe():
    cfg = check(TrainConfig().replace(**PRESETS["real"], data=["images:/x"]))
    assert (cfg.teacher, cfg.student, cfg.loss, head_init(cfg)) == ("lite2", "lite0", "csd", "procrustes")
    assert cfg.init_images is None and cfg.loss_args.get("label_weight", 0) == 0 and cfg.sampling == "sources"


def _trainset(n: int) -> TrainSet:
    return TrainSet([f"{i}.jpg" for i in range(n)], np.full(n, -1), np.zeros(0, int), np.zeros(0, int), "x")


def test_sampling_by_source_gives_a_small_source_an_equal_share_of_the_epoch():
    """900 images of one source and 300 of another: `--sampling images` draws the small one at its size (25%),
    `sources` at an equal share (~50%); distinct images either way, and one source is the uniform draw."""
    ranges = ((0, 900), (900, 1200))
    cfg = TrainConfig(query_size=100, pool_size=50)
    small = {}
    for mode in ("images", "sources"):
        plan = plan_images(cfg.replace(sampling=mode), _trainset(1200), np.random.default_rng(0), ranges)
        assert len(set(plan.anchors)) == 100 and plan.anchors.max() < 1200
        small[mode] = float((plan.anchors >= 900).mean())
    assert small["images"] < 0.35 and 0.4 <= small["sources"] <= 0.6
    one = plan_images(cfg.replace(sampling="sources"), _trainset(1200), np.random.default_rng(0), ((0, 1200),))
    uniform = plan_images(cfg, _trainset(1200), np.random.default_rng(0), ((0, 1200),))
    assert np.array_equal(one.anchors, uniform.anchors)
    few = draw_by_source(((0, 5), (5, 8)), np.arange(8), 20, np.random.default_rng(1))
    assert sorted(few) == list(range(8))  # fewer images than asked: every one, once


def test_sampling_by_source_draws_pairs_and_classes_by_source_too():
    """300 two-image classes of one source, 20 of another: by source, the small one's pairs are every one of its
    20 (by size, about 6 of the 100), and its classes about half of the class-balanced batches' (6% by size)."""
    ranges = ((0, 600), (600, 640))
    labels = np.arange(640) // 2
    qidxs, pidxs = np.arange(0, 640, 2), np.arange(1, 640, 2)
    rng = np.random.default_rng(0)
    weights = source_weights(ranges, qidxs)
    assert weights.sum() == pytest.approx(1) and weights[-1] == pytest.approx(15 * weights[0])
    plain, _, _ = sample_epoch(labels, qidxs, pidxs, 100, 10, rng)
    fair, pos, _ = sample_epoch(labels, qidxs, pidxs, 100, 10, rng, weights)
    assert (plain >= 600).sum() <= 12 and (fair >= 600).sum() == 20 and np.array_equal(pos, fair + 1)
    share = {}
    for name, src in (("images", ()), ("sources", ranges)):
        batches = class_balanced_batches(labels, 100, 2, 2, np.random.default_rng(1), src)
        share[name] = float((np.concatenate(batches) >= 600).mean())
    assert share["images"] < 0.15 and 0.35 <= share["sources"] <= 0.65
