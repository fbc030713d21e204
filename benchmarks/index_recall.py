"""Retrieval index: recall@20 of HNSW against exact search, and query latency, by pool size.

Synthetic data: clustered 128-d embeddings (Gaussian clusters around random unit centres,
L2-normalised like the engine's embeddings) at 10k and 100k points, queried by held-out
points of the same distribution; then the real Major TOM cell (spectral features of a pool
cut with stride 32, as ``anneal-geo index`` builds for a bare pool). For each: build time,
median single-query latency and recall@20 of exact ``IndexFlatL2`` and of ``IndexHNSWFlat``
(M=32, efConstruction=200, built on all faiss threads) at several efSearch. Writes
``benchmarks/results/index_recall.json``.

    .venv/bin/python benchmarks/index_recall.py                 # 10k and 100k, real pool
    .venv/bin/python benchmarks/index_recall.py --sizes 10000   # quicker
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from anneal_geo.retrieval.geoindex import HNSW_EF_CONSTRUCTION, HNSW_M, HNSW_THRESHOLD

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"
K = 20


def clustered(
    n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """``n`` L2-normalised points around ``clusters`` random unit centres."""
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    points = centres[labels] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def latency_ms(index: Any, queries: np.ndarray, k: int) -> float:
    """Median wall time of one query at a time (the CLI's use), in milliseconds, on one
    faiss thread as GeoIndex.search runs it (see there why)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        for q in queries:
            t0 = time.perf_counter()
            index.search(q[None], k)
            times.append(time.perf_counter() - t0)
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(times) * 1000)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top-k found among the approximate top-k."""
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / truth.shape[1])


def measure(name: str, data: np.ndarray, queries: np.ndarray, efs: list[int]) -> dict[str, Any]:
    dim = data.shape[1]
    t0 = time.perf_counter()
    flat = faiss.IndexFlatL2(dim)
    flat.add(data)
    flat_build = time.perf_counter() - t0
    _, truth = flat.search(queries, K)
    row: dict[str, Any] = {
        "data": name,
        "n": int(data.shape[0]),
        "dim": int(dim),
        "queries": int(queries.shape[0]),
        "flat": {
            "build_s": round(flat_build, 3),
            "latency_ms": round(latency_ms(flat, queries, K), 3),
            "recall@20": 1.0,
        },
        "hnsw": [],
    }
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, HNSW_M)
    hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    hnsw.add(data)
    row["hnsw_build_s"] = round(time.perf_counter() - t0, 3)
    for ef in efs:
        hnsw.hnsw.efSearch = ef
        _, found = hnsw.search(queries, K)
        row["hnsw"].append(
            {
                "ef_search": ef,
                "recall@20": round(recall(found, truth), 4),
                "latency_ms": round(latency_ms(hnsw, queries, K), 3),
            }
        )
    print(
        f"{name:>24}  n={row['n']:>7}  flat: build {row['flat']['build_s']:.2f} s, "
        f"{row['flat']['latency_ms']:.2f} ms/query | hnsw: build {row['hnsw_build_s']:.1f} s, "
        + ", ".join(
            f"ef{h['ef_search']}: R@20 {h['recall@20']:.3f} {h['latency_ms']:.2f} ms"
            for h in row["hnsw"]
        ),
        flush=True,
    )
    return row


def real_pool(n_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spectral embeddings of the Major TOM cell cut at stride 32, as `anneal-geo index`
    computes them for a bare pool; queries are a random subset of the patches."""
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.retrieval.geoindex import spectral_embeddings

    pool = PatchPool.from_tiles(SAMPLE / "majortom_s2l2a_tile", 64, stride=32, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        pool.save(tmp)
        embeddings, _ = spectral_embeddings(PatchPool.open(tmp))
    ids = rng.choice(len(embeddings), size=min(n_queries, len(embeddings)), replace=False)
    return embeddings, embeddings[ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument(
        "--spreads", default="0.6,1.2", help="cluster spread(s): 0.6 tight, 1.2 overlapping"
    )
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ef", default="32,64,128,256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-real", action="store_true", help="skip the Major TOM pool")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    efs = [int(e) for e in args.ef.split(",")]
    rows = []
    for spread in (float(s) for s in args.spreads.split(",")):
        for n in (int(s) for s in args.sizes.split(",")):
            points = clustered(n + args.queries, args.dim, args.clusters, spread, rng)
            name = f"synthetic, spread {spread:g}"
            rows.append(measure(name, points[:n], points[n:], efs) | {"spread": spread})
    if not args.no_real:
        data, queries = real_pool(args.queries, rng)
        rows.append(measure("Major TOM cell, stride 32", data, queries, efs))
    out = {
        "k": K,
        "hnsw_m": HNSW_M,
        "hnsw_ef_construction": HNSW_EF_CONSTRUCTION,
        "hnsw_threshold": HNSW_THRESHOLD,
        "faiss_threads": faiss.omp_get_max_threads(),
        "settings": vars(args),
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index_recall.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'index_recall.json'}")


if __name__ == "__main__":
    main()
