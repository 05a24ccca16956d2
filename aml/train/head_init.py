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

from aml import ort_backend
from aml.cache import content_identity
from aml.closed_form import CrossCovariance, residual
from aml.data.images import header_size, loaded_size
from aml.extract import size_batches
from aml.io import aml_home, atomic_path, sha256_lines
from aml.net import RetrievalNet
from aml.nn import gem, l2n
from aml.progress import progress_bar, write_line
from aml.registry import model_identity
from aml.settings import ORT_MIN_IMAGES
from aml.train.batches import ImageTensors

HEAD_INITS: dict[str, str] = {  # method -> the head it initialises
    "random": "aml",
    "lstsq": "aml",
    "ridge": "linear",
    "procrustes": "linear",
    "local-procrustes": "linear",
}
MAP_METHODS = ("lstsq", "local-procrustes")  # fitted on feature maps: these need the teacher network
RIDGE_LAMBDA = 0.1  # relative to the mean of diag(S^T S)
_FIT_BATCH = 4  # images per forward while fitting on an accelerator (x2 with the mirrored views); 1 on the CPU
RESIDUAL_IMAGES = 20_000  # fitting images the reported residual is measured on (all of a smaller fit)


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
    paths: Sequence[str], idx: np.ndarray, size: int, net: RetrievalNet, batch: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(positions into idx, (b, 3, H, W) batch) of at most `batch` images of one loaded size (read from the
    headers), normalised for `net`."""
    images = ImageTensors(paths, size, net.mean, net.std)
    sizes = [loaded_size(*header_size(paths[i]), size) for i in idx] if batch > 1 else [(0, 0)] * len(idx)
    for b in size_batches(np.asarray(sizes).reshape(-1, 2), batch):
        yield b, torch.stack([images[int(idx[j])] for j in b])


def _per_image(dev: torch.device) -> bool:
    """One image per forward on the CPU: batches only slow eager torch and onnxruntime down there (measured: lite2
    at 362 px, one thread, 4 images in one forward cost 1.8x four forwards of one); batches elsewhere."""
    return dev.type == "cpu"


def _views(maps: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor], apart: bool) -> torch.Tensor:
    """The maps of every view, stacked: one forward per view (`apart`), else one for all."""
    return torch.cat([maps(v) for v in views]) if apart else maps(torch.cat(views))


def _common_grid(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps on the coarser of their two grids (the finer one average-pooled)."""
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    return tuple(m if m.shape[-2:] == (h, w) else F.adaptive_avg_pool2d(m, (h, w)) for m in (a, b))  # type: ignore[return-value]


def _rows(m: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps -> (B h w, C) local descriptors."""
    return m.permute(0, 2, 3, 1).reshape(-1, m.shape[1])


def _trunk(net: RetrievalNet, dev: torch.device, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a fit on `n` images reads `net`'s maps (`RetrievalNet.trunk`): on the CPU from ORT_MIN_IMAGES images
    on (extraction's rule), its trunk's onnxruntime graph when onnxruntime is installed and the graph matches
    torch (`aml.ort_backend`; ~2.7x faster than eager torch at one thread), else torch."""
    use_ort = dev.type == "cpu" and n >= ORT_MIN_IMAGES and ort_backend.available()
    if use_ort and ort_backend.exportable(net):
        fwd = ort_backend.ort_forward(net, threads=ort_backend.ort_threads(), maps=True)
        if fwd is not None:
            return fwd
    return net.trunk


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
    file is refitted. With `progress`, a start read from the cache says so, and from where, in one line."""
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
            info = {**json.loads(saved["info"]), "cached": True}
        except Exception:  # noqa: BLE001 - a half-written or foreign file: fit again and replace it
            pass
        else:
            if kw.get("progress"):
                write_line(f"closed-form start ({method}, fitted on {info.get('images')} images): read from the "
                           f"cache {path}")  # fmt: skip
            return info
    info = init_head(student, method, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state": _head_state(student), "info": json.dumps(info)}, tmp)
    return info


def _residual_positions(n: int, seed: int) -> np.ndarray:
    """Positions (sorted) of the fitting images the residual is measured on: all of them up to RESIDUAL_IMAGES,
    else that many drawn under the run's seed (the pooled vectors kept for it stay bounded)."""
    if n <= RESIDUAL_IMAGES:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 3]).choice(n, size=RESIDUAL_IMAGES, replace=False))


def _accumulate(
    student: RetrievalNet,
    teacher: RetrievalNet | None,
    method: str,
    acc: CrossCovariance,
    teacher_vectors: np.ndarray,
    paths: Sequence[str],
    idx: np.ndarray,
    keep: np.ndarray,
    image_size: int,
    flip: bool,
    dev: torch.device,
    progress: bool,
) -> np.ndarray:
    """One streaming pass over the fitting images `idx`, in batches of one size (mirrored views in the same
    forward): with a `teacher` (map methods), every location pair of the two networks' maps is added to `acc`
    (L2-normalised descriptors for local-procrustes); without one (pooled methods), the student's L2N GeM
    vectors paired with the cached teacher vectors. Returns the student vectors of the images at
    positions `keep` (for the residual); memory stays O(D^2) whatever len(idx)."""
    kept = np.zeros((len(keep), student.out_channels), dtype=np.float32)
    slot = np.full(len(idx), -1, dtype=np.int64)
    slot[keep] = np.arange(len(keep))
    p = student.pool.p.detach().to(dev)
    mirror = flip and teacher is not None
    s_maps = _trunk(student, dev, len(idx))
    t_maps = _trunk(teacher, dev, len(idx)) if teacher is not None else None
    per_image = _per_image(dev)
    bar = progress_bar(len(idx), f"closed-form start ({method})", "img", enabled=progress)
    try:
        for pos, x in _batches(paths, idx, image_size, student, 1 if per_image else _FIT_BATCH):
            x = x.to(dev)
            views = [x, x.flip(-1)] if mirror else [x]
            fs = _views(s_maps, views, per_image)
            s = l2n(gem(fs[: len(x)], p)).cpu().numpy()
            mine = slot[pos] >= 0
            kept[slot[pos][mine]] = s[mine]
            if teacher is None:
                acc.add(s, np.asarray(teacher_vectors[idx[pos]], dtype=np.float32))
            else:
                a, b = _common_grid(fs, _views(t_maps, views, per_image))
                a, b = _rows(a), _rows(b)
                if method == "local-procrustes":
                    a, b = l2n(a.clamp(min=1e-6)), l2n(b.clamp(min=1e-6))
                acc.add(a.cpu().numpy(), b.cpu().numpy())
            bar.update(len(x))
    finally:
        bar.close()
    return kept


def _solve(student: RetrievalNet, method: str, acc: CrossCovariance, s_kept: np.ndarray, t_kept: np.ndarray) -> float:
    """Solve `method`'s map from the accumulated pairs `acc`, write it into the student's head; returns its
    residual (on the kept pooled vectors)."""
    if method == "lstsq":
        w = acc.lstsq()
        student.proj[0].weight.data.copy_(torch.from_numpy(w.T.copy())[:, :, None, None])
        return acc.relative_error(w)
    w = acc.procrustes() if method != "ridge" else acc.ridge(RIDGE_LAMBDA)
    student.fc.weight.data.copy_(torch.from_numpy(w.T.copy()))
    return residual(s_kept, t_kept, w)


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
    progress: bool = False,
) -> dict[str, Any]:
    """Fit `student`'s head to the teacher in place and return what was done (the record kept with the run).

    Args:
        student: a student RetrievalNet whose head matches `head_for(method)`.
        method: one of HEAD_INITS.
        paths: the training images; `teacher_vectors` (N, D) their cached teacher vectors, same order.
        teacher_net: builds the teacher network (called only by the map methods).
        image_size: the training size; `count` how many images to fit on (None: all); `flip` adds mirrored images
            (map methods); `seed` picks the images when `count` is smaller than the set.
        progress: show a progress bar (`aml.progress`) over the fitting images.

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
    # map methods: location pairs, pooled methods: one pair per image; S^T S only where the solve needs it
    acc = CrossCovariance(ds, teacher.out_channels if teacher else dt, second_moment=method in ("lstsq", "ridge"))
    keep = _residual_positions(len(idx), seed)
    s_kept = _accumulate(student, teacher, method, acc, teacher_vectors, paths, idx, keep, image_size, flip, dev,
                         progress)  # fmt: skip
    t_kept = np.asarray(teacher_vectors[idx[keep]], dtype=np.float32)
    res = _solve(student, method, acc, s_kept, t_kept)
    student.train(was_training)
    pairs = acc.n
    return {
        "method": method,
        "head": head,
        "images": int(len(idx)),
        "flip": bool(flip and method in MAP_METHODS),
        "pairs": int(pairs),
        "residual": float(res),
        "seconds": round(time.perf_counter() - t0, 2),
    }
