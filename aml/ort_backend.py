"""The onnxruntime backend of `aml.extract.extract`: the model's fp32 ONNX graph, cached, checked, run on the CPU.

The graph is the one `aml export` writes (`aml.export.encoder.export_encoder` + `aml.export.onnx_export.export_onnx`,
fp32, dynamic batch / height / width; no whitening folded in: extraction applies Lw after the scale combination,
as the torch backend does). It is traced once per model state and cached as `$AML_HOME/cache/onnx/<digest>.onnx`
(written atomically; the digest is a sha256 of the state dict, the module tree, torch's version and the export
version), so a teacher is exported once and a student once per epoch (the KEEP most recently used files stay).
Every session is checked against the torch model on a probe batch before use (max |difference| <= PARITY on
L2-normalised vectors): a cached file that does not load or does not match is exported again.

Imports: the bottom layer (`aml.net`, `aml.probe`, `aml.threads`, `aml.io`, `aml.errors`) at the top; the
graph writers (`aml.export.encoder`, `aml.export.onnx_export`: the middle-layer part of the export package, which
imports only the bottom layer) and `aml.ort_session` where a graph is named, written or loaded, because onnx and
onnxruntime are the optional `export` extra (`available` checks for onnxruntime without importing it). There is
one exporter, not two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aml.errors import UserError, first_line
from aml.io import aml_home, atomic_path
from aml.net import RetrievalNet
from aml.probe import probe_batch
from aml.threads import intra_op_threads

PARITY = 1e-5  # largest |difference| to the torch backend's L2-normalised vectors on the probe
EXPORT_VERSION = 3  # 3: TF "same" padding in the Conv node (static pads, or auto_pad SAME_UPPER); bump on graph changes
KEEP = 8  # cached graphs kept on disk (least recently used removed first)
PROBE = (65, 48)  # (H, W) of the probe batch: an odd and an even side, both parities of TF "same" padding
_MEMO_SIZE = 4  # sessions kept in this process (a teacher and a student, at two thread counts)
_memo: OrderedDict[tuple[str, int], tuple[OrtForward | None, str | None]] = OrderedDict()
_lock = threading.Lock()


def available() -> bool:
    """Whether onnxruntime is installed (checked without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def ort_threads() -> int:
    """The threads onnxruntime extraction may use: the one thread setting (`aml.threads.intra_op_threads`)."""
    return intra_op_threads()


def exportable(model: nn.Module) -> bool:
    """Whether the backend can run `model`: a RetrievalNet with float32 weights on the CPU."""
    if not isinstance(model, RetrievalNet):
        return False
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64) for t in model.state_dict().values())


def model_digest(model: nn.Module) -> str:
    """sha256 of what the exported graph depends on: weights and buffers, module tree, torch and export versions."""
    from aml.export.onnx_export import OPSET

    h = hashlib.sha256(f"aml-onnx {EXPORT_VERSION} opset {OPSET} torch {torch.__version__}\n{model!r}\n".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).numpy())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where exported graphs are cached: `$AML_HOME/cache/onnx`."""
    return aml_home() / "cache" / "onnx"


class Trunk(nn.Module):
    """A RetrievalNet's trunk as a module: normalised (B, 3, H, W) -> (B, C, h, w) maps (`RetrievalNet.trunk`)."""

    def __init__(self, net: RetrievalNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(x)


class OrtForward:
    """A model's ONNX graph on onnxruntime, called like the model: normalised (B, 3, H, W) -> (B, D) tensor; with
    `maps`, like its trunk: -> (B, C, h, w) feature maps (what a closed-form start fits)."""

    def __init__(self, session: Any, model: nn.Module, path: Path, export_s: float | None, maps: bool = False) -> None:
        self.session, self.path, self.export_s, self.maps = session, path, export_s, maps
        self.input = session.get_inputs()[0].name
        self.msp, self.dim = model.msp, int(model.dim)

    def run(self, x: np.ndarray) -> np.ndarray:
        """(B, D) float32 vectors (or maps) of a normalised (B, 3, H, W) float32 batch."""
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))

    def difference(self, model: nn.Module) -> float:
        """Largest |difference| to `model`'s vectors (eval mode) on the probe batch; for maps, relative to the
        largest |value| of the torch maps."""
        x = probe_batch(*PROBE, seed=0, batch=1, mean=model.mean, std=model.std)
        was_training = model.training
        try:
            with torch.inference_mode():
                m = model.eval()
                want = (m.trunk if self.maps else m)(torch.from_numpy(x)).float().numpy()
        finally:
            model.train(was_training)
        got = self.run(x)
        if got.shape != want.shape or not np.isfinite(got).all():
            return float("inf")
        scale = max(float(np.abs(want).max()), 1e-12) if self.maps else 1.0
        return float(np.abs(got - want).max()) / scale


def _export(model: nn.Module, path: Path, maps: bool = False) -> float:
    """Write `model`'s fp32 graph (of its trunk's maps with `maps`) to `path` atomically; returns the seconds."""
    from aml.export.encoder import export_encoder
    from aml.export.friendly import make_export_friendly
    from aml.export.onnx_export import export_onnx

    t = time.perf_counter()
    module = Trunk(make_export_friendly(model)[0]).eval() if maps else export_encoder(model, None, "fp32")[0]
    example = torch.from_numpy(probe_batch(*PROBE, seed=0, batch=1, mean=model.mean, std=model.std))
    with atomic_path(path) as tmp:
        export_onnx(module, tmp, example, maps=maps)
    return time.perf_counter() - t


def _prune(keep: Path) -> None:
    """Keep the KEEP most recently used graphs (`keep` always)."""
    try:
        os.utime(keep)
        files = sorted(cache_dir().glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for p in files[KEEP:]:
        if p != keep:
            p.unlink(missing_ok=True)


def forget() -> None:
    """Drop this process's sessions: the next `ort_forward` reads the disk cache, as a new process would."""
    with _lock:
        _memo.clear()


def remembered() -> int:
    """How many sessions (or refusals) this process holds."""
    with _lock:
        return len(_memo)


def ort_forward(
    model: nn.Module, *, threads: int = 1, required: bool = False, log: bool = False, maps: bool = False
) -> OrtForward | None:
    """The onnxruntime forward of `model`'s current weights (`threads` intra-op threads), from this process's
    memo, the disk cache, or a fresh export; checked against torch on the probe batch. `maps`: the graph of
    its trunk's feature maps (`RetrievalNet.trunk`) instead of its vectors (a graph of its own).

    When the model does not export or its graph does not match: a one-line UserError if `required` (an explicit
    `--backend onnxruntime`), else a warning on stderr and None (auto falls back to torch). `log` prints the
    one-off export's cost.
    """
    why = None if exportable(model) else f"{type(model).__name__} is not a float32 RetrievalNet on the CPU"
    fwd, seen = None, False
    if why is None:
        key = (model_digest(model) + ("-maps" if maps else ""), threads)
        with _lock:
            seen = key in _memo
            if seen:
                _memo.move_to_end(key)
                fwd, why = _memo[key]
        if not seen:
            fwd, why = _build(model, cache_dir() / f"{key[0]}.onnx", threads, log, maps)
            with _lock:
                _memo[key] = (fwd, why)
                while len(_memo) > _MEMO_SIZE:
                    _memo.popitem(last=False)
    if fwd is None:
        if required:
            raise UserError(f"--backend onnxruntime: {why}; use --backend torch or auto")
        if not seen:
            print(f"warning: onnxruntime backend: {why}; extracting with torch", file=sys.stderr)
    return fwd


def _build(
    model: nn.Module, path: Path, threads: int, log: bool, maps: bool = False
) -> tuple[OrtForward | None, str | None]:
    """(forward, None), or (None, why not): the cached graph if it loads and matches, else a fresh export."""
    from aml.ort_session import session

    why = None
    for fresh in (False, True):
        export_s = None
        if fresh or not path.is_file():
            try:
                export_s = _export(model, path, maps)
            except Exception as e:  # noqa: BLE001 - the exporter raises many types; the reason is reported
                return None, f"the model does not export to ONNX ({first_line(e)})"
            if log:
                print(f"onnxruntime backend: exported the model in {export_s:.1f} s (once; cached in {path.parent})",
                      file=sys.stderr)  # fmt: skip
        try:
            fwd = OrtForward(session(path, threads), model, path, export_s, maps)
            diff = fwd.difference(model)
        except Exception as e:  # noqa: BLE001 - a corrupt or half-written file: onnxruntime's own exception types
            why = f"{path} does not load ({first_line(e)})"
        else:
            if diff <= PARITY:
                _prune(path)
                return fwd, None
            why = f"the ONNX graph differs from torch by {diff:.1e} (> {PARITY:g}) on the probe"
        if export_s is not None:  # a fresh export failed: exporting again would not help
            break
    return None, why
