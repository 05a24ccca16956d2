"""The FastAPI application of `aml serve` (`create_app`): search by query vectors or by an uploaded image,
the index's description, a page to try it from a browser, and the database images under the image root.

Every refusal is a 4xx JSON answer {"error": "<one line>"}; the service goes on serving. Requests other than
GET /healthz and the static page at / need `Authorization: Bearer KEY` when the server has a keys file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from aml.errors import UserError, first_line
from aml.index import query_vectors
from aml.serve.backend import Generation, Source
from aml.serve.keys import KeyRing
from aml.serve.page import PAGE

OPEN_PATHS = ("/healthz", "/")  # answered without a key: liveness, and the static page (it holds no data)
ENCODER_HEADER = "x-aml-encoder"  # raw float32 requests: the encoder identity (JSON) travels in this header


@dataclass(frozen=True)
class Limits:
    """What one request may ask: body bytes, queries, k and uploaded image pixels."""

    max_body: int = 8 << 20
    max_queries: int = 256
    max_k: int = 1000
    max_pixels: int = 40_000_000


class Refused(Exception):
    """A request the service answers with `status` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _error(status: int, reason: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(reason.split())}, status_code=status, headers=headers or None)


def _k(value: Any, limits: Limits) -> int:
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise Refused(400, f"k: expected an integer, got {str(value)[:40]!r}") from None
    if not 1 <= k <= limits.max_k:
        raise Refused(400, f"k {k}: must be between 1 and {limits.max_k} (the server's --max-k)")
    return k


def _vectors(value: Any, limits: Limits) -> np.ndarray:
    """(Q, D) float32 query vectors from JSON lists or raw rows; a 4xx unless 1..max_queries finite rows."""
    try:
        q = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise Refused(400, "vectors: expected a list of equal-length lists of numbers") from None
    if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] < 1:
        raise Refused(400, f"vectors: expected (Q, D) numbers, got shape {list(q.shape)}")
    if q.shape[0] > limits.max_queries:
        raise Refused(400, f"vectors: {q.shape[0]} queries; at most {limits.max_queries} per request")
    if not np.isfinite(q).all():
        raise Refused(400, "vectors: NaN or infinite values")
    return q


def _encoder(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Refused(400, "encoder: expected the query encoder's identity (its sidecar: teacher, image_size, whiten)")
    return value


async def _parse_search(request: Request, gen: Generation, limits: Limits) -> tuple[np.ndarray, int, dict]:
    """(vectors, k, encoder) of a POST /search: JSON, or raw little-endian float32 rows (k and dim in the query
    string, the encoder identity as JSON in the X-AML-Encoder header)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if ctype == "application/json":
        try:
            req = json.loads(body)
        except ValueError as e:
            raise Refused(400, f"body: not JSON ({first_line(e)})") from None
        if not isinstance(req, dict) or "vectors" not in req:
            raise Refused(400, 'body: expected {"vectors": [[...], ...], "k": 10, "encoder": {...}}')
        return _vectors(req["vectors"], limits), _k(req.get("k", 10), limits), _encoder(req.get("encoder"))
    if ctype == "application/octet-stream":
        dim = int(gen.manifest["dim"])
        given = request.query_params.get("dim")
        if given is not None and given != str(dim):
            raise Refused(400, f"dim {given}: this index holds {dim}-d vectors")
        if len(body) == 0 or len(body) % (4 * dim):
            raise Refused(400, f"body: {len(body)} bytes is not a whole number of {dim}-d float32 vectors")
        try:
            encoder = json.loads(request.headers.get(ENCODER_HEADER) or "null")
        except ValueError:
            raise Refused(400, f"{ENCODER_HEADER}: not JSON") from None
        q = np.frombuffer(body, dtype="<f4").reshape(-1, dim)
        return _vectors(q, limits), _k(request.query_params.get("k", 10), limits), _encoder(encoder)
    raise Refused(415, f"content-type {ctype or 'missing'}: send application/json or application/octet-stream")


def _checked_image(data: bytes, limits: Limits) -> None:
    """A decodable image of at most max_pixels, or a 4xx (the header is read before any pixel)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise Refused(413, f"image: {w} x {h} pixels; at most {limits.max_pixels} (the server's --max-pixels)")
            img.load()
    except Refused:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise Refused(400, f"image: not a readable image ({first_line(e)})") from None


def _image_root(gen: Generation, given: str | os.PathLike | None) -> Path | None:
    """The folder database images are served from: `given`, else the common folder of the index's names."""
    if given is not None:
        return Path(given).resolve()
    if not gen.names:
        return None
    return Path(os.path.commonpath([os.path.dirname(n) for n in gen.names])).resolve()


def _embed_upload(data: bytes, spec: str, gen: Generation) -> tuple[np.ndarray, dict[str, Any]]:
    """The query vector of an uploaded image by encoder `spec`, exactly as `aml search` makes it
    (`aml.index.query_vectors`: the index's image size and scales, its Lw unless folded), and its identity."""
    with tempfile.TemporaryDirectory(prefix="aml-serve-") as tmp:
        path = Path(tmp) / "query"  # never the client's file name: images are read by content
        path.write_bytes(data)
        view = SimpleNamespace(meta=gen.manifest, lw=lambda: gen.lw)  # what query_vectors reads of an index
        return query_vectors(spec, [str(path)], view, device="cpu", workers=0)


def _image_response(rel: str, root: Path | None, gen: Generation) -> Response:
    """A database image under the image root, read-only; a 4xx for anything else."""
    if root is None:
        raise Refused(404, "no image root: start the server with --image-root DIR to serve database images")
    try:
        target = (root / rel).resolve()
    except (ValueError, OSError):
        raise Refused(400, "path: not a valid file name") from None
    if not target.is_relative_to(root):
        raise Refused(403, f"path {rel[:80]!r}: outside the image root")
    if gen.names and str(target) not in _resolved_names(gen):
        raise Refused(404, f"path {rel[:80]!r}: not an image of this index")
    if not target.is_file():
        raise Refused(404, f"path {rel[:80]!r}: not found")
    return FileResponse(target, headers={"Cache-Control": "private, max-age=3600"})


def _resolved_names(gen: Generation) -> set[str]:
    """The resolved paths of a generation's images (computed once per generation)."""
    got = getattr(gen, "_resolved", None)
    if got is None:
        got = {str(Path(n).resolve()) for n in gen.names}
        gen._resolved = got  # type: ignore[attr-defined]
    return got


async def _search_image(request: Request, gen: Generation, limits: Limits, encoders: dict[str, str]) -> dict:
    """POST /search/image: the multipart upload checked, embedded by the chosen encoder, checked and searched."""
    form = await request.form(max_files=1, max_fields=4)
    upload, name = form.get("image"), form.get("encoder") or (min(encoders) if encoders else "")
    if upload is None or isinstance(upload, str):
        raise Refused(400, "image: send the photo as the multipart file field 'image'")
    if name not in encoders:
        raise Refused(400, f"encoder {str(name)[:60]!r}: this server embeds with {sorted(encoders) or 'none'}")
    k = _k(form.get("k", 10), limits)
    data = await upload.read()
    _checked_image(data, limits)
    q, ident = await run_in_threadpool(_embed_upload, data, encoders[name], gen)
    try:
        gen.check(ident, what=f"encoder {name} is for")
    except UserError as e:
        raise Refused(409, str(e)) from None
    hits = await run_in_threadpool(gen.search, q, k, False)
    return {"results": hits, "generation": gen.manifest.get("generation"), "encoder": name}


def _add_guards(app: FastAPI, keys: KeyRing | None, limits: Limits) -> None:
    """Every refusal as a one-line JSON 4xx; the key check and the body size limit before any route runs."""

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> JSONResponse:
        return _error(e.status, e.reason)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, f"request: {first_line(e)}")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if keys is not None and request.url.path not in OPEN_PATHS:
            why = await run_in_threadpool(keys.check, request.headers.get("authorization"))  # PBKDF2: off the loop
            if why:
                return _error(401, why, **{"WWW-Authenticate": "Bearer"})
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "body: send a Content-Length header")
            if int(length) > limits.max_body:  # uvicorn reads no more than Content-Length says
                return _error(413, f"body: {length} bytes; at most {limits.max_body} (the server's --max-body)")
        return await call_next(request)


def create_app(
    source: Source,
    *,
    keys: KeyRing | None = None,
    limits: Limits = Limits(),
    image_root: str | os.PathLike | None = None,
    encoders: dict[str, str] | None = None,
) -> FastAPI:
    """The service over `source` (see the module docstring); `encoders`: name -> encoder spec (exported .onnx,
    checkpoint or registry name) that POST /search/image may embed an upload with."""
    app = FastAPI(title="aml serve", docs_url=None, redoc_url=None, openapi_url=None)
    root = _image_root(source.current, image_root)
    encoders = dict(encoders or {})

    _add_guards(app, keys, limits)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "generation": source.current.manifest.get("generation")}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return {**source.current.info(), "image_root": str(root) if root else None, "encoders": sorted(encoders),
                "limits": vars(limits)}  # fmt: skip

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        gen = source.current  # this request's generation, whatever the watcher does meanwhile
        q, k, encoder = await _parse_search(request, gen, limits)
        try:
            apply_lw = gen.check(encoder)
        except UserError as e:
            raise Refused(409, str(e)) from None
        hits = await run_in_threadpool(gen.search, q, k, apply_lw)
        return {"results": hits, "generation": gen.manifest.get("generation")}

    @app.post("/search/image")
    async def search_image(request: Request) -> dict[str, Any]:
        return await _search_image(request, source.current, limits, encoders)

    @app.get("/images/{rel:path}")
    def image(rel: str) -> Response:
        return _image_response(rel, root, source.current)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    return app
