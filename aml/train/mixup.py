"""Metrix (Venkataramanan et al., ICLR 2022; docs/REFERENCE.md §8): mixup of examples and labels for the pair losses.

Each tuple (query q, positive p, negatives n_1..n_K, hardest first) gets one lambda ~ Beta(alpha, alpha), drawn
from the epoch's seeded rng. A mixed example `mix_lambda(x, n)` = lambda x + (1 - lambda) n of a source x and a
negative n carries the label mix_lambda(y(x), y(n)): with x = p (`pos-neg`) or x = the anchor (`anchor-neg`),
both positive to the anchor, its label for the anchor is lambda. The loss of a step is the clean loss plus
`mixup_weight` x the mixed loss, the loss's generic pair form (`LossSpec.pairs`, aml/losses/pairs.py) over the
mixed pairs.

Modes (f = the student, g its feature maps `RetrievalNet.maps`, h the rest `RetrievalNet.embed_maps`):
- `embedding`: the mixed references `l2n(mix(r(x), r(n_k)))` for every negative n_k of the tuple, with r the
  references the clean loss uses: in the asymmetric case the teacher's cached vectors (t(p), t(q) and t(n_k): no
  extra forward, and no gradient); for `sym` the student's vectors of the tuple (the paper's setting). The
  clean student anchor is scored against them.
- `input`: f(mix(x, n_1)) on pixels; `feature`: h(mix(g(x), g(n_1))) on the student's last maps before pooling.
  The mixed image goes through the student, so it cannot be a teacher reference. For `sym` it is one (the clean
  anchor against the mixed example, as the paper). In the asymmetric case the mixed example is a student query
  instead, scored against the tuple's teacher references r with the labels mix_lambda(y(x, r), y(n_1, r)):
  lambda for t(p) (and t(q) for `contr+`), 1 - lambda for t(n_1), 0 for the other negatives (mining takes one
  image per cluster): every pair stays student vs teacher, as in the clean loss. n_1 is the tuple's hardest
  negative (the public code's top-1; a random one under `--mining random`). Equal sizes: n_1 is resized
  (bilinear, antialiased, on the normalised tensor) to the size of x; mixed examples are then batched by the size
  of x. Cost per tuple and mixed pair: one extra student forward (`input`) or two (`feature`: the maps of x and
  n_1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from aml.extract import torch_groups
from aml.losses import LossSpec, clean_refs
from aml.nn import l2n
from aml.train.augment import resize_to
from aml.train.batches import Embedder, forward_by_size
from aml.train.config import TrainConfig

# The source x mixed with a negative, per `mixup_pairs`.
SOURCES = {"pos-neg": ("positive",), "anchor-neg": ("anchor",), "both": ("positive", "anchor")}


def mix(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam a + (1 - lam) b, with lam (B,) broadcast over the trailing dimensions of a and b (B, ...)."""
    lam = lam.reshape(-1, *([1] * (a.dim() - 1))).to(a.dtype)
    return lam * a + (1 - lam) * b


def feature_mixes(
    net: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]], lam: np.ndarray, device
) -> torch.Tensor:
    """(N, D) h(mix(g(x), g(n))) of same-size image pairs (x, n): one forward per distinct size, rows in input order."""
    order: list[int] = []
    parts: list[torch.Tensor] = []
    for idx, x in torch_groups((i, torch.stack(p)) for i, p in enumerate(pairs)):  # x: (G, 2, 3, H, W)
        x = x.to(device, non_blocking=True).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        maps = net.maps(x).unflatten(0, (len(idx), 2))
        l = torch.as_tensor(lam[idx], device=device)
        parts.append(net.embed_maps(mix(maps[:, 0], maps[:, 1], l)))
        order += idx
    return torch.cat(parts)[torch.as_tensor(np.argsort(order))].float()


@dataclass(frozen=True)
class Metrix:
    """The mixup of one run: its mode, pairs, weight and alpha, for the configured pair-based loss."""

    spec: LossSpec
    constants: dict[str, Any]
    mode: str
    pairs: str = "pos-neg"
    weight: float = 0.4
    alpha: float = 2.0

    @classmethod
    def from_config(cls, cfg: TrainConfig, spec: LossSpec, constants: dict[str, Any]) -> Metrix | None:
        """The run's Metrix, None without `--mixup` (the config is validated: the loss is pair-based)."""
        if cfg.mixup == "none":
            return None
        return cls(spec, dict(constants), cfg.mixup, cfg.mixup_pairs, cfg.mixup_weight, cfg.mixup_alpha)

    @property
    def sources(self) -> tuple[str, ...]:
        return SOURCES[self.pairs]

    def lambdas(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) float32 lambda ~ Beta(alpha, alpha), one per tuple of the epoch."""
        return rng.beta(self.alpha, self.alpha, size=n).astype(np.float32)

    def images(self, anchors: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        """The training images a step loads for its mixed examples (after the clean ones): per source the B source
        images, then the B hardest negatives; none for `embedding`."""
        if self.mode == "embedding":
            return np.empty(0, dtype=np.int64)
        src = {"positive": positives, "anchor": anchors}
        return np.concatenate([*(src[s] for s in self.sources), negatives[:, 0]])

    def n_images(self, tuples: int) -> int:
        """How many of a step's images are `images`' (the tail of its image list)."""
        return 0 if self.mode == "embedding" else tuples * (len(self.sources) + 1)

    def embed_mixes(self, images: list[torch.Tensor], lam: np.ndarray, embed: Embedder) -> torch.Tensor | None:
        """(P * B, D) the student's vectors of the mixed examples, mix(x, n_1) per source x, source-major, from the
        step's `images` tensors (the tail of its image list) and lam (B,); None for `embedding` (no images)."""
        if self.mode == "embedding":
            return None
        B = len(lam)
        xs, ns = images[: len(images) - B], images[len(images) - B :]
        lam_all = np.tile(lam, len(self.sources))
        with embed.autocast():  # the whole mixing under it, as the clean forward
            pairs = [(x, resize_to(ns[i % B], tuple(x.shape[-2:]))) for i, x in enumerate(xs)]
            if self.mode == "input":
                mixed = [
                    mix(x[None], n[None], torch.as_tensor(lam_all[i : i + 1]))[0] for i, (x, n) in enumerate(pairs)
                ]
                return forward_by_size(embed.model, mixed, embed.device)
            return feature_mixes(embed.net, pairs, lam_all, embed.device)

    def loss(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        *,
        anchor_ref: torch.Tensor,
        anchor_teacher: torch.Tensor | None,
        lam: np.ndarray,
        mixed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`weight` x the mixed loss of one step (summed over its tuples).

        anchor (B, D) the student's clean anchors; positive (B, D), negatives (B, K, D) the clean loss's references
        (teacher, or student for `sym`); anchor_ref (B, D) the anchor as a reference (t(q), or s(q) for `sym`);
        anchor_teacher the `contr+` extra positive; lam (B,); mixed: `embed_mixes`' vectors (not for `embedding`).
        """
        spec, asymmetric = self.spec, not self.spec.student_refs
        B, K = negatives.shape[:2]
        lam_t = torch.as_tensor(lam, dtype=anchor.dtype, device=anchor.device)
        refs, labels = clean_refs(positive, negatives, anchor_teacher if "anchor_teacher" in spec.inputs else None)
        if asymmetric:  # the teacher side is frozen
            refs, anchor_ref = refs.detach(), anchor_ref.detach()
        if self.mode == "embedding":
            src = {"positive": positive, "anchor": anchor_ref}
            v = [l2n(mix(src[s][:, None].expand_as(negatives), negatives, lam_t)) for s in self.sources]
            if asymmetric:
                v = [x.detach() for x in v]
            return self.weight * self._against_mixed(anchor, refs, labels, torch.cat(v, 1), lam_t).sum()
        if mixed is None:
            raise ValueError(f"Metrix {self.mode}: pass the mixed examples' vectors (`embed_mixes`)")
        m = mixed.to(anchor.dtype)  # (P * B, D), source-major
        P = len(self.sources)
        if not asymmetric:  # the paper: the clean anchor against the mixed examples
            v = m.reshape(P, B, -1).transpose(0, 1)
            return self.weight * self._against_mixed(anchor, refs, labels, v, lam_t).sum()
        # asymmetric: each mixed example is a student query against its tuple's teacher references
        hardest = torch.zeros_like(labels)
        hardest[:, refs.shape[1] - K] = 1
        mixed_labels = mix(labels, hardest, lam_t)
        everything = torch.ones(P * B, refs.shape[1], dtype=torch.bool, device=refs.device)
        value = spec.pairs(m, refs.repeat(P, 1, 1), mixed_labels.repeat(P, 1), mixed=everything, **self.constants)
        return self.weight * value.sum()

    def _against_mixed(
        self, anchor: torch.Tensor, refs: torch.Tensor, labels: torch.Tensor, v: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """(B,) the mixed loss of the anchors with U(a) = (refs, labels) and V(a) = v (B, V, D), labelled lam."""
        B, M, V = len(anchor), refs.shape[1], v.shape[1]
        all_refs = torch.cat([refs, v], 1)
        all_labels = torch.cat([labels, lam[:, None].expand(B, V)], 1)
        is_mixed = torch.cat([torch.zeros(B, M, dtype=torch.bool), torch.ones(B, V, dtype=torch.bool)], 1)
        return self.spec.pairs(anchor, all_refs, all_labels, mixed=is_mixed.to(anchor.device), **self.constants)
