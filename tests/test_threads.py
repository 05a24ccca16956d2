"""Threads named once: --threads > $AML_THREADS > $OMP_NUM_THREADS > affinity cores, applied to torch and to
onnxruntime sessions; bad values are one-line errors; benchmarks refuse ratios across thread settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from aml import threads
from aml.errors import UserError
from aml.threads import ENV, OMP_ENV, apply_threads, check_comparable, describe, resolve_threads


@pytest.fixture
def cores(monkeypatch):
    """Three affinity cores and no thread variables."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(OMP_ENV, raising=False)
    monkeypatch.setattr(threads, "_applied", None)


def test_option_beats_aml_threads_beats_omp_beats_affinity(cores, monkeypatch):
    assert resolve_threads() == (3, "affinity")
    monkeypatch.setenv(OMP_ENV, "2,1")  # OpenMP's nested list: its first level
    assert resolve_threads() == (2, OMP_ENV)
    monkeypatch.setenv(ENV, "4")
    assert resolve_threads() == (4, ENV)
    assert resolve_threads(1) == (1, "--threads")


@pytest.mark.parametrize("name", [ENV, OMP_ENV])
@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_variables_are_one_line_errors_naming_them(cores, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=f"^{name}='{value}': not a positive whole number") as e:
        resolve_threads()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [0, -1, True])
def test_bad_option_values_name_the_option(cores, value):
    with pytest.raises(UserError, match="^--threads "):
        resolve_threads(value)


def test_apply_sets_torch_and_onnxruntime_and_keeps_the_users_omp(cores, monkeypatch):
    from aml.onnx_embed import resize_graph, session

    monkeypatch.setenv(OMP_ENV, "2")
    assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    assert session(resize_graph()).get_session_options().intra_op_num_threads == 1
    s = threads.setting()
    assert (s["threads"], s["source"], s["torch"], s["onnxruntime"], s[OMP_ENV], s["cores"]) == (
        1, "--threads", 1, 1, "2", 3,
    )  # fmt: skip
    assert os.environ[OMP_ENV] == "1"  # what torch / faiss loaded later start from
    assert apply_threads() == 2 and threads.setting()["source"] == OMP_ENV  # the user's value, not the one set
    assert describe().startswith("threads 2 (OMP_NUM_THREADS): torch 2, onnxruntime 2")


def test_apply_before_torch_loads_reaches_torch():
    code = (
        "import sys\nfrom aml.threads import apply_threads\napply_threads(1)\nassert 'torch' not in sys.modules\n"
        "import torch\nprint(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in (ENV, OMP_ENV)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "1", p.stderr[-2000:]


def test_cli_threads_option_and_bad_variable(cores, tmp_path, run_cli):
    args = ["extract", "--model", "resnet18", "--random-init", "--images", tmp_path / "missing.txt",
            "--image-size", 32, "--out", tmp_path / "v.npy"]  # fmt: skip
    code, _, err = run_cli(*args, env={ENV: "many"})
    assert code == 2 and err.startswith(f"error: {ENV}='many'") and err.count("\n") == 1, err
    code, _, err = run_cli(*args, "--threads", 1)  # applied while the options are read, before the work fails
    assert code == 2 and "missing.txt" in err
    assert threads.setting()["threads"] == 1 and torch.get_num_threads() == 1
    code, _, err = run_cli(*args, "--threads", 0)
    assert code == 2 and "--threads" in err


def test_every_computing_command_takes_threads():
    import click
    from conftest import _cli_module

    cli = _cli_module().cli
    ctx = click.Context(cli)

    def names(cmd):
        return {o for p in cmd.params for o in getattr(p, "opts", [])}

    computing = {"extract", "evaluate", "distill", "whiten", "export", "embed", "search"}
    for name in computing:
        cmd = cli.get_command(ctx, name)
        for sub in getattr(cmd, "commands", {"": cmd}).values():  # a group (evaluate): every subcommand
            assert "--threads" in names(sub), name
    index = cli.get_command(ctx, "index")
    assert {"--threads"} <= names(index.commands["build"]) & names(index.commands["add"])


def test_ratios_are_refused_across_thread_settings():
    check_comparable({"eager": 2, "ort-fp32": 2})
    with pytest.raises(UserError, match=r"different thread counts \(eager 2, ort-fp32 1\)"):
        check_comparable({"eager": 2, "ort-fp32": 1})
