"""`aml serve`: answer query vectors (and photos) over HTTP from an `aml index` or its Milvus copy."""

from __future__ import annotations

import click


@click.command("serve")
@click.option("--index", "db", type=click.Path(file_okay=False), help="Index directory (`aml index build`).")
@click.option("--milvus", help="Instead of --index: a Milvus URI (`aml index push`): a Milvus Lite .db file or URL.")
@click.option("--collection", default="aml", show_default=True, help="With --milvus: the collection.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--keys", type=click.Path(dir_okay=False), help="Keys file (`aml keys new`): require a Bearer key.")
@click.option(
    "--encoder",
    "encoders",
    multiple=True,
    help="An encoder POST /search/image (and the page) may embed photos with: exported .onnx, aml checkpoint or "
    "registry name (repeatable).",
)
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder served under /images (default: the "
              "common folder of the index's images).")  # fmt: skip
@click.option("--max-body", type=click.IntRange(min=1), default=8 << 20, show_default=True, help="Request bytes.")
@click.option("--max-k", type=click.IntRange(min=1), default=1000, show_default=True, help="Largest k.")
@click.option("--max-queries", type=click.IntRange(min=1), default=256, show_default=True, help="Vectors a request.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True, help="Upload pixels.")
@click.option("--poll", type=click.FloatRange(min=0.01), default=0.2, show_default=True,
              help="Seconds between checks for a new index generation.")  # fmt: skip
def command(
    db, milvus, collection, host, port, keys, encoders, image_root, max_body, max_k, max_queries, max_pixels, poll
) -> None:  # fmt: skip
    """Serve POST /search, POST /search/image, GET /info, GET /healthz and a page at / (docs/SERVE.md)."""
    import uvicorn

    from aml.errors import UserError
    from aml.serve.app import Limits, create_app
    from aml.serve.backend import index_source
    from aml.serve.keys import KeyRing

    if bool(db) == bool(milvus):
        raise UserError("give --index DIR or --milvus URI (one of them)")
    if milvus:
        from aml.milvus import milvus_source

        source = milvus_source(milvus, collection)
    else:
        source = index_source(db, poll=poll)
    ring = KeyRing(keys) if keys else None
    names = {e.rstrip("/").rsplit("/", 1)[-1]: e for e in encoders}
    if len(names) != len(encoders):
        raise UserError("--encoder: two encoders with the same file name; rename one")
    limits = Limits(max_body=max_body, max_queries=max_queries, max_k=max_k, max_pixels=max_pixels)
    app = create_app(source, keys=ring, limits=limits, image_root=image_root, encoders=names)
    m = source.current.manifest
    click.echo(f"aml serve: {m['count']} x {m['dim']} ({m['type']}, generation {m.get('generation')}) on "
               f"http://{host}:{port}{'' if ring else ' (no keys: anyone who can reach it may search)'}")  # fmt: skip
    source.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        source.stop()
