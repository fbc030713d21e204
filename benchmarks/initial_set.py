"""The initial set at scale: round 0's pairs from 10k, 100k and 1M synthetic embeddings, by the
two ``initial_design`` settings.

- ``random`` (the baseline, the earlier default): half the pairs among 3 nearest neighbours
  of the starting embedding (the engine's k-NN candidate graph over the whole archive), half
  random pairs (:func:`anneal_geo.engine.initial_pairs`);
- ``clusters`` (the default): k-means into ``initial // 2`` groups on a sample, every row
  assigned in chunks, each group's medoid with a random member and with the nearest group's
  medoid (:func:`anneal_geo.engine.cluster_initial_pairs`).

The embeddings are those of ``scale_selection.py`` (clustered, seeded, L2-normalised; D =
376 here, the width of a mixed ``texture`` session's embedding). Every (size, design) runs in
a fresh subprocess; its wall time and the peak of its resident set above the embeddings
(sampled at 200 Hz) are recorded, and the table gives clusters / random as ratios. Also
reported: the share of each design's pairs whose two patches come from the same synthetic
cluster (random pairs: about 1/64).

    .venv/bin/python benchmarks/initial_set.py                     # 10k, 100k, 1M
    .venv/bin/python benchmarks/initial_set.py --sizes 10000,100000

Writes ``benchmarks/results/initial_set.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_selection import MemoryMonitor, clustered_embeddings

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 376


def run_one(n: int, design: str, count: int) -> dict[str, Any]:
    from anneal_geo.engine import cluster_initial_pairs, initial_pairs

    emb, cluster = clustered_embeddings(n, dim=DIM, seed=0)
    ids = np.arange(n, dtype=np.int64)
    monitor = MemoryMonitor()
    base = monitor.sample()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with monitor.during("initial"):
        if design == "clusters":
            pairs, _ = cluster_initial_pairs(emb, ids, count, rng)
        else:
            pairs, _ = initial_pairs(emb, ids, count, 0.5, rng)
    seconds = time.perf_counter() - t0
    monitor.close()
    same = float(np.mean(cluster[pairs[:, 0]] == cluster[pairs[:, 1]]))
    return {
        "n": n,
        "design": design,
        "pairs": len(pairs),
        "seconds": round(seconds, 3),
        "peak_rss_above_embeddings_mb": round((monitor.peaks["initial"] - base) / 2**20, 1),
        "same_cluster_share": round(same, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--initial", type=int, default=100)
    parser.add_argument("--one", nargs=2, metavar=("N", "DESIGN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.initial)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        pair = {}
        for design in ("random", "clusters"):
            cmd = [sys.executable, __file__, "--one", str(n), design]
            cmd += ["--initial", str(args.initial)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            pair[design] = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(pair[design])
        r, c = pair["random"], pair["clusters"]
        print(
            f"{n:>9,} patches: random {r['seconds']:6.2f} s "
            f"{r['peak_rss_above_embeddings_mb']:7.1f} MB (same cluster "
            f"{r['same_cluster_share']:.2f}); clusters {c['seconds']:6.2f} s "
            f"{c['peak_rss_above_embeddings_mb']:7.1f} MB (same cluster "
            f"{c['same_cluster_share']:.2f}); time clusters / random "
            f"{c['seconds'] / max(r['seconds'], 1e-9):.2f}",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "initial_set",
        "dim": DIM,
        "initial": args.initial,
        "cores": len(os.sched_getaffinity(0)),
        "results": rows,
    }
    target = RESULTS / "initial_set.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
