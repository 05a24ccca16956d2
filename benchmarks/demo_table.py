"""Copy the table of a `make demo` run (RUN/table.txt, written by `aml distill`) into
`benchmarks/results/demo.txt` and README.md's demo block, so the README quotes a measured run, never typed numbers.

    .venv/bin/python benchmarks/demo_table.py            # the newest runs/*-lite2-lite0-* run
    .venv/bin/python benchmarks/demo_table.py RUN_DIR
    .venv/bin/python benchmarks/demo_table.py --smoke    # a tiny `aml distill` demo run, into scratch copies
"""

from __future__ import annotations

from pathlib import Path

from common import REPO, RESULTS, aml, header, parse, parser, results_path, scratch, smoke_copy, smoke_distill

from aml.io import atomic_write

RESULT = RESULTS / "demo.txt"
START, END = "<!-- demo:start -->", "<!-- demo:end -->"


def readme_block(text: str) -> str:
    """The fenced table README.md shows for a results text."""
    return f"{START}\n```\n{text.strip()}\n```\n{END}"


def smoke_run() -> Path:
    """A smoke run's demo run folder: `aml distill --preset demo` (with its baseline) at the tiny budget."""
    run = scratch() / "demo"
    aml("distill", *smoke_distill(), "--preset", "demo", "--baseline", "--out", str(run))
    return run


def main() -> None:
    ap = parser(__doc__, results=RESULT)
    ap.add_argument("run_dir", type=Path, nargs="?", help="A `make demo` run folder (default: the newest one).")
    ap.add_argument("--readme", type=Path, help="The README to fill (default: README.md; smoke: a scratch copy).")
    args = parse(ap, {})
    import torch  # noqa: F401  (loaded before the thread setting, so that it is set on torch itself)

    print(header(args), flush=True)
    if args.smoke and args.run_dir is None:
        args.run_dir = smoke_run()
    if args.smoke and args.readme is None:
        args.readme = smoke_copy("README.md")
    runs = sorted((REPO / "runs").glob("*-lite2-lite0-*/table.txt"), key=lambda p: p.stat().st_mtime)
    src = args.run_dir / "table.txt" if args.run_dir else (runs[-1] if runs else None)
    if src is None or not src.is_file():
        raise SystemExit(f"{src or REPO / 'runs'}: no table.txt of a demo run; run `make demo` first")
    text = src.read_text()
    readme = args.readme or REPO / "README.md"
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme}: no '{START}' ... '{END}' block to fill")
    result = results_path(args, RESULT)
    with atomic_write(result) as f:
        f.write(text)
    print(text.rstrip("\n"))
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    with atomic_write(readme) as f:
        f.write(head + readme_block(text) + tail)
    print(f"{result} and {readme} from {src}")


if __name__ == "__main__":
    main()
