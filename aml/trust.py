"""What aml unpickles from disk: nothing beyond each format's needs, unless the user says the file is trusted.

Torch files (weights, checkpoints, training runs) load with `torch.load(weights_only=True)` plus, by name,
the numpy reconstructors a cirtorch `meta['Lw']` needs (`NUMPY_TORCH_GLOBALS`). Plain pickles (revisitop gnd,
SfM-120k) load through `SafeUnpickler`: builtin containers and numbers, and numpy arrays, nothing else.
A file that needs more is refused with one line naming it and the global it wanted. The one opt-in is
`trust_pickle()`: set by `AML_TRUST_PICKLE=1` or by `set_trust_pickle(True)` (what a `--trust-pickle` flag
calls); each file loaded that way prints a one-line warning to stderr.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from aml.errors import UserError, first_line

ENV = "AML_TRUST_PICKLE"
_trusted = False

# (module, name) a plain pickle of dicts, lists, numbers, strings and numpy arrays / scalars refers to
SAFE_PICKLE_GLOBALS = frozenset(
    {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool")}
    | {("builtins", n) for n in ("str", "bytes", "bytearray")}
    | {("collections", "OrderedDict"), ("_codecs", "encode")}
    | {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    | {("numpy", "ndarray"), ("numpy", "dtype")}
)


def trust_pickle() -> bool:
    """Whether the user trusts the files given to aml enough to run full unpickling (`AML_TRUST_PICKLE=1`)."""
    return _trusted or os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_trust_pickle(on: bool = True) -> None:
    """Switch full unpickling on (or back off) for this process; the `--trust-pickle` CLI flag calls this."""
    global _trusted
    _trusted = bool(on)


def opt_in_hint() -> str:
    """How a user opts in to loading a file that needs full unpickling (the end of every refusal): the
    `--trust-pickle` flag only where the running command has it, else `AML_TRUST_PICKLE=1` (and, outside a
    command, `set_trust_pickle(True)`)."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        how = f"set {ENV}=1 (or call aml.trust.set_trust_pickle(True))"
    elif any("--trust-pickle" in p.opts for p in ctx.command.params):
        how = f"pass --trust-pickle (or set {ENV}=1)"
    else:
        how = f"set {ENV}=1 in the environment"
    return f"if you trust this file, {how} to load it anyway (that runs any code it holds)"


def _warn(path: Path, why: str) -> None:
    print(f"warning: {path}: loaded with full unpickling (--trust-pickle or {ENV}=1): {why}", file=sys.stderr)


def _needs(name: str) -> str:
    return f"it needs the global {name}, more than plain data and weights (loading it could run code)"


def _refusal(path: Path, why: str) -> UserError:
    return UserError(f"{path}: refused to load: {why}; {opt_in_hint()}")


# ------------------------------------------------------------------------------------------ plain pickles
class SafeUnpickler(pickle.Unpickler):
    """A pickle reader that builds only `SAFE_PICKLE_GLOBALS` (containers, numbers, strings, numpy arrays)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (__builtin__, copy_reg, ...)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(_needs(f"{module}.{name}"))
        return super().find_class(module, name)


def load_pickle(path: str | os.PathLike, *, encoding: str = "ASCII") -> Any:
    """The object in a plain pickle file, built by `SafeUnpickler` (or fully, with a warning, when trusted).

    Unreadable files raise a one-line UserError; a refused global raises one naming it and the opt-in.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); check the path and its permissions") from None
    try:
        return SafeUnpickler(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as e:
        why = str(e)
        if not why.startswith("it needs the global "):
            raise UserError(
                f"{path}: not a readable pickle (UnpicklingError: {why}); re-download or rewrite it"
            ) from None
        if not trust_pickle():
            raise _refusal(path, why) from None
        _warn(path, why)
        return pickle.loads(data, encoding=encoding)
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means a bad file
        raise UserError(f"{path}: not a readable pickle ({first_line(e)}); re-download or rewrite it") from None


# ------------------------------------------------------------------------------------------ torch files
def _numpy_torch_globals() -> list[Any]:
    """numpy's array / scalar reconstructors and numeric dtype classes, under both numpy 1 and numpy 2 names."""
    try:
        from numpy._core import multiarray  # numpy >= 2 (numpy.core is its deprecated alias)
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    out: list[Any] = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        out += [(fn, f"{m}.{fn.__name__}") for m in ("numpy.core.multiarray", "numpy._core.multiarray")]
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    out += list(dict.fromkeys(type(np.dtype(c)) for c in codes))
    return out


_UNSAFE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


def _weights_only_refusal(e: Exception) -> tuple[str | None, str] | None:
    """(the global a weights-only load refused or None, the reader's reason); None when torch could not read it."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    m = _UNSAFE.search(text)
    if m is not None:
        return m.group(1) or m.group(2), ""
    reason = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
    return None, reason[0].strip() if reason else "unsupported content"


def torch_load(path: str | os.PathLike) -> Any:
    """torch.load on CPU, weights-only with the numpy globals cirtorch's Lw needs (memory-mapped when possible).

    A file that needs more is refused (UserError naming the file and the global) unless `trust_pickle()`;
    an unreadable file raises a one-line UserError.
    """
    import torch

    path = Path(path)
    last: Exception | None = None
    with torch.serialization.safe_globals(_numpy_torch_globals()):
        for kw in ({"mmap": True}, {}):  # mmap needs the zip format; old (legacy) files read without it
            try:
                return torch.load(path, map_location="cpu", weights_only=True, **kw)
            except Exception as e:  # noqa: BLE001 - try the next reader, then report the most telling error
                if last is None or _weights_only_refusal(last) is None:
                    last = e
    refused = _weights_only_refusal(last) if last is not None else None
    if refused is not None and trust_pickle():
        _warn(path, _needs(refused[0]) if refused[0] else f"the weights-only reader said: {refused[1]}")
        try:
            # Safe by consent only: reached solely when the user opted in (--trust-pickle / AML_TRUST_PICKLE=1)
            # for a file the weights-only reader refused, after the one-line warning above names the file. Such a
            # file is a pickle that needs globals beyond tensors and numpy arrays: the format forbids a safe load,
            # and a restricted unpickler allowing the globals it names would still run them.
            return torch.load(path, map_location="cpu", weights_only=False)  # safe: user opt-in, warned above
        except Exception as e:  # noqa: BLE001 - reported as a bad file below
            last, refused = e, None
    if refused is not None and refused[0] is not None:
        raise _refusal(path, _needs(refused[0]))
    if refused is not None:
        raise UserError(
            f"{path}: not a readable torch file (the weights-only reader: {refused[1]}); re-download it or check "
            f"the path; {opt_in_hint()}"
        )
    raise UserError(f"{path}: not a readable torch file ({first_line(last)}); re-download it or check the path")
