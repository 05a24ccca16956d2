"""The student's start: its head fitted to the teacher in closed form on training images, before epoch 1.

The AML paper starts every student from a random 1x1 projection, which a small budget cannot align with the
teacher's space (a student trained so keeps its own, good space but searches the teacher's badly). Here the
head is solved for instead (`aml.closed_form`), with the backbone as it is (ImageNet weights):

| method             | head                                   | fitted on                                        |
|--------------------|----------------------------------------|--------------------------------------------------|
| `random`           | aml: Conv1x1 -> ReLU -> GeM (paper)    | nothing: the paper's random start                |
| `lstsq`            | aml: Conv1x1 -> ReLU -> GeM            | least squares, student -> teacher feature maps,  |
|                    |                                        | location by location                             |
| `ridge`            | linear: GeM -> L2N -> Linear -> L2N    | ridge on pooled vectors (teacher's from cache)   |
| `procrustes`       | linear                                 | orthogonal Procrustes on pooled vectors          |
| `local-procrustes` | linear                                 | orthogonal Procrustes on the L2-normalised local |
|                    |                                        | descriptors (one per feature-map location), the  |
|                    |                                        | default                                          |

`local-procrustes` rests on two facts: a rotation keeps the student's own geometry (which is as good as the
teacher's), and every location of the two networks' feature maps of one image is a matched pair, so N images
give N x h x w pairs instead of N (and horizontal flips double them) for the same backbone passes; the
rotation fitted on local descriptors then aligns the GeM vectors pooled from them. Both networks see the same
image at the same size; when their grids differ (other strides) the finer map is average-pooled to the
coarser grid. With GLAM (`aml.glam`) the maps are read through it (`RetrievalNet.trunk`), so the fit is the
closed form of the student as it starts, GLAM included. Methods fitted on maps need the teacher network itself
(one teacher forward per fitting image, flips included); pooled methods read the teacher's cached vectors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from aml.cache import content_identity
from aml.closed_form import CrossCovariance, residual
from aml.data.images import header_size, size_key
from aml.io import aml_home, atomic_path, sha256_lines
from aml.net import RetrievalNet
from aml.nn import gem, l2n
from aml.registry import model_identity
from aml.train.batches import ImageTensors, size_buckets

HEAD_INITS: dict[str, str] = {  # method -> the head it initialises
    "random": "aml",
    "lstsq": "aml",
    "ridge": "linear",
    "procrustes": "linear",
    "local-procrustes": "linear",
}
MAP_METHODS = ("lstsq", "local-procrustes")  # fitted on feature maps: these need the teacher network
RIDGE_LAMBDA = 0.1  # relative to the mean of diag(S^T S)
_FIT_BATCH = 4  # images per forward while fitting (the CPU extraction batch)


def head_for(method: str) -> str:
    """The student head (`aml` or `linear`) that a head-init method initialises."""
    if method not in HEAD_INITS:
        raise ValueError(f"head init {method!r}: expected one of {', '.join(HEAD_INITS)}")
    return HEAD_INITS[method]


def fit_images(n: int, count: int | None, seed: int) -> np.ndarray:
    """The training images a fit uses: all of them (`count` None), or `count` drawn under the run's seed (sorted)."""
    if count is None or count <= 0 or count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 2]).choice(n, size=count, replace=False))


def _batches(
    paths: Sequence[str], idx: np.ndarray, size: int, net: RetrievalNet
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(positions into idx, (b, 3, H, W) batch) of same-size images, normalised for `net`."""
    images = ImageTensors(paths, size, net.mean, net.std)
    keys = size_key([header_size(paths[i]) for i in idx])
    for b in size_buckets(np.argsort(keys, kind="stable"), keys, _FIT_BATCH):
        x = [images[int(idx[j])] for j in b]
        for shape in dict.fromkeys(tuple(t.shape) for t in x):
            sel = [k for k, t in enumerate(x) if tuple(t.shape) == shape]
            yield b[sel], torch.stack([x[k] for k in sel])


def _common_grid(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps on the coarser of their two grids (the finer one average-pooled)."""
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    return tuple(m if m.shape[-2:] == (h, w) else F.adaptive_avg_pool2d(m, (h, w)) for m in (a, b))  # type: ignore[return-value]


def _rows(m: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps -> (B h w, C) local descriptors."""
    return m.permute(0, 2, 3, 1).reshape(-1, m.shape[1])


def _head_state(student: RetrievalNet) -> dict[str, torch.Tensor]:
    """The head's parameters (what a fit writes)."""
    return {k: v.detach().cpu().clone() for k, v in student.state_dict().items() if k.startswith(("proj.", "fc."))}


def run_start(
    student: RetrievalNet,
    method: str,
    *,
    student_name: str,
    student_weights: str | None,
    random_student: bool,
    teacher_identity: dict[str, Any],
    bn_images: int,
    **kw: Any,
) -> dict[str, Any]:
    """A run's closed-form start: `cached_init_head` in $AML_HOME/cache, keyed by the student's and teacher's
    identities, the BatchNorm estimate's size and GLAM's parts (the fit reads the maps through GLAM's seeded
    start); `kw` as `init_head`'s."""
    identity = model_identity(student_name, weights=student_weights, random_init=random_student)
    key = {"student": identity, "teacher": teacher_identity, "bn_images": bn_images}
    if student.glam is not None:
        key["glam"] = list(student.glam_parts)
    return cached_init_head(student, method, cache_dir=aml_home() / "cache", key=key, **kw)


def cached_init_head(
    student: RetrievalNet, method: str, *, cache_dir: str | os.PathLike, key: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    """`init_head`, memoised in `cache_dir` under `key` (what the fit depends on besides the arguments: the
    student's and teacher's identities, the training images): runs that share a start (every method of a
    benchmark, a rerun) fit once. The file holds tensors and JSON only (read with weights_only=True); a bad
    file is refitted."""
    if method == "random":
        return init_head(student, method, **kw)
    full = {**key, "method": method, "image_size": kw["image_size"], "count": kw.get("count") or 0,  # 0: all
            "flip": kw.get("flip", True), "seed": kw.get("seed", 0), "paths": sha256_lines(list(kw["paths"])),
            "content": content_identity(kw["paths"]), "format": 1}  # fmt: skip
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"head-init-{digest}.pt"
    if path.is_file() and not path.is_symlink():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            student.load_state_dict(saved["state"], strict=False)
            return {**json.loads(saved["info"]), "cached": True}
        except Exception:  # noqa: BLE001 - a half-written or foreign file: fit again and replace it
            pass
    info = init_head(student, method, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state": _head_state(student), "info": json.dumps(info)}, tmp)
    return info


def _accumulate(
    student: RetrievalNet,
    teacher: RetrievalNet | None,
    method: str,
    local: CrossCovariance,
    paths: Sequence[str],
    idx: np.ndarray,
    image_size: int,
    flip: bool,
    dev: torch.device,
) -> np.ndarray:
    """One pass over the fitting images `idx`: their (len(idx), C) L2N GeM vectors of the student's maps, returned;
    with a `teacher` (map methods), every location pair of the two networks' maps (and of the mirrored images with
    `flip`) added to `local` (L2-normalised descriptors for local-procrustes)."""
    s_pooled = np.zeros((len(idx), student.out_channels), dtype=np.float32)
    p = student.pool.p.detach().to(dev)
    for pos, x in _batches(paths, idx, image_size, student):
        x = x.to(dev)
        fs = student.trunk(x)
        s_pooled[pos] = l2n(gem(fs, p)).cpu().numpy()
        if teacher is None:
            continue
        for view in (x, x.flip(-1)) if flip else (x,):
            a, b = _common_grid(student.trunk(view) if view is not x else fs, teacher.trunk(view))
            a, b = _rows(a), _rows(b)
            if method == "local-procrustes":
                a, b = l2n(a.clamp(min=1e-6)), l2n(b.clamp(min=1e-6))
            local.add(a.cpu().numpy(), b.cpu().numpy())
    return s_pooled


def _solve(
    student: RetrievalNet,
    method: str,
    local: CrossCovariance,
    pooled: CrossCovariance,
    s_pooled: np.ndarray,
    t_rows: np.ndarray,
) -> float:
    """Solve `method`'s map from the accumulated pairs, write it into the student's head; returns its residual."""
    if method == "lstsq":
        w = local.lstsq()
        student.proj[0].weight.data.copy_(torch.from_numpy(w.T.copy())[:, :, None, None])
        return local.relative_error(w)
    acc = local if method == "local-procrustes" else pooled
    w = acc.procrustes() if method != "ridge" else acc.ridge(RIDGE_LAMBDA)
    student.fc.weight.data.copy_(torch.from_numpy(w.T.copy()))
    return residual(s_pooled, t_rows, w)


@torch.inference_mode()
def init_head(
    student: RetrievalNet,
    method: str,
    *,
    paths: Sequence[str],
    teacher_vectors: np.ndarray,
    teacher_net: Callable[[], RetrievalNet],
    image_size: int,
    count: int | None = None,
    flip: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fit `student`'s head to the teacher in place and return what was done (the record kept with the run).

    Args:
        student: a student RetrievalNet whose head matches `head_for(method)`.
        method: one of HEAD_INITS.
        paths: the training images; `teacher_vectors` (N, D) their cached teacher vectors, same order.
        teacher_net: builds the teacher network (called only by the map methods).
        image_size: the training size; `count` how many images to fit on (None: all); `flip` adds mirrored images
            (map methods); `seed` picks the images when `count` is smaller than the set.

    Returns {'method', 'head', 'images', 'flip', 'pairs', 'residual', 'seconds'}: `residual` is the mean
    1 - cos of the mapped student's pooled vectors and the teacher's on the fitting images (for `lstsq`, whose
    map acts before ReLU and GeM: ||S W - T||^2 / ||T||^2 of the fitted local maps).
    """
    head = head_for(method)
    if student.head != head:
        raise ValueError(f"head init {method!r} initialises a {head!r} head, the student has {student.head!r}")
    if method == "random":
        return {"method": method, "head": head}
    t0 = time.perf_counter()
    dev = torch.device(device)
    idx = fit_images(len(paths), count, seed)
    was_training = student.training
    student.eval()
    teacher = teacher_net().eval().to(dev) if method in MAP_METHODS else None
    ds, dt = student.out_channels, int(teacher_vectors.shape[1])
    local, pooled = CrossCovariance(ds, teacher.out_channels if teacher else dt), CrossCovariance(ds, dt)
    s_pooled = _accumulate(student, teacher, method, local, paths, idx, image_size, flip, dev)
    t_rows = np.asarray(teacher_vectors[idx], dtype=np.float32)
    pooled.add(s_pooled, t_rows)
    res = _solve(student, method, local, pooled, s_pooled, t_rows)
    student.train(was_training)
    pairs = local.n if method in MAP_METHODS else pooled.n
    return {
        "method": method,
        "head": head,
        "images": int(len(idx)),
        "flip": bool(flip and method in MAP_METHODS),
        "pairs": int(pairs),
        "residual": float(res),
        "seconds": round(time.perf_counter() - t0, 2),
    }
