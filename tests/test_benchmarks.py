"""Every benchmarks/*.py script runs its `--smoke` size (tiny models, a few images or vectors, the same code path)
and prints its report: exit 0, the thread-setting header, and the script's own table / result lines. A script is
any benchmarks/*.py with a `__main__` block, found by glob, so a new one is covered (and fails here until it has
`--smoke` and its report lines are listed in REPORTS). The scripts run as subprocesses, two at a time on the
machine's cores (they are single-threaded), each with OMP_NUM_THREADS=1 and a private $AML_HOME."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO

from aml.threads import available_cores

sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402  (benchmarks/common.py, the scripts' shared helpers)

BENCH = REPO / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "__main__" in p.read_text())
NUM = r"\d+\.\d+"
TRIPLE = rf"{NUM} / {NUM} / {NUM}"
INDEXES = (("flat", r"1\.000"), ("flat16", r"1\.000"), ("ivfpq", NUM), ("binary", NUM))
# The thread-setting line every benchmark prints (aml.threads.describe), under this test's environment.
HEADER = re.compile(
    r"^threads 1 \(OMP_NUM_THREADS\): torch (\d+|-), onnxruntime \d+, faiss (\d+|-); OMP_NUM_THREADS given: 1; "
    r"\d+ affinity cores",
    re.M,
)
# Script -> (extra arguments, {file under the run's folder: a pattern it must match}); {out} is that folder.
OPTIONS: dict[str, tuple[list[str], dict[str, str]]] = {
    "demo_recipe.py": (["--out", "{out}/demo_recipe.txt"], {"demo_recipe.txt": r"mean of 2 seeds"}),
    "demo_table.py": (["--out", "{out}/demo.txt"], {"demo.txt": r"teacher resnet18 \(symmetric\)"}),
    "test_protocols.py": (["--out", "{out}/protocols.txt"], {"protocols.txt": r"teacher's PCA whitening"}),
    "upgrade.py": (["--out", "{out}/upgrade.txt"], {"upgrade.txt": r"new\* as it is against the old database"}),
    "methods.py": (
        ["--out", "{out}"],
        {
            "methods-synth.md": r"\| contr\+ \| 1 \| [\d.]+ \|",
            "methods-synth.json": r'"exports"',
            "methods-synth.png": "",
        },
    ),
}
# Script -> the lines (regular expressions, each matched at a line start) its report must hold.
REPORTS: dict[str, list[str]] = {
    "binary_codes.py": [
        r"\s*N_db\s+method\s+database MiB\s+search s mAP E / M / H$",
        *(rf"\s*\d+\s+{re.escape(m)}\s+.*\s{NUM}\s+{NUM} /\s+{NUM} /\s+{NUM}" for m in ("float", "float->bits")),
        rf"\s*\d+\s+hamming\s+.*\s{NUM}\s+{NUM} /\s+{NUM} /\s+{NUM}  faiss index build {NUM} s$",
        r"\s+bits set \d+\.\d%, ranking depth \d+, float search on the CPU \(aml\.search\)$",
    ],
    "demo_recipe.py": [
        r"demo budget: resnet18 -> resnet18 \(random weights\), closed-form start, 1 epochs x 8 images, 40 px",
        r"variant\s+seed\s+asym M ep 0\s+asym M ep 1\s+sym M$",
        *(rf"demo\s+{s}\s+{NUM}\s+{NUM}\s+{NUM}$" for s in (0, 1)),
        rf"demo\s+mean of 2 seeds: asymmetric M {NUM} ± {NUM}, symmetric M {NUM}$",
    ],
    "demo_table.py": [
        rf"teacher resnet18 \(symmetric\)(\s+{NUM}){{6}}$",
        rf"student resnet18 csd, 1 ep x 8 \(asymmetric\)(\s+{NUM}){{6}}$",
        rf"student resnet18 sym, no teacher, .* \(symmetric\)(\s+{NUM}){{6}}$",
        r"\S+/demo\.txt and \S+/README\.md from \S+/table\.txt$",
    ],
    "eval_speed.py": [
        r"\s*N_db\s+topk\s+search s\s+cpu s s\+s\s+score s\s+loop s\s+loop/vec",
        rf"\s*\d+\s+\d+\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+\d+\s+\d+\s+\d+\s+{NUM}/{NUM}/{NUM}",
        r"process max RSS",
    ],
    "export_latency.py": [
        r"student\s+size\s+eager\s+torchscript\s+ort-fp32\s+ort-fp16\s+ort-int8\s+int8/fp32\s+int8\?",
        rf"resnet18\s+64(\s+{NUM}){{6}}\s+(int8|fp32)\s+\d+/\d+\s+\d+/\d+\s+\S+ x{NUM}$",
        r"int8\? = int8 when int8/fp32 <= ",
    ],
    "extract_speed.py": [
        *(rf"\s+{v}\s+median\s+{NUM} img/s" for v in ("per-image bs=1", "extract torch", "extract onnxruntime")),
        *(rf"\s+ratio extract {b} / per-image: {NUM}x$" for b in ("torch", "onnxruntime")),
        *(rf"\s+extract {b}: max \|difference\| to the loop \S+ \(ok: <= 1e-05\)$" for b in ("torch", "onnxruntime")),
    ],
    "index_speed.py": [
        r"\s*N_db\s+type\s+train s\s+add s\s+disk MiB\s+RSS build\s+RSS load\s+q/s\s+R@\d+\s+mAP E/M/H",
        # type, train and add seconds, disk and RSS MiB, q/s, recall against flat (itself: 1.000), mAP
        *(rf"\s*\d+\s+{k}(\s+{NUM}){{2}}(\s+\d+){{3}}\s+{NUM}\s+{r}\s+{NUM}/{NUM}/{NUM}" for k, r in INDEXES),
        r"max RSS \d+ MiB$",
    ],
    "methods.py": [
        *(rf"synth lite0 {m} seed 0: asym M {NUM} sym M {NUM} \(\d+ s\)$" for m in ("0 epochs", r"contr\+")),
        rf"\s+int8: asym M {NUM} vs fp32 {NUM}$",
        r"wrote \S+/methods-synth\.md$",
        r"wrote the results block of \S+/RESULTS\.md$",
    ],
    "mining_speed.py": [
        rf"\s*{kind}: vectorised\s+{NUM} s \| per-query walk\s+{NUM} s \| ratio\s+{NUM}x \| identical outputs: True"
        for kind in ("random", "clustered")
    ],
    "test_protocols.py": [
        r"protocol\s+teacher\s+student \(symmetric\)\s+asymmetric$",
        # each protocol: teacher, student and asymmetric mAP E / M / H
        *(rf"{p}.*\s{TRIPLE}\s+{TRIPLE}\s+{TRIPLE}$" for p in ("40 px, one", "48 px", "40 px, scales", "40 px, t.*lw")),
        rf"40 px, teacher's PCA whitening \(pca\)\s+{TRIPLE}\s+{TRIPLE}\s+{TRIPLE}$",
    ],
    "mobile_latency.py": [
        r"student\s+thr\s+ort-fp32\s+ort-int8\s+pte-fp32\s+pte-int8\s+ort-int8/fp32",
        *(rf"resnet18\s+{t}(\s+{NUM}){{7}}\s+\S+ x{NUM} \[{NUM}-{NUM}\]$" for t in (1, 2)),
        r"fp32 gates passed",
        rf"mAP M torch fp32 {NUM}; ort-fp32 {NUM}",
    ],
    "real_photos.py": [
        r"test split\s+size\s+teacher\s+student\s+asym\s+asym/T\s+baseline$",
        *(rf"drawn-test\s+{s}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}$" for s in ("224", "512", "ms")),
        r"^asym >= 0.95 x teacher at 224 and 512: (met|not met: .+)$",
        r"^seconds: recipe \d+, baseline \d+, evaluation \d+$",
    ],
    "real_selection.py": [
        r"candidate\s+fold\s+size\s+teacher\s+student\s+asym\s+ratio\s+train s$",
        *(rf"{c}\s+no-test\s+{s}(\s+{NUM}){{4}}\s+\d+$" for c in ("real", "tau0.1") for s in ("40", "48")),
        rf"^mean ratio real: {NUM} over no-test$",
        r"^chosen on validation: (real|tau0\.1) \(",
    ],
    "selection.py": [
        r"candidate\s+split\s+asym M\s+sym M\s+teacher\s+ratio$",
        *(rf"{c}\s+val(\s+{NUM}){{4}}$" for c in ("demo", "lw0")),
        rf"demo\s+test(\s+{NUM}){{4}}$",
        r"chosen on validation: (demo|lw0) \(",
        rf"test: chosen {NUM} = {NUM} x teacher {NUM} \(demo preset {NUM} = {NUM} x teacher\); >= 0\.95 x teacher: "
        r"(met|not met)$",
    ],
    "serve_load.py": [
        r"phase\s+requests\s+wall s\s+q/s\s+p50 ms\s+p99 ms\s+errors\s+gens",
        rf"steady\s+\d+\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+0\s",
        rf"index add\s+\d+\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+0\s",
        r"^failed requests: 0$",
    ],
    "train_speed.py": [rf"\({v}\) .*\s{NUM} tuples/s\s+median step\s+{NUM} ms\s+aml speed-up x{NUM}$" for v in "abc"],
    "upgrade_selection.py": [
        r"candidate\s+old/old\s+new\*/new\*\s+new/new\s+new->old\s+compatible\s+keeps gain$",
        *(rf"{c}\s+(\s+{NUM}){{4}}\s+(yes|no)\s+(yes|no)$" for c in ("bct", "bct-csd")),
        r"^chosen on validation: (bct|bct-csd|none) \(",
    ],
    "upgrade.py": [
        r"test set\s+method\s+old/old\s+new\*/new\*\s+new/new\s+new->old\s+G\s+kept\s+compatible$",
        *(
            rf"synth\s+{m}\s+{NUM}\s+{NUM}\s+{NUM}\s+{NUM}\s+(-|{NUM})\s+(-|{NUM})\s+(yes|no)$"
            for m in ("recipe", "0 epochs")
        ),
        r"^synth: recipe (meets|does not meet) the target \(compatible: (yes|no), new->old",
        rf"^synth: new\* as it is against the old database: new\*->old {NUM} vs old/old {NUM}: (NOT )?compatible$",
    ],
}


def _snapshot() -> dict[str, object]:
    """What a run must not change: benchmarks/results (name -> size, mtime), the mtimes of README.md and
    docs/RESULTS.md (the pages the scripts fill) and the checkout's top-level names (a run folder left in runs/)."""
    results = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in BENCH.joinpath("results").iterdir()}
    top = sorted(p.name for p in REPO.iterdir() if not p.name.startswith((".", "__")))
    pages = {name: REPO.joinpath(name).stat().st_mtime_ns for name in ("README.md", "docs/RESULTS.md")}
    return {"results": results, "pages": pages, "top": top}


def _smoke(script: str, out: Path) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT --smoke [its OPTIONS]` from the checkout, one thread, a private $AML_HOME."""
    extra = [a.format(out=out) for a in OPTIONS.get(script, ([], {}))[0]]
    env = {k: v for k, v in os.environ.items() if k != "AML_THREADS"}
    env.update(OMP_NUM_THREADS="1", AML_HOME=str(out / "home"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(BENCH / script), "--smoke", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, tuple[Path, Future]]:
    """The smoke run of every script this session tests (all when none is picked), started at once, two at a time
    (one per core, at most two); "before": the _snapshot taken first."""
    picked = {i.callspec.params.get("script") for i in request.session.items if hasattr(i, "callspec")} - {None}
    before = _snapshot()
    workers = min(2, available_cores())
    with ThreadPoolExecutor(workers) as pool:
        outs = {s: tmp_path_factory.mktemp(Path(s).stem) for s in SCRIPTS if s in picked or not picked}
        yield {**{s: (out, pool.submit(_smoke, s, out)) for s, out in outs.items()}, "before": before}
        pool.shutdown(cancel_futures=True)  # after a stop at the first failure (-x), start no more


def test_every_script_is_found_and_has_a_report():
    assert {"methods.py", "train_speed.py", "eval_speed.py"} <= set(SCRIPTS) and "common.py" not in SCRIPTS
    assert not set(SCRIPTS) - set(REPORTS), "list each new benchmark's report lines in REPORTS"


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_prints_its_report(script, runs):
    out, future = runs[script]
    done = future.result()
    log = f"\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    assert "unrecognized arguments: --smoke" not in done.stderr, f"{script} has no --smoke{log}"
    assert done.returncode == 0, f"{script} --smoke exited {done.returncode}{log}"
    assert HEADER.search(done.stdout), f"{script}: no thread-setting header line{log}"
    missing = [p for p in REPORTS.get(script, []) if not re.search(p, done.stdout, re.M)]
    assert not missing, f"{script}: report lines missing: {missing}{log}"
    for name, pattern in OPTIONS.get(script, ([], {}))[1].items():
        assert (out / name).is_file(), f"{script}: --out wrote no {name}{log}"
        if name.endswith(".txt"):  # a results file holds the report printed
            assert (out / name).read_text().strip() in done.stdout, f"{script}: {name} is not the report printed"
        if pattern:
            assert re.search(pattern, (out / name).read_text()), f"{script}: {name} lacks {pattern!r}"


def test_smoke_runs_write_nothing_into_the_checkout(runs):
    for script in set(SCRIPTS) & set(runs):
        runs[script][1].result()
    assert _snapshot() == runs["before"], "a smoke run wrote into benchmarks/results, a page or the checkout"


def test_smoke_sizes_yield_to_the_options_given(monkeypatch):
    monkeypatch.setenv("AML_HOME", "unchanged")
    ap = common.parser("x", results=common.RESULTS / "x.txt")
    ap.add_argument("--n", type=int, default=100)
    assert common.parse(ap, {"n": 3}, []).n == 100 and os.environ["AML_HOME"] == "unchanged"
    assert common.parse(ap, {"n": 3}, ["--smoke", "--n", "7"]).n == 7
    args = common.parse(ap, {"n": 3}, ["--smoke"])
    assert args.n == 3 and os.environ["AML_HOME"] == str(common.scratch() / "home")
    assert common.results_path(args, common.RESULTS / "x.txt") == common.scratch() / "x.txt"


def test_smoke_ground_truth_is_disjoint_per_query():
    gnd = common.smoke_gnd(images=50, queries=3)
    assert (len(gnd["imlist"]), len(gnd["qimlist"]), len(gnd["gnd"])) == (50, 3, 3)
    for g in gnd["gnd"]:
        ids = g["easy"] + g["hard"] + g["junk"]
        assert (len(g["easy"]), len(g["hard"]), len(g["junk"])) == (4, 2, 2) and len(set(ids)) == 8
        assert all(0 <= i < 50 for i in ids)
