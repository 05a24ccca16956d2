"""Shared fixtures: the real data beside the repo (../shared/data), skipped cleanly when absent; the thread count
through `aml.threads` (its default, at most 2); the `aml` command line run in this process."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from aml import threads

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; skips the calling test with a clear message when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p} (../shared/data is absent on this machine)")
    return p


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    torch.manual_seed(0)
    # each test starts from the resolver's default (capped at 2: tiny networks), and what a test or an in-process
    # CLI run applies (`--threads`, the OMP_NUM_THREADS that `apply_threads` sets) ends with it
    monkeypatch.setattr(threads, "_applied", None)
    for name in (threads.ENV, threads.OMP_ENV):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    threads.apply_threads(min(2, threads.resolve_threads()[0]))
    yield


@pytest.fixture
def one_thread():
    """Tiny convolutions on one thread: two spinning OpenMP threads on a shared 2-core box are many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli_module():
    """The repository's `cli.py` (the console entry point `aml = cli:main`), imported once."""
    spec = importlib.util.spec_from_file_location("aml_cli", REPO / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `aml ARGS...` in this process through `cli.main`; returns (exit_code, stdout, stderr).

    `env` entries are set and `cwd` entered for the call only. The console script's own process start is
    tested once, in tests/test_cli_extract.py.
    """
    cli = _cli_module()

    def _run(*args: str, cwd: Path | None = None, env: dict | None = None) -> tuple[int, str, str]:
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, str(v))
            if cwd is not None:
                m.chdir(cwd)
            capsys.readouterr()
            try:
                cli.main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            out, err = capsys.readouterr()
        return code, out, err

    return _run
