"""Every distillation method at one budget, evaluated asymmetric and symmetric: the results table (issue 7).

For each dataset (the synthetic landmarks set; UKBench from ../shared, objects 0-149 train, 150-249 test) and
each student (lite0 from its bundled ImageNet weights; mobilenetv2 from random weights, none being installable
offline), every method trains with the same data, epochs, tuples per epoch, image size and seeds, teacher lite2
(bundled ImageNet weights). Each run is evaluated at the end: the student's queries against the teacher's
database (asymmetric) and against its own (symmetric). The int8 ONNX export of chosen lite0 students is
evaluated next to its fp32 student. Writes, per dataset, `benchmarks/results/methods-<dataset>.md`, `.json`
and `.png`; `--readme` copies the tables into docs/RESULTS.md.

Runs are resumable: each finished run leaves `result.json` in its run folder and is skipped next time; an
interrupted run continues from its last checkpoint.

    .venv/bin/python benchmarks/methods.py                      # everything (about 1.3 h on 2 CPU cores)
    .venv/bin/python benchmarks/methods.py --datasets ukbench --students lite0 --seeds 0
    .venv/bin/python benchmarks/methods.py --report-only --readme   # rewrite results files and docs/RESULTS.md
    .venv/bin/python benchmarks/methods.py --smoke    # 2 methods, tiny random networks, one int8 export, scratch files
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

from aml.allocator import keep_freed_memory
from aml.io import atomic_write, write_json
from aml.scoring import PROTOCOLS as SCORING_PROTOCOLS
from aml.threads import intra_op_threads

REPO, RESULTS = common.REPO, common.RESULTS
UKBENCH_CSV = REPO.parent / "shared" / "data" / "ukbench" / "groups.csv"
METHODS = [
    "0 epochs",
    "sym",
    "contr",
    "contr+",
    "reg",
    "triplet",
    "triplet m0.1",
    "ms",
    "rkd",
    "darkrank",
    "darkrank all",
    "csd",
    "csd k64 t0.05",
    "csd t0.03",
    "csd labels",
    "contr+csd",
    "contr+10csd",
    "contr+ glam",
    "csd glam",
    "csd k64 t0.05 glam",
    "normsoftmax",
    "normsoftmax trained",
    "normsoftmax learned",
]
# Metrix (issue 14, docs/REFERENCE.md §8): each pair-based method with mixup, the public code's weight 0.4, alpha 2 and
# positive-negative pairs. `metrix-emb` mixes embeddings (asymmetric: the teacher's cached vectors, no extra
# forward; sym: the student's); contr+ also mixes inputs and feature maps (aml/train/mixup.py says what the
# asymmetric case mixes). Table name -> (method it modifies, --mixup mode).
METRIX: dict[str, tuple[str, str]] = {
    **{f"{m} metrix-emb": (m, "embedding") for m in ("sym", "contr", "contr+", "triplet", "ms")},
    "contr+ metrix-input": ("contr+", "input"),
    "contr+ metrix-feat": ("contr+", "feature"),
}
METHODS += list(METRIX)
# Table names that are a registered loss with other constants or another budget: (loss, constants, config
# changes). contr+ plus csd weighted 10x (the 1:1 mix is dominated by the contrastive term at this budget);
# triplet with margin 0.1 and DarkRank with the denominator over all items (this project's defaults before
# issue 12; the AML paper code's are margin 0.7 and the teacher's list only); csd with the former demo's
# constants (k 64, tau_s 0.05); "csd labels": the demo's loss (the label-refined target, label_weight 0.5, tau_s
# 0.03, k 256), and "csd t0.03" the same without the label term;
# "0 epochs": the start alone (the closed form, or the paper's random head), nothing trained; "<method> glam": the
# method with the global-local attention module (all four parts) between the student's backbone and its head.
# NormSoftmax (docs/REFERENCE.md §8): "normsoftmax" classifies the student by the teacher's class means (frozen;
# asymmetric), "normsoftmax trained" by proxies NormSoftmax fitted to the teacher's cached vectors (frozen;
# asymmetric), "normsoftmax learned" is the paper's symmetric recipe (learned proxies, LayerNorm head, never the
# teacher); both with class-balanced batches of 4 classes x 2 images (batch 8) and one warm-up epoch that trains
# only the new parameters (the defaults).
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "0 epochs": ("reg", {}, {"epochs": 0}),
    "triplet m0.1": ("triplet", {"margin": 0.1}, {}),
    "darkrank all": ("darkrank", {"denominator": "all"}, {}),
    "csd k64 t0.05": ("csd", {"k": 64, "tau_s": 0.05}, {}),
    "csd t0.03": ("csd", {"tau_s": 0.03}, {}),
    "csd labels": ("csd", {"tau_s": 0.03, "label_weight": 0.5}, {}),
    "contr+10csd": ("contr+csd", {"weight_csd": 10.0}, {}),
    "contr+ glam": ("contr+", {}, {"glam": "all"}),
    "csd glam": ("csd", {}, {"glam": "all"}),
    "csd k64 t0.05 glam": ("csd", {"k": 64, "tau_s": 0.05}, {"glam": "all"}),
    **{name: (base, {}, {"mixup": mode}) for name, (base, mode) in METRIX.items()},
    "normsoftmax trained": ("normsoftmax", {}, {"proxies": "teacher-trained"}),
    "normsoftmax learned": ("normsoftmax", {}, {"proxies": "learned"}),
}
GLAM_SUFFIX = " glam"  # "<method> glam": the same method with GLAM's four parts on the student's maps (issue 14)
CSD_METHODS = ("csd", "csd k64 t0.05", "csd t0.03", "csd labels", "contr+csd", "contr+10csd")
# The label-refined CSD target (issue 12's demo recipe) against the same CSD without it: (with, without).
LABEL_TARGET = ("csd labels", "csd t0.03")
# The budget every method gets (the demo recipe, shortened): only the method changes between runs.
BUDGET: dict[str, Any] = dict(
    teacher="lite2",
    epochs=2,
    query_size=200,
    pool_size=2000,
    neg_num=5,
    batch_size=8,
    image_size=224,
    lr_decay=math.exp(-0.1),
    eval_every=2,
)
# Per student profile: the student, where its weights come from, how its head starts and the learning rates that
# suit that start (the teacher always keeps its ImageNet weights). `lite0` and `mobilenetv2` start as the AML
# paper does (a random 1x1 projection); `lite0-init` starts from the closed form (issue 12: the default).
STUDENTS: dict[str, dict[str, Any]] = {
    "lite0": dict(student="lite0", student_random_init=False, head_init="random", lr=5e-5, head_lr_mult=50.0),
    "mobilenetv2": dict(student="mobilenetv2", student_random_init=True, head_init="random", lr=1e-3, head_lr_mult=1.0),
    "lite0-init": dict(student="lite0", student_random_init=False, head_init="auto", lr=1e-5, head_lr_mult=1.0),
}
# Seeds per profile by default: three for lite0; one for the random-weight mobilenetv2, which this budget leaves
# near chance whatever the method (so spread says little there), and one for the closed-form start.
SEEDS = {"lite0": (0, 1, 2), "mobilenetv2": (0,), "lite0-init": (0,)}
# Methods a profile does not run: `sym` and learned-proxy NormSoftmax never see the teacher, so they start from
# the random head anyway (and so does `sym` with Metrix).
NO_TEACHER = ("sym", "normsoftmax learned")
SKIP = {"lite0-init": (*NO_TEACHER, "sym metrix-emb")}
EXPORTED = {"lite0": ("contr+", "csd", "contr+csd"), "lite0-init": ("csd k64 t0.05", "csd labels")}  # seed 0, int8 ONNX
PROTOCOLS = tuple(SCORING_PROTOCOLS)  # E, M, H
# Per dataset: its test set in words and the protocols its table shows.
TEST_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "synth": ("synthetic landmarks test split (72 queries, 320 database images); mAP Easy / Medium / Hard", PROTOCOLS),
    "ukbench": (
        "UKBench objects 150-249 (400 images, each a query against the other 399); one mAP column (M): "
        "UKBench has no hard positives, so Easy = Medium and Hard is undefined",
        ("M",),
    ),
}


def start(student: str, smoke: bool = False) -> str:
    """Where a student profile's weights come from and how its head starts, in words (a smoke run: random
    weights)."""
    st = STUDENTS[student]
    weights = "random weights, no ImageNet" if st["student_random_init"] or smoke else "ImageNet weights, bundled"
    head = (
        "random 1x1 projection (the AML paper's)" if st["head_init"] == "random" else "closed form (local-procrustes)"
    )
    return f"{weights}; head: {head}"


def budget(smoke: bool = False) -> dict[str, Any]:
    """The TrainConfig fields every method gets (a smoke run: tiny random networks on the tiny synthetic set)."""
    return common.smoke_budget(BUDGET) if smoke else BUDGET


def test_set(dataset: str, smoke: bool = False) -> str:
    """A dataset's test set in words (a smoke run: the tiny synthetic set)."""
    return f"tiny {common.synth_test_set(smoke=True)}; mAP Easy / Medium / Hard" if smoke else TEST_SETS[dataset][0]


def data_spec(dataset: str, smoke: bool = False) -> str | None:
    """The `--data` spec of a benchmark dataset (a smoke run: the tiny synthetic set), or None when its files are
    absent."""
    if dataset == "synth":
        return common.smoke_budget({})["data"] if smoke else "synth"
    if dataset == "ukbench":
        return f"groups:{UKBENCH_CSV}" if UKBENCH_CSV.is_file() else None
    raise SystemExit(f"--datasets: unknown dataset {dataset!r}; use synth, ukbench")


# ------------------------------------------------------------------------------------------------ runs
def method_config(dataset: str, student: str, method: str, seed: int, run_dir: Path, smoke: bool = False):
    """The TrainConfig of one (dataset, student, method, seed): the budget, the student profile, the method (a
    smoke run: its tiny networks in place of the profile's)."""
    from aml.train.config import TrainConfig

    loss, loss_args, changes = VARIANTS.get(method, (method, {}, {}))
    fields = {**STUDENTS[student], **budget(smoke), **changes, "data": data_spec(dataset, smoke)}
    return TrainConfig(**fields, loss=loss, loss_args=loss_args, seed=seed, out=str(run_dir))


def train_one(work: Path, dataset: str, student: str, method: str, seed: int, smoke: bool = False) -> dict[str, Any]:
    """Train and evaluate one (dataset, student, method, seed); cached in `result.json` of its run folder."""
    from aml.train.checkpoint import load_checkpoint
    from aml.train.loop import Trainer

    run_dir = work / dataset / student / method / f"seed{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = method_config(dataset, student, method, seed, run_dir, smoke)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume=(run_dir / "last.pt").is_file(), progress=False)
    trainer.fit()
    seconds = time.perf_counter() - t0
    ckpt = load_checkpoint(run_dir / "last.pt")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    ev = ckpt["metrics"]["eval"]
    result = {
        "dataset": dataset,
        "student": student,
        "method": method,
        "seed": seed,
        "asymmetric": ev["asymmetric"]["mAP"],
        "symmetric": ev["student"]["mAP"],
        "teacher": trainer.evaluator.teacher()["mAP"],
        "chance": chance_map(trainer.evaluator.ds),
        "seconds": seconds,
        "images_per_s": statistics.median([e["images_per_s"] for e in log if "images_per_s" in e] or [0.0]),
        "init": ckpt.get("init"),
        "checkpoint": str(run_dir / "last.pt"),
        "threads": intra_op_threads(),
    }
    write_json(done, result)
    return result


def chance_map(ds) -> dict[str, float]:
    """mAP of random rankings on the test set (mean of 5 seeds): what 'useless' scores."""
    from aml.evaluate import evaluate_features

    rng = np.random.default_rng(0)
    runs = [
        evaluate_features(
            ds,
            db=rng.standard_normal((len(ds.imlist), 8)).astype(np.float32),  # drawn first, as before
            queries=rng.standard_normal((len(ds.qimlist), 8)).astype(np.float32),
        )["mAP"]
        for _ in range(5)
    ]
    return {p: float(np.mean([r[p] for r in runs])) for p in PROTOCOLS}


def export_one(result: dict[str, Any]) -> dict[str, Any]:
    """fp32 student vs its int8 ONNX export: asymmetric mAP on the test set (gate recorded, not enforced)."""
    from aml.export.pipeline import ExportSettings, export_checkpoint
    from aml.export.verify import MAP_TOLERANCE

    run_dir = Path(result["checkpoint"]).parent
    done = run_dir / "int8.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    settings = ExportSettings(precision="int8", map_tolerance=float("inf"))
    info = export_checkpoint(result["checkpoint"], settings, out=run_dir / "student-int8.onnx")
    rt = info["verification"]["retrieval"]
    out = {
        "method": result["method"],
        "student": result["student"],
        "fp32": rt["student_fp32_mAP"],
        "int8": rt["exported_mAP"],
        "query_cosine_min": rt["query_cosine"]["cosine_min"],
        "gate_tolerance": MAP_TOLERANCE,
        "gate_passed": rt["max_mAP_difference"] <= MAP_TOLERANCE,
        "bytes": os.path.getsize(run_dir / "student-int8.onnx"),
        "seconds": time.perf_counter() - t0,
    }
    write_json(done, out)
    return out


# ---------------------------------------------------------------------------------------------- report
def finished(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every finished run (and int8 export) under a dataset's folder, in student / method / seed order."""

    def key(r: dict[str, Any]) -> tuple:
        return list(STUDENTS).index(r["student"]), METHODS.index(r["method"]), r.get("seed", 0)

    results = [json.loads(p.read_text()) for p in root.glob("*/*/seed*/result.json")]
    exports = [json.loads(p.read_text()) for p in root.glob("*/*/seed*/int8.json")]
    keep = [r for r in results if r["student"] in STUDENTS and r["method"] in METHODS]
    return sorted(keep, key=key), sorted(exports, key=key)


def _stats(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    m, s = _stats(values)
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{student: {method: {asymmetric: {p: [..]}, symmetric: {p: [..]}, seeds, seconds}}} in METHODS order."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for student in STUDENTS:
        rows = {}
        for method in METHODS:
            rs = sorted(
                (r for r in results if r["student"] == student and r["method"] == method), key=lambda r: r["seed"]
            )
            if rs:
                rows[method] = {
                    side: {p: [r[side][p] for r in rs] for p in PROTOCOLS} for side in ("asymmetric", "symmetric")
                }
                rows[method].update(seeds=[r["seed"] for r in rs], seconds=[r["seconds"] for r in rs])
        if rows:
            out[student] = rows
    return out


def findings(rows: dict[str, dict[str, Any]], chance: float, teacher: float | None = None) -> list[str]:
    """The issue's claims checked on Medium asymmetric mAP (means over seeds), one line each; with the teacher's
    own mAP M, first the compatibility report's verdict per method (`compat_findings`)."""
    asym = {m: _stats(r["asymmetric"]["M"])[0] for m, r in rows.items()}
    lines = []
    ranked = sorted(asym, key=asym.get, reverse=True)
    if asym[ranked[0]] < 2 * chance:
        lines.append(
            f"no method reaches twice chance asymmetrically (best {asym[ranked[0]]:.2f}, chance "
            f"{chance:.2f}): this budget does not bring the student into the teacher's space, so the "
            "comparisons below are noise"
        )
    lines.append("asymmetric ranking (mAP M): " + " > ".join(f"{m} {asym[m]:.2f}" for m in ranked))
    if "sym" in asym:
        aware = [m for m in asym if m not in NO_TEACHER and VARIANTS.get(m, (m,))[0] not in NO_TEACHER]
        above = [m for m in aware if asym[m] > asym["sym"]]
        lines.append(
            f"no-teacher `sym` student against the teacher's database: {asym['sym']:.2f} (chance "
            f"{chance:.2f}); teacher-aware methods above it: {len(above)} of {len(aware)}"
            + (f" (not: {', '.join(sorted(set(aware) - set(above)))})" if len(above) < len(aware) else "")
        )
    aml = [m for m in ranked if m in ("contr", "contr+", "reg", "triplet", "ms", "rkd", "darkrank")]
    if len(aml) >= 4:
        lines.append(
            f"among the AML paper's methods: best two {aml[0]}, {aml[1]} (paper: reg, contr+); "
            f"worst two {aml[-2]}, {aml[-1]} (paper: rkd, darkrank)"
        )
    for cand in CSD_METHODS:
        if cand in asym and "contr+" in asym and "reg" in asym:
            best = max(asym["contr+"], asym["reg"])
            three = [rows[m]["asymmetric"]["M"] for m in (cand, "contr+", "reg")]
            spread = (
                f"largest seed std of the three {max(_stats(v)[1] for v in three):.2f}"
                if min(map(len, three)) > 1
                else "one seed: no spread"
            )
            verdict = "beats" if asym[cand] > best else "does not beat"
            lines.append(
                f"`{cand}` {verdict} contr+ and reg: {asym[cand]:.2f} vs {best:.2f} "
                f"({asym[cand] - best:+.2f} points; {spread})"
            )
    sym_m = {m: _stats(r["symmetric"]["M"])[0] for m, r in rows.items()}
    for name, (base, mode) in METRIX.items():
        if name in asym and base in asym:
            mixed, clean, spread = versus(rows, name, base)
            lines.append(
                f"Metrix ({mode}) on `{base}`: asymmetric {mixed:.2f} vs {clean:.2f} ({mixed - clean:+.2f}; "
                f"{spread}), symmetric {sym_m[name]:.2f} vs {sym_m[base]:.2f} ({sym_m[name] - sym_m[base]:+.2f}) mAP M"
            )
    with_labels, without = LABEL_TARGET
    if with_labels in rows and without in rows:
        a, b, spread = versus(rows, without, with_labels)
        weight = VARIANTS[with_labels][1]["label_weight"]
        lines.append(
            f"the label-refined CSD target (`{with_labels}`, label_weight {weight:g}) vs the same CSD without it "
            f"(`{without}`): asymmetric {a:.2f} -> {b:.2f} ({b - a:+.2f} points; {spread}), symmetric "
            f"{sym_m[without]:.2f} -> {sym_m[with_labels]:.2f}"
        )
    return (compat_findings(rows, teacher) if teacher is not None else []) + lines + glam_findings(rows)


def compat_findings(rows: dict[str, dict[str, Any]], teacher: float) -> list[str]:
    """The compatibility report (aml.compat, docs/REFERENCE.md §9) read as an upgrade, the teacher the old model and
    the student the new one (mAP M, seed means): which methods are compatible (new -> old above old / old)."""
    from aml.compat import compat_report

    reps = {
        m: compat_report(teacher, _stats(r["symmetric"]["M"])[0], _stats(r["asymmetric"]["M"])[0])
        for m, r in rows.items()
    }
    yes = [m for m, r in reps.items() if r.compatible]
    closest = max(reps, key=lambda m: reps[m].new_old) if reps else None
    return [
        f"compatibility report (the teacher as the old model, the student as the new one; aml.compat): new -> old "
        f"above old / old {teacher:.2f} for {len(yes)} of {len(reps)} methods"
        + (f" ({', '.join(f'{m} {reps[m].new_old:.2f}' for m in yes)})" if yes else "")
        + (f", closest {closest} {reps[closest].new_old:.2f}" if not yes and reps else "")
        + "; this student is the smaller model, so the upgrade's question is asked by benchmarks/upgrade.py"
    ]


def versus(rows: dict[str, dict[str, Any]], first: str, second: str) -> tuple[float, float, str]:
    """Two methods' asymmetric mAP M (seed means) and their seed spread in words (`seed std first / second`)."""
    (a, a_sd), (b, b_sd) = (_stats(rows[m]["asymmetric"]["M"]) for m in (first, second))
    seeds = min(len(rows[first]["seeds"]), len(rows[second]["seeds"]))
    return a, b, f"seed std {a_sd:.2f} / {b_sd:.2f}" if seeds > 1 else "one seed: no spread"


def glam_findings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """With and without GLAM, method by method: asymmetric and symmetric mAP M (seed means) and the seed spread."""
    lines = []
    for with_glam in (m for m in rows if m.endswith(GLAM_SUFFIX)):
        base = with_glam[: -len(GLAM_SUFFIX)]
        if base not in rows:
            continue
        a_asym, b_asym, spread = versus(rows, base, with_glam)
        a_sym, b_sym = (_stats(rows[m]["symmetric"]["M"])[0] for m in (base, with_glam))
        verdict = "helps" if b_asym > a_asym else "does not help"
        lines.append(
            f"GLAM {verdict} `{base}`: asymmetric {a_asym:.2f} -> {b_asym:.2f} ({b_asym - a_asym:+.2f} points; "
            f"{spread}), symmetric {a_sym:.2f} -> {b_sym:.2f}"
        )
    return lines


def start_findings(summary: dict[str, dict[str, Any]], base: str = "lite0", init: str = "lite0-init") -> list[str]:
    """What the closed-form start changes: asymmetric mAP M of each method from both starts (seed means)."""
    if base not in summary or init not in summary:
        return []
    a, b = summary[base], summary[init]
    both = [m for m in a if m in b]
    if not both:
        return []
    asym = {m: (_stats(a[m]["asymmetric"]["M"])[0], _stats(b[m]["asymmetric"]["M"])[0]) for m in both}
    best = max(both, key=lambda m: asym[m][1])
    gains = [asym[m][1] - asym[m][0] for m in both if m != "0 epochs"]
    lines = [
        f"closed-form start vs the paper's random start ({init} vs {base}, asymmetric mAP M): "
        + ", ".join(f"{m} {asym[m][0]:.2f} -> {asym[m][1]:.2f}" for m in both)
    ]
    if gains:
        lines.append(
            f"the closed form changes every trained method by {min(gains):+.2f} to {max(gains):+.2f} points; "
            f"best from it: {best} {asym[best][1]:.2f}"
        )
    if "0 epochs" in b:
        start = _stats(b["0 epochs"]["asymmetric"]["M"])[0]
        trained = {m: _stats(b[m]["asymmetric"]["M"])[0] - start for m in b if m != "0 epochs"}
        up = [f"{m} {d:+.2f}" for m, d in sorted(trained.items(), key=lambda kv: -kv[1]) if d > 0]
        down = [f"{m} {d:+.2f}" for m, d in sorted(trained.items(), key=lambda kv: -kv[1]) if d <= 0]
        lines.append(
            f"fine-tuning from the closed form ({init}, '0 epochs' asymmetric M {start:.2f}): raises it for "
            f"{', '.join(up) or 'no method'}; lowers it for {', '.join(down) or 'no method'}"
        )
    return lines


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} CPU cores, {dev}, torch {torch.__version__}"


def write_report(
    dataset: str,
    results: list[dict[str, Any]],
    exports: list[dict[str, Any]],
    command: str,
    out: Path | None = None,
    smoke: bool = False,
) -> Path:
    """methods-<dataset>.md / .json / .png from the finished runs, in `out` (default RESULTS)."""
    out = out or RESULTS
    summary = summarise(results)
    teacher = results[0]["teacher"]
    chance = results[0]["chance"]
    total = sum(r["seconds"] for r in results) + sum(e["seconds"] for e in exports)
    b = budget(smoke)
    weights = "random weights" if b.get("random_init") else "ImageNet"
    budget_text = (
        f"teacher {b['teacher']} ({weights}), {b['epochs']} epochs x {b['query_size']} tuples (or images, "
        f"for batch losses), {b['neg_num']} negatives, batch {b['batch_size']}, {b['image_size']} px"
    )
    test, cols = test_set(dataset, smoke), TEST_SETS[dataset][1]
    md = [
        f"### {dataset}",
        "",
        f"Budget (every method): {budget_text}. Test: {test}; x100, mean ± sample std over seeds. Teacher "
        f"{b['teacher']} on itself: {_triple(teacher, cols)}; random ranking (chance): {_triple(chance, cols)}.",
        "",
    ]
    for student, rows in summary.items():
        st = STUDENTS[student]
        shown = f"{student} profile, {b['student']}" if smoke else student
        md += [
            f"**student {shown}** (start: {start(student, smoke)}; lr {st['lr']:g}, projection lr "
            f"x{st['head_lr_mult']:g})",
            "",
            "| method | seeds | "
            + " | ".join(f"{side} {p}" for side in ("asymmetric", "symmetric") for p in cols)
            + " | s / run |",
            "|---" * (3 + 2 * len(cols)) + "|",
        ]
        for method, r in rows.items():
            cells = [_cell(r[side][p]) for side in ("asymmetric", "symmetric") for p in cols]
            md.append(
                f"| {method} | {len(r['seeds'])} | " + " | ".join(cells) + f" | {statistics.median(r['seconds']):.0f} |"
            )
        md += ["", "Findings (computed from the table):", ""]
        md += [f"- {line}" for line in findings(rows, chance["M"], teacher["M"])]
        md.append("")
    closed = start_findings(summary)
    if closed:
        md += ["**The closed-form start** (computed from the tables above):", ""] + [f"- {x}" for x in closed] + [""]
    if exports:
        md += [
            "**int8 ONNX export** (static QDQ, 32 calibration images; asymmetric mAP of the exported query "
            "encoder vs its fp32 PyTorch student, same teacher database)",
            "",
            f"| student | method | fp32 {' / '.join(cols)} | int8 {' / '.join(cols)} | query cosine min | "
            f"within {exports[0]['gate_tolerance']:g} point | int8 MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in exports:
            md.append(
                f"| {e['student']} | {e['method']} | {_triple(e['fp32'], cols)} | {_triple(e['int8'], cols)} | "
                f"{e['query_cosine_min']:.4f} | {'yes' if e['gate_passed'] else 'no'} | "
                f"{e['bytes'] / 1e6:.1f} |"
            )
        md.append("")
    md += [
        f"Run time: {total / 60:.1f} min for {len(results)} runs and {len(exports)} exports on {machine()}. "
        f"Command: `{command}`. Chart: `benchmarks/results/methods-{dataset}.png`.",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"methods-{dataset}.md"
    with atomic_write(path) as f:
        f.write("\n".join(md))
    write_json(
        out / f"methods-{dataset}.json",
        {"budget": b, "students": STUDENTS, "runs": results, "exports": exports, "seconds": total},
    )
    chart(dataset, summary, teacher["M"], chance["M"], out / f"methods-{dataset}.png", smoke)
    return path


def _triple(m: dict[str, float], cols: tuple[str, ...]) -> str:
    return " / ".join(f"{m[p]:.2f}" for p in cols)


def chart(
    dataset: str, summary: dict[str, dict[str, Any]], teacher_m: float, chance_m: float, path: Path, smoke: bool = False
) -> None:
    """Bars of asymmetric and symmetric mAP M per method (seed std as error bars), teacher and chance lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6.5 * len(summary), 4), squeeze=False)
    for ax, (student, rows) in zip(axes[0], summary.items(), strict=True):
        x = np.arange(len(rows))
        for off, side, color in ((-0.2, "asymmetric", "tab:blue"), (0.2, "symmetric", "tab:gray")):
            stats = [_stats(r[side]["M"]) for r in rows.values()]
            ax.bar(x + off, [m for m, _ in stats], 0.4, yerr=[s for _, s in stats], color=color, label=side, capsize=2)
        ax.axhline(teacher_m, color="tab:red", ls="--", lw=1, label="teacher (symmetric)")
        ax.axhline(chance_m, color="k", ls=":", lw=1, label="chance")
        ax.set_xticks(x, list(rows), rotation=40, ha="right")
        ax.set_ylabel("mAP Medium")
        ax.set_title(f"{dataset}: student {student} ({start(student, smoke).split(',')[0]})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(datasets: list[str], results: Path | None = None, page: Path | None = None) -> None:
    """Replace the generated block of `page` (default docs/RESULTS.md) with the tables of the results files in
    `results` (default RESULTS): no hand-typed numbers."""
    readme = page or REPO / "docs" / "RESULTS.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme}: no '{README_START}' ... '{README_END}' block to fill")
    parts = []
    for d in datasets:
        md = (results or RESULTS) / f"methods-{d}.md"
        if md.is_file():
            parts.append(md.read_text().strip() + f"\n\n![{d} methods chart](../benchmarks/results/methods-{d}.png)")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with atomic_write(readme) as f:
        f.write(head + README_START + "\n" + "\n\n".join(parts) + "\n" + README_END + tail)


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = common.parser(__doc__, results=RESULTS)
    ap.add_argument("--datasets", default="synth,ukbench")
    ap.add_argument("--students", default="lite0,mobilenetv2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", help="Comma-separated seeds for every student (default: lite0 0,1,2; mobilenetv2 0).")
    ap.add_argument("--work", type=Path, help="Run folders, resumable (default: runs/methods; smoke: scratch).")
    ap.add_argument("--report-only", action="store_true", help="Only rewrite results from finished runs.")
    ap.add_argument(
        "--readme", action="store_true", help="Copy the results tables into docs/RESULTS.md (smoke: a copy)."
    )
    args = common.parse(ap, dict(datasets="synth", students="lite0", methods="0 epochs,contr+", seeds="0", readme=True))
    keep_freed_memory()
    import torch  # noqa: F401  (loaded before the thread setting, so that it is set on torch itself)

    print(common.header(args), flush=True)
    work = common.work_dir(args, REPO / "runs" / "methods")
    out = common.results_path(args, RESULTS)
    datasets = args.datasets.split(",")
    given = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    shown = [a for a in sys.argv[1:] if a not in ("--report-only", "--readme")]
    command = " ".join(["python benchmarks/methods.py", *shown])
    for dataset in datasets:
        if data_spec(dataset) is None:
            print(f"{dataset}: skipped, {UKBENCH_CSV} not found (the shared data folder is absent)")
            continue
        for student in [] if args.report_only else args.students.split(","):
            if student not in STUDENTS:
                raise SystemExit(f"--students: unknown student {student!r}; use {', '.join(STUDENTS)}")
            run_student(work, dataset, student, args.methods.split(","), given or SEEDS[student], args.smoke)
        results, exports = finished(work / dataset)
        if results:
            print(f"wrote {write_report(dataset, results, exports, command, out, args.smoke)}")
    if args.readme:
        page = common.smoke_copy("docs/RESULTS.md") if args.smoke else REPO / "docs" / "RESULTS.md"
        update_readme(datasets, out, page)
        print(f"wrote the results block of {page}")


def run_student(work: Path, dataset: str, student: str, methods: list[str], seeds: list[int], smoke: bool) -> None:
    """Train (or read) every method and seed of one student profile, and the int8 exports it makes; one line each."""
    for method in methods:
        if method in SKIP.get(student, ()):
            continue
        for seed in seeds:
            r = train_one(work, dataset, student, method, seed, smoke)
            print(
                f"{dataset} {student} {method} seed {seed}: asym M {r['asymmetric']['M']:.2f} "
                f"sym M {r['symmetric']['M']:.2f} ({r['seconds']:.0f} s)",
                flush=True,
            )
            if seed == seeds[0] and method in EXPORTED.get(student, ()):
                e = export_one(r)
                print(f"  int8: asym M {e['int8']['M']:.2f} vs fp32 {e['fp32']['M']:.2f}", flush=True)


if __name__ == "__main__":
    main()
