"""Extraction settings, named once and torch-free (the CLI reads its defaults here without importing torch).

`ExtractSettings` is what every extraction carries (`aml.extract.extract`, `TeacherVectors`, `QuickEval`,
`evaluate_models`, the trainer's mining pass): image size, scales, batch size, workers, device, progress,
backend. The image size and the scales are also part of the teacher cache key (the backend is not: both
backends give the same vectors, within `aml.ort_backend.PARITY`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from aml.errors import UserError

IMAGE_SIZE = 362  # longest image side of training and export when neither the user nor the checkpoint names one
MULTISCALE = (1.0, 2**-0.5, 0.5)  # cirtorch's multi-scale setting (`--multiscale` given alone)
BATCH_SIZE = 32  # images per forward (on a GPU; the CPU caps it at CPU_BATCH)
# Images per forward on the CPU: throughput peaks at a few images; larger CPU batches only thrash the caches.
CPU_BATCH = 4
# Devices, one meaning everywhere (`parse_device`): auto (a GPU when one is usable, else the CPU), cpu, cuda (the
# first GPU, cuda:0), cuda:N (GPU N), and, where a command can spread over GPUs (`aml search --search-device`),
# cuda:all (every GPU). torch resolves them in `aml.extract.resolve_device`, faiss in `aml.faiss_gpu.faiss_gpus`.
DEVICES = "auto, cpu, cuda or cuda:N"  # what `--device` accepts
ALL_GPUS = "cuda:all"
_DEVICE = re.compile(r"auto|cpu|cuda(?::(\d+|all))?")
# What runs the network in `aml.extract.extract`: torch, or onnxruntime on an fp32 ONNX export of the model
# (CPU only). auto: onnxruntime on the CPU for lists of at least ORT_MIN_IMAGES images when onnxruntime is
# installed and the model exports, torch otherwise (a GPU, a short list: the one-off export would not pay).
BACKENDS = ("auto", "torch", "onnxruntime")
ORT_MIN_IMAGES = 128


def parse_device(device: str, option: str = "--device", *, many: bool = False) -> tuple[str, tuple[int, ...] | None]:
    """The one device parser: (kind, gpus) of a device string, kind auto | cpu | cuda; gpus (N,) for cuda:N,
    (0,) for cuda, None for cuda:all (every GPU, only where `many`) and for auto / cpu. Anything else is a
    one-line UserError naming `option` (checked before any work)."""
    m = _DEVICE.fullmatch(str(device))
    if m is None or (m.group(1) == "all" and not many):
        accepted = f"{DEVICES}{' or ' + ALL_GPUS if many else ''}"
        raise UserError(f"{option} {device}: unknown device; use {accepted}")
    if not str(device).startswith("cuda"):
        return str(device), None
    return "cuda", None if m.group(1) == "all" else (int(m.group(1) or 0),)


def check_device(device: str, option: str = "--device") -> str:
    """`device` if `parse_device` accepts it (auto, cpu, cuda or cuda:N), else its one-line UserError."""
    parse_device(device, option)
    return str(device)


def check_backend(backend: str, option: str = "--backend") -> str:
    """`backend` if it is one of BACKENDS, else a one-line UserError (checked before any work)."""
    if backend not in BACKENDS:
        raise UserError(f"{option} {backend}: unknown extraction backend; use {', '.join(BACKENDS)}")
    return backend


# The largest scale: a scale above 1 upsamples the loaded image, and memory grows with the square of the scale
# (cirtorch's multi-scale uses at most 1; sqrt(2) in some of its tables).
MAX_SCALE = 2.0


def check_scales(scales: tuple[float, ...], option: str = "--multiscale") -> tuple[float, ...]:
    """`scales` if there are some and each is a number in (0, MAX_SCALE], else a one-line UserError."""
    bad = [s for s in scales if not 0 < s <= MAX_SCALE]  # also NaN
    if not scales or bad:
        raise UserError(
            f"{option} {','.join(f'{s:g}' for s in scales)}: scales must be in (0, {MAX_SCALE:g}] (a scale above 1 "
            "upsamples the image; memory grows with its square)"
        )
    return scales


@dataclass(frozen=True)
class ExtractSettings:
    """How images become vectors: longest side `image_size`, `scales`, images per forward (`batch_size`,
    capped at CPU_BATCH on the CPU), decoding `workers` (None: automatic; the torch backend's), `device` (auto |
    cpu | cuda[:N]), `backend` (BACKENDS: auto | torch | onnxruntime)."""

    image_size: int
    scales: tuple[float, ...] = (1.0,)
    batch_size: int = BATCH_SIZE
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_backend(self.backend)
        object.__setattr__(self, "scales", check_scales(tuple(float(s) for s in self.scales)))
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.workers is not None and self.workers < 0:
            object.__setattr__(self, "workers", None)

    @property
    def multiscale(self) -> bool:
        """Whether several scales are combined (selects the 'ms' learned whitening)."""
        return len(self.scales) > 1

    def replace(self, **changes: object) -> ExtractSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
