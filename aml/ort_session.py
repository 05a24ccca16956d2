"""The one onnxruntime session factory: every session aml opens (`aml embed`, the onnxruntime extraction backend,
export verification, the int8 report) takes its options here (torch-free; onnxruntime is the `export` extra).

Options: the CPU provider; `intra_op_threads` threads (default `aml.threads.intra_op_threads()`, the one thread
setting) and one inter-op thread; every graph optimisation (ORT_ENABLE_ALL); idle intra-op threads do not spin,
because aml's own threads decode images between runs and need the cores meanwhile.
"""

from __future__ import annotations

import os

import onnxruntime as ort

from aml.threads import intra_op_threads

PROVIDERS = ["CPUExecutionProvider"]


def session(
    model: str | os.PathLike | bytes, threads: int | None = None, *, optimized: str | os.PathLike | None = None
) -> ort.InferenceSession:
    """An onnxruntime session of `model` (a file or serialised bytes) with `threads` intra-op threads (None:
    `intra_op_threads()`); `optimized` also writes the graph onnxruntime runs after its rewrites to that file."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or intra_op_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        opts.log_severity_level = 3  # its warning that an optimised graph is hardware specific: known, wanted
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=PROVIDERS)
