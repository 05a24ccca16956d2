"""Intra-op threads, decided in one place for torch, onnxruntime and faiss (torch-free: `aml embed` uses it).

The count is `--threads N` where a command or benchmark takes it, else `$AML_THREADS`, else `$OMP_NUM_THREADS`
(the OpenMP convention torch itself reads; torchrun sets it to 1 per rank), else the cores this process may run
on (`os.sched_getaffinity`: a container's or `taskset`'s share, not the machine's). `apply_threads` sets it:
torch's intra-op threads (now if torch is imported, else through `OMP_NUM_THREADS`, which torch and faiss read
when they load), faiss's OpenMP threads if faiss is imported, and the count every onnxruntime session and
thread pool of aml takes (`intra_op_threads`). More intra-op threads than free cores slow torch many times over
(its threads wait on each other while another process holds a core), so every figure a benchmark prints names
this setting (`describe`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from aml.errors import UserError

ENV = "AML_THREADS"
OMP_ENV = "OMP_NUM_THREADS"
OPTION = "--threads"
HELP = (
    f"Intra-op threads of torch / onnxruntime / faiss (default: ${ENV}, else ${OMP_ENV}, else the cores this "
    "process may use)."
)

_applied: dict[str, Any] | None = None  # what `apply_threads` set: {"threads", "source", "omp_given"}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count where affinity is unknown)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _positive(text: str, where: str) -> int:
    """A positive int from an environment variable's text, or a one-line UserError naming the variable."""
    try:
        n = int(text.strip())
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{where}={text!r}: not a positive whole number of threads; set it to e.g. 1, or unset it")
    return n


def _omp_given() -> str | None:
    """The user's OMP_NUM_THREADS (the one before `apply_threads` set it)."""
    return _applied["omp_given"] if _applied is not None else os.environ.get(OMP_ENV)


def resolve_threads(threads: int | None = None, *, option: str = OPTION) -> tuple[int, str]:
    """(count, where it came from): `threads` (the option) > $AML_THREADS > $OMP_NUM_THREADS > affinity cores.
    A value below 1 or an unreadable variable is a one-line UserError naming the option or variable."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserError(f"{option} {threads}: not a positive whole number of threads; use e.g. {option} 1")
        return threads, option
    for name, text in ((ENV, os.environ.get(ENV)), (OMP_ENV, _omp_given())):
        text = (text or "").strip()
        if text:  # OpenMP allows a nested list "4,2": its first level is the intra-op count
            return _positive(text.split(",")[0] if name == OMP_ENV else text, name), name
    return available_cores(), "affinity"


def apply_threads(threads: int | None = None, *, option: str = OPTION) -> int:
    """Resolve the count and set it on torch, faiss and aml's onnxruntime sessions; returns it.

    torch not yet imported: `OMP_NUM_THREADS` is set so that torch (and faiss) start with it, which also keeps
    torch out of torch-free commands. The user's own `OMP_NUM_THREADS` is kept for `describe`.
    """
    global _applied
    omp_given = _omp_given()
    n, source = resolve_threads(threads, option=option)
    os.environ[OMP_ENV] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    _applied = {"threads": n, "source": source, "omp_given": omp_given}
    return n


def intra_op_threads() -> int:
    """The count set by `apply_threads`, else the resolved default (onnxruntime sessions, aml's thread pools)."""
    return _applied["threads"] if _applied is not None else resolve_threads()[0]


def setting() -> dict[str, Any]:
    """What this process runs with now: the chosen count and its source, torch's and faiss's live counts (None
    when not imported), the onnxruntime count, the user's OMP_NUM_THREADS and the affinity cores."""
    n, source = (_applied["threads"], _applied["source"]) if _applied is not None else resolve_threads()
    torch, faiss = sys.modules.get("torch"), sys.modules.get("faiss")
    return {
        "threads": n,
        "source": source,
        "torch": torch.get_num_threads() if torch is not None else None,
        "onnxruntime": intra_op_threads(),
        "faiss": faiss.omp_get_max_threads() if faiss is not None else None,
        OMP_ENV: _omp_given(),
        "cores": available_cores(),
    }


def describe(s: dict[str, Any] | None = None) -> str:
    """One line for a benchmark header: 'threads 2 (affinity): torch 2, onnxruntime 2, faiss -; ...'."""
    s = s or setting()

    def shown(v: Any) -> str:
        return "-" if v is None else str(v)

    return (
        f"threads {s['threads']} ({s['source']}): torch {shown(s['torch'])}, onnxruntime {s['onnxruntime']}, "
        f"faiss {shown(s['faiss'])}; {OMP_ENV} given: {s[OMP_ENV] or 'unset'}; {s['cores']} affinity cores"
    )


def benchmark_threads(threads: int | None = None) -> str:
    """For a benchmark script: `apply_threads(threads)` (call it after importing torch / faiss, so that their live
    counts are set and shown) and the header line (`describe`); a bad value exits with its one-line error."""
    try:
        apply_threads(threads)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    return describe()


def check_comparable(threads_of: dict[str, int]) -> None:
    """Before a ratio of timings: every named backend ran with the same intra-op thread count, else a one-line
    UserError naming them (a ratio across thread settings measures the settings, not the backends)."""
    if len(set(threads_of.values())) > 1:
        runs = ", ".join(f"{name} {n}" for name, n in threads_of.items())
        raise UserError(
            f"backends ran with different thread counts ({runs}); no ratio between them is printed: run them all "
            f"with the same {OPTION} / ${ENV}"
        )
