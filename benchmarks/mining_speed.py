"""Negative mining speed: vectorised `aml.mining.mine_negatives` vs a straightforward per-query walk.

Same inputs for both (docs/REFERENCE.md §4 sizes by default: 2000 queries, a 20,000-image pool, 2048-d, 5 negatives),
identical outputs checked, medians of --repeats runs and their ratio printed. Two kinds of data: `random`
(neighbours rarely share a cluster) and `clustered` (a cluster's images lie close together, so each
query's top ranks are full of its own and repeated clusters, which exercises the longer-list fallback).

    .venv/bin/python benchmarks/mining_speed.py [--queries 2000 --pool 20000 --dim 2048 --repeats 3]
    .venv/bin/python benchmarks/mining_speed.py --smoke      # 50 queries x 400, 32-d: a check that it runs
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from common import header, parse, parser, timed

from aml.mining import mine_negatives

SMOKE = dict(queries=50, pool=400, dim=32, clusters=20, repeats=1)


def per_query_walk(q: torch.Tensor, pool: torch.Tensor, qc: np.ndarray, pc: np.ndarray, neg_num: int) -> np.ndarray:
    """The straightforward version: score, rank the whole pool per query, walk it in Python (cirtorch)."""
    scores = q @ pool.t()
    out = np.full((len(q), neg_num), -1, dtype=np.int64)
    for i in range(len(q)):
        ranks = torch.argsort(scores[i], descending=True)
        taken = {int(qc[i])}
        k = r = 0
        while k < neg_num and r < len(ranks):
            pos = int(ranks[r])
            if int(pc[pos]) not in taken:
                out[i, k] = pos
                taken.add(int(pc[pos]))
                k += 1
            r += 1
    return out


def make(kind: str, Q: int, P: int, D: int, clusters: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pc = torch.randint(clusters, (P,), generator=g)
    qc = torch.randint(clusters, (Q,), generator=g)
    if kind == "clustered":
        centres = torch.randn(clusters, D, generator=g)
        pool, q = centres[pc] + torch.randn(P, D, generator=g), centres[qc] + torch.randn(Q, D, generator=g)
    else:
        pool, q = torch.randn(P, D, generator=g), torch.randn(Q, D, generator=g)
    return F.normalize(q, dim=1), F.normalize(pool, dim=1).half().float(), qc.numpy(), pc.numpy()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--clusters", type=int, default=700)
    ap.add_argument("--neg-num", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = parse(ap, SMOKE)
    setting = header(args)
    print(
        f"{args.queries} queries x {args.pool} pool, {args.dim}-d (pool rounded to float16, as cached), "
        f"{args.clusters} clusters, neg_num {args.neg_num}, median of {args.repeats}\n{setting}"
    )
    for kind in ("random", "clustered"):
        q, pool, qc, pc = make(kind, args.queries, args.pool, args.dim, args.clusters, seed=0)
        t_vec, got = timed(lambda: mine_negatives(q, pool, qc, pc, args.neg_num).numpy(), args.repeats)  # noqa: B023
        t_ref, want = timed(lambda: per_query_walk(q, pool, qc, pc, args.neg_num), args.repeats)  # noqa: B023
        t_mm, _ = timed(lambda: q @ pool.t(), args.repeats)  # noqa: B023
        same = np.array_equal(got, want)
        print(
            f"{kind:>9}: vectorised {t_vec:6.2f} s | per-query walk {t_ref:6.2f} s | "
            f"ratio {t_ref / t_vec:5.1f}x | identical outputs: {same} | (scoring alone {t_mm:.2f} s)"
        )
        if not same:
            raise SystemExit(f"{kind}: outputs differ in {int((got != want).any(1).sum())} rows")


if __name__ == "__main__":
    main()
