"""`aml index push`: copy an `aml index` into a Milvus collection (a subcommand `aml index` registers)."""

from __future__ import annotations

import click

from aml.milvus import MILVUS_TYPES


@click.command("push")
@click.argument("db", type=click.Path(file_okay=False))
@click.option("--to", "target", nargs=2, required=True, metavar="milvus URI",
              help="Where: `milvus URI` (a Milvus Lite .db file or http://HOST:PORT).")  # fmt: skip
@click.option("--collection", default="aml", show_default=True, help="Collection name.")
@click.option("--type", "kind", type=click.Choice(tuple(MILVUS_TYPES)), default="flat", show_default=True,
              help="Milvus index: flat (exact), ivf (IVF_FLAT) or hnsw.")  # fmt: skip
@click.option("--nlist", type=click.IntRange(min=1), help="ivf: inverted lists (default 128).")
@click.option("--hnsw-m", type=click.IntRange(min=2), help="hnsw: links per node (default 16).")
@click.option("--ef-construction", type=click.IntRange(min=8), help="hnsw: build breadth (default 200).")
@click.option("--overwrite", is_flag=True, help="Drop the collection first (it holds another index).")
def command(db, target, collection, kind, nlist, hnsw_m, ef_construction, overwrite) -> None:
    """Push the index's vectors, names and manifest; resumable and idempotent (a re-push adds only new rows)."""
    from aml.errors import UserError
    from aml.milvus import index_params, push

    engine, uri = target
    if engine != "milvus":
        raise UserError(f"--to {engine} {uri}: the one target is `milvus URI`")
    params = index_params(kind, nlist, hnsw_m, ef_construction)
    new, total = push(db, uri, collection, kind, params=params, overwrite=overwrite,
                      log=lambda s: click.echo(s, err=True))  # fmt: skip
    click.echo(f"{uri} {collection}: +{new} rows, {total} in all ({MILVUS_TYPES[kind]})")
