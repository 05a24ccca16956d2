"""What `aml serve` searches: one loaded generation of an index (`Generation`), and the source that keeps the
current one (`IndexSource`: an `aml index` directory watched for `aml index add`; `aml.milvus.MilvusSource`).

A request takes `source.current` once and uses only that object, and a new generation is loaded completely
(every file checked by `Index.open`) before one reference assignment makes it current: no request sees a
half-added index, and none fails during the switch (the old generation stays in memory until its last
request ends).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aml.errors import UserError, first_line
from aml.identity import IDENTITY_FIELDS, check_compatible, describe
from aml.index import Index, index_identity, read_manifest

Hits = list[list[dict[str, Any]]]  # per query, best first: {"name", "score"}


@dataclass
class Generation:
    """One generation of the served index: its manifest fields, teacher Lw and a search function."""

    manifest: dict[str, Any]
    lw: Any
    search_fn: Callable[[np.ndarray, int], Hits]
    names: list[str] = field(default_factory=list)  # database image names, when the source lists them

    @property
    def identity(self) -> dict[str, Any]:
        return index_identity(self.manifest)

    def query_identity(self, encoder: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """The identity of a query encoder given as its sidecar (teacher, image_size, whiten) or as an identity,
        and whether the server is to apply the index's Lw to its vectors (an encoder without folded whitening,
        as `aml search` does for such an encoder)."""
        if "teacher" in encoder:
            if not isinstance(encoder["teacher"], Mapping):
                raise UserError("encoder.teacher: expected an object (the sidecar's teacher identity)")
            folded = encoder.get("whiten")
            if folded and not (isinstance(folded, Mapping) and {"dataset", "variant"} <= set(folded)):
                raise UserError("encoder.whiten: expected null or the sidecar's {dataset, variant, ...}")
            size = encoder.get("image_size", self.manifest.get("image_size"))
            whitening = f"{folded['dataset']}/{folded['variant']}" if folded else None
            apply_lw = not folded and self.lw is not None
            ident = {**encoder["teacher"], "image_size": size, "whitening": self.lw.name if apply_lw else whitening}
            return ident, apply_lw
        ident = {k: encoder[k] for k in ("weights", *IDENTITY_FIELDS) if k in encoder}
        if "name" not in ident:
            raise UserError("encoder: expected the sidecar (teacher, image_size, whiten) or an identity with a name")
        return ident, False

    def check(self, encoder: Mapping[str, Any], what: str = "encoder is for") -> bool:
        """The `aml search` compatibility check of a query encoder against this index (a UserError on a
        mismatch); returns whether the index's Lw is to be applied to its vectors."""
        ident, apply_lw = self.query_identity(encoder)
        check_compatible(
            ident, self.identity, what=what, where="this index holds",
            fix="use an encoder distilled from that teacher, at the index's image size and whitening",
        )  # fmt: skip
        return apply_lw

    def search(self, q: np.ndarray, k: int, apply_lw: bool = False) -> Hits:
        """Top-k hits of (Q, D) query vectors (whitened with the index's Lw when `apply_lw`)."""
        dim = int(self.manifest["dim"])
        if q.ndim != 2 or q.shape[1] != dim:
            raise UserError(
                f"vectors: {q.shape[-1]}-d, but this index holds {dim}-d vectors ({describe(self.identity)})"
            )
        if apply_lw:
            q = self.lw.apply_np(q)
        return self.search_fn(np.ascontiguousarray(q, dtype=np.float32), k)

    def info(self) -> dict[str, Any]:
        """GET /info: the manifest's identity, shape and generation, and which encoders are compatible."""
        m = self.manifest
        keep = ("type", "dim", "count", "generation", "image_size", "scales", "whitening", "params", "backend")
        return {
            **{k: m.get(k) for k in keep if k in m},
            "teacher": m["teacher"],
            "identity": self.identity,
            "describe": describe(self.identity),
            "compatible": "query encoders distilled from this teacher (sidecar teacher: name, sha256, dim equal), "
            f"at {m.get('image_size')} px, whitening {m.get('whitening') or 'none'} (folded into the export or "
            "applied by this server)",
        }


def index_manifest(index: Index) -> dict[str, Any]:
    """The manifest fields of an opened index (its meta with type, dim, count and generation)."""
    return {**index.meta, "type": index.kind, "dim": index.dim, "count": len(index), "generation": index.generation}


def index_generation(index: Index, backend: str = "faiss") -> Generation:
    """A `Generation` of an opened `aml index` (its search, names and Lw), or of anything searched like one
    (`aml.milvus.MilvusIndex`, backend 'milvus')."""
    names, meta = index.names, index_manifest(index)

    def search(q: np.ndarray, k: int) -> Hits:
        s, ids = index.search(q, k, device="cpu")
        return [
            [{"name": names[i], "score": round(float(v), 6)} for v, i in zip(rs, ri, strict=True) if i >= 0]
            for rs, ri in zip(s, ids, strict=True)
        ]

    return Generation({**meta, "backend": backend}, index.lw(), search, names)


class Source:
    """The served index: its current `Generation`, replaced by a watcher thread when `stamp()` (e.g. the
    manifest's generation) changes; a failed load (files mid-change) keeps the current one and retries."""

    def __init__(self, stamp: Callable[[], Any], load: Callable[[], Generation], poll: float = 0.2) -> None:
        self._stamp_fn, self._load, self.poll = stamp, load, poll
        self.stamp = stamp()
        self.current = load()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the source again when its stamp differs from the current one's; whether it switched."""
        try:
            stamp = self._stamp_fn()
            if stamp == self.stamp:
                return False
            new = self._load()
        except (UserError, OSError, RuntimeError, ValueError) as e:  # an add in progress: retry at the next poll
            print(f"aml serve: generation not loaded yet ({first_line(e)})", file=sys.stderr)
            return False
        self.current, self.stamp = new, stamp  # one assignment: requests hold the generation they started with
        m = new.manifest
        print(f"aml serve: now serving generation {m.get('generation')} ({m['count']} vectors)", file=sys.stderr)
        return True

    def start(self) -> None:
        """Watch in a daemon thread (every `poll` seconds) until `stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="aml-serve-watch", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


def index_source(directory: str | os.PathLike, poll: float = 0.2) -> Source:
    """An `aml index` directory as a `Source`: reloaded when its manifest's generation changes (`aml index add`)."""
    d = Path(directory)
    return Source(lambda: read_manifest(d).get("generation", 0), lambda: index_generation(Index.open(d)), poll)
