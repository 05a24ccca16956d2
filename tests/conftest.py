"""Shared fixtures: the real data beside the repo (../shared/data), skipped cleanly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; skips the calling test with a clear message when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p} (../shared/data is absent on this machine)")
    return p


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture
def run_cli(monkeypatch):
    """Run `aml ARGS...` in-process; returns (exit_code, stdout, stderr)."""
    import subprocess
    import sys

    def _run(*args: str, cwd: Path | None = None, env: dict | None = None):
        import os

        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.run(
            [sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e
        )
        return p.returncode, p.stdout, p.stderr

    return _run
