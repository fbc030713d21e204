"""Retrieval index at 1M patches: recall@20 of faiss IVF and HNSW against exact search, and
query latency.

The same synthetic clustered embeddings as ``scale_selection.py`` (D = 128, L2-normalised),
queried by held-out points of the same distribution. For each index: build time (training
included), the memory it adds, recall@20 against ``IndexFlatL2`` and the median latency of
one query at a time on one faiss thread (how ``GeoIndex.search`` serves a user), at several
search breadths (IVF ``nprobe``, HNSW ``efSearch``).

    .venv/bin/python benchmarks/scale_index.py                    # 1M
    .venv/bin/python benchmarks/scale_index.py --n 100000         # quicker

Writes ``benchmarks/results/scale_index.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_selection import SYNTHETIC, clustered_embeddings

RESULTS = Path(__file__).resolve().parent / "results"
K = 20


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def latency_ms(index: Any, queries: np.ndarray, count: int = 200) -> float:
    """Median wall time of single queries on one faiss thread, in milliseconds."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        for q in queries[:count]:
            t0 = time.perf_counter()
            index.search(q[None], K)
            times.append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(threads)
    return round(float(np.median(times)) * 1000, 3)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return round(float(hits.mean() / truth.shape[1]), 4)


def build(name: str, make: Any, data: np.ndarray) -> tuple[Any, dict[str, Any]]:
    before = rss_mb()
    t0 = time.perf_counter()
    index = make(data)
    row = {
        "index": name,
        "build_s": round(time.perf_counter() - t0, 1),
        "added_rss_mb": round(rss_mb() - before, 1),
    }
    print(f"{name}: built in {row['build_s']} s", flush=True)
    return index, row


def make_ivf(nlist: int, seed: int) -> Any:
    def make(data: np.ndarray) -> Any:
        quantizer = faiss.IndexFlatL2(data.shape[1])
        index = faiss.IndexIVFFlat(quantizer, data.shape[1], nlist)
        index.cp.seed = seed
        # faiss trains on up to 256 points per list by default; 32 trains a good enough
        # coarse quantizer in an eighth of the time (4096 lists: 131k points).
        index.cp.max_points_per_centroid = 32
        index.train(data)
        index.add(data)
        return index

    return make


def make_hnsw(m: int, ef_construction: int) -> Any:
    def make(data: np.ndarray) -> Any:
        index = faiss.IndexHNSWFlat(data.shape[1], m)
        index.hnsw.efConstruction = ef_construction
        index.add(data)
        return index

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", default="1024,4096")
    parser.add_argument("--nprobe", default="4,8,16,32,64")
    parser.add_argument("--hnsw", default="32:40", help="M:efConstruction of the HNSW indexes")
    parser.add_argument("--ef", default="16,32,64,128,256")
    parser.add_argument("--out", default=str(RESULTS / "scale_index.json"))
    args = parser.parse_args()

    emb, _ = clustered_embeddings(args.n + args.queries, seed=args.seed, **SYNTHETIC)
    data, queries = emb[: args.n], np.ascontiguousarray(emb[args.n :])
    load_before = os.getloadavg()
    flat, flat_row = build("flat", lambda d: _flat(d), data)
    _, truth = flat.search(queries, K)
    flat_row |= {"recall@20": 1.0, "latency_ms": latency_ms(flat, queries, 50)}
    rows: list[dict[str, Any]] = [flat_row]
    del flat
    for nlist in (int(x) for x in args.nlist.split(",") if x):
        index, row = build(f"IVF{nlist},Flat", make_ivf(nlist, args.seed), data)
        row["search"] = []
        for nprobe in (int(x) for x in args.nprobe.split(",")):
            index.nprobe = nprobe
            _, found = index.search(queries, K)
            row["search"].append(
                {"nprobe": nprobe, "recall@20": recall(found, truth),
                 "latency_ms": latency_ms(index, queries)}
            )
            print(f"  nprobe {nprobe}: {row['search'][-1]}", flush=True)
        rows.append(row)
        del index
    for spec in (s for s in args.hnsw.split(",") if s):
        m, efc = (int(x) for x in spec.split(":"))
        index, row = build(f"HNSW{m},efC{efc}", make_hnsw(m, efc), data)
        row["search"] = []
        for ef in (int(x) for x in args.ef.split(",")):
            index.hnsw.efSearch = ef
            _, found = index.search(queries, K)
            row["search"].append(
                {"ef_search": ef, "recall@20": recall(found, truth),
                 "latency_ms": latency_ms(index, queries)}
            )
            print(f"  efSearch {ef}: {row['search'][-1]}", flush=True)
        rows.append(row)
        del index
    out = {
        "n": args.n,
        "queries": args.queries,
        "k": K,
        "synthetic": SYNTHETIC,
        "faiss_threads_build": faiss.omp_get_max_threads(),
        "latency": "median of single queries on one faiss thread",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


def _flat(data: np.ndarray) -> Any:
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    return index


if __name__ == "__main__":
    main()
