"""`aml serve` as a child process on a free loopback port (tests, benchmarks): started, waited for until
GET /healthz answers, always stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

CLI = Path(__file__).resolve().parents[2] / "cli.py"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_process(
    args: Sequence[object], *, env: dict[str, str] | None = None, timeout: float = 120.0, log: str | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `aml serve ARGS --port P` on 127.0.0.1; stderr goes to `log` (a file) or is
    dropped. The process is terminated (killed after 10 s) on exit, whatever happened."""
    port = free_port()
    cmd = [sys.executable, str(CLI), "serve", *map(str, args), "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, "PYTHONPATH": str(CLI.parent), **(env or {})}
    with open(log or os.devnull, "w") as err:
        proc = subprocess.Popen(cmd, env=full_env, stdout=err, stderr=err)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    tail = Path(log).read_text()[-2000:] if log else ""
                    raise RuntimeError(f"aml serve exited with {proc.returncode} before answering: {tail}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"aml serve did not answer /healthz within {timeout:.0f} s")
                time.sleep(0.1)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
