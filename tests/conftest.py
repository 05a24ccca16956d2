"""Shared fixtures: the real data beside the repo (../shared/data), skipped cleanly when absent; the thread count
through `aml.threads` (its default, at most 2); the `aml` command line run in this process; a private $AML_HOME;
the trainer tests' tiny synthetic set and their tiny `TrainConfig`."""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing as mp
import os
import queue
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from aml import threads
from aml.data.synth import SynthConfig, generate_synth
from aml.train.config import TrainConfig

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
    """The repository's `cli.py` (its entry to `aml.cli:main`, the console script `aml`), imported once."""
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


TINY = SynthConfig(
    landmarks=6,
    views=3,
    val_landmarks=1,
    test_landmarks=2,
    queries=2,
    db_views=4,
    distractors=1,
    distractor_views=2,
    size=48,
    seed=3,
)


def one_line(result: tuple[int, str, str], *needles: str) -> None:
    """A CLI result (from `run_cli`) that is exactly one `error: ...` line, exit 2, no traceback, naming `needles`."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def valid_sidecar() -> dict:
    """A sidecar that passes `read_sidecar` (no sha256: the model pair is checked apart)."""
    return {
        "format": "onnx", "precision": "fp32", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "image_size": 32, "dim": 8, "msp": 1.0, "whiten": None, "teacher": None, "verification": {},
        "output": {"name": "vectors"},
    }  # fmt: skip


@pytest.fixture
def image_list(tmp_path):
    """A list file naming one 40x30 grey PNG beside it."""
    from PIL import Image

    Image.fromarray(np.full((30, 40, 3), 90, dtype=np.uint8)).save(tmp_path / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\n")
    return lst


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "synth"
    generate_synth(out, TINY)
    return out


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private $AML_HOME, so feature caches start empty in every test."""
    monkeypatch.setenv("AML_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_cfg(data, out, **changes) -> TrainConfig:
    base = TrainConfig(
        teacher="resnet18",
        student="resnet18",
        random_init=True,
        data=f"synth:{data}",
        epochs=2,
        lr=1e-3,
        query_size=8,
        pool_size=12,
        neg_num=2,
        batch_size=3,
        image_size=40,
        eval_every=1,
        workers=0,
        device="cpu",
        out=str(out),
    )
    return base.replace(**changes)


# `aml distill` options of a tiny CPU run on the tiny synthetic set (tiny_cfg's settings, one epoch)
TINY_DISTILL: dict[str, object] = dict(teacher="resnet18", student="resnet18", random_init=True, epochs=1,
                                       query_size=8, pool_size=12, neg_num=2, batch_size=3, image_size=40,
                                       workers=0, device="cpu", quiet=True)  # fmt: skip


def distill_args(data: Path, out: Path, **options: object) -> list[str]:
    """`aml distill` arguments of a tiny run on `data` into `out`: TINY_DISTILL with `options` changed or added
    (underscores for dashes; True: a flag, False or None: left out)."""
    merged = {**TINY_DISTILL, "data": f"synth:{data}", **options, "out": out}
    args = []
    for name, value in merged.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def torchrun(*args: object, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Two gloo processes on this machine (`torchrun --standalone --nproc_per_node 2 ARGS`), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **{k: str(v) for k, v in (env or {}).items()})
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def aml_torchrun(*args: object, **kw) -> subprocess.CompletedProcess:
    """`aml ARGS` under two gloo processes (the repository's cli.py as torchrun's script)."""
    return torchrun(REPO / "cli.py", *args, **kw)


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path | None]:
    """A new folder this user cannot write to (mode 0500), writable again afterwards; None for root, who writes
    anywhere (the caller then skips its unwritable-folder checks)."""
    if os.geteuid() == 0:
        yield None
        return
    path.mkdir()
    path.chmod(0o500)
    try:
        yield path
    finally:
        path.chmod(0o700)


@contextlib.contextmanager
def paired_workers(target) -> Iterator[Callable[[list], list]]:
    """Two spawned processes running `target(tasks, barrier, results)` (each takes tasks from its queue until None,
    waits on the shared barrier so both act at once, and puts one result per task): yields `run(tasks)`, one task
    per worker, returning their two results sorted; the workers are stopped when the block ends."""
    ctx = mp.get_context("spawn")
    queues, barrier, results = [ctx.Queue(), ctx.Queue()], ctx.Barrier(2), ctx.Queue()
    ps = [ctx.Process(target=target, args=(q, barrier, results), daemon=True) for q in queues]
    for p in ps:
        p.start()

    def run(tasks: list) -> list:
        for q, task in zip(queues, tasks, strict=True):
            q.put(task)
        try:
            return sorted(results.get(timeout=120) for _ in tasks)
        except queue.Empty:
            pytest.fail("a worker did not answer")

    try:
        yield run
    finally:
        for q in queues:
            q.put(None)
        for p in ps:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
