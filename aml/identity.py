"""The one compatibility check: do two model identities (what vectors are for) match? Torch-free.

An identity is a dict of `IDENTITY_FIELDS`: a teacher's `model_identity` (name, weights, sha256, dim), plus
for a query encoder and an index the image size and whitening the vectors are made with. `aml evaluate` (a
student's recorded teacher against --teacher), `aml search` (the encoder against the index), `aml index add`
(the teacher now against the index's) and the export retrieval gate (the teacher found against the one the
student recorded) all compare through `mismatch` and refuse through `check_compatible`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aml.errors import UserError

IDENTITY_FIELDS = ("name", "sha256", "dim", "image_size", "whitening")  # a field absent on both sides matches


def mismatch(a: Mapping[str, Any], b: Mapping[str, Any], fields: Sequence[str] = IDENTITY_FIELDS) -> list[str]:
    """The fields on which identities `a` and `b` differ (a weights hash of None on either side compares the
    weights labels instead: 'random-init', a path)."""
    diff = []
    for f in fields:
        x, y = a.get(f), b.get(f)
        if f == "sha256" and (x is None or y is None):
            x, y = a.get("weights"), b.get("weights")
        if x != y:
            diff.append(f)
    return diff


def describe(identity: Mapping[str, Any]) -> str:
    """One-line text of an identity: name (sha256 or weights, dim[, image size, whitening]); an identity of a
    dim alone (a model recording no teacher): 'D-d vectors'."""
    if set(identity) == {"dim"}:
        return f"{identity['dim']}-d vectors"
    sha = identity.get("sha256")
    parts = [f"sha256 {sha[:12]}" if sha else f"weights {identity.get('weights')}", f"{identity.get('dim')}-d"]
    if "image_size" in identity:
        parts.append(f"{identity['image_size']} px")
    if "whitening" in identity:
        parts.append(identity["whitening"] or "no whitening")
    return f"{identity.get('name')} ({', '.join(parts)})"


def recorded_teacher(meta: Mapping[str, Any] | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The teacher a model's meta records (meta['aml']['teacher']) and the fields it can be checked on: all;
    a model that records no teacher (not distilled by aml) only its dim, or nothing without one."""
    aml = meta.get("aml") if isinstance(meta, Mapping) else None
    recorded = aml.get("teacher") if isinstance(aml, Mapping) else None
    if isinstance(recorded, Mapping):
        return dict(recorded), IDENTITY_FIELDS
    dim = aml.get("dim") if isinstance(aml, Mapping) else None
    return ({"dim": int(dim)}, ("dim",)) if dim is not None else ({}, ())


def check_compatible(
    have: Mapping[str, Any],
    want: Mapping[str, Any],
    *,
    what: str,
    where: str,
    fix: str,
    force: bool | None = None,
    fields: Sequence[str] = IDENTITY_FIELDS,
) -> str:
    """'' when `have` matches `want` on `fields`; else a one-line UserError "`what` HAVE, but `where` WANT
    (differ: ...); `fix`" (`what` / `where`: the phrases before each identity, e.g. "encoder E is for", "index
    DB holds"), with ', or --force' when the command has one (`force` not None); with `force` True the same
    line comes back as a warning instead."""
    diff = mismatch(have, want, fields)
    if not diff:
        return ""
    text = f"{what} {describe(have)}, but {where} {describe(want)} (differ: {', '.join(diff)})"
    if force:
        return f"warning: --force: going on anyway: {text}"
    raise UserError(f"{text}; {fix}{'' if force is None else ', or --force'}")


def recorded_image_size(model: str) -> tuple[int | None, str]:
    """The image size a model was made for, and where it is recorded: an exported encoder's sidecar
    ('image_size'), a checkpoint's training config (its test size, else its training size); (None, '') for a
    registry name or a file that records none. Torch is imported only to read a checkpoint."""
    from pathlib import Path

    from aml.sidecar import read_sidecar, sidecar_path

    if sidecar_path(model).is_file():
        return int(read_sidecar(model)["image_size"]), "its sidecar"
    if not Path(model).is_file():
        return None, ""
    from aml.registry import read_torch_file

    obj = read_torch_file(model)
    config = obj.get("config") if isinstance(obj, Mapping) else None
    size = (config.get("test_image_size") or config.get("image_size")) if isinstance(config, Mapping) else None
    return (int(size), "the checkpoint") if size else (None, "")
