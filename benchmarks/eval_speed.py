"""Evaluation speed: 70 revisitop queries against 5k / 100k / 1M random 2048-d database vectors.

The database is the real roxford5k ground truth (4993 images, the positives leaning towards their queries)
padded with random distractors to the target size, stored as float16 and generated in chunks. For each size,
in one run: search (aml.search, the search core, on --device) + vectorised scoring (aml.scoring), and the same
scoring through a straightforward per-query loop (revisitop's compute_map style: np.isin and a Python walk per
query). Medians over --reps runs (wall seconds, and "cpu s s+s": this process's CPU seconds of search + scoring,
which stay comparable on a shared machine); peak memory as numpy's traced peak (tracemalloc) per phase and the
process's max RSS.

    .venv/bin/python benchmarks/eval_speed.py --sizes 5000,100000            # quick
    .venv/bin/python benchmarks/eval_speed.py --sizes 1000000 --reps 1       # the 1M case, once
    .venv/bin/python benchmarks/eval_speed.py --sizes 100000 --fp16-check    # what float16 storage changes
    .venv/bin/python benchmarks/eval_speed.py --smoke                        # the same code path, tiny
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aml.evaluate import default_topk  # noqa: E402
from aml.scoring import KAPPAS, PROTOCOLS, score_rankings  # noqa: E402
from aml.search import search, search_device  # noqa: E402
from aml.threads import HELP, benchmark_threads  # noqa: E402
from aml.trust import load_pickle  # noqa: E402

GND = REPO.parent / "shared" / "data" / "revisitop" / "gnd_roxford5k.pkl"


def loop_scores(ranks: np.ndarray, gnd: list[dict], kappas=KAPPAS) -> dict[str, float]:
    """The straightforward per-query evaluation (revisitop compute_map), mAP per protocol."""
    out = {}
    for name, (positive, ignored) in PROTOCOLS.items():
        aps, prs = [], []
        for i, g in enumerate(gnd):
            ok = np.concatenate([np.asarray(g[k], dtype=np.int64) for k in positive])
            junk = np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ignored])
            if ok.size == 0:
                continue
            pos = np.flatnonzero(np.isin(ranks[i], ok))
            jpos = np.flatnonzero(np.isin(ranks[i], junk))
            k = ij = 0
            for ip in range(len(pos)):
                while ij < len(jpos) and pos[ip] > jpos[ij]:
                    k += 1
                    ij += 1
                pos[ip] -= k
            ap = 0.0
            for j, r in enumerate(pos):
                ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / (2 * ok.size)
            aps.append(ap)
            R = pos + 1
            prs.append([(R <= min(R.max(), kk)).sum() / min(R.max(), kk) if R.size else 0.0 for kk in kappas])
        out[name] = 100 * float(np.mean(aps))
    return out


def make_data(gnd: dict, n: int, d: int, rng: np.random.Generator, dtype=np.float16, chunk: int = 65536):
    """(n, d) database (imlist first, then distractors) and (70, d) float32 queries, L2-normalised."""
    nq, n_im = len(gnd["qimlist"]), len(gnd["imlist"])
    q = rng.standard_normal((nq, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db = np.empty((n, d), dtype)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        db[s : s + x.shape[0]] = x
    # positives lean towards their query: cosine ~ 0.035-0.1 for easy, less for hard (noise std 0.022)
    lean = np.zeros((n_im, d), np.float32)
    for i, g in enumerate(gnd["gnd"]):
        for key, w in (("easy", 0.07), ("hard", 0.04), ("junk", 0.04)):
            idx = np.asarray(g[key], dtype=np.int64)
            lean[idx] += w * rng.uniform(0.5, 1.5, (idx.size, 1)).astype(np.float32) * q[i]
    x = db[:n_im].astype(np.float32) + lean
    db[:n_im] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return db, q


def timed(fn, reps: int):
    """((median wall seconds, median CPU seconds of this process), peak traced MiB above what was allocated
    before, result). The CPU seconds stay comparable on a machine shared with other work; wall time does not."""
    times, cpu, out = [], [], None
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return (statistics.median(times), statistics.median(cpu)), (tracemalloc.get_traced_memory()[1] - base) / 2**20, out


def run_size(gnd: dict, n: int, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """One database size: search + vectorised scoring vs the per-query loop (and float16 vs float32)."""
    db, q = make_data(gnd, n, args.dim, rng, np.float32 if args.fp16_check else np.float16)
    db32, db = (db, db.astype(np.float16)) if args.fp16_check else (None, db)
    k = default_topk(n)
    (t_search, c_search), m_search, (_, ranks) = timed(lambda: search(q, db, k, device=args.device), args.reps)
    (t_score, c_score), m_score, sc = timed(lambda: score_rankings(ranks, gnd["gnd"], n), args.reps)
    (t_loop, _), m_loop, lp = timed(lambda: loop_scores(ranks, gnd["gnd"]), args.reps)
    vec = {p: 100 * s.map for p, s in sc.items()}
    assert all(abs(vec[p] - lp[p]) < 1e-9 for p in "EMH"), (vec, lp)
    print(
        f"{n:>8} {k:>7} {t_search:>9.3f} {c_search + c_score:>10.3f} {t_score:>8.4f} {t_loop:>8.4f} "
        f"{t_loop / t_score:>8.1f} "
        f"{m_search:>10.0f} {m_score:>9.0f} {m_loop:>8.0f}  "
        + "/".join(f"{vec[p]:.2f}" for p in "EMH")
        + (f"  (mAP_max M {100 * sc['M'].map_max:.2f})" if k < n else ""),
        flush=True,
    )
    if db32 is not None:
        (t32, _), m32, (_, r32) = timed(lambda: search(q, db32, k, device=args.device), args.reps)
        s32 = score_rankings(r32, gnd["gnd"], n)
        d_map = max(abs(100 * s32[p].map - vec[p]) for p in "EMH")
        d_ap = max(np.nanmax(np.abs(s32[p].ap - sc[p].ap)) for p in "EMH")
        mb16, mb32 = db.nbytes / 2**20, db32.nbytes / 2**20
        print(
            f"{'':>8} float16 vs float32 storage: {mb16:.0f} vs {mb32:.0f} MiB,"
            f" search {t_search:.3f} vs {t32:.3f} s (peak {m_search:.0f} vs {m32:.0f} MiB), same index at "
            f"{100 * (r32 == ranks).mean():.3f}% of ranking positions, max |dmAP| {d_map:.4f}, "
            f"max |dAP| {100 * d_ap:.4f} (x100)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,100000", help="database sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="search device: cpu, auto, cuda, cuda:N (aml.search)")
    ap.add_argument(
        "--fp16-check",
        action="store_true",
        help="generate float32 vectors and compare their search with float16 storage (4x memory)",
    )
    ap.add_argument("--threads", type=int, help=HELP)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (5000 x 64-d, one rep): the same code path")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.dim, args.reps = "5000", 64, 1
    with contextlib.suppress(ImportError):  # the search backends, loaded first so that their threads are set
        import faiss  # noqa: F401
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    setting = benchmark_threads(args.threads)
    gnd = load_pickle(GND)
    rng = np.random.default_rng(0)
    tracemalloc.start()
    where = search_device(args.device, 1)[0]
    print(f"search on {where} (--device {args.device}), dim {args.dim}, 70 queries, medians of {args.reps}\n{setting}")
    print(
        f"{'N_db':>8} {'topk':>7} {'search s':>9} {'cpu s s+s':>10} {'score s':>8} {'loop s':>8} {'loop/vec':>8} "
        f"{'search MiB':>10} {'score MiB':>9} {'loop MiB':>8}  mAP E/M/H (vec == loop)"
    )
    for n in [int(s) for s in args.sizes.split(",")]:
        run_size(gnd, n, args, rng)
    print(f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
