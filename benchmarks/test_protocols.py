"""One distilled student under several test protocols on the synthetic test set: image size, multi-scale, and
the teacher's learned / PCA whitening on both sides (the AML protocol), each by `aml evaluate` (issue 12).

The whitening files are learned first by `aml whiten --teacher lite2 --data synth --image-size 224 [--method pca]`
on the teacher's cached training vectors. Writes `benchmarks/results/synth_test_protocols.txt`.

    .venv/bin/python benchmarks/test_protocols.py RUN_DIR       # a `make demo` run folder (RUN_DIR/last.pt)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aml.io import atomic_write  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "synth_test_protocols.txt"
TEACHER, SIZE = "lite2", "224"
WHITEN = f"aml whiten --teacher {TEACHER} --data synth --image-size {SIZE} [--method pca]"
# Protocol in words -> `aml evaluate` options (LW / PCA: the whitening files learned first).
PROTOCOLS: dict[str, list[str]] = {
    f"{SIZE} px, one scale (the demo's test)": ["--image-size", SIZE],
    "256 px (the images' size), one scale": ["--image-size", "256"],
    f"{SIZE} px, scales 1.4142,1,0.7071": ["--image-size", SIZE, "--multiscale", "1.4142,1,0.7071"],
    f"{SIZE} px, teacher's learned whitening (lw)": ["--image-size", SIZE, "--whiten", "LW"],
    f"{SIZE} px, teacher's PCA whitening (pca)": ["--image-size", SIZE, "--whiten", "PCA"],
}


def aml(*args: str) -> None:
    """Run one `aml` command of this checkout; its own one-line error ends the benchmark."""
    done = subprocess.run([sys.executable, str(REPO / "cli.py"), *args, "--quiet"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"aml {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")


def triple(m: dict[str, float]) -> str:
    return " / ".join(f"{m[p]:.2f}" for p in ("E", "M", "H"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="A distill run folder holding last.pt (lite2 -> lite0 on synth).")
    args = ap.parse_args()
    student = args.run_dir / "last.pt"
    if not student.is_file():
        raise SystemExit(f"{student}: not found; give a finished `aml distill` run folder (e.g. runs/<demo run>)")
    from aml.data.spec import parse_data_spec

    root, name = parse_data_spec("synth").test
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"LW": f"{tmp}/lw.pt", "PCA": f"{tmp}/pca.pt"}
        aml("whiten", "--teacher", TEACHER, "--data", "synth", "--image-size", SIZE, "--out", files["LW"])
        aml("whiten", "--teacher", TEACHER, "--data", "synth", "--image-size", SIZE, "--method", "pca",
            "--out", files["PCA"])  # fmt: skip
        for protocol, opts in PROTOCOLS.items():
            out = f"{tmp}/scores.json"
            opts = [files.get(o, o) for o in opts]
            aml("evaluate", "--dataset", name, "--data-root", str(root), "--teacher", TEACHER, "--student",
                str(student), *opts, "--json", out)  # fmt: skip
            s = json.loads(Path(out).read_text())
            rows.append(
                f"{protocol:<44} {triple(s['teacher']['mAP']):>22} {triple(s['student']['mAP']):>22} "
                f"{triple(s['asymmetric']['mAP']):>22}"
            )
    lines = [
        f"synthetic test set, student {args.run_dir} ({TEACHER} -> lite0) evaluated by `aml evaluate`;",
        f"mAP E / M / H x100; whitening files from `{WHITEN}`",
        f"{'protocol':<44} {'teacher':>22} {'student (symmetric)':>22} {'asymmetric':>22}",
        *rows,
    ]
    with atomic_write(RESULT) as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
