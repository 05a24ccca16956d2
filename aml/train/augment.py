"""Views of the training images the student embeds in a step (`--augment`): what the student sees of an image.

The views (`--augment`, AUGMENTS):
- `none`: the image as loaded (the thumbnail at the training size).
- `flip`: mirrored with probability 1/2.
- `crop`: a random crop of `crop_area` to all of the image's area (uniform), its aspect ratio the image's times a
  factor log-uniform in [3/4, 4/3] (torchvision's RandomResizedCrop ranges, the area's lower end raised for
  retrieval, where the object fills the photo), resized back to the image's size (bilinear, antialiased, so the
  step's batches stay single-size), then `flip`.
- `mix`: a `crop` view blended with the `crop` view of the next image of the step (the last with the first),
  resized to its size: x = lam x_i + (1 - lam) x_j, lam ~ U(0, 1) (mixup, Beta(1, 1)), one lam per image. The
  images between training photos widen the inputs the student matches the teacher on ("function matching", Beyer
  et al. below: mixup is how they "improve the support of the distribution"); its targets must be `view`, its loss
  a batch loss (independent photos; a label term reads the label of the photo a blend starts from).

A view's teacher target (`--view-targets`, VIEW_TARGETS):
- `whole`: the teacher's cached vector of the whole, unmirrored image (no teacher forward in training). A view then
  asks the student to map a crop or a mirror image of a photo where the teacher puts the photo itself, as a query
  photo of the same object framed otherwise would be.
- `view`: the teacher's vector of the same view, one frozen teacher forward per view in each step
  (`batches.TeacherEmbedder`): the student matches the teacher's function on the images it is shown ("consistent
  teaching", Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR 2022). The
  references a loss compares with (csd's context, a tuple's positive and negatives) stay the cached whole images.

Deterministic: each view is drawn from its own generator seeded by (seed, epoch, rank, step, position in the
step), so a resumed epoch and any number of loading workers see the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

AUGMENTS = ("none", "flip", "crop", "mix")
VIEW_TARGETS = ("whole", "view")
ASPECT = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's ratio range, relative to the image's own aspect here


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A normalised (3, H, W) image bilinearly resized (antialiased) to `size` (H', W'); unchanged if equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def crop_box(rng: np.random.Generator, h: int, w: int, area: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of an h x w image: its area a fraction ~ U(area, 1) of the
    image's, its aspect the image's times a log-uniform factor in ASPECT, clipped to the image."""
    frac = rng.uniform(area, 1.0)
    ratio = math.exp(rng.uniform(*np.log(ASPECT)))
    ch = min(h, max(1, round(h * math.sqrt(frac / ratio))))
    cw = min(w, max(1, round(w * math.sqrt(frac * ratio))))
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw


@dataclass(frozen=True)
class Views:
    """The view of each image a training step embeds: `kind` one of AUGMENTS, `crop_area` the smallest area
    fraction a crop keeps, `seed`, `epoch` and `rank` (under DDP) the run's."""

    kind: str
    crop_area: float
    seed: int
    epoch: int
    rank: int = 0

    def __call__(self, x: torch.Tensor, step: int, position: int) -> torch.Tensor:
        """The view of the (3, H, W) image `x`, the `position`-th image of step `step`: same shape and dtype."""
        if self.kind == "none":
            return x
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, step, position])
        if self.kind in ("crop", "mix"):
            h, w = x.shape[-2:]
            top, left, ch, cw = crop_box(rng, h, w, self.crop_area)
            x = resize_to(x[:, top : top + ch, left : left + cw], (h, w))
        return x.flip(-1) if rng.random() < 0.5 else x

    def step(self, images: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """The views of a step's images, in order (`mix`: each blended with the next one's view, cyclically)."""
        views = [self(x, step, k) for k, x in enumerate(images)]
        if self.kind != "mix" or len(views) < 2:
            return views
        # the step's own generator: position len(views), after its images' own
        lam = np.random.default_rng([self.seed, self.epoch, self.rank, step, len(views)]).uniform(size=len(views))
        nxt = views[1:] + views[:1]
        mixed = zip(views, nxt, lam.tolist(), strict=True)
        return [x * a + resize_to(y, x.shape[-2:]) * (1 - a) for x, y, a in mixed]
