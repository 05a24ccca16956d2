"""Real photos, end to end: the `real` preset trained on real training photos, scored on every real test split.

Trains `aml distill --preset real` (lite2 -> lite0, bundled ImageNet weights) on the real training sources
beside the project (../shared/data: the two landmark train folders, UKBench objects 0-149, every Caltech-101
photo, the unlabelled scenes), and the no-teacher baseline (`--loss sym`, the demo baseline's budget),
then scores teacher (symmetric), student (symmetric), student -> teacher (asymmetric) and the baseline
(asymmetric) on each real test split (wonders7-test, vn5-test, UKBench objects 150-249: each image a query
against the rest of its split, positives the same label) at 224 px, 512 px (UKBench photos are 320 px and never
upscaled: 320) and multi-scale (362 px, scales 1, 1/sqrt(2), 1/2). mAP x100 (medium protocol = every positive).

The recipe's constants and the Caltech share were chosen on leave-one-source-out folds of the training photos
(benchmarks/real_selection.py); no test split chose anything. Run it with an empty $AML_HOME to time a first run
(the recipe's seconds then include the teacher's vectors of every training photo). Writes
benchmarks/results/real_photos.txt.

    AML_HOME=$(mktemp -d) .venv/bin/python benchmarks/real_photos.py --threads 2   # ~7 min on an idle 2-core CPU
    .venv/bin/python benchmarks/real_photos.py --smoke         # tiny random-weight nets on drawn photos
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common import REPO, RESULTS, aml, header, parse, parser, scratch, smoke_options, write_results
from PIL import Image

from aml.data.spec import parse_test_spec
from aml.io import atomic_write

SHARED = REPO.parent / "shared" / "data"
# Caltech-101 photos a class in the training sources (0: all 3969): every one, chosen on the validation folds of
# benchmarks/real_selection.py (10 a class before)
CALTECH_PER_CLASS = 0
SIZES = ("224", "512", "ms")
SMOKE = dict(work=None)


def _groups(path: Path, rows: list[tuple[str, str, str]]) -> str:
    """Write a groups CSV (image, object, split) and return its data spec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:  # runs side by side write the same file: a reader never sees half of it
        f.write("image,object,split\n" + "".join(f"{i},{o},{s}\n" for i, o, s in rows))
    return f"groups:{path}"


def training_sources(work: Path, caltech_per_class: int = CALTECH_PER_CLASS) -> dict[str, str]:
    """The real training sources on ../shared/data by name (`--data` specs): the two landmark train folders,
    UKBench objects 0-149, `caltech_per_class` Caltech-101 photos a class (0: all), the unlabelled scenes."""
    lm = SHARED / "real" / "landmarks"
    cal = SHARED / "real" / "objects" / "caltech101"
    rows = [(str(p), c.name, "train") for c in sorted(cal.iterdir())
            for p in sorted(c.iterdir())[: caltech_per_class or None]]  # fmt: skip
    return {
        "wonders7": f"folder:{lm / 'wonders7-train'}",
        "vn5": f"folder:{lm / 'vn5-train'}",
        "ukbench": ukbench_groups(work),
        "caltech": _groups(work / f"caltech{caltech_per_class}" / "groups.csv", rows),
        "scenes": f"images:{SHARED / 'real' / 'scenes'}",
    }


def ukbench_photo(i: int) -> str:
    """The path of UKBench photo `i` (0-999; object i // 4)."""
    return str(SHARED / "ukbench" / "jpg" / f"ukbench{i:05d}.jpg")


def ukbench_groups(work: Path) -> str:
    """A groups spec of the 1000 UKBench photos (object = photo // 4): objects 0-149 are training rows, 150-249
    the test rows."""
    rows = [(ukbench_photo(i), str(i // 4), "train" if i < 600 else "test") for i in range(1000)]
    return _groups(work / "ukbench" / "groups.csv", rows)


def real_sources(work: Path) -> tuple[list[str], dict[str, str]]:
    """The training sources (`--data` specs) and the test splits (name -> test spec) on ../shared/data; UKBench's
    one groups CSV holds both its training rows and its test rows."""
    sources = training_sources(work)
    lm = SHARED / "real" / "landmarks"
    tests = {"wonders7-test": f"folder:{lm / 'wonders7-test'}", "vn5-test": f"folder:{lm / 'vn5-test'}"}
    tests["ukbench-test"] = sources["ukbench"]
    return list(sources.values()), tests


def smoke_sources(work: Path) -> tuple[list[str], dict[str, str]]:
    """Drawn stand-ins: 3 labels x 5 photos to train, 3 x 2 to test, 4 unlabelled photos."""
    for split, n in (("train", 5), ("test", 2)):
        for lab in range(3):
            for i in range(n):
                path = work / split / f"l{lab}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (48, 40), (80 * lab, 40 * i + 20 * (split == "test"), 120)).save(path)
    for i in range(4):
        (work / "free").mkdir(exist_ok=True)
        Image.new("RGB", (40, 48), (30 * i, 200, 60)).save(work / "free" / f"{i}.png")
    return [f"folder:{work / 'train'}", f"images:{work / 'free'}"], {"drawn-test": f"folder:{work / 'test'}"}


def distill(out: Path, sources: list[str], test: str, smoke: bool, *extra: str) -> float:
    """Train one student into `out` (seconds taken)."""
    args = ["distill", "--preset", "real", "--test-data", test, "--out", str(out), "--eval-every", "0", *extra]
    for spec in sources:
        args += ["--data", spec]
    if smoke:
        args += smoke_options()
    t = time.perf_counter()
    aml(*args)
    return time.perf_counter() - t


def scores(student: Path, ref: tuple[str, str], size: str, work: Path, smoke: bool) -> dict[str, float]:
    """Medium-protocol mAP of the teacher, the student and the asymmetric pair on one test split at one size."""
    out = work / f"eval-{student.parent.name}-{ref[1]}-{size}.json"
    scale = ["--image-size", "362", "--multiscale", "1,0.7071,0.5"] if size == "ms" else ["--image-size", size]
    teacher = ["--teacher", "resnet18", "--random-init"] if smoke else ["--teacher", "lite2"]
    aml("evaluate", "models", *teacher, "--student", str(student), "--dataset", ref[1], "--data-root", ref[0],
        *scale, "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    return {row: result[row]["mAP"]["M"] for row in ("teacher", "student", "asymmetric")}


def report(table: dict[str, dict[str, dict[str, float]]], times: dict[str, float]) -> list[str]:
    """The results table, the ratio asymmetric / teacher, and the issue's checks."""
    lines = [
        f"{'test split':<14} {'size':>5} {'teacher':>8} {'student':>8} {'asym':>8} {'asym/T':>7} {'baseline':>9}",
    ]
    for name, by_size in table.items():
        for size, r in by_size.items():
            ratio = r["asymmetric"] / max(r["teacher"], 1e-9)
            lines.append(f"{name:<14} {size:>5} {r['teacher']:>8.2f} {r['student']:>8.2f} {r['asymmetric']:>8.2f} "
                         f"{ratio:>7.3f} {r['baseline']:>9.2f}")  # fmt: skip
    single = [(n, s, r) for n, by in table.items() for s, r in by.items() if s != "ms"]
    below = [
        f"{n} {s} ({r['asymmetric'] / r['teacher']:.3f})" for n, s, r in single if r["asymmetric"] < 0.95 * r["teacher"]
    ]
    lines.append("asym >= 0.95 x teacher at 224 and 512: " + ("met" if not below else "not met: " + ", ".join(below)))
    drops = [n for n, by in table.items() if by["512"]["asymmetric"] < by["224"]["asymmetric"]]
    lines.append("asym at 512 >= asym at 224: " + ("met" if not drops else "not met: " + ", ".join(drops)))
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    return lines


def main() -> None:
    ap = parser(__doc__, RESULTS / "real_photos.txt")
    ap.add_argument("--work", type=Path, help="Folder for the runs and CSVs (default: a temp folder).")
    ap.add_argument("--seed", type=int, default=0, help="The recipe's seed (`aml distill --seed`): a seed's spread.")
    args = parse(ap, SMOKE)
    import torch  # noqa: F401  (loaded before the thread setting, so that it is set on torch itself)

    setting = header(args)
    work = args.work or scratch()
    work.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not SHARED.is_dir():
        raise SystemExit(f"{SHARED}: not found; the real photos live in ../shared/data beside the project")
    sources, tests = smoke_sources(work) if args.smoke else real_sources(work)
    refs = {name: tuple(parse_test_spec(spec)) for name, spec in tests.items()}
    first = next(iter(tests.values()))
    times = {"recipe": distill(work / "real", sources, first, args.smoke, "--seed", str(args.seed))}
    baseline = ["--loss", "sym", "--head-init", "random", "--epochs", "1", "--query-size", "100", "--pool-size", "500"]
    times["baseline"] = distill(work / "baseline", sources, first, args.smoke, *baseline)
    t = time.perf_counter()
    table: dict[str, dict[str, dict[str, float]]] = {}
    sizes = ("40", "48", "ms") if args.smoke else SIZES
    for name, ref in refs.items():
        table[name] = {}
        for size in sizes:
            row = scores(work / "real" / "last.pt", ref, size, work, args.smoke)
            row["baseline"] = scores(work / "baseline" / "last.pt", ref, size, work, args.smoke)["asymmetric"]
            table[name]["512" if size == "48" else "224" if size == "40" else size] = row
    times["evaluation"] = time.perf_counter() - t
    head = [
        f"{os.uname().nodename} {os.cpu_count()} CPUs; --preset real --seed {args.seed} on {len(sources)} sources: "
        + ", ".join(s.split(":", 1)[0] + ":" + Path(s.split(":", 1)[1]).name for s in sources),
        setting,
    ]
    write_results(args, RESULTS / "real_photos.txt", head + report(table, times))


if __name__ == "__main__":
    main()
