"""The one extraction path: image list -> (N, D) L2-normalised float32 descriptors, in input order.

Images are batched only with images of the same size (so a batch gives exactly the vectors of batch-size-1
extraction); multi-scale and Lw whitening follow docs/REFERENCE.md §3 / cirtorch. Two backends run the network
(`ExtractSettings.backend`, resolved by `choose_backend`): torch (images decoded by DataLoader workers), or
onnxruntime on the CPU (`aml.ort_backend`: the model's cached fp32 ONNX graph; each of `ort_threads()` threads
decodes a batch and runs it, so decoding overlaps inference without more threads than the budget).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from aml import ort_backend
from aml.data.images import Bbx, check_bbxs, header_size, load_image, loaded_size, same_shape_groups, to_array
from aml.errors import UserError
from aml.nn import l2n, rescale
from aml.progress import progress_bar
from aml.settings import CPU_BATCH, MULTISCALE, ORT_MIN_IMAGES, ExtractSettings, parse_device
from aml.threads import available_cores, intra_op_threads
from aml.whiten import Lw

if TYPE_CHECKING:
    from tqdm import tqdm

MIN_SIDE = 32  # the networks' stride: an image whose longest side is shorter may give a vanishing vector
MEMORY_FORMAT = torch.channels_last  # the faster layout for these networks' convolutions, on the CPU and on a GPU

__all__ = [
    "MULTISCALE",
    "ExtractSettings",
    "choose_backend",
    "embed",
    "extract",
    "resolve_device",
    "to_tensor",
    "torch_groups",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The one device resolver: `auto` -> CUDA when available, else CPU; an unknown device or `cuda` without a
    GPU is a UserError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, torch.device):
        parse_device(str(device))  # the one device parser: a UserError for anything but auto, cpu, cuda[:N]
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu or auto")
    return dev


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) float32 tensor of an RGB image, normalised (`aml.data.images.to_array` as a tensor)."""
    return torch.from_numpy(to_array(img, mean, std))


def torch_groups(items: Iterable[tuple[int, torch.Tensor]]) -> list[tuple[list[int], torch.Tensor]]:
    """`same_shape_groups` of (index, tensor) pairs, stacked with torch."""
    return same_shape_groups(items, torch.stack)


def auto_workers(n: int, batch_size: int, device: torch.device | None = None) -> int:
    """Decoding processes: none for a handful of images, none on a CPU of up to 4 cores (the network already
    uses every core there, and a decoding process only takes cores from it), else up to 8 leaving one core to
    the main process."""
    cores = available_cores()
    if n <= batch_size or (device is not None and device.type == "cpu" and cores <= 4):
        return 0
    return min(8, max(1, cores - 1))


def choose_backend(settings: ExtractSettings, n: int, device: torch.device | None = None) -> str:
    """The backend an extraction of `n` images runs on: `settings.backend`, with auto resolved to onnxruntime on
    the CPU for at least ORT_MIN_IMAGES images when onnxruntime is installed, else torch."""
    dev = resolve_device(settings.device) if device is None else device
    if settings.backend == "onnxruntime":
        if dev.type != "cpu":
            raise UserError(f"--backend onnxruntime: runs on the CPU, not {dev}; use --device cpu or --backend auto")
        if not ort_backend.available():
            raise UserError("--backend onnxruntime: onnxruntime is not installed; pip install onnxruntime")
    if settings.backend != "auto":
        return settings.backend
    use_ort = dev.type == "cpu" and n >= ORT_MIN_IMAGES and ort_backend.available()
    return "onnxruntime" if use_ort else "torch"


def embed(model: nn.Module, x: torch.Tensor, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """(B, D) descriptors of a normalised batch; several scales combine as l2n(mean_s(v_s^msp)^(1/msp)).

    No grad decorator: the trainer calls it with grad.
    """
    scales = tuple(scales)
    if len(scales) == 1:
        return model(rescale(x, scales[0]))
    p = model.msp
    v = torch.stack([model(rescale(x, s)) for s in scales]).pow(p).mean(dim=0)
    return l2n(v.pow(1.0 / p))


def size_batches(sizes: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split indices 0..N-1 into batches of equal (w, h) of at most `batch_size`, ordered by first index."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if len(sizes) == 0:
        return []
    key = sizes[:, 0] * (1 << 24) + sizes[:, 1]
    order = np.argsort(key, kind="stable")
    k = key[order]
    new_group = np.r_[True, k[1:] != k[:-1]]
    group_start = np.flatnonzero(new_group)[np.cumsum(new_group) - 1]
    pos = np.arange(len(k)) - group_start
    batches = np.split(order, np.flatnonzero(pos % batch_size == 0)[1:])
    batches.sort(key=lambda b: int(b[0]))
    return batches


class _Images(torch.utils.data.Dataset):
    """(index, normalised tensor) of each listed image (crop to its bbx first when given)."""

    def __init__(
        self, paths: Sequence[str], size: int, bbxs: Sequence[Bbx] | None, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.paths, self.size, self.bbxs = list(paths), size, bbxs
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        bbx = self.bbxs[i] if self.bbxs is not None else None
        return i, to_tensor(load_image(self.paths[i], self.size, bbx), self.mean, self.std)


def _keep(items: list) -> list:
    return items


def extract(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    settings: ExtractSettings,
    *,
    bbxs: Sequence[Bbx] | None = None,
    lw: Lw | None = None,
    list_size: int | None = None,
) -> np.ndarray:
    """Embed images into an (N, D) float32 array of L2-normalised rows, in input order.

    Each image is loaded as `load_image(path, settings.image_size, bbx)`; images of equal size are batched
    together, which gives the vectors of a batch-size-1 loop. `lw` applies learned whitening after the
    multi-scale combination. The model is moved to `settings.device` and used in eval mode (its train/eval
    mode is restored afterwards). `list_size`: the length of the whole list when this call extracts a chunk
    of it (the teacher cache), so that auto picks one backend for the list (default: len(paths)).
    """
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    check_bbxs(bbxs, n)
    dev = resolve_device(settings.device)
    backend = choose_backend(settings, n if list_size is None else list_size, dev)
    if lw is not None:
        lw.check(int(model.dim))
    out = np.empty((n, int(model.dim) if lw is None else lw.dim), dtype=np.float32)  # an Lw may reduce the dim
    if n == 0:
        return out
    batch_size = min(settings.batch_size, CPU_BATCH) if dev.type == "cpu" else settings.batch_size
    batches = size_batches(loaded_sizes(paths, bbxs, settings.image_size), batch_size)
    images = _Images(paths, settings.image_size, bbxs, model.mean, model.std)
    was_training = model.training
    model.eval().to(dev, memory_format=MEMORY_FORMAT)
    job = _Job(images, batches, settings.scales, lw, out, progress_bar(n, "extract", "img", enabled=settings.progress))
    try:
        fwd, threads = _ort_forward(model, settings, len(batches)) if backend == "onnxruntime" else (None, 0)
        if fwd is not None:
            _run_ort(fwd, job, threads)
        else:
            workers = auto_workers(n, batch_size, dev) if settings.workers is None else settings.workers
            _run_torch(model, job, workers, dev)
    finally:
        job.bar.close()
        model.train(was_training)
    check_vectors(out, paths, model)
    return out


UNIT_TOL = 1e-2  # a row whose norm is further than this from 1 is not a descriptor (aml.evaluate's check too)


def check_vectors(out: np.ndarray, paths: Sequence[str], model: nn.Module) -> None:
    """UserError naming the first image whose vector is not finite (and the cause: the model's weights when they
    hold NaN or inf), or not of unit norm while the image file is smaller than MIN_SIDE (its features vanish: a
    pretrained lite2 gives every such image the same vector, of norm 0.973). A non-unit vector of a larger image
    passes (a random-init EfficientNet gives 0.973 on any image, which tests rely on)."""
    norms = np.linalg.norm(out, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms))
    if bad.size:
        i = int(bad[0])
        what = f"{bad.size} of {len(paths)} vectors are NaN or inf, first {paths[i]}"
        weights = model.state_dict().items()
        name = next((k for k, v in weights if v.is_floating_point() and not v.isfinite().all()), None)
        if name is not None:
            raise UserError(
                f"{what}: the model's weights hold NaN or inf ({name}); use a model from a run that did not diverge"
            )
        raise UserError(f"{what}: the network overflowed on this image; remove it from the list")
    for i in np.flatnonzero(~(np.abs(norms - 1) <= UNIT_TOL)).tolist():
        w, h = header_size(paths[i])
        if max(w, h) < MIN_SIDE:
            raise UserError(
                f"{paths[i]}: a {w}x{h} px image, too small for the network (its vector has norm {norms[i]:.4g}, "
                f"not 1); use images of at least {MIN_SIDE} px, or remove it from the list"
            )


def loaded_sizes(paths: Sequence[str], bbxs: Sequence[Bbx] | None, image_size: int) -> np.ndarray:
    """(N, 2) (w, h) of each image as `load_image` will return it, read from the file headers only (threads)."""
    with ThreadPoolExecutor(max_workers=min(8, intra_op_threads())) as pool:
        full = list(pool.map(header_size, paths))
    boxes = bbxs if bbxs is not None else [None] * len(paths)
    return np.asarray([loaded_size(w, h, image_size, b) for (w, h), b in zip(full, boxes, strict=True)])


def _ort_forward(
    model: nn.Module, settings: ExtractSettings, n_batches: int
) -> tuple[ort_backend.OrtForward | None, int]:
    """(onnxruntime forward or None: torch, calling threads): the thread budget goes to parallel batches first,
    what is left to each run's intra-op threads."""
    budget = ort_backend.ort_threads()
    workers = max(1, min(budget, n_batches))
    required = settings.backend == "onnxruntime"
    return ort_backend.ort_forward(model, threads=budget // workers, required=required, log=settings.progress), workers


@dataclass(frozen=True)
class _Job:
    """One extraction for a backend to run: the images, their same-size batches, the scales, the Lw, the output
    rows and the progress bar."""

    images: _Images
    batches: list[np.ndarray]
    scales: tuple[float, ...]
    lw: Lw | None
    out: np.ndarray
    bar: tqdm

    def vectors(self, v: torch.Tensor) -> np.ndarray:
        """A batch's combined vectors as float32 numpy rows, whitened by the Lw if any."""
        return (self.lw.apply_torch(v) if self.lw is not None else v).float().cpu().numpy()


def _run_torch(model: nn.Module, job: _Job, workers: int, dev: torch.device) -> None:
    """The torch backend: DataLoader workers decode, the model runs each same-size batch on `dev`."""
    loader = torch.utils.data.DataLoader(
        job.images, batch_sampler=job.batches, num_workers=workers, collate_fn=_keep, pin_memory=dev.type == "cuda"
    )
    with torch.inference_mode():
        for items in loader:
            for idx, x in torch_groups(items):
                v = embed(model, x.to(dev, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT), job.scales)
                job.out[idx] = job.vectors(v)
            job.bar.update(len(items))


def _run_ort(fwd: ort_backend.OrtForward, job: _Job, workers: int) -> None:
    """The onnxruntime backend: each of `workers` threads decodes a batch and runs it (both release the GIL)."""

    def run(batch: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
        with torch.inference_mode():  # thread-local: entered in the worker
            groups = torch_groups([job.images[int(i)] for i in batch])
            return [(idx, job.vectors(embed(fwd, x, job.scales))) for idx, x in groups]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(run, job.batches):
            for idx, v in done:
                job.out[idx] = v
                job.bar.update(len(idx))
