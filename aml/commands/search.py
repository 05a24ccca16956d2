"""`aml search`: query an `aml index` with a student (checkpoint, registry name or exported .onnx)."""

from __future__ import annotations

from typing import Any

import click
import numpy as np

from aml.commands._options import (
    image_options,
    image_sizes,
    images_options,
    read_images,
    search_device_option,
    threads_option,
    trust_pickle_option,
)


@click.command("search")
@click.option("--index", "db", type=click.Path(file_okay=False), help="Index directory.")
@click.option("--milvus", help="Instead of --index: a Milvus URI holding an `aml index push` (--collection aml).")
@click.option("--collection", default="aml", show_default=True, help="With --milvus: the collection.")
@click.option("--encoder", required=True, help="Query encoder: aml checkpoint, registry name, or exported .onnx.")
@click.option("--encoder-weights", type=click.Path(dir_okay=False), help="Weights file for a registry name.")
@images_options
@image_options(size_help="Query longest side (default: the size the encoder records, else the index's).")
@click.option("--topk", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--nprobe", type=click.IntRange(min=1), help="ivfpq: lists searched (default: the manifest's).")
@click.option("--hamming", is_flag=True, help="binary: binarise the queries, Hamming search (default: asymmetric).")
@click.option("--device", default="auto", show_default=True, help="Query extraction device (torch encoders).")
@threads_option
@search_device_option(
    "Where faiss searches: auto (faiss-gpu on every GPU when installed, else the CPU), cpu, cuda (the first GPU), "
    "cuda:N, or cuda:all (every GPU, the index sharded across them)."
)
@trust_pickle_option
@click.option("--force", is_flag=True, help="Search even when the encoder was trained for another teacher.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Results, JSON lines.")
@click.option("--show", type=click.Path(dir_okay=False), help="Also draw the results: a .png or .html file.")
@click.option("--show-k", type=click.IntRange(min=1), default=8, show_default=True, help="Hits drawn per query.")
@click.option(
    "--show-n", type=click.IntRange(min=1), help="Queries drawn: the first N of the list (default: every query)."
)
@click.option("--dataset", help="revisitop dataset name: frame hits as positive / junk / negative.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder holding DATASET/gnd_DATASET.pkl.")
def command(
    db, milvus, collection, encoder, encoder_weights, images, bbx, image_size, scales, topk, nprobe, hamming, device,
    search_device, force, out, show, show_k, show_n, dataset, data_root,
) -> None:  # fmt: skip
    """Search the index for each query image; write one JSON line per query, best first."""
    from aml.errors import UserError
    from aml.identity import IDENTITY_FIELDS, check_compatible
    from aml.index import index_identity, query_vectors
    from aml.io import check_writable_file
    from aml.milvus import open_searched
    from aml.show import check_show_path

    if dataset and not data_root:
        raise UserError("--dataset: needs --data-root DIR (the folder holding DATASET/gnd_DATASET.pkl)")
    check_writable_file(out, "--out")  # the outputs before the work: never found after the search
    if show:
        check_show_path(show, "--show")
    index, db = open_searched(db, milvus, collection)  # an `aml index` directory or its Milvus copy
    index.gpus_for(search_device, topk, hamming=hamming)  # a device that cannot search it: refused before the work
    paths, bbxs = read_images(images, bbx)
    given_scales = scales if scales != (1.0,) else None
    db_size = index.meta["image_size"]
    size, _, sizes = image_sizes(
        encoder,
        query=image_size,
        index_size=db_size,
        fallback=db_size,
        fallback_from="as the index",
        query_option="--image-size",
    )  # the database's size is the index's: it was built at that size
    q, ident = query_vectors(
        encoder, paths, index, bbxs=bbxs, weights=encoder_weights, image_size=size, scales=given_scales,
        device=device,
    )  # fmt: skip
    warning = check_compatible(  # the two sides' sizes may differ (the asymmetric deployment): printed above
        ident, index_identity(index.meta), what=f"encoder {encoder} is for", where=f"index {db} holds", force=force,
        fix="use an encoder distilled from that teacher, at the index's whitening",
        fields=[f for f in IDENTITY_FIELDS if f != "image_size"],
    )  # fmt: skip
    if warning:
        click.echo(warning, err=True)
    click.echo(sizes, err=True)
    s, ids = index.search(q, topk, nprobe=nprobe, hamming=hamming, device=search_device)
    if index.note:
        click.echo(f"note: {index.note}", err=True)
    _write_results(out, paths, index, s, ids)
    click.echo(
        f"{out}: {len(paths)} queries, top {min(topk, len(index))} of {len(index)} ({index.kind}, {index.searched_on})"
    )
    if show:
        n = min(show_n or len(paths), len(paths))
        drawn = None if bbxs is None else bbxs[:n]
        _draw(show, paths[:n], drawn, index, s[:n, :show_k], ids[:n, :show_k], dataset, data_root)
        click.echo(f"{show}: {n} of {len(paths)} queries drawn{f' ({dataset} ground truth)' if dataset else ''}")


def _write_results(out: str, paths: list[str], index: Any, s: np.ndarray, ids: np.ndarray) -> None:
    """One JSON line per query: {"query", "results": [{"name", "score"}, ...]}, best first (no -1 ids)."""
    from aml.io import atomic_write, json_text

    with atomic_write(out) as f:
        for name, row_s, row_i in zip(paths, s, ids, strict=True):
            hits = [
                {"name": index.names[i], "score": round(float(v), 6)}
                for v, i in zip(row_s, row_i, strict=True)
                if i >= 0
            ]
            f.write(json_text({"query": name, "results": hits}) + "\n")


def _draw(show: str, paths: list[str], bbxs: Any, index: Any, s: np.ndarray, ids: np.ndarray, dataset, data_root):
    """Draw the queries with their hits (s, ids: the drawn columns), framed by the ground truth of `dataset`."""
    from aml.errors import UserError
    from aml.show import draw_results, gnd_labels, name_ids

    hits = [[index.names[i] for i in row if i >= 0] for row in ids]
    labels = None
    if dataset:
        from aml.data.revisitop import load_revisitop

        ds = load_revisitop(data_root, dataset)
        qpos = name_ids(paths, ds.qimlist)
        if (qpos < 0).any():
            raise UserError(f"--dataset {dataset}: query {paths[int((qpos < 0).argmax())]} is not in its qimlist")
        db_ids = np.stack([name_ids([index.names[i] for i in row], ds.imlist) for row in ids])
        labels = gnd_labels([ds.gnd[i] for i in qpos], db_ids)
    draw_results(show, paths, bbxs, hits, s, labels)
