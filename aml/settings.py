"""Extraction settings, named once and torch-free (the CLI reads its defaults here without importing torch).

`ExtractSettings` is what every extraction carries (`aml.extract.extract`, `TeacherVectors`, `QuickEval`,
`evaluate_models`): image size, scales, batch size, workers, device, progress. The image size and the scales
are also part of the teacher cache key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from aml.errors import UserError

MULTISCALE = (1.0, 2**-0.5, 0.5)  # cirtorch's multi-scale setting (`--multiscale` given alone)
BATCH_SIZE = 32  # images per forward (on a GPU; the CPU caps it at CPU_BATCH)
# Images per forward on the CPU. Measured (2 cores, 362 px, channels_last, aml.allocator on), images/s at
# batch 1 / 2 / 4 / 8: lite2 24.8 / 33.1 / 34.2 / 31.0, lite0 35.7 / 41.2 / 44.5 / 40.3; contiguous tensors
# at batch 32 (the GPU-style setting): lite2 5.7. Larger CPU batches only thrash the caches.
CPU_BATCH = 4
DEVICES = "auto, cpu, cuda or cuda:N"  # what `--device` accepts (resolved by `aml.extract.resolve_device`)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str, option: str = "--device") -> str:
    """`device` if it is auto, cpu, cuda or cuda:N, else a one-line UserError (checked before any work)."""
    if not _DEVICE.fullmatch(str(device)):
        raise UserError(f"{option} {device}: unknown device; use {DEVICES}")
    return str(device)


@dataclass(frozen=True)
class ExtractSettings:
    """How images become vectors: longest side `image_size`, `scales`, images per forward (`batch_size`,
    capped at CPU_BATCH on the CPU), decoding `workers` (None: automatic), `device` (auto | cpu | cuda[:N])."""

    image_size: int
    scales: tuple[float, ...] = (1.0,)
    batch_size: int = BATCH_SIZE
    workers: int | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
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
