"""Load on `aml serve`: N concurrent clients on loopback, a bounded number of POST /search requests against a
100k-vector flat index, then the same while a new generation is written (`aml index add`'s file protocol:
`Index.open`, `add`, `save`, in another process) and the service switches to it.

Reports queries per second, p50 / p99 latency, errors (must be 0: the script exits 1 otherwise) and the
server's resident memory (VmRSS) before and after each phase (VmHWM: its peak). Random unit vectors (the
service does the same work whatever they are); one query vector a request, top 10.

    .venv/bin/python benchmarks/serve_load.py                 # 100k x 512, 8 clients, 2000 requests a phase
    .venv/bin/python benchmarks/serve_load.py --smoke         # tiny: 2000 x 64, seconds, writes nothing
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from common import REPO, RESULTS, header, parse, parser, write_results

from aml.index import build_index
from aml.serve.spawn import serve_process

SMOKE = dict(n=2000, dim=64, clients=4, requests=200, add=500, time_limit=60.0)

IDENTITY = {"name": "random-benchmark", "weights": "random-init", "sha256": None}
ADD = """import sys, numpy as np
from aml.index import Index
idx = Index.open(sys.argv[1])
x = np.random.default_rng(1).standard_normal((int(sys.argv[2]), idx.dim)).astype(np.float32)
idx.add(x / np.linalg.norm(x, axis=1, keepdims=True), [f"/bench/added/{i}.jpg" for i in range(len(x))])
idx.save()
"""


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, MiB (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def load(url: str, clients: int, requests: int, deadline_s: float, dim: int, k: int) -> dict:
    """`requests` POST /search from `clients` threads (each its own connection), stopped at `deadline_s`."""
    lat, errors, generations, lock = [], [], set(), threading.Lock()
    left = [requests]
    encoder = {"teacher": {**IDENTITY, "dim": dim}, "image_size": 512, "whiten": None}
    queries = unit(64, dim, 2).tolist()
    stop = time.monotonic() + deadline_s

    def client(c_id: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            n = c_id
            while time.monotonic() < stop:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                body = {"vectors": [queries[n % len(queries)]], "k": k, "encoder": encoder}
                n += clients
                t = time.perf_counter()
                try:
                    r = c.post("/search", json=body)
                    ok, why = r.status_code == 200, f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)[:160]
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    if ok:
                        generations.add(r.json()["generation"])
                    else:
                        errors.append(why)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.zeros(1)
    return {"n": len(lat), "wall": wall, "qps": len(lat) / wall, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "errors": errors, "generations": sorted(generations)}  # fmt: skip


def row(phase: str, r: dict, before: dict, after: dict) -> str:
    gens, mem = ",".join(map(str, r["generations"])), f"{before['VmRSS']:>9.0f} {after['VmRSS']:>9.0f}"
    return (f"{phase:>10} {r['n']:>8} {r['wall']:>7.1f} {r['qps']:>8.1f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
            f"{len(r['errors']):>6} {gens:>6} {mem} {after['VmHWM']:>9.0f}")  # fmt: skip


def main() -> None:
    p = parser(__doc__, RESULTS / "serve_load.txt")
    p.add_argument("--n", type=int, default=100_000, help="Index vectors.")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000, help="Requests a phase (bounded).")
    p.add_argument("--add", type=int, default=10_000, help="Vectors the new generation adds.")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=300.0, help="Seconds a phase may take at most.")
    p.add_argument("--server-threads", default="1", help="OMP_NUM_THREADS / AML_THREADS of the server.")
    p.add_argument("--tmp", help="Folder for the index (default: the system's temp folder).")
    a = parse(p, SMOKE)
    env = {"OMP_NUM_THREADS": a.server_threads, "AML_THREADS": a.server_threads, "PYTHONPATH": str(REPO)}
    lines = [
        f"{platform.machine()} {os.cpu_count()} CPUs, {a.n} x {a.dim} flat index (+{a.add} added), {a.clients} "
        f"clients on 127.0.0.1, {a.requests} requests a phase (1 query, top {a.k}), server threads {a.server_threads}",
        f"{'phase':>10} {'requests':>8} {'wall s':>7} {'q/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
        f"{'gens':>6} {'RSS0 MiB':>9} {'RSS1 MiB':>9} {'peak MiB':>9}",
    ]
    lines.insert(1, header(a))
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="aml-serve-load-") as tmp:
        db = Path(tmp) / "db"
        meta = {"teacher": {**IDENTITY, "dim": a.dim}, "image_size": 512, "whitening": None}
        build_index(unit(a.n, a.dim, 0), "flat", [f"/bench/{i}.jpg" for i in range(a.n)], meta=meta).save(db)
        errors = []
        with serve_process(["--index", db, "--poll", "0.1"], env=env, log=str(Path(tmp) / "serve.log")) as (url, proc):
            m0 = memory(proc.pid)
            r = load(url, a.clients, a.requests, a.time_limit, a.dim, a.k)
            m1 = memory(proc.pid)
            lines.append(row("steady", r, m0, m1))
            errors += r["errors"]
            adder = subprocess.Popen([sys.executable, "-c", ADD, str(db), str(a.add)], env={**os.environ, **env})
            t = time.perf_counter()
            r = load(url, a.clients, a.requests, a.time_limit, a.dim, a.k)
            adder.wait(a.time_limit)
            add_s = time.perf_counter() - t
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/healthz").json()["generation"] != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            info = httpx.get(f"{url}/info").json()
            m2 = memory(proc.pid)
            lines.append(row("index add", r, m1, m2))
            errors += r["errors"]
            lines.append(f"index add: exit {adder.returncode}, load phase {add_s:.1f} s; then serving generation "
                         f"{info['generation']} of {info['count']} vectors")  # fmt: skip
            if adder.returncode != 0 or info["count"] != a.n + a.add:
                errors.append("the new generation was not served")
    lines.append(f"failed requests: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    write_results(a, RESULTS / "serve_load.txt", lines)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
