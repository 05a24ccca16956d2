"""An `aml index` copied into a Milvus collection (pymilvus): `push` writes it, `MilvusSource` searches it.

A collection NAME holds one row per database vector: `id` (INT64 primary key: the row's position, as in the
faiss index), `vector` (FLOAT_VECTOR, inner product) and `name` (the image path). Beside it, NAME_meta holds
keyed JSON rows: `progress` (rows pushed so far, the sha256 of their names, the teacher identity), `whiten`
(the index's Lw, base64 of whiten.npz in chunks `whiten/0`, ...) and `manifest` (the index manifest, written
last: a search reads only ids below its count, so a push of a new generation is seen whole or not at all).

Pushes upsert by id: a re-push of the same index changes nothing, an interrupted one resumes after the rows its
`progress` row records, and a later generation (`aml index add` appends) pushes only the new rows. Milvus
index types: FLAT (exact, default: the same ranking as the faiss flat index), IVF_FLAT, HNSW. A URI ending in
.db is a Milvus Lite file (the embedded engine); http://HOST:PORT a Milvus server.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aml.errors import UserError, first_line
from aml.identity import check_compatible
from aml.index import FILE_FIELDS, Index, index_identity
from aml.io import read_npz, sha256_lines
from aml.serve.backend import Source, index_generation, index_manifest

MILVUS_TYPES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW"}
BATCH = 4096  # rows per upsert
CHUNK = 60_000  # base64 characters per meta row (a VARCHAR holds up to 65535)
MAX_NAME = 4096
MAX_TOPK = 16384  # Milvus's top-k limit


def client(uri: str) -> Any:
    """A pymilvus MilvusClient of `uri` (a Milvus Lite .db file or a server URL), or a one-line UserError."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError("--milvus: pymilvus is not installed; install aml with the serve extra") from None
    if "://" not in uri:
        if not uri.endswith(".db"):
            raise UserError(f"--milvus {uri}: expected a Milvus Lite file ending in .db or http://HOST:PORT")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).resolve())
    try:
        return MilvusClient(uri)
    except Exception as e:  # noqa: BLE001 - pymilvus raises its own exception types
        raise UserError(f"--milvus {uri}: cannot connect ({first_line(e)})") from None


def _meta_name(collection: str) -> str:
    return f"{collection}_meta"


def _read_meta(c: Any, collection: str) -> dict[str, str]:
    """The meta rows of a collection: key -> value ({} when there is none)."""
    name = _meta_name(collection)
    if not c.has_collection(name):
        return {}
    c.load_collection(name)  # a collection opened by another process starts released
    rows = c.query(name, filter='key != ""', output_fields=["key", "value"])
    return {r["key"]: r["value"] for r in rows}


def _put_meta(c: Any, collection: str, rows: dict[str, str]) -> None:
    c.upsert(_meta_name(collection), [{"key": k, "value": v, "pad": [0.0, 0.0]} for k, v in rows.items()])


def _create(c: Any, collection: str, dim: int, kind: str, params: dict[str, int]) -> None:
    """The vector collection (id, vector, name) with a `kind` inner-product index, and its meta collection."""
    from pymilvus import DataType

    schema = c.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("name", DataType.VARCHAR, max_length=MAX_NAME)
    index = c.prepare_index_params()
    index.add_index("vector", index_type=MILVUS_TYPES[kind], metric_type="IP", params=params)
    c.create_collection(collection, schema=schema, index_params=index)
    meta = c.create_schema(auto_id=False)
    meta.add_field("key", DataType.VARCHAR, is_primary=True, max_length=256)
    meta.add_field("value", DataType.VARCHAR, max_length=65535)
    meta.add_field("pad", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field in every collection
    meta_index = c.prepare_index_params()
    meta_index.add_index("pad", index_type="FLAT", metric_type="L2")
    c.create_collection(_meta_name(collection), schema=meta, index_params=meta_index)


def index_params(kind: str, nlist: int | None, hnsw_m: int | None, ef_construction: int | None) -> dict[str, int]:
    """The Milvus build parameters of `kind` (flat | ivf | hnsw), defaults where not given."""
    if kind == "ivf":
        return {"nlist": int(nlist or 128)}
    if kind == "hnsw":
        return {"M": int(hnsw_m or 16), "efConstruction": int(ef_construction or 200)}
    return {}


def _resume_at(meta: dict[str, str], names: list[str], identity: dict[str, Any], where: str) -> int:
    """The rows already pushed (0 for a new collection); a collection holding another index is refused."""
    if "progress" not in meta:
        return 0
    done = json.loads(meta["progress"])
    check_compatible(
        identity, done["identity"], what="index of", where=f"{where} holds vectors of",
        fix="push into another --collection, or pass --overwrite to replace it",
    )  # fmt: skip
    n = min(int(done["pushed"]), len(names))
    if done["pushed"] > len(names) or done["names_sha256"] != sha256_lines(names[:n]):
        raise UserError(f"{where}: holds other images than this index; push into another --collection or --overwrite")
    return n


def _whiten_rows(directory: Path | None) -> dict[str, str]:
    """The index's whiten.npz as meta rows (base64 chunks), or none."""
    path = None if directory is None else directory / "whiten.npz"
    if path is None or not path.is_file():
        return {}
    text = base64.b64encode(path.read_bytes()).decode()
    chunks = [text[s : s + CHUNK] for s in range(0, len(text), CHUNK)]
    return {"whiten": str(len(chunks)), **{f"whiten/{i}": ch for i, ch in enumerate(chunks)}}


def push(
    directory: str | os.PathLike,
    uri: str,
    collection: str = "aml",
    kind: str = "flat",
    *,
    params: dict[str, int] | None = None,
    overwrite: bool = False,
    batch: int = BATCH,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[int, int]:
    """Copy index `directory` into Milvus collection `collection` at `uri` (see the module docstring);
    returns (rows pushed now, rows in all)."""
    index = Index.open(directory)
    if index.kind not in ("flat", "flat16"):
        raise UserError(f"{directory}: a {index.kind} index keeps no exact vectors to push; push a flat or flat16 one")
    man = index_manifest(index)
    identity, names, where = index_identity(man), index.names, f"--milvus {uri} --collection {collection}"
    if any(len(n.encode()) > MAX_NAME for n in names):
        raise UserError(f"{directory}: an image name is longer than {MAX_NAME} bytes; Milvus cannot hold it")
    c = client(uri)
    if overwrite:
        for name in (collection, _meta_name(collection)):
            if c.has_collection(name):
                c.drop_collection(name)
    if not c.has_collection(collection):
        _create(c, collection, index.dim, kind, params or index_params(kind, None, None, None))
    start = _resume_at(_read_meta(c, collection), names, identity, where)
    for s in range(start, len(names), batch):
        e = min(s + batch, len(names))
        x = index.faiss_index.reconstruct_n(s, e - s).astype(np.float32)
        c.upsert(
            collection, [{"id": i, "vector": v, "name": names[i]} for i, v in zip(range(s, e), x.tolist(), strict=True)]
        )
        progress = {"pushed": e, "names_sha256": sha256_lines(names[:e]), "identity": identity}
        _put_meta(c, collection, {"progress": json.dumps(progress)})
        log(f"{where}: {e} / {len(names)} rows")
    c.flush(collection)
    milvus = {"collection": collection, "index_type": MILVUS_TYPES[kind], "params": params or {}}
    _put_meta(c, collection, {**_whiten_rows(index.dir), "manifest": json.dumps({**man, "milvus": milvus})})
    c.close()
    return len(names) - start, len(names)


def _lw(meta: dict[str, str]) -> Any:
    if "whiten" not in meta:
        return None
    from aml.whiten import Lw

    data = base64.b64decode("".join(meta[f"whiten/{i}"] for i in range(int(meta["whiten"]))))
    z = read_npz(io.BytesIO(data), ("m", "P", "key", "variant"), "milvus:whiten.npz")
    return Lw(z["m"], z["P"], "milvus:whiten.npz", str(z["key"]), str(z["variant"]))


NAMES_PAGE = 10_000  # names read per query when a collection is opened


class MilvusIndex:
    """A pushed index in a Milvus collection, searched like an `aml.index.Index` (`search(queries, topk)` ->
    (scores, ids) best first, ties by ascending id; `names`, `meta`, `lw()`): only ids below its manifest's
    count, so a push in progress is not seen."""

    def __init__(self, uri: str, collection: str = "aml", search_params: dict[str, int] | None = None) -> None:
        self.client, self.collection, self.search_params = client(uri), collection, dict(search_params or {})
        meta = _read_meta(self.client, collection) if self.client.has_collection(collection) else {}
        if "manifest" not in meta:
            raise UserError(f"--milvus {uri}: collection '{collection}' holds no complete push; run `aml index push`")
        man = json.loads(meta["manifest"])
        self.kind, self.dim, self.count = man["type"], int(man["dim"]), int(man["count"])
        self.generation, self._lw = int(man.get("generation", 0)), _lw(meta)
        self.meta = {k: v for k, v in man.items() if k not in FILE_FIELDS}
        self.client.load_collection(collection)
        self.names = self._names()
        self.searched_on, self.note = f"milvus {man['milvus']['index_type']}", ""

    def __len__(self) -> int:
        return self.count

    def _names(self) -> list[str]:
        names: list[str] = []
        for s in range(0, self.count, NAMES_PAGE):
            e = min(s + NAMES_PAGE, self.count)
            rows = self.client.query(self.collection, filter=f"id >= {s} and id < {e}", output_fields=["id", "name"],
                                     limit=e - s)  # fmt: skip
            names += [r["name"] for r in sorted(rows, key=lambda r: r["id"])]
        if len(names) != self.count:
            raise UserError(
                f"--milvus: collection '{self.collection}' holds {len(names)} of {self.count} rows; push again"
            )
        return names

    def lw(self) -> Any:
        """The index's Lw pushed with it (aml.whiten.Lw), or None."""
        return self._lw

    def gpus_for(self, device: str, topk: int, *, hamming: bool = False) -> tuple[list[int] | None, str]:
        """Milvus searches where it runs: no GPU of this machine (the `aml search` interface)."""
        return None, ""

    def search(
        self, queries: np.ndarray, topk: int, *, nprobe: int | None = None, hamming: bool = False, device: str = "auto"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (Q, k), best first, ties by ascending id; id -1 where fewer hits exist."""
        if hamming:
            raise UserError("--hamming: a Milvus collection holds float vectors; search without --hamming")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"queries {q.shape}: the index holds {self.dim}-d vectors; use a compatible encoder")
        k = min(int(topk), self.count, MAX_TOPK)
        params = {**self.search_params, **({"nprobe": nprobe} if nprobe else {})}
        if self.meta["milvus"]["index_type"] == "HNSW":
            params["ef"] = max(params.get("ef", 0), k)
        res = self.client.search(self.collection, data=q.tolist(), limit=k, filter=f"id < {self.count}",
                                 search_params={"metric_type": "IP", "params": params})  # fmt: skip
        scores, ids = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        for r, row in enumerate(res):
            hits = sorted((-float(h["distance"]), int(h["id"])) for h in row)[:k]
            scores[r, : len(hits)] = [-s for s, _ in hits]
            ids[r, : len(hits)] = [i for _, i in hits]
        return scores, ids


def milvus_source(uri: str, collection: str = "aml", search_params: dict[str, int] | None = None) -> Source:
    """A pushed index in a Milvus collection as `aml serve`'s `Source`, reloaded when a push replaces its manifest
    (a new generation)."""
    c = client(uri)

    def stamp() -> str:
        return _read_meta(c, collection).get("manifest", "")

    return Source(stamp, lambda: index_generation(MilvusIndex(uri, collection, search_params), "milvus"), poll=1.0)


def open_searched(db: str | None, milvus: str | None, collection: str = "aml") -> tuple[Index | MilvusIndex, str]:
    """What `aml search` searches, and how to name it: `--index DB` (an `aml.index.Index`) or `--milvus URI`
    (a `MilvusIndex`), exactly one of them."""
    if bool(db) == bool(milvus):
        raise UserError("give --index DIR or --milvus URI (one of them)")
    if milvus:
        return MilvusIndex(milvus, collection), f"{milvus} {collection}"
    return Index.open(db), str(db)
