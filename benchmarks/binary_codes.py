"""Binary codes vs float vectors: roxford5k mAP, database memory and search time, up to 1M (run by hand).

The database is the real roxford5k ground truth (4993 images, positives leaning towards their 70 queries)
padded with random distractors to the target size, as benchmarks/eval_speed.py makes it (zero-centred random
vectors, so the sign bits split evenly; real GeM vectors must be whitened or LayerNorm'd first). For each size:
- float: exact inner-product search of the float16-stored database (aml.search, the default CPU backend);
- float->bits: float queries against the database's sign bits, <q, +-1> / sqrt(D) (aml.search.search);
- hamming: the queries' sign bits against the database's, faiss IndexBinaryFlat (aml.search.hamming_search);
with the database's bytes in memory (float32, float16 or packed bits), the search time of the 70 queries
(median of --reps; Hamming includes building the faiss index once, reported apart) and mAP E/M/H on the top
--topk ranking (default: the whole database up to 100k, else 10,000, as `aml evaluate`).

    .venv/bin/python benchmarks/binary_codes.py --sizes 100000
    .venv/bin/python benchmarks/binary_codes.py --sizes 1000000 --reps 1     # the 1M case (~4 GB float16)
    .venv/bin/python benchmarks/binary_codes.py --sizes 5000 --dim 64 --reps 1   # a quick run
    .venv/bin/python benchmarks/binary_codes.py --smoke     # a tiny ground truth, 1000 x 64-d: a check that it runs
"""

from __future__ import annotations

import argparse

import numpy as np
from common import padded_gnd, parse, parser, timed
from eval_speed import GND, make_data

from aml.binary import bits_set, code_bytes, pack_bits
from aml.evaluate import default_topk
from aml.scoring import KAPPAS, score_rankings
from aml.search import binary_index, hamming_search, search

SMOKE = dict(sizes="1000", dim=64, reps=1)


def maps(ids: np.ndarray, gnd: dict, n: int) -> str:
    sc = score_rankings(ids, gnd["gnd"], n, KAPPAS)
    return " / ".join(f"{100 * sc[p].map:6.2f}" for p in "EMH")


def run_size(gnd: dict, n: int, args: argparse.Namespace) -> None:
    d = args.dim
    db, q = make_data(gnd, n, d, np.random.default_rng(0), np.float16)
    k = args.topk or default_topk(n)
    t_pack, codes = timed(lambda: pack_bits(db), 1)
    t_float, (_, ids_f) = timed(lambda: search(q, db, k, device="cpu"), args.reps)
    t_asym, (_, ids_a) = timed(lambda: search(q, codes, k), args.reps)
    t_build, index = timed(lambda: binary_index([codes]), 1)
    t_ham, (_, ids_h) = timed(lambda: hamming_search(q, index, d, k), args.reps)
    mib = 2**20
    rows = [
        ("float", f"{n * d * 4 / mib:.0f} (f32) / {n * d * 2 / mib:.0f} (f16)", t_float, ids_f, ""),
        ("float->bits", f"{n * code_bytes(d) / mib:.1f}", t_asym, ids_a, f"pack {t_pack:.2f} s"),
        ("hamming", f"{n * code_bytes(d) / mib:.1f}", t_ham, ids_h, f"faiss index build {t_build:.2f} s"),
    ]
    for name, mem, t, ids, note in rows:
        print(f"{n:>8} {name:>12} {mem:>20} {t:>9.3f} {maps(ids, gnd, n)}  {note}", flush=True)
    print(f"{'':>8} bits set {100 * bits_set(codes, d):.1f}%, ranking depth {k}, float search on the CPU (aml.search)")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--sizes", default="100000", help="Database sizes (at least the roxford5k images, 4993).")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--topk", type=int, help="Ranking depth (default: as aml evaluate).")
    ap.add_argument("--reps", type=int, default=3)
    args = parse(ap, SMOKE)
    gnd, machine, setting = padded_gnd(args, GND)
    print(
        f"{machine}, dim {args.dim} ({code_bytes(args.dim)} bytes of bits), {len(gnd['qimlist'])} queries, "
        f"median of {args.reps}\n{setting}"
    )
    print(f"{'N_db':>8} {'method':>12} {'database MiB':>20} {'search s':>9} mAP E / M / H")
    for n in (int(s) for s in args.sizes.split(",")):
        if n < len(gnd["imlist"]):
            raise SystemExit(f"--sizes {n}: at least {len(gnd['imlist'])} (the roxford5k database)")
        run_size(gnd, n, args)


if __name__ == "__main__":
    main()
