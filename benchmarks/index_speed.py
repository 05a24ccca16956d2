"""Index speed and quality: flat / flat16 / ivfpq / binary on 2048-d vectors at 100k and 1M (run by hand).

The database is the real roxford5k ground truth (4993 images, positives leaning towards their 70 queries)
padded with random distractors to the target size, as benchmarks/eval_speed.py makes it. For each index type:
train time (ivfpq: k-means of the coarse quantizer and the PQ codebooks on `aml.index.train_sample`) and add
time (encoding every vector), bytes on disk, RSS growth while building and loaded, queries per second (70
queries, top 100), recall@100 against exact search (flat, when it runs first), and roxford5k mAP (E/M/H,
ranking = the top 100). ivfpq uses `aml index build`'s defaults (nlist ~4 sqrt(N): 1264 at 100k, 4000 at 1M;
m = D/32; 8 bits; trained on 64 points a list) unless --nlist/--m/--nbits/--nprobe are given.

    .venv/bin/python benchmarks/index_speed.py --sizes 100000 --threads 1
    .venv/bin/python benchmarks/index_speed.py --sizes 1000000 --threads 1 --tmp /big/disk
    # 1M x 2048: the float16 database 4 GB in memory, flat 8 GB more (and 8 GB on disk under --tmp)
    .venv/bin/python benchmarks/index_speed.py --smoke    # a tiny ground truth, 2000 x 64-d: a check that it runs
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from common import padded_gnd, parse, parser
from eval_speed import GND, make_data

from aml.index import KINDS, Index, trained_index
from aml.scoring import KAPPAS, score_rankings

# ivfpq: 16 lists of 8 sub-quantizers x 6 bits (faiss wants 39 training points a centroid: 2496 for 2^6)
SMOKE = dict(sizes="2500", dim=64, topk=10, reps=1, nlist=16, m=8, nbits=6, nprobe=4)


def rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(kind: str, db: np.ndarray, q: np.ndarray, gnd: dict, exact: np.ndarray | None, args: argparse.Namespace):
    """One index type: (row text, its ids)."""
    topk, reps = args.topk, args.reps
    params = {k: getattr(args, k) for k in ("nlist", "m", "nbits", "nprobe")}
    r0 = rss_mib()
    t = time.perf_counter()
    idx = trained_index(db, kind, meta={"teacher": {"name": "random-benchmark", "dim": db.shape[1]}}, **params)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    idx.add(db, [str(i) for i in range(db.shape[0])])
    t_add = time.perf_counter() - t
    r_built = rss_mib() - r0
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        idx.save(Path(tmp) / "db")
        disk = sum(f.stat().st_size for f in (Path(tmp) / "db").iterdir()) / 2**20
        del idx
        r1 = rss_mib()
        idx = Index.open(Path(tmp) / "db")
        r_loaded = rss_mib() - r1
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            _, ids = idx.search(q, topk, device=args.device)
            times.append(time.perf_counter() - t)
    qps = q.shape[0] / float(np.median(times))
    if kind == "flat":
        recall = "1.000"
    elif exact is None:
        recall = "-"
    else:
        recall = f"{np.mean([len(set(a) & set(b)) / topk for a, b in zip(ids, exact, strict=True)]):.3f}"
    sc = score_rankings(ids, gnd["gnd"], db.shape[0], KAPPAS)
    m = "/".join(f"{100 * sc[p].map:.2f}" for p in "EMH")
    row = (
        f"{db.shape[0]:>8} {kind:>7} {t_train:>8.2f} {t_add:>8.2f} {disk:>9.0f} {r_built:>9.0f} {r_loaded:>9.0f} "
        f"{qps:>9.1f} {recall:>8}  {m}  {idx.params or ''} {idx.searched_on if idx.searched_on != 'cpu' else ''}"
    ).rstrip()
    return row, ids


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--types", default=",".join(KINDS))
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nlist", type=int, help="ivfpq inverted lists (default: aml's, ~4 sqrt(N))")
    ap.add_argument("--m", type=int, help="ivfpq sub-quantizers (default D/32)")
    ap.add_argument("--nbits", type=int, help="ivfpq bits per code (default 8)")
    ap.add_argument("--nprobe", type=int, help="ivfpq lists searched (default 32)")
    ap.add_argument("--tmp", help="folder for the saved indexes (default: the system temp folder)")
    ap.add_argument("--device", default="cpu", help="search device: cpu, auto, cuda[:N], cuda:all (faiss-gpu)")
    args = parse(ap, SMOKE)
    gnd, machine, setting = padded_gnd(args, GND)
    print(
        f"{machine}, dim {args.dim}, {len(gnd['qimlist'])} queries, top {args.topk}, median of {args.reps}, "
        f"search on {args.device}\n{setting}"
    )
    print(
        f"{'N_db':>8} {'type':>7} {'train s':>8} {'add s':>8} {'disk MiB':>9} {'RSS build':>9} {'RSS load':>9} "
        f"{'q/s':>9} {f'R@{args.topk}':>8}  mAP E/M/H (top-{args.topk} ranking)  params"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        db, q = make_data(gnd, n, args.dim, np.random.default_rng(0), np.float16)
        exact = None
        for kind in args.types.split(","):
            row, ids = run(kind, db, q, gnd, exact, args)
            exact = ids if kind == "flat" else exact
            print(row, flush=True)
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
