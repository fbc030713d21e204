"""The k-NN candidate graph on wide embeddings: IVF search in the full embedding against the
same search on its leading principal components (what ``knn_candidates`` does above
``IVF_MAX_DIM`` dimensions), on a real session's embeddings.

For each variant: the time of the graph (``seconds_neighbours`` of ``knn_candidates``) and
its edge recall: the share of the exact k nearest neighbours (in the full embedding) of
sampled patches that the graph holds, plus how much farther the graph's k nearest partners
of a patch are than its exact ones (1.0: as close). The baseline, the full-dimension search,
runs in the same process on the same embeddings.

    .venv/bin/python benchmarks/knn_projection.py SESSION_DIR_OR_EMBEDDINGS.npy

Given a session folder, the embeddings are the vectors of its exact index
(``index.faiss``; ``archive_end_to_end.py --keep`` leaves a 100k-patch session with one
under ``/tmp/anneal-archive/run_100000/session``).
Writes ``benchmarks/results/knn_projection.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _edge_recall() -> Any:
    """``edge_recall`` of benchmarks/scale_selection.py (one definition for both)."""
    path = Path(__file__).resolve().parent / "scale_selection.py"
    spec = importlib.util.spec_from_file_location("scale_selection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_selection"] = module
    spec.loader.exec_module(module)
    return module.edge_recall


def load_embeddings(path: Path) -> np.ndarray:
    """An (N, D) ``.npy``, or the vectors of a session's exact index (``index.faiss``)."""
    if path.is_dir():
        path = path / "index.faiss"
    if path.suffix == ".npy" and path.is_file():
        return np.ascontiguousarray(np.load(path), dtype=np.float32)
    if path.suffix == ".faiss" and path.is_file():
        import faiss

        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexFlat):
            raise SystemExit(f"error: {path} is not an exact (flat) index; index with --kind flat")
        return np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
    raise SystemExit(f"error: {path} is neither an embeddings .npy nor a session's index.faiss")


def run(
    emb: np.ndarray, k: int, dims: list[int], queries: int, seed: int, repeat: int
) -> list[dict]:
    from anneal_geo.pairs import candidates

    edge_recall = _edge_recall()
    ids = np.arange(emb.shape[0], dtype=np.int64)
    # One untimed search first: faiss's and numpy's first calls pay their start-up, which
    # would otherwise be charged to whichever variant runs first.
    candidates.knn_candidates(emb[: min(len(emb), 5000)], ids[: min(len(emb), 5000)], k, 0.0,
                              None, 0, method="ivf")
    rows = []
    for dim in dims:
        candidates.IVF_MAX_DIM = dim  # type: ignore[misc]
        graph, total = [], []
        for _ in range(repeat):  # the fastest of a few runs: others share the cores
            stats: dict[str, Any] = {}
            t0 = time.perf_counter()
            pairs = candidates.knn_candidates(emb, ids, k, 0.0, None, 0, method="ivf", stats=stats)
            total.append(time.perf_counter() - t0)
            graph.append(stats["seconds_neighbours"])
        recall = edge_recall(emb, pairs, k, np.random.default_rng(seed), queries)
        rows.append(
            {
                "search_dim": min(dim, emb.shape[1]),
                "seconds_graph": round(min(graph), 3),
                "seconds_total": round(min(total), 3),
                "edges": int(pairs.shape[0]),
                **recall,
            }
        )
        row = rows[-1]
        print(
            f"  search in {row['search_dim']:>4} dims: graph {row['seconds_graph']:>7.2f} s"
            f"  recall {recall['edge_recall']:.3f}  distance ratio {recall['distance_ratio']:.3f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", type=Path)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dims", default="100000,128,64", help="IVF_MAX_DIM values; the first "
                        "(wider than the embedding) is the full-dimension baseline")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (the fastest)")
    parser.add_argument("--out", default=str(RESULTS / "knn_projection.json"))
    args = parser.parse_args()
    emb = load_embeddings(args.embeddings)
    print(f"{emb.shape[0]:,} embeddings of {emb.shape[1]} dimensions, k = {args.k}", flush=True)
    load = os.getloadavg()
    rows = run(emb, args.k, [int(d) for d in args.dims.split(",")], args.queries, args.seed,
               args.repeat)
    base = rows[0]
    for row in rows:
        row["time_ratio_to_full"] = round(row["seconds_graph"] / base["seconds_graph"], 3)
        row["recall_ratio_to_full"] = round(row["edge_recall"] / base["edge_recall"], 3)
    print(f"\n{'search dims':>12}{'graph s':>10}{'x full':>8}{'recall':>8}{'x full':>8}"
          f"{'dist ratio':>12}")
    for row in rows:
        print(f"{row['search_dim']:>12}{row['seconds_graph']:>10.2f}{row['time_ratio_to_full']:>8.2f}"
              f"{row['edge_recall']:>8.3f}{row['recall_ratio_to_full']:>8.2f}"
              f"{row['distance_ratio']:>12.3f}")
    out = {
        "benchmark": "knn_projection",
        "embeddings": str(args.embeddings),
        "n": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
        "k": args.k,
        "repeat": args.repeat,
        "load_average_before": [round(v, 2) for v in load],
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
