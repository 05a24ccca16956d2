"""One distilled student under several test protocols on the synthetic test set: image size, multi-scale, and
the teacher's learned / PCA whitening on both sides (the AML protocol), each by `aml evaluate` (issue 12).

The whitening files are learned first by `aml whiten --teacher lite2 --data synth --image-size 224 [--method pca]`
on the teacher's cached training vectors. Writes `benchmarks/results/synth_test_protocols.txt`. Each `aml` command
runs in this process (its output kept back; its one-line error ends the benchmark).

    .venv/bin/python benchmarks/test_protocols.py RUN_DIR       # a `make demo` run folder (RUN_DIR/last.pt)
    .venv/bin/python benchmarks/test_protocols.py --smoke       # a tiny random student trained first, 40 px
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import NamedTuple

from common import RESULTS, SMOKE_SYNTH, aml, header, parse, parser, scratch, smoke_budget, smoke_distill, write_results

from aml.data.spec import parse_data_spec

RESULT = RESULTS / "synth_test_protocols.txt"


class Setup(NamedTuple):
    """The teacher and its student, the whitening's --data, the test image size and the images' own size (px), and
    the teacher's weights option."""

    teacher: str
    student: str
    data: str
    size: str
    full: str
    init: tuple[str, ...]


DEMO = Setup("lite2", "lite0", "synth", "224", "256", ())


def smoke_setup() -> tuple[Path, Setup]:
    """A smoke run's student (a tiny random-weight distill run on the tiny synthetic set) and its setup."""
    run = scratch() / "student"
    aml("distill", *smoke_distill(), "--out", str(run))
    t = smoke_budget({})
    return run, Setup(t["teacher"], t["student"], t["data"], str(t["image_size"]), str(SMOKE_SYNTH.size),
                      ("--random-init",))  # fmt: skip


def protocols(size: str, full: str) -> dict[str, list[str]]:
    """Protocol in words -> `aml evaluate` options at image size `size` (`full`: the images' own size; LW / PCA:
    the whitening files learned first)."""
    return {
        f"{size} px, one scale (the demo's test)": ["--image-size", size],
        f"{full} px (the images' size), one scale": ["--image-size", full],
        f"{size} px, scales 1.4142,1,0.7071": ["--image-size", size, "--multiscale", "1.4142,1,0.7071"],
        f"{size} px, teacher's learned whitening (lw)": ["--image-size", size, "--whiten", "LW"],
        f"{size} px, teacher's PCA whitening (pca)": ["--image-size", size, "--whiten", "PCA"],
    }


def triple(m: dict[str, float]) -> str:
    return " / ".join(f"{m[p]:.2f}" for p in ("E", "M", "H"))


def main() -> None:
    ap = parser(__doc__, results=RESULT)
    ap.add_argument("run_dir", type=Path, nargs="?", help="A distill run folder holding last.pt (lite2 -> lite0).")
    args = parse(ap, {})
    import torch  # noqa: F401  (loaded before the thread setting, so that it is set on torch itself)

    setting = header(args)
    print(setting, flush=True)
    if args.smoke and args.run_dir is None:
        args.run_dir, setup = smoke_setup()
    elif args.run_dir is None:
        ap.error("the following arguments are required: run_dir (or --smoke)")
    else:
        setup = DEMO
    student = args.run_dir / "last.pt"
    if not student.is_file():
        raise SystemExit(f"{student}: not found; give a finished `aml distill` run folder (e.g. runs/<demo run>)")
    root, name = parse_data_spec(setup.data).test
    learn = ["whiten", "--teacher", setup.teacher, *setup.init, "--data", setup.data, "--image-size", setup.size]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"LW": f"{tmp}/lw.pt", "PCA": f"{tmp}/pca.pt"}
        aml(*learn, "--out", files["LW"])
        aml(*learn, "--method", "pca", "--out", files["PCA"])
        for protocol, opts in protocols(setup.size, setup.full).items():
            out = f"{tmp}/scores.json"
            opts = [files.get(o, o) for o in opts]
            aml("evaluate", "--dataset", name, "--data-root", str(root), "--teacher", setup.teacher, *setup.init,
                "--student", str(student), *opts, "--json", out)  # fmt: skip
            s = json.loads(Path(out).read_text())
            rows.append(
                f"{protocol:<44} {triple(s['teacher']['mAP']):>22} {triple(s['student']['mAP']):>22} "
                f"{triple(s['asymmetric']['mAP']):>22}"
            )
    lines = [
        f"synthetic test set, student {args.run_dir} ({setup.teacher} -> {setup.student}) evaluated by `aml evaluate`;",
        f"mAP E / M / H x100; whitening files from `aml {' '.join(learn)} [--method pca]`",
        f"{'protocol':<44} {'teacher':>22} {'student (symmetric)':>22} {'asymmetric':>22}",
        *rows,
        setting,
    ]
    write_results(args, RESULT, lines)


if __name__ == "__main__":
    main()
