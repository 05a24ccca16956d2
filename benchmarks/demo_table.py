"""Copy the table of a `make demo` run (RUN/table.txt, written by `aml distill`) into
`benchmarks/results/demo.txt` and README.md's demo block, so the README quotes a measured run, never typed numbers.

    .venv/bin/python benchmarks/demo_table.py            # the newest runs/*-lite2-lite0-* run
    .venv/bin/python benchmarks/demo_table.py RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aml.io import atomic_write  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "demo.txt"
START, END = "<!-- demo:start -->", "<!-- demo:end -->"


def readme_block(text: str) -> str:
    """The fenced table README.md shows for a results text."""
    return f"{START}\n```\n{text.strip()}\n```\n{END}"


def main() -> None:
    runs = sorted((REPO / "runs").glob("*-lite2-lite0-*/table.txt"), key=lambda p: p.stat().st_mtime)
    src = Path(sys.argv[1]) / "table.txt" if len(sys.argv) > 1 else (runs[-1] if runs else None)
    if src is None or not src.is_file():
        raise SystemExit(f"{src or REPO / 'runs'}: no table.txt of a demo run; run `make demo` first")
    text = src.read_text()
    with atomic_write(RESULT) as f:
        f.write(text)
    readme = REPO / "README.md"
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme}: no '{START}' ... '{END}' block to fill")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    with atomic_write(readme) as f:
        f.write(head + readme_block(text) + tail)
    print(f"{RESULT} and {readme} from {src}")


if __name__ == "__main__":
    main()
