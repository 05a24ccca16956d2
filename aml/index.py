"""The database side as a product: a faiss index of teacher vectors, its image list and a manifest.

Vectors are the interface: `build_index(vectors, kind, ...)` -> `Index`, `Index.open(dir)`, `.search(queries
(Q, D), topk) -> (scores, ids)`, `.add(vectors, names)`, `.save(dir)`. Torch-free (an ONNX query encoder
searches without torch); `build_from_images` / `add_images` take teacher vectors through `TeacherVectors`.

On disk, `DB/` holds `manifest.json` (written last: the teacher identity, image size, scales, whitening, the
index type and parameters, counts, the faiss and format versions, and the names and byte sizes of the files
below), `index-G.faiss`, `images-G.txt` (one absolute path per line; ids = positions) and `whiten.npz` (the
teacher's Lw, applied to database and queries alike). A build writes a temp dir `.DB.aml-tmp-HOST-PID-RANDOM`
beside DB/ and renames it; `add` writes generation G+1 files, then replaces the manifest atomically, then
removes generation G. A directory without a readable manifest whose files match is never opened.

Types: `flat` (IndexFlatIP, float32), `flat16` (IndexScalarQuantizer QT_fp16, inner product), `ivfpq`
(IndexIVFPQ, inner product, trained on a seeded sample of the vectors), `binary` (sign bits packed,
IndexBinaryFlat; the codes are `aml.binary`'s). A binary index is searched **asymmetrically** by float queries:
each code is read as +-1 and scored by inner product / sqrt(D) (exact, blockwise); `search(..., hamming=True)`
binarises the queries and uses faiss's Hamming search instead (score = 1 - 2 * hamming / D).

On the CPU, flat, flat16 and binary indexes are searched by the search core (`aml.search.search`) on the
vectors faiss stores (no copy), ivfpq by faiss. With faiss-gpu, on the GPUs `search_gpus` picks for `device`
(auto | cpu | cuda | cuda:N | cuda:all, `aml.faiss_gpu.faiss_gpus`; several GPUs shard the index), the copy
made by `aml.faiss_gpu.to_gpu`. The compatibility of a query
encoder with an index is `aml.identity.check_compatible` against `index_identity(manifest)`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aml.binary import code_bytes, pack_bits
from aml.errors import UserError, first_line
from aml.faiss_gpu import faiss_gpus, gpu_count, load_faiss, to_gpu
from aml.identity import check_compatible
from aml.io import atomic_write, temp_dir, write_json
from aml.search import hamming_search, search, tie_sorted

FORMAT = "aml-index"
VERSION = 1
KINDS = ("flat", "flat16", "ivfpq", "binary")
MANIFEST = "manifest.json"
BLOCK = 65536  # rows converted / added at a time
TRAIN_PER_LIST = 64  # ivfpq k-means points per centroid, coarse lists and PQ codes (faiss: 39 to 256)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def default_params(kind: str, n: int, dim: int, **given: int | None) -> dict[str, int]:
    """The index parameters of `kind` for n vectors of `dim`: given values, else defaults that fit n."""
    if kind != "ivfpq":
        return {}
    nlist = given.get("nlist") or max(1, min(int(4 * math.sqrt(max(n, 1))), max(n // 39, 1)))
    m = given.get("m") or next(d for d in range(max(dim // 32, 1), 0, -1) if dim % d == 0)
    nbits = given.get("nbits") or max(1, min(8, int(math.log2(max(n, 2)))))
    nprobe = given.get("nprobe") or min(nlist, 32)
    if dim % m:
        raise UserError(f"--m {m}: must divide the vector dimension {dim}")
    if n < nlist or n < 2**nbits:
        raise UserError(f"ivfpq: {n} vectors cannot train nlist {nlist} and 2^{nbits} codes; lower --nlist/--nbits")
    return {"nlist": int(nlist), "m": int(m), "nbits": int(nbits), "nprobe": int(nprobe)}


def _empty(kind: str, dim: int, params: dict[str, int]) -> Any:
    faiss = load_faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "flat16":
        return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivfpq":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(
            quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT
        )
        index.own_fields = True
        quantizer.this.disown()
        index.cp.max_points_per_centroid = index.pq.cp.max_points_per_centroid = TRAIN_PER_LIST  # k-means samples
        return index
    if kind == "binary":
        return faiss.IndexBinaryFlat(8 * code_bytes(dim))
    raise UserError(f"--type {kind}: expected one of {', '.join(KINDS)}")


def search_gpus(kind: str, device: str, topk: int, *, hamming: bool, n_gpus: int) -> tuple[list[int] | None, str]:
    """`aml.faiss_gpu.faiss_gpus` for a `kind` index: flat, flat16 and ivfpq go to the GPUs (sharded over
    several); binary only for --hamming, on one GPU (float queries are scored on the CPU)."""
    cpu_only = ""
    if kind == "binary" and not hamming:
        cpu_only = "a binary index is scored against float queries on the CPU (--hamming searches its codes on a GPU)"
    gpus, note = faiss_gpus(device, topk, n_gpus=n_gpus, cpu_only=cpu_only)
    return (gpus[:1] if kind == "binary" and gpus else gpus), note


def _to_gpu(faiss: Any, kind: str, index: Any, gpus: list[int]) -> Any:
    """The GPU copy of a CPU index of `kind`: flat exact (float32), flat16 decoded into a float16 flat index (one
    GPU flat type for one or several GPUs), ivfpq with float16 lookup tables, binary on one GPU."""
    if kind == "flat16":
        flat = faiss.IndexFlatIP(index.d)
        for s in range(0, index.ntotal, BLOCK):
            flat.add(index.reconstruct_n(s, min(BLOCK, index.ntotal - s)))
        index = flat
    return to_gpu(faiss, index, gpus, float16=kind in ("flat16", "ivfpq"))


class Index:
    """A faiss index of (N, D) vectors with their names and build information (`meta`, the manifest fields)."""

    def __init__(self, faiss_index: Any, kind: str, dim: int, names: list[str], meta: dict[str, Any]) -> None:
        self.faiss_index, self.kind, self.dim = faiss_index, kind, int(dim)
        self.names = list(names)
        self.meta = dict(meta)
        self.dir: Path | None = None
        self.generation = 0
        self._gpu: tuple[tuple, Any] | None = None  # (key, the GPU copy) once searched on GPUs
        self.searched_on, self.note = "cpu", ""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def params(self) -> dict[str, int]:
        return dict(self.meta.get("params") or {})

    # ------------------------------------------------------------------------------------------ vectors
    def add(self, vectors: np.ndarray, names: Sequence[str]) -> None:
        """Append (n, D) vectors with their names (ids continue after the current ones)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise UserError(f"vectors {vectors.shape}: the index holds {self.dim}-d vectors")
        if len(names) != vectors.shape[0]:
            raise ValueError(f"{len(names)} names for {vectors.shape[0]} vectors")
        for s in range(0, vectors.shape[0], BLOCK):
            block = vectors[s : s + BLOCK]
            self.faiss_index.add(pack_bits(block) if self.kind == "binary" else _f32(block))
        self.names += list(names)
        self._gpu = None

    def search(
        self,
        queries: np.ndarray,
        topk: int,
        *,
        nprobe: int | None = None,
        hamming: bool = False,
        device: str = "auto",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (Q, topk), best first, ties by ascending id; id -1 where fewer hits exist.

        `device` (auto | cpu | cuda | cuda:N, see `search_gpus`): where faiss searches; afterwards
        `self.searched_on` says where it did and `self.note` why auto stayed on the CPU ('' otherwise)."""
        q = _f32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"queries {q.shape}: the index holds {self.dim}-d vectors; use a compatible encoder")
        k = min(int(topk), len(self))
        if k < 1:
            raise UserError(f"topk {topk}: must be at least 1 (the index holds {len(self)} vectors)")
        if self.kind == "ivfpq":
            self.faiss_index.nprobe = int(nprobe or self.params.get("nprobe", 1))
        index = self._searcher(device, k, hamming)
        if hamming:
            return hamming_search(q, index, self.dim, k)
        if index is self.faiss_index and self.kind != "ivfpq":  # exact on the CPU: the search core
            return search(q, self.stored(), k, device="cpu")
        s, i = index.search(q, k)
        return tie_sorted(s, i.astype(np.int64))

    def stored(self) -> np.ndarray:
        """The vectors faiss stores, without a copy: (N, D) float32 (flat), float16 (flat16) or (N, ceil(D/8))
        uint8 codes (binary); a ValueError for ivfpq (its codes are not the vectors)."""
        faiss, n = load_faiss(), len(self)
        if self.kind == "ivfpq":
            raise ValueError("an ivfpq index stores PQ codes, not the vectors")
        codes = self.faiss_index.xb if self.kind == "binary" else self.faiss_index.codes
        raw = faiss.rev_swig_ptr(codes.data(), codes.size()) if codes.size() else np.empty(0, np.uint8)
        dtype = {"flat": np.float32, "flat16": np.float16, "binary": np.uint8}[self.kind]
        return np.asarray(raw).view(dtype).reshape(n, -1)

    def gpus_for(self, device: str, topk: int, *, hamming: bool = False) -> tuple[list[int] | None, str]:
        """`search_gpus` for this index with the GPUs faiss sees (a UserError before any work when the
        device asked for cannot search it)."""
        k = min(int(topk), len(self))
        return search_gpus(self.kind, device, k, hamming=hamming, n_gpus=gpu_count(load_faiss()))

    def _searcher(self, device: str, k: int, hamming: bool) -> Any:
        """The faiss index to search: this one, or its copy on the GPUs `search_gpus` picks (made once per GPU
        set, size and nprobe); with device auto, an index faiss-gpu refuses stays on the CPU (`self.note`)."""
        faiss = load_faiss()
        gpus, self.note = self.gpus_for(device, k, hamming=hamming)
        self.searched_on = "cpu"
        if gpus is None:
            return self.faiss_index
        key = (tuple(gpus), len(self), getattr(self.faiss_index, "nprobe", None))
        if self._gpu is None or self._gpu[0] != key:
            self._gpu = None
            try:
                self._gpu = (key, _to_gpu(faiss, self.kind, self.faiss_index, gpus))
            except RuntimeError as e:
                why = f"faiss-gpu cannot hold this {self.kind} index ({_faiss_reason(e)})"
                if device != "auto":
                    raise UserError(f"--search-device {device}: {why}; use --search-device cpu") from None
                self.note = f"{why}: searching on the CPU"
                return self.faiss_index
        self.searched_on = f"cuda:{','.join(map(str, gpus))}" + (" (sharded)" if len(gpus) > 1 else "")
        return self._gpu[1]

    # ------------------------------------------------------------------------------------------ files
    def manifest(self, files: dict[str, str], directory: Path) -> dict[str, Any]:
        faiss = load_faiss()
        sizes = {role: (directory / name).stat().st_size for role, name in files.items()}
        return {
            **self.meta,
            "format": FORMAT,
            "version": VERSION,
            "type": self.kind,
            "dim": self.dim,
            "count": len(self),
            "generation": self.generation,
            "faiss": faiss.__version__,
            "files": files,
            "bytes": sizes,
        }

    def _write_files(self, directory: Path, lw: Any = None) -> dict[str, str]:
        faiss = load_faiss()
        g = self.generation
        files = {"index": f"index-{g}.faiss", "images": f"images-{g}.txt"}
        write = faiss.write_index_binary if self.kind == "binary" else faiss.write_index
        write(self.faiss_index, str(directory / files["index"]))
        with atomic_write(directory / files["images"]) as f:
            f.write("".join(f"{n}\n" for n in self.names))
        if lw is not None:
            files["whiten"] = "whiten.npz"
            with atomic_write(directory / files["whiten"], "wb") as f:
                np.savez(f, m=lw.m, P=lw.P, key=lw.key, variant=lw.variant)
        return files

    def save(self, directory: str | os.PathLike | None = None, *, lw: Any = None, overwrite: bool = False) -> Path:
        """Write the index: a new `directory` (temp dir + rename), or, when None, the next generation of the
        directory it was opened from (new files, then the manifest replaced atomically, then old files removed)."""
        if directory is None:
            if self.dir is None:
                raise ValueError("an index built in memory needs a directory to save to")
            return self._save_next()
        out = Path(directory)
        if out.exists() and not overwrite:
            raise UserError(f"{out}: already exists; pass --overwrite, or `aml index add` to append to it")
        tmp = temp_dir(out)
        try:
            self.generation = 0
            files = self._write_files(tmp, lw)
            write_json(tmp / MANIFEST, self.manifest(files, tmp))
            if out.exists():
                old = tmp.with_name(f"{tmp.name}-old")  # a temp name too: a killed swap's leftover is removed
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.dir = out
        return out

    def _save_next(self) -> Path:
        d = self.dir
        old = json.loads((d / MANIFEST).read_text())
        self.generation += 1
        files = self._write_files(d)
        if "whiten" in old["files"]:
            files["whiten"] = old["files"]["whiten"]
        write_json(d / MANIFEST, self.manifest(files, d))
        for role in ("index", "images"):
            if old["files"][role] != files[role]:
                (d / old["files"][role]).unlink(missing_ok=True)
        return d

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Index:
        """An index directory, checked: manifest format and version, every file present with its size."""
        faiss = load_faiss()
        d = Path(directory)
        man = read_manifest(d)
        path = d / man["files"]["index"]
        read = faiss.read_index_binary if man["type"] == "binary" else faiss.read_index
        try:
            index = read(str(path))
        except RuntimeError as e:
            raise UserError(f"{path}: faiss cannot read it ({first_line(e)}); rebuild the index") from None
        names = [ln for ln in (d / man["files"]["images"]).read_text().splitlines() if ln]
        if len(names) != man["count"] or index.ntotal != man["count"]:
            raise UserError(f"{d / MANIFEST}: count {man['count']} but {index.ntotal} vectors / {len(names)} names")
        meta = {
            k: v for k, v in man.items() if k not in ("format", "version", "type", "dim", "count", "files", "bytes")
        }
        meta.pop("generation", None)
        meta.pop("faiss", None)
        out = cls(index, man["type"], man["dim"], names, meta)
        out.dir, out.generation = d, int(man.get("generation", 0))
        return out

    def lw(self) -> Any:
        """The whitening stored with the index (aml.whiten.Lw), or None."""
        if self.dir is None or not (self.dir / "whiten.npz").is_file():
            return None
        from aml.whiten import Lw

        with np.load(self.dir / "whiten.npz", allow_pickle=False) as z:
            return Lw(z["m"], z["P"], str(self.dir / "whiten.npz"), str(z["key"]), str(z["variant"]))


def _faiss_reason(e: Exception) -> str:
    """The reason in a faiss C++ exception ("Error in FUNC at FILE:LINE: Error: 'COND' failed: REASON")."""
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", " ".join(str(e).split()))  # its prefix is long: not first_line
    return re.sub(r"^Error: '.*?' failed: ", "", text)[:160]


def read_manifest(d: Path) -> dict[str, Any]:
    """The manifest of index directory `d`, validated (one-line UserError naming what is wrong)."""
    path = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"{d}: index directory not found; build it with `aml index build --out {d}`")
    if not path.is_file():
        raise UserError(
            f"{path}: missing: {d} is not a complete aml index (an interrupted build?); rerun `aml index build`"
        )
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e)[:80]}); the index is corrupt, rebuild it") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise UserError(f"{path}: not an aml index manifest (format {FORMAT!r} expected); rebuild the index")
    v = man.get("version")
    if not isinstance(v, int) or v > VERSION:
        raise UserError(f"{path}: index format version {v}; this aml reads up to {VERSION}: upgrade aml or rebuild")
    missing = [k for k in ("type", "dim", "count", "files", "bytes", "teacher") if k not in man]
    if missing or man["type"] not in KINDS:
        raise UserError(f"{path}: field '{missing[0] if missing else 'type'}' missing or invalid; rebuild the index")
    for role, name in man["files"].items():
        f = d / name
        if not f.is_file() or f.stat().st_size != man["bytes"].get(role):
            raise UserError(f"{f}: missing or of the wrong size for the manifest; the index is corrupt, rebuild it")
    return man


def train_sample(n: int, params: dict[str, int]) -> np.ndarray:
    """The sorted rows (seeded) an ivfpq index of n vectors trains on: TRAIN_PER_LIST per inverted list (and per
    PQ centroid), at most all n (the PQ codebooks take TRAIN_PER_LIST x 2^nbits of their residuals)."""
    size = min(n, TRAIN_PER_LIST * max(params["nlist"], 2 ** params["nbits"]))
    return np.sort(np.random.default_rng(0).choice(n, size, replace=False))


def trained_index(
    vectors: np.ndarray,
    kind: str = "flat",
    *,
    meta: dict[str, Any] | None = None,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int | None = None,
    nprobe: int | None = None,
) -> Index:
    """An empty `Index` of `kind` for (N, D) `vectors` (N sets the ivfpq defaults, `default_params`), an ivfpq
    one trained on `train_sample` of them; `build_index` then adds them."""
    if kind not in KINDS:
        raise UserError(f"--type {kind}: expected one of {', '.join(KINDS)}")
    n, dim = vectors.shape
    params = default_params(kind, n, dim, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe)
    faiss_index = _empty(kind, dim, params)
    if kind == "ivfpq":
        faiss_index.train(_f32(vectors[train_sample(n, params)]))
    return Index(faiss_index, kind, dim, [], {**(meta or {}), "params": params})


def build_index(
    vectors: np.ndarray,
    kind: str = "flat",
    names: Sequence[str] | None = None,
    *,
    meta: dict[str, Any] | None = None,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int | None = None,
    nprobe: int | None = None,
) -> Index:
    """An in-memory `Index` of (N, D) vectors (ids = row positions; names default to '0', '1', ...): the
    `trained_index` of them, with them added."""
    out = trained_index(vectors, kind, meta=meta, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe)
    out.add(vectors, [str(i) for i in range(vectors.shape[0])] if names is None else list(names))
    return out


# ---------------------------------------------------------------------------------------- compatibility
def index_identity(man: dict[str, Any]) -> dict[str, Any]:
    """The identity an index was built with (from its manifest / meta), for `aml.identity.check_compatible`."""
    return {**man["teacher"], "image_size": man.get("image_size"), "whitening": man.get("whitening")}


# ---------------------------------------------------------------------------------------- from images
def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous rows of an n-image list that rank `rank` of `world` extracts."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def teacher_vectors(t: Any, paths: list[str], rank: int = 0, world: int = 1) -> np.ndarray | None:
    """Teacher vectors of `paths` through the cache, sharded: each rank extracts its shard into its own cache
    entry; rank 0 then reads every shard (waiting on a shard another rank is building) and returns all rows."""
    if world == 1:
        return t.get(paths)
    n = len(paths)  # each shard extracts with the backend chosen for the whole list
    t.get(paths[shard(n, rank, world)], list_size=n)
    if rank != 0:
        return None
    return np.concatenate([t.get(paths[shard(n, r, world)], list_size=n) for r in range(world)])


def build_from_images(
    t: Any,
    paths: list[str],
    kind: str,
    out: str | os.PathLike,
    *,
    lw: Any = None,
    params: dict[str, int | None] | None = None,
    overwrite: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Index | None:
    """Build DB `out` from the teacher vectors (`t`: a TeacherVectors) of `paths`, whitened with `lw`; with
    several ranks, rank 0 alone writes (returns None elsewhere)."""
    x = teacher_vectors(t, paths, rank, world)
    if x is None:
        return None
    x = x if lw is None else lw.apply_np(x, dtype=x.dtype)
    st = t.settings
    meta = {
        "teacher": t.identity,
        "image_size": st.image_size,
        "scales": list(st.scales),
        "whitening": None if lw is None else lw.name,
        "cache_dtype": t.dtype,
        "source": {"teacher": t.teacher, "weights": t.weights, "random_init": t.random_init},
    }
    index = build_index(x, kind, [os.path.abspath(p) for p in paths], meta=meta, **(params or {}))
    index.save(out, lw=lw, overwrite=overwrite)
    return index


def add_images(
    index: Index,
    paths: list[str],
    *,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    weights: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    backend: str = "auto",
) -> int:
    """Append the teacher vectors of `paths` to an opened index with the settings of its manifest (the teacher
    identity is checked), then save its next generation; returns the number added."""
    from aml.io import aml_home
    from aml.settings import ExtractSettings
    from aml.teacher_vectors import TeacherVectors

    src, meta = index.meta.get("source") or {}, index.meta
    settings = ExtractSettings(
        meta["image_size"], tuple(meta["scales"]), batch_size, workers, device, progress, backend
    )
    t = TeacherVectors(
        src.get("teacher") or meta["teacher"]["name"],
        settings,
        cache_dir=cache_dir or aml_home() / "cache",
        weights=weights or src.get("weights"),
        random_init=bool(src.get("random_init")),
        dtype=meta.get("cache_dtype") or "float16",
    )
    check_compatible(
        t.identity,
        meta["teacher"],
        what=f"teacher {src.get('teacher') or meta['teacher']['name']} now is",
        where=f"index {index.dir} was built with",
        fix="pass --teacher-weights with the original weights",
    )
    x = t.get(paths)
    lw = index.lw()
    index.add(x if lw is None else lw.apply_np(x, dtype=x.dtype), [os.path.abspath(p) for p in paths])
    index.save()
    return len(paths)


def query_vectors(
    encoder: str,
    paths: list[str],
    index: Index,
    *,
    bbxs: list | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    scales: Sequence[float] | None = None,
    device: str = "auto",
    workers: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(Q, D) query vectors of `paths` by `encoder` (an exported .onnx: torch-free; else an aml checkpoint or a
    registry name), at the index's image size and scales unless given, whitened with the index's Lw as the
    asymmetric protocol does; and the encoder's identity (the teacher it was trained for) for the check."""
    meta = index.meta
    size = int(image_size or meta["image_size"])
    scales = tuple(scales or meta.get("scales") or (1.0,))
    lw = index.lw()
    if encoder.endswith(".onnx"):
        from aml.onnx_embed import OnnxEncoder

        enc = OnnxEncoder(encoder)
        folded = enc.info.get("whiten")
        x = enc.embed(paths, image_size=size, scales=scales, bbxs=bbxs)
        teacher = enc.info.get("teacher") or {}
        whitening = f"{folded['dataset']}/{folded['variant']}" if folded else None
        if not folded and lw is not None:
            x, whitening = lw.apply_np(x), lw.name
        return x, {**teacher, "image_size": size, "whitening": whitening}
    from aml.extract import extract
    from aml.registry import create_model, model_identity
    from aml.settings import ExtractSettings

    net = create_model(encoder, role=None, weights=weights)
    teacher = (net.meta.get("aml") or {}).get("teacher") or model_identity(encoder, weights=weights)
    x = extract(net, paths, ExtractSettings(size, scales, workers=workers, device=device, progress=False), bbxs=bbxs)
    if lw is not None:
        x = lw.apply_np(x)
    return x, {**teacher, "image_size": size, "whitening": None if lw is None else lw.name}
