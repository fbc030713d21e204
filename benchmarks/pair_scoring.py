"""Scoring candidate pairs: MGUE's pair distances with faiss (``pairwise_indexed_L2sqr``,
what ``pair_distances`` does) against the NumPy way it replaced (gather both rows of each
pair into (block, D) arrays, subtract, square and sum), in the same process on the same
pairs.

The embeddings are synthetic and shaped like the million-patch archive's (376 dimensions:
a 128-d head beside 248 texture features), the pairs a k-NN graph's plus far ones: each
patch's nearest neighbours among the rows near it, so the first row of a pair is read in
order and the second almost at random, as in ``knn_candidates``' sorted output.

    .venv/bin/python benchmarks/pair_scoring.py [--sizes 100000,1000000] [--dim 376]

Prints a table; writes ``benchmarks/results/pair_scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 65_536


def numpy_distances(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The previous ``pair_distances``: gathered rows, difference, einsum (the baseline)."""
    out = np.empty(pairs.shape[0], dtype=np.float64)
    for start in range(0, pairs.shape[0], BLOCK):
        chunk = pairs[start : start + BLOCK]
        diff = embeddings[chunk[:, 0]] - embeddings[chunk[:, 1]]
        out[start : start + len(chunk)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def make_case(n: int, dim: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit-norm embeddings and about 1.1 n k sorted candidate pairs."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    left = np.repeat(np.arange(n, dtype=np.int64), k)
    right = rng.integers(0, n, size=left.size, dtype=np.int64)
    far = rng.integers(0, n, size=(left.size // 10, 2), dtype=np.int64)
    pairs = np.concatenate([np.stack([left, right], axis=1), far])
    pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return emb, pairs[order]


def fastest(call: Any, repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` timed calls (after one warm-up) and the last result."""
    result = call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - t0)
    return best, result


def measure(n: int, dim: int, k: int, repeats: int, scorer: Any) -> dict[str, Any]:
    """Both ways on one case: seconds (fastest of ``repeats``), their ratio, agreement."""
    emb, pairs = make_case(n, dim, k)
    t_numpy, ref = fastest(lambda: numpy_distances(emb, pairs), repeats)
    t_faiss, got = fastest(lambda: scorer(emb, pairs), repeats)
    return {
        "patches": n,
        "dim": dim,
        "pairs": int(pairs.shape[0]),
        "seconds_numpy": round(t_numpy, 3),
        "seconds_faiss": round(t_faiss, 3),
        "ratio_faiss_to_numpy": round(t_faiss / t_numpy, 3),
        "max_abs_difference": float(np.abs(got - ref).max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=376)
    parser.add_argument("--k", type=int, default=10, help="neighbours per patch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "pair_scoring.json"))
    args = parser.parse_args(argv)

    from anneal_geo.estimators.mgue import pair_distances

    rows = []
    header = ("patches", "pairs", "numpy s", "faiss s", "ratio", "max |diff|")
    print("{:>10} {:>11} {:>9} {:>9} {:>7} {:>11}".format(*header))
    for n in (int(s) for s in args.sizes.split(",")):
        row = measure(n, args.dim, args.k, args.repeats, pair_distances)
        rows.append(row)
        print(f"{n:>10,} {row['pairs']:>11,} {row['seconds_numpy']:>9.2f} "
              f"{row['seconds_faiss']:>9.2f} {row['ratio_faiss_to_numpy']:>6.2f}x "
              f"{row['max_abs_difference']:>11.1e}")  # fmt: skip
    result = {
        "benchmark": "pair_scoring",
        "baseline": "NumPy gather + einsum in blocks of 65,536 pairs (the previous pair_distances)",
        "repeats": args.repeats,
        "k": args.k,
        "results": rows,
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
