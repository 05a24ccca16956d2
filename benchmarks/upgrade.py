"""Model upgrades without re-indexing: the `upgrade` preset (backward-compatible training) and two alternatives,
with the compatibility report on every test set (issue 29).

The old model is lite0 (bundled ImageNet weights, frozen: the teacher whose database stays), the new one lite2
(bundled ImageNet weights, the student), started by the closed form. Methods, each at the preset's budget:
`recipe` (the preset: the new model's own NormSoftmax, the teacher-proxy NormSoftmax and the label-refined csd;
chosen on the synthetic validation split by benchmarks/upgrade_selection.py), `asymmetric alone` (the csd term
only), `influence alone` (the teacher-proxy NormSoftmax only, BCT's influence loss) and `0 epochs` (the
closed-form start, nothing trained). new* is lite2 as it is (its own GeM head, never trained towards lite0):
the independently trained new model. On each test set: old / old, new* / new*, new / new, new -> old (new
queries, old database), G = (new -> old - old / old) / (new* / new* - old / old) (Shen et al., CVPR 2020; docs/
REFERENCE.md §9) and kept = (new / new - old / old) / (new* / new* - old / old); mAP x100, Medium protocol.

Datasets: the synthetic landmarks (default size; its held-out test split), UKBench (objects 0-149 train,
150-249 test) and the real landmark photos (wonders7-train + vn5-train; tested on wonders7-test and vn5-test,
each image a query against the rest of its split), all at 224 px. Resumable: each finished run leaves
`result.json` in its folder. Writes benchmarks/results/upgrade.txt.

    .venv/bin/python benchmarks/upgrade.py --threads 1      # about 30 min of one core
    .venv/bin/python benchmarks/upgrade.py --smoke          # tiny random-weight nets on the tiny synthetic set
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import common
from common import REPO, RESULTS, header, parse, parser, write_results

from aml.io import write_json

SHARED = REPO.parent / "shared" / "data"
LANDMARKS = SHARED / "real" / "landmarks"
UKBENCH_CSV = SHARED / "ukbench" / "groups.csv"
# Table name -> (the `bct` loss's constants changed from the preset's; the preset's other fields changed).
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "recipe": ({}, {}),
    "asymmetric alone": ({"weight_own": 0.0, "weight_influence": 0.0}, {}),
    "influence alone": ({"weight_own": 0.0, "weight_csd": 0.0}, {}),
    "0 epochs": ({}, {"epochs": 0}),
}
DEFAULT_METHODS = tuple(METHODS)
SEEDS = (0,)  # the methods benchmark's seeds for the closed-form start (its `lite0-init` profile)
SIZE = 224


def datasets(smoke: bool) -> dict[str, tuple[list[str], str | None, list[str]]]:
    """name -> (--data specs, --test-data spec or None for the held-out split, extra test specs)."""
    if smoke:
        return {"synth": ([common.smoke_data()], None, [])}
    out: dict[str, tuple[list[str], str | None, list[str]]] = {"synth": (["synth"], None, [])}
    if UKBENCH_CSV.is_file():
        out["ukbench"] = ([f"groups:{UKBENCH_CSV}"], None, [])
    if LANDMARKS.is_dir():
        train = [f"folder:{LANDMARKS / 'wonders7-train'}", f"folder:{LANDMARKS / 'vn5-train'}"]
        out["landmarks"] = (train, f"folder:{LANDMARKS / 'wonders7-test'}", [f"folder:{LANDMARKS / 'vn5-test'}"])
    return out


def config(data: list[str], test: str | None, method: str, seed: int, run_dir: Path, smoke: bool):
    """The TrainConfig of one run: the `upgrade` preset, the method's loss constants (a smoke run: tiny nets)."""
    from aml.train.config import PRESETS, TrainConfig

    fields = {**PRESETS["upgrade"], "data": data, "test_data": test, "eval_every": None}
    if smoke:
        fields.update({**common.SMOKE_TRAIN, "eval_every": None, "data": data})
    loss_args, changes = METHODS[method]
    fields.update(changes, loss_args={**fields["loss_args"], **loss_args})
    return TrainConfig(**fields, seed=seed, out=str(run_dir))


def settings(smoke: bool):
    """How every model embeds the test sets: SIZE px, one scale, no progress bars."""
    from aml.settings import ExtractSettings

    return ExtractSettings(40 if smoke else SIZE, device="cpu", progress=False)


def test_refs(data: list[str], test: str | None, extra: list[str]) -> list[tuple[str, str]]:
    """The (data_root, name) of each test set of a dataset: its own test split, then the extra ones."""
    from aml.data.sources import parse_data_specs
    from aml.data.spec import parse_test_spec

    own = parse_data_specs(data, test, check_images=False).test
    return [(str(own.data_root), own.dataset_name)] + [tuple(map(str, parse_test_spec(s))) for s in extra]


def train_one(
    work: Path, name: str, method: str, seed: int, smoke: bool, cached: bool = False
) -> dict[str, Any] | None:
    """Train one (dataset, method, seed) and score it on each test set; cached in `result.json` (`cached`: only
    read, None when not finished)."""
    from aml.compat import reports_of
    from aml.data.revisitop import load_revisitop
    from aml.evaluate import evaluate_models
    from aml.train.loop import Trainer

    run_dir = work / name / method.replace(" ", "-") / f"seed{seed}"
    done = run_dir / "result.json"
    if done.is_file() or cached:
        return json.loads(done.read_text()) if done.is_file() else None
    data, test, extra = datasets(smoke)[name]
    cfg = config(data, test, method, seed, run_dir, smoke)
    t0 = time.perf_counter()
    Trainer(cfg, resume=(run_dir / "last.pt").is_file(), progress=False).fit()
    seconds = time.perf_counter() - t0
    scores = {}
    for ref in test_refs(data, test, extra):
        ds = load_revisitop(*ref)
        ev = evaluate_models(ds, cfg.teacher, str(run_dir / "last.pt"), settings(smoke), random_init=cfg.random_init)
        scores[ds.name] = {p: r.as_dict() for p, r in reports_of(ev.result).items()}
    result = {"dataset": name, "method": method, "seed": seed, "seconds": seconds, "scores": scores}
    write_json(done, result)
    return result


def new_star(ref: tuple[str, str], smoke: bool) -> tuple[str, dict[str, float | None]]:
    """new* (the upgrade preset's student backbone as it is) on one revisitop-layout test set `ref` (data_root,
    name): (its name, {"new*/new*", "new*->old"}) (medium protocol; new*->old None when the dimensions differ)."""
    from aml.data.revisitop import load_revisitop
    from aml.evaluate import evaluate_independent
    from aml.train.config import PRESETS

    old, new = ("resnet18", "resnet18") if smoke else (PRESETS["upgrade"]["teacher"], PRESETS["upgrade"]["student"])
    ds = load_revisitop(*ref)
    r = evaluate_independent(ds, old, new, settings(smoke), random_init=smoke)
    cross = r["asymmetric"]
    return ds.name, {"new*/new*": r["student"]["mAP"]["M"], "new*->old": None if cross is None else cross["mAP"]["M"]}


def independent(work: Path, name: str, smoke: bool, cached: bool = False) -> dict[str, dict[str, float | None]] | None:
    """new* on each test set of a dataset: {test set: {"new*/new*", "new*->old"}} (medium protocol); cached
    (`cached`: only read, None when not measured)."""
    done = work / name / "independent.json"
    if done.is_file() or cached:
        return json.loads(done.read_text()) if done.is_file() else None
    data, test, extra = datasets(smoke)[name]
    out = dict(new_star(ref, smoke) for ref in test_refs(data, test, extra))
    write_json(done, out)
    return out


def report(rows: list[dict[str, Any]], stars: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    """The table (one line per test set and method, seed means) and the issue's checks per test set."""
    from aml.compat import KEEP, compat_report

    head = (
        f"{'test set':<14} {'method':<17} {'old/old':>8} {'new*/new*':>9} {'new/new':>8} {'new->old':>8} "
        f"{'G':>7} {'kept':>7}  compatible"
    )
    lines, checks = [head, "-" * len(head)], []
    for name in dict.fromkeys(t for r in rows for t in r["scores"]):
        star = next(s[name] for s in stars.values() if name in s)
        by_method: dict[str, list[Any]] = {}
        for r in rows:
            if name in r["scores"]:
                m = r["scores"][name]["M"]
                by_method.setdefault(r["method"], []).append(m)
        for method, ms in by_method.items():
            mean = {k: sum(m[k] for m in ms) / len(ms) for k in ("old/old", "new/new", "new->old")}
            rep = compat_report(
                mean["old/old"], mean["new/new"], mean["new->old"], star["new*/new*"], star["new*->old"]
            )
            g = "-" if rep.update_gain is None else f"{rep.update_gain:7.3f}"
            kept = "-" if rep.kept is None else f"{rep.kept:7.3f}"
            lines.append(
                f"{name:<14} {method:<17} {rep.old_old:>8.2f} {rep.independent:>9.2f} {rep.new_new:>8.2f} "
                f"{rep.new_old:>8.2f} {g:>7} {kept:>7}  {'yes' if rep.compatible else 'no'}"
            )
            if method == "recipe":  # the preset
                ok = rep.compatible and rep.keeps_gain
                gain = (
                    f"kept {rep.kept:.3f} of new*'s gain"
                    if rep.kept is not None
                    else f"new* {rep.independent:.2f} has no gain over old/old"
                )
                checks.append(
                    f"{name}: {method} {'meets' if ok else 'does not meet'} the target (compatible: "
                    f"{'yes' if rep.compatible else 'no'}, new->old {rep.new_old:.2f} vs old/old {rep.old_old:.2f}; "
                    f"{gain}; new/new - old/old >= {KEEP:g} x (new*/new* - old/old): "
                    f"{'yes' if rep.keeps_gain else 'no'})"
                )
        cross = star["new*->old"]
        if cross is not None:
            old_old = next(iter(by_method.values()))[0]["old/old"]
            word = "compatible" if cross > old_old else "NOT compatible"
            checks.append(
                f"{name}: new* as it is against the old database: new*->old {cross:.2f} vs old/old "
                f"{old_old:.2f}: {word}"
            )
    return lines + [""] + checks


def main() -> None:
    ap = parser(__doc__, RESULTS / "upgrade.txt")
    ap.add_argument("--work", type=Path, help="Run folders, resumable (default: runs/upgrade; smoke: scratch).")
    ap.add_argument("--datasets", default="synth,ukbench,landmarks")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"Of: {', '.join(METHODS)}.")
    ap.add_argument("--report-only", action="store_true", help="Only write the results of the finished runs.")
    args = parse(ap, dict(work=None, methods="recipe,0 epochs"))
    import torch  # noqa: F401  (loaded before the thread setting, so that it is set on torch itself)

    setting = header(args)
    print(setting, flush=True)
    work = common.work_dir(args, REPO / "runs" / "upgrade")
    available = datasets(args.smoke)
    names = [d for d in args.datasets.split(",") if d in available]
    methods = common.names_of(args.methods, METHODS, "--methods", "method")
    rows, stars = [], {}
    for name in names:
        stars[name] = independent(work, name, args.smoke, args.report_only)
        print(f"{name}: new* {stars[name]}", flush=True)
    for method in methods:  # method by method: the recipe on every dataset first
        for name in (n for n in names if stars[n] is not None):
            for seed in SEEDS:
                r = train_one(work, name, method, seed, args.smoke, args.report_only)
                if r is None:
                    continue
                rows.append(r)
                summary = ", ".join(f"{t} new/new {s['M']['new/new']:.2f} new->old {s['M']['new->old']:.2f}"
                                    for t, s in r["scores"].items())  # fmt: skip
                print(f"{name} {method} seed {seed}: {summary} ({r['seconds']:.0f} s)", flush=True)
    from aml.train.config import PRESETS

    p = {**PRESETS["upgrade"], **(common.SMOKE_TRAIN if args.smoke else {})}
    nets = "resnet18 -> resnet18 (random weights)" if args.smoke else f"old {p['teacher']}, new {p['student']}"
    head = [
        f"model upgrade ({nets}, bundled weights unless random): `aml distill --preset upgrade`, {p['epochs']} "
        f"epochs x {p['query_size']} images, batch {p['batch_size']}, {settings(args.smoke).image_size} px, "
        f"seeds {', '.join(map(str, SEEDS))}; mAP M x100",
        setting,
    ]
    seconds = sum(r["seconds"] for r in rows)
    tail = [f"training time {seconds / 60:.1f} min over {len(rows)} runs (each run's own, from its result.json)"]
    write_results(args, RESULTS / "upgrade.txt", head + report(rows, stars) + tail)


if __name__ == "__main__":
    main()
