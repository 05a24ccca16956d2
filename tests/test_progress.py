"""Progress that a log can hold: outside a terminal a line per interval (never '\\r'), `--quiet` silences it,
training writes one line per epoch and no step bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from aml.errors import UserError
from aml.progress import INTERVAL_ENV, LogLines, log_interval, progress_bar

LINE = re.compile(r"^extract: (\d+)/(\d+) img \(\d+%\), ")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    """12 tiny images of one size (3 forwards of CPU_BATCH = 4) and their list."""
    rng = np.random.default_rng(0)
    (tmp_path / "jpg").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "jpg" / f"{i}.png")
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"jpg/{i}.png\n" for i in range(12)))
    return lst


def _extract_args(lst, out) -> list[str]:
    return ["extract", "--model", "resnet18", "--random-init", "--images", str(lst), "--image-size", "32",
            "--device", "cpu", "--out", str(out)]  # fmt: skip


def _progress_lines(text: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in map(LINE.match, text.splitlines()) if m]


def test_a_timed_loop_logs_about_one_line_per_interval(tmp_path):
    # 200 updates over ~1 s with a 0.25 s interval: ~4 interval lines + the start and end lines, not 200
    script = textwrap.dedent(
        """
        import time
        from aml.progress import progress_bar
        t0 = time.perf_counter()
        bar = progress_bar(200, "work", "item")
        for _ in range(200):
            time.sleep(0.005)
            bar.update()
        bar.close()
        print(time.perf_counter() - t0)
        """
    )
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{INTERVAL_ENV: "0.25"})
    with open(log, "w") as err:
        p = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    assert p.returncode == 0
    seconds, text = float(p.stdout), log.read_text()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert all(ln.startswith("work: ") for ln in lines), text
    assert lines[0].startswith("work: 0/200 item") and lines[-1].startswith("work: 200/200 item")
    # at most one line per 0.25 s between the start and end lines; at least one interval line in between
    assert 3 <= len(lines) <= seconds / 0.25 + 2, (seconds, text)


def test_extract_logged_to_a_file_writes_lines_per_interval_not_per_image(images, tmp_path):
    log = tmp_path / "log.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1", AML_HOME=str(tmp_path / "home"), **{INTERVAL_ENV: "3600"})
    with open(log, "w") as err:
        p = subprocess.run([sys.executable, "cli.py", *_extract_args(images, tmp_path / "v.npy")], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=err, text=True, env=env)  # fmt: skip
    text = log.read_text()
    assert p.returncode == 0, text
    assert "\r" not in text and "12 x 512" in p.stdout
    # 12 images in 3 forwards, one interval longer than the run: the start line and the end line only
    assert _progress_lines(text) == [(0, 12), (12, 12)], text


def test_interval_zero_logs_every_update_and_quiet_logs_nothing(images, tmp_path, run_cli):
    out = tmp_path / "v.npy"
    code, stdout, stderr = run_cli(*_extract_args(images, out), env={INTERVAL_ENV: "0"})
    assert code == 0, stderr
    assert "\r" not in stderr
    assert _progress_lines(stderr) == [(0, 12), (4, 12), (8, 12), (12, 12), (12, 12)]  # start, 3 forwards, end
    code, stdout, stderr = run_cli(*_extract_args(images, out), "--quiet", env={INTERVAL_ENV: "0"})
    assert code == 0 and stderr == "" and "12 x 512" in stdout  # the result, no progress


def test_bad_interval_is_one_line(monkeypatch, images, tmp_path, run_cli):
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(UserError, match=f"^{INTERVAL_ENV}='soon': not a number"):
        log_interval()
    code, _, err = run_cli(*_extract_args(images, tmp_path / "v.npy"))
    assert code == 2 and err.startswith(f"error: {INTERVAL_ENV}=") and err.count("\n") == 1


def test_log_lines_drop_carriage_returns_cursor_moves_and_clears(capsys):
    import sys as _sys

    LogLines(_sys.stderr).write("\r" + "a: 1/2" + "   ")
    LogLines(_sys.stderr).write("\n\x1b[A\r" + " " * 20 + "\r")
    assert capsys.readouterr().err == "a: 1/2\n"


def test_terminal_only_bars_and_disabled_bars_write_nothing(capsys):
    for bar in (progress_bar(3, "steps", terminal_only=True), progress_bar(3, "x", enabled=False)):
        bar.set_postfix_str("loss 1", refresh=False)
        bar.update(3)
        bar.close()
    assert capsys.readouterr().err == ""


def test_distill_logs_one_line_per_epoch_and_no_step_bar(tmp_path, run_cli):
    from aml.data.synth import SynthConfig, generate_synth

    data = generate_synth(tmp_path / "synth", SynthConfig(landmarks=4, views=3, val_landmarks=0, test_landmarks=2,
                          queries=1, db_views=2, distractors=1, size=64))  # fmt: skip
    args = ["distill", "--teacher", "resnet18", "--student", "resnet18", "--random-init", "--data", f"synth:{data}",
            "--epochs", "2", "--query-size", "4", "--pool-size", "8", "--neg-num", "2", "--batch-size", "2",
            "--image-size", "40", "--eval-every", "0", "--workers", "0", "--device", "cpu"]  # fmt: skip
    env = {"AML_HOME": tmp_path / "home", INTERVAL_ENV: "0"}
    code, stdout, stderr = run_cli(*args, "--out", tmp_path / "run", env=env)
    assert code == 0, stderr
    assert "\r" not in stdout + stderr and "step" not in stderr  # no step bar outside a terminal
    epochs = [ln for ln in stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 3 and epochs[0].startswith("epoch 0: head init")  # the start, then one per epoch
    assert all(re.match(rf"epoch {e}: loss \d+\.\d+, \d+\.\d+ img/s", epochs[e]) for e in (1, 2)), epochs
    code, stdout, stderr = run_cli(*args, "--out", tmp_path / "quiet", "--quiet", env=env)
    assert code == 0 and stderr == "" and not [ln for ln in stdout.splitlines() if ln.startswith("epoch")]
    assert f"run: {tmp_path / 'quiet'}" in stdout
