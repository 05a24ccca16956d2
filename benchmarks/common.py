"""What every benchmark script shares: its --smoke / --threads / --out options, the smoke run's scratch folder,
tiny synthetic set, tiny training settings and tiny revisitop ground truth, medians of timed calls, and a results
file written atomically, then printed.

A smoke run (`--smoke`) takes tiny sizes (a tiny random-weight model, a few images or vectors) through the
script's own code path in seconds and prints its normal report: `make test` runs every script so (tests/
test_benchmarks.py), so that none can rot. It writes nothing into benchmarks/results (its results file goes to a
scratch folder unless `--out` names one) and keeps $AML_HOME in that scratch folder, removed at exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aml.cli import main as cli_main  # noqa: E402
from aml.data.synth import SynthConfig, generate_synth  # noqa: E402
from aml.io import atomic_write  # noqa: E402
from aml.threads import HELP, benchmark_threads  # noqa: E402
from aml.trust import load_pickle  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SMOKE_HELP = (
    "Smoke run: tiny sizes (a tiny random-weight model, a few images or vectors) through the same code path in "
    "seconds, a check that the script works, not a measurement; writes nothing into benchmarks/results."
)
# A smoke run's training (TrainConfig fields): random-weight resnet18 teacher and student on the tiny synthetic
# set, one epoch of 8 tuples at 40 px, evaluated after it.
SMOKE_TRAIN: dict[str, Any] = dict(teacher="resnet18", student="resnet18", random_init=True, epochs=1, query_size=8,
                                   pool_size=12, neg_num=2, batch_size=3, image_size=40, eval_every=1, workers=0,
                                   device="cpu")  # fmt: skip
# The tiny synthetic set of a smoke run: 18 training images, 2 x 2 queries against 8 + 2 database images.
SMOKE_SYNTH = SynthConfig(landmarks=6, views=3, val_landmarks=1, test_landmarks=2, queries=2, db_views=4,
                          distractors=1, distractor_views=2, size=48, seed=3)  # fmt: skip

T = TypeVar("T")


def parser(doc: str, results: Path | None = None) -> argparse.ArgumentParser:
    """A benchmark's argument parser (its docstring as help) with --smoke and --threads, and --out when it writes
    a results file (`results`, its default place)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    ap.add_argument("--threads", type=int, help=HELP)
    if results is not None:
        ap.add_argument(
            "--out", type=Path, help=f"Results file (default: {results.relative_to(REPO)}; smoke: a scratch file)."
        )
    return ap


def names_of(value: str, known: Iterable[str], option: str, what: str) -> list[str]:
    """The comma-separated names of `value`, each one of `known`, or SystemExit naming `option` and the choices."""
    known = list(known)
    names = value.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"{option}: unknown {what} {unknown[0]!r}; use {', '.join(known)}")
    return names


def parse(ap: argparse.ArgumentParser, smoke: dict[str, Any], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options; with --smoke, those not given take the `smoke` values and $AML_HOME is the scratch folder's."""
    args = ap.parse_args(argv)
    if args.smoke:
        ap.set_defaults(**smoke)
        args = ap.parse_args(argv)
        os.environ["AML_HOME"] = str(scratch() / "home")
        print("smoke run: tiny sizes, a check that the script works, not a measurement", flush=True)
    return args


@functools.cache
def scratch() -> Path:
    """A smoke run's scratch folder (data, runs, results, $AML_HOME), removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="aml-bench-smoke-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def header(args: argparse.Namespace) -> str:
    """Apply --threads and return the thread-setting line every benchmark prints (call it after importing torch /
    faiss, so that their live counts are set and shown)."""
    return benchmark_threads(args.threads)


def results_path(args: argparse.Namespace, default: Path) -> Path:
    """Where the results go: --out, else the scratch folder on a smoke run, else `default`."""
    if args.out is not None:
        return Path(args.out)
    return scratch() / default.name if args.smoke else default


def command() -> str:
    """The command line this benchmark ran with, as its report quotes it: `python benchmarks/NAME.py ARGS`."""
    return "`" + " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]) + "`"


def write_results(args: argparse.Namespace, default: Path, lines: Sequence[str]) -> None:
    """Write the report's lines atomically to the results file (`results_path`), then print them."""
    with atomic_write(results_path(args, default)) as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def work_dir(args: argparse.Namespace, default: Path) -> Path:
    """The run folders: --work, else the scratch folder's on a smoke run, else `default`."""
    return args.work or (scratch() / "runs" if args.smoke else default)


def smoke_copy(name: str) -> Path:
    """A smoke run's copy of the checkout's file `name` (README.md, say) in the scratch folder, for the scripts
    that fill a block of it."""
    return Path(shutil.copy(REPO / name, scratch() / Path(name).name))


def timed(fn: Callable[[], T], reps: int, warmup: int = 0) -> tuple[float, T]:
    """(median wall seconds of `reps` calls of `fn` after `warmup` untimed ones, the last call's result)."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def aml(*args: str) -> None:
    """Run one `aml` command of this checkout in this process, its output kept back (`--quiet`); its own one-line
    error ends the benchmark."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            cli_main([*args, "--quiet"])
    except SystemExit as e:
        if e.code:
            raise SystemExit(f"aml {' '.join(args)}: {out.getvalue().strip()}") from None


def smoke_budget(base: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig fields `base` at a smoke run's budget: SMOKE_TRAIN's networks and sizes, the tiny synthetic set."""
    return {**base, **SMOKE_TRAIN, "data": smoke_data()}


def smoke_options() -> list[str]:
    """SMOKE_TRAIN as `aml distill` options (networks, sizes, budget; no data)."""
    args: list[str] = []
    for name, value in SMOKE_TRAIN.items():
        args += [f"--{name.replace('_', '-')}", *([] if value is True else [str(value)])]
    return args


def smoke_distill() -> list[str]:
    """`aml distill` options of a smoke run's training (SMOKE_TRAIN on the tiny synthetic set)."""
    return ["--data", smoke_data(), *smoke_options()]


@functools.cache
def smoke_data() -> str:
    """The `--data` spec of the tiny synthetic set, generated once into the scratch folder."""
    root = scratch() / "synth"
    generate_synth(root, SMOKE_SYNTH)
    return f"synth:{root}"


def synth_test_set(smoke: bool = False) -> str:
    """The synthetic set's test split in words, its queries and database images (a smoke run: the tiny set's)."""
    cfg = SMOKE_SYNTH if smoke else SynthConfig()
    queries = cfg.test_landmarks * cfg.queries
    database = cfg.test_landmarks * cfg.db_views + cfg.distractors * cfg.distractor_views
    return f"synthetic test set ({queries} queries, {database} database images)"


def padded_gnd(args: argparse.Namespace, path: Path) -> tuple[dict[str, Any], str, str]:
    """For the scripts that pad a revisitop ground truth with random vectors: faiss loaded and --threads applied;
    the ground truth at `path` (a smoke run: `smoke_gnd`), the header's first words (this machine, faiss's
    version) and the thread-setting line."""
    import faiss  # loaded before the thread setting, so that it is set on faiss itself

    setting = header(args)
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, faiss {faiss.__version__}"
    return (smoke_gnd() if args.smoke else load_pickle(path)), machine, setting


def smoke_gnd(images: int = 200, queries: int = 5, seed: int = 0) -> dict[str, Any]:
    """A tiny revisitop ground truth (imlist, qimlist, gnd: easy / hard / junk per query, disjoint), in place of
    roxford5k's for a smoke run of the scripts that pad it with random distractors."""
    rng = np.random.default_rng(seed)
    picks = rng.permutation(images)[: queries * 8].reshape(queries, 8)
    return {
        "imlist": [f"im{i}" for i in range(images)],
        "qimlist": [f"q{i}" for i in range(queries)],
        "gnd": [{"easy": p[:4].tolist(), "hard": p[4:6].tolist(), "junk": p[6:].tolist()} for p in picks],
    }
