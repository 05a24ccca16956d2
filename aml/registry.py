"""The model zoo: one table of backbones for both roles, and the one way to build a RetrievalNet.

`create_model` takes a registered name (weights from `weights=`, the bundled package, or a seeded random
init) or a checkpoint path (cirtorch or aml: the architecture comes from its meta). `model_identity`
names the same model without building it: the teacher-cache key.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aml.errors import UserError
from aml.glam import parse_parts, parts_in, spec_of
from aml.io import sha256_file
from aml.net import RetrievalNet, default_meta
from aml.trust import torch_load

Builder = Callable[[str | None], nn.Module]  # (weights file or None) -> the backbone's feature-map module
INIT_SEED = 0  # every network is built under this seed: random-init models are reproducible
ROLES = ("teacher", "student")
TORCHVISION_URL = "https://download.pytorch.org/models"
CIRTORCH_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"


@dataclass(frozen=True)
class Bundled:
    """Weights shipped inside an installed Python package."""

    package: str
    path: Callable[[], str]


@dataclass(frozen=True)
class Entry:
    """One registered backbone: its builder and everything about it, named once."""

    name: str
    builder: Builder
    feature_dim: int
    weights_help: str
    description: str
    architecture: str
    default_role: str
    bundled: Bundled | None


_REGISTRY: dict[str, Entry] = {}
# Backbone families, one per file, imported in this order: registration order is the listing order within a role.
_PACKAGES = ("aml.students", "aml.teachers")
_loaded = False
_checked: set[str] = set()  # entries whose built module's output channels were checked against feature_dim


def register(
    name: str,
    *,
    feature_dim: int,
    architecture: str,
    default_role: str,
    weights_help: str,
    description: str,
    bundled: Bundled | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator: register a backbone builder `(weights: str | None) -> nn.Module` (the feature maps).

    `feature_dim` is the module's output channels (checked on its first build); `architecture` is the name
    cirtorch checkpoints carry in `meta['architecture']` (torchvision's); `default_role` is the side it is
    listed under (any backbone works on either side); `bundled` names weights that ship with an installed
    package (used when no `weights=` is given).
    """
    if default_role not in ROLES:
        raise ValueError(f"model '{name}': default_role {default_role!r}, expected one of {ROLES}")

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = Entry(name, fn, feature_dim, weights_help, description, architecture, default_role, bundled)
        return fn

    return deco


def _entries() -> dict[str, Entry]:
    global _loaded
    if not _loaded:
        for package in _PACKAGES:
            importlib.import_module(package)
        _loaded = True
    return _REGISTRY


def _unknown(name: str) -> UserError:
    return UserError(f"unknown model '{name}'; registered: {', '.join(sorted(_entries()))} (or pass a checkpoint file)")


# --------------------------------------------------------------------------------------- weight files
_memo: dict[str, Any] = {}  # one file read by `_resolve` and reused by the builder in the same call


def read_torch_file(path: str | os.PathLike) -> Any:
    """The object saved in a torch file (weights-only: `aml.trust.torch_load`), a one-line UserError when it is
    missing, unreadable, or needs more than weights to load."""
    p = Path(path)
    key = str(p.resolve())
    if key in _memo:
        return _memo[key]
    if not p.is_file():
        raise UserError(f"{p}: file not found; check the path (weights are never downloaded by aml)")
    return torch_load(p)


def backbone_keys(sd: Mapping[str, Any], renames: Mapping[str, int] | None = None, drop: tuple[str, ...] = ()) -> dict:
    """Keys of a backbone file, as a `features` Sequential names them (cirtorch's layout).

    Accepts a torchvision ImageNet state dict (attributes renamed by `renames`, heads in `drop` removed),
    cirtorch `features.N.*` keys, or a bare features state dict (`N.*`, cirtorch's imagenet files).
    """
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in drop:
            continue
        if renames and head in renames:
            k = f"{renames[head]}.{rest}"
        elif head == "features":
            k = rest
        out[k] = v
    return out


def _strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a DistributedDataParallel `module.` prefix."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from a file (a dict of tensors, or a checkpoint's `state_dict`)."""
    obj = read_torch_file(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path}: not a state dict (expected a dict of tensors, or a dict with 'state_dict')")
    return _strip_module(obj)


def load_into(
    module: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike, *, optional: tuple[str, ...] = ()
) -> None:
    """Load `sd` into `module` strictly, as a one-line UserError naming the file and the first bad key.

    Missing `num_batches_tracked` buffers are accepted (old cirtorch files); keys starting with a prefix in
    `optional` may be missing too (a freshly initialised head).
    """
    own = module.state_dict()
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise UserError(
                f"{path}: state_dict: key '{k}' has shape {tuple(v.shape)}, the network expects "
                f"{tuple(own[k].shape)}; the file is for another architecture or dimension"
            )
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked") and not k.startswith(optional)]
    unexpected = [k for k in sd if k not in own]
    for keys, what in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise UserError(
                f"{path}: state_dict: key '{keys[0]}' {what}{more}; the file does not match this architecture"
            )
    module.load_state_dict(sd, strict=False)


def _as_checkpoint(obj: Any, path: Path) -> dict[str, Any]:
    """Validate a full-network checkpoint (cirtorch or aml): a dict with `state_dict` and `meta`."""
    if not isinstance(obj, Mapping):
        raise UserError(
            f"{path}: not a checkpoint (a {type(obj).__name__}); expected a dict with 'state_dict' and 'meta'"
        )
    for field in ("state_dict", "meta"):
        if field not in obj:
            raise UserError(
                f"{path}: field '{field}' missing; expected a cirtorch or aml checkpoint "
                "(dict with 'state_dict' and 'meta'), or pass it as --weights of a named model"
            )
    if not isinstance(obj["meta"], Mapping):
        raise UserError(f"{path}: field 'meta' is a {type(obj['meta']).__name__}, expected a dict")
    sd = _checked_state_dict(obj["state_dict"], path)
    return {"state_dict": sd, "meta": dict(obj["meta"])}


def _checked_state_dict(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    """Check that a checkpoint's `state_dict` is a dict of tensors."""
    if not isinstance(sd, Mapping) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: field 'state_dict' is not a dict of tensors")
    return _strip_module(sd)


def _entry_from_meta(meta: Mapping[str, Any], path: Path) -> Entry:
    """The registered backbone a checkpoint's meta describes (aml name first, then cirtorch architecture)."""
    entries = _entries()
    aml = meta.get("aml")
    if isinstance(aml, Mapping) and aml.get("name") is not None:
        if aml["name"] not in entries:
            raise UserError(
                f"{path}: meta['aml']['name'] = '{aml['name']}' is not registered; "
                f"registered: {', '.join(sorted(entries))}"
            )
        return entries[aml["name"]]
    if "architecture" not in meta:
        raise UserError(f"{path}: meta: field 'architecture' missing; cannot tell which network the weights are for")
    for field, want in (("pooling", "gem"), ("local_whitening", False), ("regional", False)):
        if meta.get(field, want) != want:
            raise UserError(
                f"{path}: meta['{field}'] = {meta[field]!r}; only GeM networks without local or "
                "regional whitening are supported"
            )
    arch = meta["architecture"]
    for e in entries.values():
        if e.architecture == arch:
            return e
    known = sorted(e.architecture for e in entries.values())
    raise UserError(f"{path}: meta['architecture'] = '{arch}' is not supported; supported: {', '.join(known)}")


def _checkpoint_dim(ckpt: Mapping[str, Any], entry: Entry) -> int:
    sd = ckpt["state_dict"]
    for key in ("proj.0.weight", "fc.weight", "whiten.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    return int(ckpt["meta"].get("outputdim", entry.feature_dim))


# ------------------------------------------------------------------------------------------ resolving
@dataclass
class _Source:
    """Where a model's weights come from: a full checkpoint, a backbone file, bundled, or random init."""

    entry: Entry
    label: str  # file path | bundled:<package> | random-init
    path: Path | None
    checkpoint: dict[str, Any] | None


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or Path(s).suffix in (".pth", ".pt", ".tar", ".ckpt") or Path(s).exists()


def _resolve(
    name_or_path: str | os.PathLike, weights: str | os.PathLike | None, random_init: bool, opt: str = "--weights"
) -> _Source:
    """Where a model's weights come from; `opt` is the weights option of the command typed (in messages)."""
    entries = _entries()
    name = str(name_or_path)
    if weights is not None and random_init:
        raise UserError(f"{opt} {weights} and --random-init both given; pass one of them")
    if name in entries:
        entry = entries[name]
        if weights is not None:
            path = Path(weights)
            obj = read_torch_file(path)
            _memo[str(path.resolve())] = obj
            ckpt = None
            if isinstance(obj, Mapping) and "meta" in obj:
                ckpt = _as_checkpoint(obj, path)
                other = _entry_from_meta(ckpt["meta"], path)
                if other.name != entry.name:
                    raise UserError(
                        f"{path}: checkpoint is for '{other.name}' ({other.architecture}), not "
                        f"'{entry.name}'; pass --model {other.name} or the checkpoint alone"
                    )
            return _Source(entry, str(path.resolve()), path, ckpt)
        if random_init:
            return _Source(entry, "random-init", None, None)
        if entry.bundled is not None:
            return _Source(entry, f"bundled:{entry.bundled.package}", Path(entry.bundled.path()), None)
        raise UserError(
            f"model '{name}' has no bundled weights: pass {opt} FILE ({entry.weights_help}); "
            "--random-init gives random weights (tests only)"
        )
    if not _looks_like_path(name):
        raise _unknown(name)
    path = Path(name)
    if weights is not None:
        raise UserError(f"{path}: a checkpoint carries its own weights; drop {opt} {weights}")
    if random_init:
        raise UserError(f"{path}: a checkpoint carries its own weights; drop --random-init")
    if not path.is_file():
        raise UserError(
            f"{path}: checkpoint not found; pass a registered model name "
            f"({', '.join(sorted(entries))}) or an existing checkpoint file"
        )
    ckpt = _as_checkpoint(read_torch_file(path), path)
    return _Source(_entry_from_meta(ckpt["meta"], path), str(path.resolve()), path, ckpt)


def model_identity(
    name_or_path: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    *,
    weights_option: str = "--weights",
) -> dict[str, Any]:
    """What a model is, without building it: {'name', 'weights', 'sha256', 'dim'} (the teacher-cache key).
    `weights_option` is how the calling command names its weights option (e.g. `--teacher-weights`)."""
    try:
        src = _resolve(name_or_path, weights, random_init, weights_option)
    finally:
        _memo.clear()
    dim = _checkpoint_dim(src.checkpoint, src.entry) if src.checkpoint is not None else src.entry.feature_dim
    return {
        "name": src.entry.name,
        "weights": src.label,
        "sha256": sha256_file(src.path) if src.path is not None else None,
        "dim": dim,
    }


def _output_channels(features: nn.Module) -> int:
    """Channels of a feature module's maps, from one small eval-mode forward (no RNG, no state change)."""
    was_training = features.training
    try:
        with torch.no_grad():
            return int(features.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
    finally:
        features.train(was_training)


def _features(entry: Entry, weights: str | None) -> nn.Module:
    """The entry's feature module; its output channels are checked against `feature_dim` on the first build."""
    features = entry.builder(weights)
    if entry.name not in _checked:
        got = _output_channels(features)
        if got != entry.feature_dim:
            raise ValueError(
                f"model '{entry.name}': the builder's maps have {got} channels, registered {entry.feature_dim}"
            )
        _checked.add(entry.name)
    return features


def _checkpoint_head(sd: Mapping[str, torch.Tensor]) -> tuple[str, int | None]:
    """The student head a state dict holds and its dimension: ("aml", D), ("linear", D) or ("aml", None)."""
    if "proj.0.weight" in sd:
        return "aml", int(sd["proj.0.weight"].shape[0])
    if "fc.weight" in sd:
        return "linear", int(sd["fc.weight"].shape[0])
    return "aml", None


def _glam_parts(sd: Mapping[str, torch.Tensor], asked: tuple[str, ...], path: Path | None) -> tuple[str, bool]:
    """The GLAM parts to build for a checkpoint and whether they are new: the checkpoint's own (its `glam.*` keys),
    or `asked` freshly initialised when it holds none; asking for other parts than it holds is a UserError."""
    held = parts_in(sd)
    if asked and held and asked != held:
        raise UserError(f"{path}: checkpoint has GLAM parts {spec_of(held)}, but --glam {spec_of(asked)} was asked for")
    return (held or asked), bool(asked and not held)


def _build(
    src: _Source, dim: int | None, head: str, glam: tuple[str, ...] = (), layernorm: bool = False
) -> RetrievalNet:
    entry, ckpt = src.entry, src.checkpoint
    channels = entry.feature_dim
    if ckpt is None:
        features = _features(entry, str(src.path) if src.path is not None else None)
        meta = default_meta(entry.architecture, dim or channels)
        return RetrievalNet(features, channels, dim=dim, head=head, glam=glam, layernorm=layernorm, meta=meta)
    sd = ckpt["state_dict"]
    ck_head, ck_dim = _checkpoint_head(sd)
    whiten = "whiten.weight" in sd
    new_head = dim is not None and ck_dim is None and not whiten
    if dim is not None and ck_dim != dim and not new_head:
        kind = "projection" if ck_head == "aml" else "linear"
        have = f"a {ck_dim}-d {kind} head" if ck_dim else "a whitening layer"
        raise UserError(f"{src.path}: checkpoint has {have}, but dim={dim} was asked for")
    parts, new_glam = _glam_parts(sd, glam, src.path)
    features = _features(entry, None)
    meta = {**default_meta(entry.architecture, channels), **ckpt["meta"]}
    net = RetrievalNet(
        features,
        channels,
        dim=dim if new_head else ck_dim,
        head=head if new_head else ck_head,
        whiten=whiten,
        glam=parts,
        layernorm=layernorm if new_head else None,  # a trained head keeps its checkpoint's (meta['layernorm'])
        meta=meta,
    )
    optional = (("proj.", "fc.") if new_head else ()) + (("glam.",) if new_glam else ())
    load_into(net, sd, src.path, optional=optional)
    return net


def create_model(
    name_or_path: str | os.PathLike,
    *,
    role: str | None = None,
    weights: str | os.PathLike | None = None,
    dim: int | None = None,
    head: str = "aml",
    glam: str | Sequence[str] | None = None,
    layernorm: bool = False,
    random_init: bool = False,
    weights_option: str = "--weights",
) -> RetrievalNet:
    """Build a RetrievalNet from a registered name (+ weights file) or from a checkpoint path.

    `role="student"` with `dim` adds a student head to `dim` (`head="aml"`: the AML projection Conv1x1 -> ReLU
    before GeM; `head="linear"`: a Linear after GeM; `layernorm`: an affine-free LayerNorm before the last L2N;
    a checkpoint keeps the head and the LayerNorm it was saved with);
    `role="teacher"` (the default, or the role recorded in an aml checkpoint) returns the net frozen, in
    eval mode. `glam` (either role: "all", a comma list of `aml.glam.PARTS`, or None) puts the global-local
    attention module on the backbone's maps; a checkpoint is rebuilt with the GLAM parts it holds. Networks are
    built under a fixed seed, so `random_init=True` is reproducible.
    """
    if role not in (None, "teacher", "student"):
        raise UserError(f"role '{role}': expected 'teacher' or 'student'")
    try:
        src = _resolve(name_or_path, weights, random_init, weights_option)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            net = _build(src, dim, head, parse_parts(glam), layernorm)
    finally:
        _memo.clear()
    saved = (src.checkpoint or {}).get("meta", {}).get("aml") or {}
    role = role or saved.get("role") or "teacher"
    net.meta["aml"] = {"name": src.entry.name, "role": role, "dim": net.dim, "teacher": saved.get("teacher")}
    if role == "teacher":
        net.eval().requires_grad_(False)
    return net


def list_models() -> list[dict[str, Any]]:
    """One row per registered backbone: name, roles, output dim, where its weights come from."""
    rows = []
    for e in sorted(_entries().values(), key=lambda e: ROLES.index(e.default_role)):  # stable: registration order
        source = f"bundled:{e.bundled.package}" if e.bundled is not None else e.weights_help
        rows.append(
            {
                "name": e.name,
                "roles": e.default_role,
                "dim": e.feature_dim,
                "architecture": e.architecture,
                "weights": source,
                "description": e.description,
            }
        )
    return rows
