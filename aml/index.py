"""The database side as a product: a faiss index of teacher vectors, its image list and a manifest.

Vectors are the interface: `build_index(vectors, kind, ...)` -> `Index`, `Index.open(dir)`, `.search(queries
(Q, D), topk) -> (scores, ids)`, `.add(vectors, names)`, `.save(dir)`. Torch-free (an ONNX query encoder
searches without torch); `build_from_images` / `add_images` take teacher vectors through `TeacherVectors`.

On disk, `DB/` holds `manifest.json` (written last: the teacher identity, image size, scales, whitening, the index
type and parameters, counts, the faiss and format versions, and the names, byte sizes and sha256 of the files
below), `index-G.faiss`, `images-G.txt` (one absolute path per line; ids = positions) and `whiten.npz` (the
teacher's Lw, applied to database and queries alike). Every file is written as a temp file and renamed (a link
planted under its name is replaced, never written through). A build writes a temp dir `.DB.aml-tmp-HOST-PID-RANDOM`
beside DB/ and renames it; `add` (and `build --overwrite` of an index) writes generation G+1 files, then replaces
the manifest atomically (names and vectors switch together), then removes the files of generation G that the new
manifest does not list. `read_manifest` is the one check of a manifest (field types; file names plain names inside
the folder; sizes; no link out of the folder), `Index.open` adds the sha256, before faiss parses a file (older
manifests have none: sizes only); `check_out` is the one rule of what `build --out` may replace. Writers
(`build_from_images`, `append`) hold `writing(DB)`, an `aml.lock.exclusive` lock `.DB.lock` beside the folder: a
second `add` waits, a second `build` is refused.

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

import contextlib
import errno
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aml.binary import code_bytes, pack_bits
from aml.errors import UserError, first_line
from aml.exported import is_exported, open_exported
from aml.faiss_gpu import faiss_gpus, gpu_count, load_faiss, to_gpu
from aml.identity import check_compatible
from aml.io import atomic_write, read_npz, scratch_dir, sha256_file, write_json
from aml.lock import exclusive
from aml.search import hamming_search, search, tie_sorted

FORMAT = "aml-index"
VERSION = 1
KINDS = ("flat", "flat16", "ivfpq", "binary")
MANIFEST = "manifest.json"
WHITEN = "whiten.npz"
REBUILD = "aml index build --overwrite"
_REMAKE = "remove {d} and build it again with `aml index build`"  # a manifest not to trust: its files unknown
# the manifest fields about its files, not the vectors (what a pushed collection or `info` leaves out)
FILE_FIELDS = ("format", "version", "type", "dim", "count", "files", "bytes", "sha256", "generation", "faiss")
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
        self.files: dict[str, str] = {}  # role: file name, of the folder it was opened from or saved to
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
        """The manifest of this index whose `files` (role: name) lie in `directory`: their sizes and sha256."""
        faiss = load_faiss()
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
            "bytes": {role: (directory / name).stat().st_size for role, name in files.items()},
            "sha256": {role: sha256_file(directory / name) for role, name in files.items()},
        }

    def _write_files(self, directory: Path, lw: Any, whiten: str | None) -> dict[str, str]:
        """Write this generation's files into `directory` (each a temp file renamed onto its name: a link there is
        replaced, never written through); `whiten`: the name of a whiten file already there to keep."""
        g = self.generation
        files = {"index": f"index-{g}.faiss", "images": f"images-{g}.txt"}
        with atomic_write(directory / files["index"], "wb") as f:
            _write_faiss(self.faiss_index, self.kind, f)
        with atomic_write(directory / files["images"], "wb") as f:
            f.write("".join(f"{n}\n" for n in self.names).encode())
        if lw is not None:
            files["whiten"] = WHITEN
            with atomic_write(directory / WHITEN, "wb") as f:
                np.savez(f, m=lw.m, P=lw.P, key=lw.key, variant=lw.variant)
        elif whiten:
            files["whiten"] = whiten
        return files

    def _commit(self, directory: Path, old: dict[str, Any] | None, lw: Any, whiten: str | None, shown: Path) -> None:
        """Write generation G+1 of the index in `directory` (G: `old`'s, the manifest there; 0 without one), then
        its manifest (replaced atomically: the switch), then remove the files of `old` the new one does not use.
        On failure the new files are removed and the old manifest stays; a full disk is one line naming `shown`."""
        self.generation = int(old.get("generation", 0)) + 1 if old else 0
        files: dict[str, str] = {}
        keep = set(old["files"].values()) if old else set()
        try:
            files = self._write_files(directory, lw, whiten)
            write_json(directory / MANIFEST, self.manifest(files, directory))
        except BaseException as e:
            for name in {f"index-{self.generation}.faiss", f"images-{self.generation}.txt"} - keep:
                (directory / name).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                state = "the index there is unchanged" if old else "nothing was written"
                raise UserError(
                    f"{shown}: the disk is full (no space left on device); free space and rerun ({state})"
                ) from None
            raise
        self.files = files
        for name in keep - set(files.values()):
            (directory / name).unlink(missing_ok=True)

    def save(self, directory: str | os.PathLike | None = None, *, lw: Any = None, overwrite: bool = False) -> Path:
        """Write the index: a new `directory` (`aml.io.temp_dir` + rename), or with `overwrite` the next generation
        of the index there (`check_out`: only an aml index is replaced, only its files are removed); `directory`
        None: the next generation of the index it was opened from (refused if another writer moved it on). Not
        locked: a writer that may race holds `writing(directory)` around open/build and save."""
        if directory is None:
            if self.dir is None:
                raise ValueError("an index built in memory needs a directory to save to")
            old = read_manifest(self.dir, check_files=False)
            if int(old.get("generation", 0)) != self.generation:
                raise UserError(f"{self.dir}: changed since it was opened (generation {old.get('generation')} now, "
                                f"{self.generation} opened); open it again and add again")  # fmt: skip
            self._commit(self.dir, old, None, old["files"].get("whiten"), self.dir)
            return self.dir
        out = Path(directory)
        if check_out(out, overwrite):  # an index there: its next generation, in place
            self._commit(out, read_manifest(out, check_files=False), lw, None, out)
        else:
            with scratch_dir(out) as tmp:
                self._commit(tmp, None, lw, None, out)
                os.replace(tmp, out)  # onto nothing, or onto an empty folder
        self.dir = out
        return out

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Index:
        """An index directory, checked: manifest fields, every file present with its size and (when the manifest
        records them; older ones do not) its sha256, hashed before faiss parses the file."""
        d = Path(directory)
        man = read_manifest(d)
        for role, name in man["files"].items():  # before faiss parses a byte of them
            if "sha256" in man and sha256_file(d / name) != man["sha256"][role]:
                raise UserError(
                    f"{d / name}: damaged (its sha256 differs from the manifest's); rebuild with `{REBUILD}`"
                )
        path = d / man["files"]["index"]
        faiss = load_faiss()
        read = faiss.read_index_binary if man["type"] == "binary" else faiss.read_index
        try:
            index = read(str(path))
        except RuntimeError as e:
            raise UserError(f"{path}: faiss cannot read it ({_faiss_reason(e)}); rebuild with `{REBUILD}`") from None
        path = d / man["files"]["images"]
        raw = path.read_bytes()
        try:
            names = [ln for ln in raw.decode().splitlines() if ln]
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; the image list is damaged, rebuild with `{REBUILD}`") from None
        if len(names) != man["count"] or index.ntotal != man["count"]:
            raise UserError(f"{d / MANIFEST}: count {man['count']} but {index.ntotal} vectors / {len(names)} names")
        meta = {k: v for k, v in man.items() if k not in FILE_FIELDS}
        out = cls(index, man["type"], man["dim"], names, meta)
        out.dir, out.generation, out.files = d, int(man.get("generation", 0)), dict(man["files"])
        return out

    def lw(self) -> Any:
        """The whitening stored with the index (aml.whiten.Lw), or None."""
        name = self.files.get("whiten")
        if self.dir is None or not name:
            return None
        from aml.whiten import Lw

        path = self.dir / name
        z = read_npz(path, ("m", "P", "key", "variant"))
        return Lw(z["m"], z["P"], str(path), str(z["key"]), str(z["variant"]))


def _faiss_reason(e: Exception) -> str:
    """The reason in a faiss C++ exception ("Error in FUNC at FILE:LINE: Error: 'COND' failed: REASON")."""
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", " ".join(str(e).split()))  # its prefix is long: not first_line
    return re.sub(r"^Error: '.*?' failed: ", "", text)[:160]


def _is_int(lo: int) -> Any:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_map(value_ok: Any) -> Any:
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and value_ok(x) for k, x in v.items())


def _plain_name(v: Any) -> bool:
    """A file name inside the index folder: no separator, not '.', '..' or empty, not absolute."""
    return isinstance(v, str) and v not in ("", ".", "..") and not any(c in v for c in "/\\\0")


_NUMBER = (int, float)
# manifest field: (its check, what it must be); the optional ones are checked when present
_FIELDS: dict[str, tuple[Any, str]] = {
    "type": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "dim": (_is_int(1), "an integer >= 1"),
    "count": (_is_int(0), "an integer >= 0"),
    "teacher": (lambda v: isinstance(v, dict), "an object (the teacher identity)"),
    "files": (_is_map(lambda x: isinstance(x, str)), "an object of file names"),
    "bytes": (_is_map(_is_int(0)), "an object of byte sizes"),
}
_OPTIONAL: dict[str, tuple[Any, str]] = {
    "generation": (_is_int(0), "an integer >= 0"),
    "sha256": (_is_map(lambda x: isinstance(x, str) and re.fullmatch("[0-9a-f]{64}", x)), "an object of sha256 hex"),
    "params": (_is_map(_is_int(1)), "an object of integers >= 1"),
    "image_size": (_is_int(1), "an integer >= 1"),
    "scales": (
        lambda v: isinstance(v, list) and v and all(isinstance(x, _NUMBER) and x > 0 for x in v),
        "a list of positive numbers",
    ),  # fmt: skip
    "whitening": (lambda v: v is None or isinstance(v, str), "a name or null"),
    "source": (lambda v: isinstance(v, dict), "an object"),
    "cache_dtype": (lambda v: isinstance(v, str), "a string"),
}


def read_manifest(d: Path, *, check_files: bool = True) -> dict[str, Any]:
    """The manifest of index directory `d`, validated: fields and their types, file names plain names inside `d`,
    and (`check_files`) every file present, of its recorded size, no link out of `d`. A one-line UserError naming
    the manifest, the field and the fix otherwise."""
    path = d / MANIFEST
    if not d.is_dir():
        raise UserError(f"{d}: index directory not found; build it with `aml index build --out {d}`")
    if not path.is_file():
        raise UserError(
            f"{path}: missing: {d} is not a complete aml index (an interrupted build?); rerun `aml index build`"
        )
    _inside(d, path)
    try:
        man = json.loads(path.read_bytes().decode())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: not readable JSON ({first_line(e)[:80]}); the index is corrupt, rebuild it") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise UserError(f"{path}: not an aml index manifest (format {FORMAT!r} expected); rebuild the index")
    v = man.get("version")
    if not isinstance(v, int) or v > VERSION:
        raise UserError(f"{path}: index format version {v}; this aml reads up to {VERSION}: upgrade aml or rebuild")
    for field, (ok, what) in (_FIELDS | {k: c for k, c in _OPTIONAL.items() if k in man}).items():
        if field not in man or not ok(man[field]):
            got = "missing" if field not in man else f"{json.dumps(man[field])[:60]} is not {what}"
            raise UserError(f"{path}: field '{field}': {got}; the manifest is damaged: {_REMAKE.format(d=d)}")
    files, remake = man["files"], _REMAKE.format(d=d)
    for role in dict.fromkeys(("index", "images", *files)):
        name = files.get(role)
        if name is None or not _plain_name(name):
            got = "missing" if name is None else f"{json.dumps(name)[:60]} is not a plain file name inside {d}"
            raise UserError(f"{path}: field 'files.{role}': {got}; the manifest is damaged: {remake}")
        for field in ("bytes", "sha256"):
            if field in man and role not in man[field]:
                raise UserError(f"{path}: field '{field}.{role}': missing; the manifest is damaged: {remake}")
    if check_files:
        for role, name in files.items():
            f = d / name
            _inside(d, f)
            if not f.is_file() or f.stat().st_size != man["bytes"][role]:
                raise UserError(f"{f}: missing or of the wrong size for the manifest; the index is damaged, rebuild "
                                f"with `{REBUILD}`")  # fmt: skip
    return man


def _inside(d: Path, f: Path) -> None:
    """A UserError unless `f`, links resolved, lies in folder `d` (a planted link out of the folder is not read)."""
    if f.is_symlink() and Path(os.path.realpath(f)).parent != Path(os.path.realpath(d)):
        raise UserError(f"{f}: a link out of the index folder ({os.path.realpath(f)}); aml reads no file outside "
                        f"{d}: remove the link and rebuild with `{REBUILD}`")  # fmt: skip


def _write_faiss(faiss_index: Any, kind: str, f: Any) -> None:
    """Serialise a faiss index into the open binary file `f` through Python (so a write error, a full disk
    included, is a Python OSError: faiss's own file writer only prints close errors)."""
    faiss = load_faiss()
    write = faiss.write_index_binary if kind == "binary" else faiss.write_index
    write(faiss_index, faiss.PyCallbackIOWriter(f.write))


def lock_path(directory: str | os.PathLike) -> Path:
    """The write lock of index folder `directory`: `.NAME.lock` beside it (the folder may not exist yet)."""
    d = Path(os.path.abspath(directory))
    return d.parent / f".{d.name}.lock"


@contextlib.contextmanager
def writing(directory: str | os.PathLike, quiet: bool = False, wait: bool = True) -> Any:
    """Hold the write lock of an index folder while the block runs: one `build` or `add` at a time; a second
    waits (one line on stderr unless `quiet`) or, with `wait=False`, is refused in one line."""
    lock = lock_path(directory)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fix = "wait for it to finish, or choose another --out"
    with exclusive(lock, wait=wait, what=f"index {directory}", fix=fix, quiet=quiet):
        yield


def check_out(out: str | os.PathLike, overwrite: bool) -> bool:
    """Before any work: whether `aml index build --out` may write `out`. Nothing there, or an empty folder: a new
    index (False). An aml index: replaced only with `overwrite` (True: its next generation, in place). Anything
    else (a file, a folder that is not an index, an index whose manifest is unreadable): a one-line UserError."""
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"{out}: --out: is a file, not a folder; choose another --out")
    if not any(out.iterdir()):
        return False
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out}: --out: exists and is not an aml index (no {MANIFEST}); aml replaces only an index "
                        "folder: choose another --out")  # fmt: skip
    if not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or `aml index add` to append to it")
    try:
        read_manifest(out, check_files=False)
    except UserError as e:
        raise UserError(f"{e} (--overwrite removes only the files a valid manifest lists)") from None
    return True


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
    quiet: bool = False,
) -> Index | None:
    """Build DB `out` from the teacher vectors (`t`: a TeacherVectors) of `paths`, whitened with `lw`, under the
    write lock of `out`, taken without waiting (a second build of the same `out` is refused at once, not after
    the first one's extraction), then `check_out` before extracting; with several ranks, rank 0 alone locks and
    writes (returns None elsewhere)."""
    if rank != 0:
        teacher_vectors(t, paths, rank, world)
        return None
    with writing(out, quiet, wait=False):
        check_out(out, overwrite)
        x = teacher_vectors(t, paths, rank, world)
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


def append(
    directory: str | os.PathLike,
    names: Sequence[str],
    vectors_of: Callable[[Index, list[int]], np.ndarray],
    *,
    skip_existing: bool = False,
    where: str = "",
    quiet: bool = False,
) -> tuple[Index, int, int]:
    """Append images `names` to index folder `directory` under its write lock: open it, refuse names it holds or
    that repeat (`skip_existing`: skip them), add `vectors_of(index, rows)` for the other rows of `names`, and
    commit the next generation (names and vectors in one manifest switch). Returns (index, added, skipped)."""
    d = Path(directory)
    with writing(d, quiet):
        index = Index.open(d)
        seen, rows = set(index.names), []
        for i, name in enumerate(names):
            if name not in seen:
                rows.append(i)
                seen.add(name)
        skipped = len(names) - len(rows)
        if skipped and not skip_existing:
            kept = set(rows)
            first = next(n for i, n in enumerate(names) if i not in kept)
            raise UserError(
                f"{where or d}: {skipped} of {len(names)} images are already in index {d} or listed twice (first: "
                f"{first}); pass --skip-existing to add only the others"
            )
        if rows:
            index.add(vectors_of(index, rows), [names[i] for i in rows])
            index.save()
    return index, len(rows), skipped


def add_images(
    directory: str | os.PathLike,
    paths: list[str],
    *,
    skip_existing: bool = False,
    where: str = "",
    quiet: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    weights: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    backend: str = "auto",
) -> tuple[Index, int, int]:
    """`append` the teacher vectors of `paths` (named by absolute path) to index `directory`, extracted with the
    settings of its manifest (the teacher identity is checked first) and whitened with its Lw."""

    def vectors_of(index: Index, rows: list[int]) -> np.ndarray:
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
        x = t.get([paths[i] for i in rows])
        lw = index.lw()
        return x if lw is None else lw.apply_np(x, dtype=x.dtype)

    names = [os.path.abspath(p) for p in paths]
    return append(directory, names, vectors_of, skip_existing=skip_existing, where=where, quiet=quiet)


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
    """(Q, D) query vectors of `paths` by `encoder` (an exported .onnx / .ort: torch-free, or .pte; else an aml
    checkpoint or a registry name), at the index's image size and scales unless given, whitened with the index's
    Lw as the asymmetric protocol does; and the encoder's identity (the teacher it was trained for) for the check."""
    meta = index.meta
    size = int(image_size or meta["image_size"])
    scales = tuple(scales or meta.get("scales") or (1.0,))
    lw = index.lw()
    if is_exported(encoder):
        enc = open_exported(encoder)
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
