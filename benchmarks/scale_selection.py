"""Selection at scale: one round's pair selection on 10k, 100k and 1M synthetic embeddings.

Times each stage of the engine's ``select_pairs`` (neighbour search, far pairs, scoring,
short-list, clustering) and samples the process's resident memory during each, for the
``knn`` candidates (exact k-NN graph up to 20k patches, IVF above) and, where it can run,
the ``exhaustive`` candidates; the ratios knn / exhaustive are in the table. Every
configuration runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own.

The embeddings are synthetic, clustered and seeded: 64 clusters around random unit centres,
each spread along its own 8-dimensional subspace plus isotropic noise, L2-normalised like the
engine's (D = 128). MGUE is fitted on 300 labelled pairs (half same-cluster, half random),
the k-means selector picks b = 1,000 pairs from a short-list of h = 10,000, as the engine
does with its defaults. The stage timings come from a copy of ``select_pairs`` with timers
(:func:`staged_select_pairs`); the same inputs are then run through the engine's own
``select_pairs`` and the two selections are checked to be identical.

    .venv/bin/python benchmarks/scale_selection.py                       # 10k, 100k, 1M
    .venv/bin/python benchmarks/scale_selection.py --sizes 10000,100000  # quicker

Writes ``benchmarks/results/scale_selection.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

#: Synthetic embedding settings (recorded in the JSON).
SYNTHETIC = {"dim": 128, "clusters": 64, "latent": 8, "noise": 0.02}


# -- data ------------------------------------------------------------------------------------


def clustered_embeddings(
    n: int,
    dim: int = 128,
    clusters: int = 64,
    latent: int = 8,
    noise: float = 0.02,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised points in ``clusters`` clusters, and each point's cluster.

    A cluster is a random unit centre plus a random ``latent``-dimensional subspace (so
    clusters have shape, like learned embeddings of a land-cover class, rather than being
    isotropic balls) plus isotropic noise of standard deviation ``noise`` per dimension.
    Generated in chunks, so the only large array is the result.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((clusters, latent, dim)).astype(np.float32)
    basis *= 0.35 / np.sqrt(latent)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    step = 65_536
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = labels[lo:hi]
        z = rng.standard_normal((hi - lo, latent)).astype(np.float32)
        x = centres[c] + np.einsum("nl,nld->nd", z, basis[c])
        x += noise * rng.standard_normal((hi - lo, dim)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels


def labelled_pairs(
    labels: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` labelled pairs, half within a cluster (similar), half random (mostly not)."""
    n = labels.size
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(labels.max() + 2))
    half = count // 2
    a = rng.integers(0, n, half)
    c = labels[a]
    b = order[starts[c] + (rng.random(half) * (starts[c + 1] - starts[c])).astype(np.int64)]
    same = np.stack([a, b], axis=1)
    rand = rng.integers(0, n, (count - half, 2))
    pairs = np.sort(np.concatenate([same, rand]), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = np.unique(pairs, axis=0)
    return pairs.astype(np.int64), (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)


# -- memory ----------------------------------------------------------------------------------


class MemoryMonitor:
    """Samples the resident set size every few milliseconds and keeps the peak per stage.

    Uses psutil when installed, else /proc/self/statm (Linux). Stages may interleave (the
    engine scores a block, then merges the short-list, then scores the next): each sample
    goes to the stage running at that moment.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.stage = "idle"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        try:
            import psutil

            proc = psutil.Process()
            self._rss = lambda: int(proc.memory_info().rss)
            self.source = "psutil"
        except ImportError:  # psutil is optional; /proc works on Linux
            page = os.sysconf("SC_PAGE_SIZE")

            def statm() -> int:
                with open("/proc/self/statm") as fh:
                    return int(fh.read().split()[1]) * page

            self._rss = statm
            self.source = "/proc/self/statm"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> int:
        rss = self._rss()
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
        return rss

    @contextmanager
    def during(self, stage: str) -> Iterator[None]:
        before = self.stage
        self.sample()
        self.stage = stage
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self.stage = before

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- the engine's select_pairs with timers ---------------------------------------------------


class _Clock:
    """Wall and CPU seconds per stage, summed over the stage's visits."""

    def __init__(self, monitor: MemoryMonitor) -> None:
        self.monitor = monitor
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        with self.monitor.during(name):
            yield
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0


def staged_select_pairs(
    embeddings: np.ndarray,
    archive_ids: np.ndarray,
    exclude: np.ndarray,
    estimator: Any,
    selector: Any,
    budget: int,
    rng: np.random.Generator,
    clock: _Clock,
    *,
    candidates: str = "auto",
    knn_k: int = 50,
    far_fraction: float = 0.1,
    shortlist_factor: int = 10,
    knn_method: str = "auto",
) -> tuple[np.ndarray, dict[str, Any]]:
    """``anneal_geo.engine.select_pairs``, step for step, with each stage timed.

    Same candidates, same blocks, same short-list merge and order, same selector call and
    the same use of ``rng``, so the selection is identical (the benchmark checks it). The
    knn candidates are built by ``knn_candidates`` itself, which reports the time of its
    neighbour search and of its far-pair sampling; both are one ``neighbours`` memory stage.
    """
    from anneal_geo.engine import _top_h
    from anneal_geo.pairs.candidates import (
        DEFAULT_BLOCK_SIZE,
        default_mode,
        exhaustive_blocks,
        knn_candidates,
    )
    from anneal_geo.selectors.descriptors import pair_descriptors

    mode = default_mode(len(archive_ids)) if candidates == "auto" else candidates
    h = max(budget, shortlist_factor * budget)
    best_pairs = np.zeros((0, 2), dtype=np.int64)
    best_u = np.zeros(0, dtype=np.float64)
    n_candidates = 0
    knn_stats: dict[str, Any] = {}
    if mode == "knn":
        with clock.stage("neighbours"):
            pairs = knn_candidates(
                embeddings, archive_ids, knn_k, far_fraction, exclude, rng,
                method=knn_method, stats=knn_stats,
            )
        size = DEFAULT_BLOCK_SIZE
        blocks: Iterator[np.ndarray] = (
            pairs[lo : lo + size] for lo in range(0, pairs.shape[0], size)
        )
    elif mode == "exhaustive":
        blocks = exhaustive_blocks(archive_ids, exclude, DEFAULT_BLOCK_SIZE)
    else:
        raise SystemExit(f"mode {mode} is not benchmarked")
    while True:
        with clock.stage("candidates"):  # enumerating exhaustive blocks (lazy); ~0 for knn
            block = next(blocks, None)
        if block is None:
            break
        if block.shape[0] == 0:
            continue
        n_candidates += int(block.shape[0])
        with clock.stage("scoring"):
            u = estimator.checked_score(embeddings, block)
        with clock.stage("shortlist"):
            best_pairs, best_u = _top_h(best_pairs, best_u, block, u, h)
    with clock.stage("shortlist"):
        order = np.lexsort((best_pairs[:, 1], best_pairs[:, 0], -best_u))
        best_pairs, best_u = best_pairs[order], best_u[order]
    with clock.stage("clustering"):
        descriptors = pair_descriptors(embeddings, best_pairs)
        picked = selector.checked_select(descriptors, best_u, budget, rng)
    stats = {
        "candidates": mode,
        "n_candidates": n_candidates,
        "shortlist": int(best_pairs.shape[0]),
        "mean_uncertainty_selected": float(best_u[picked].mean()),
        "mean_uncertainty_shortlist": float(best_u.mean()),
        **knn_stats,
    }
    return best_pairs[picked], stats | {"_shortlist_pairs": best_pairs}


# -- one configuration (run in a subprocess) -------------------------------------------------


def edge_recall(
    embeddings: np.ndarray, pairs: np.ndarray, k: int, rng: np.random.Generator, queries: int
) -> dict[str, float]:
    """Share of the exact k-NN pairs of sampled points found among ``pairs`` (sorted, all ids
    0..n-1), and the mean distance to a point's k nearest partners in ``pairs`` over the
    mean exact k-NN distance (1.0: the graph's neighbours are as close as the true ones)."""
    import faiss

    from anneal_geo.pairs.candidates import in_sorted, pair_keys

    n = embeddings.shape[0]
    q = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    _, exact = faiss.knn(embeddings[q], embeddings, k + 1)
    keys = pair_keys(pairs, n)  # sorted: knn_candidates returns pairs in key order
    by_second = np.argsort(pairs[:, 1], kind="stable")
    second = pairs[by_second, 1]
    found, exact_d, got_d = 0, [], []
    for row, i in enumerate(q):
        nbr = exact[row][exact[row] != i][:k]
        want = np.minimum(nbr, i) * np.int64(n) + np.maximum(nbr, i)
        found += int(in_sorted(want, keys).sum())
        exact_d.append(np.linalg.norm(embeddings[nbr] - embeddings[i], axis=1).mean())
        lo, hi = np.searchsorted(pairs[:, 0], [i, i + 1])
        lo2, hi2 = np.searchsorted(second, [i, i + 1])
        partners = np.concatenate([pairs[lo:hi, 1], pairs[by_second[lo2:hi2], 0]])
        if partners.size:
            d = np.sort(np.linalg.norm(embeddings[partners] - embeddings[i], axis=1))[:k]
            got_d.append(d.mean())
    return {
        "edge_recall": round(found / (k * q.size), 4),
        "distance_ratio": round(float(np.mean(got_d) / np.mean(exact_d)), 4),
        "recall_queries": int(q.size),
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from anneal_geo.engine import select_pairs
    from anneal_geo.estimators.mgue import MGUEEstimator, pair_distances
    from anneal_geo.pairs.candidates import in_sorted, knn_candidates, pair_keys
    from anneal_geo.selectors.kmeans import KMeansSelector

    monitor = MemoryMonitor()
    clock = _Clock(monitor)
    load_before = os.getloadavg()
    with clock.stage("data"):
        emb, labels = clustered_embeddings(args.n, seed=args.seed, **SYNTHETIC)
        ids = np.arange(args.n, dtype=np.int64)
        pairs, answers = labelled_pairs(labels, args.labelled, np.random.default_rng(args.seed))
    rss_data = monitor.sample()
    estimator = MGUEEstimator()
    estimator.checked_fit(emb, pairs, answers)
    selector = KMeansSelector(seed=args.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    chosen, stats = staged_select_pairs(
        emb, ids, pairs, estimator, selector, args.budget, np.random.default_rng([args.seed, 1]),
        clock, candidates=args.mode, knn_k=args.k, knn_method=args.method,
    )
    total_wall, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_select = max(v for s, v in monitor.peaks.items() if s != "data")
    shortlist = stats.pop("_shortlist_pairs")
    row: dict[str, Any] = {
        "n": args.n,
        "mode": args.mode,
        "k": args.k if args.mode == "knn" else None,
        "method": stats.get("knn_method"),
        "labelled_pairs": len(pairs),
        "tau": round(float(estimator.threshold_), 4),
        "budget": args.budget,
        **{k: v for k, v in stats.items() if not k.startswith("seconds_")},
        "seconds_total": round(total_wall, 2),
        "cpu_seconds_total": round(total_cpu, 2),
        "seconds": {k: round(v, 3) for k, v in clock.wall.items() if k != "data"},
        "cpu_seconds": {k: round(v, 3) for k, v in clock.cpu.items() if k != "data"},
        "knn_split_seconds": {
            k: stats[k] for k in ("seconds_neighbours", "seconds_far") if k in stats
        },
        "rss_after_data_mb": round(rss_data / 2**20, 1),
        "peak_rss_mb": {
            k: round(v / 2**20, 1) for k, v in monitor.peaks.items() if k not in ("idle",)
        },
        "peak_rss_select_mb": round(peak_select / 2**20, 1),
        "memory_source": monitor.source,
    }
    if args.check_engine and args.method == "auto":  # the engine always uses "auto"
        t0 = time.perf_counter()
        engine_chosen, _ = select_pairs(
            emb, ids, pairs, estimator, KMeansSelector(seed=args.seed), args.budget,
            np.random.default_rng([args.seed, 1]), candidates=args.mode, knn_k=args.k,
        )
        row["engine_select_pairs_seconds"] = round(time.perf_counter() - t0, 2)
        row["engine_select_pairs_identical"] = bool(np.array_equal(engine_chosen, chosen))
    if args.mode == "knn":
        # Outside the timings: where the uncertain pairs come from, and graph quality.
        edges = knn_candidates(emb, ids, args.k, 0.0, pairs, 0, method=args.method)
        in_graph = in_sorted(pair_keys(shortlist, args.n), pair_keys(edges, args.n))
        row["shortlist_from_knn_edges"] = round(float(in_graph.mean()), 4)
        d = pair_distances(emb, edges[:: max(1, edges.shape[0] // 200_000)])
        row["knn_edge_distance_quantiles"] = [
            round(float(x), 4) for x in np.quantile(d, [0.5, 0.99])
        ]
        if args.recall_queries:
            allp = knn_candidates(emb, ids, args.k, 0.0, None, 0, method=args.method)
            row |= edge_recall(emb, allp, args.k, np.random.default_rng(5), args.recall_queries)
    row["peak_rss_process_mb"] = round(peak_rss_bytes() / 2**20, 1)
    row["loadavg_before"] = [round(x, 2) for x in load_before]
    row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    monitor.close()
    return row


# -- driver ----------------------------------------------------------------------------------


def spawn(n: int, mode: str, k: int, method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", "--n", str(n), "--mode", mode, "--k", str(k),
        "--method", method, "--seed", str(args.seed), "--budget", str(args.budget),
        "--labelled", str(args.labelled), "--recall-queries", str(args.recall_queries),
    ]
    if not args.no_check_engine:
        cmd.append("--check-engine")
    print(f"... n={n} mode={mode} k={k} method={method}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    stages = ("neighbours", "candidates", "scoring", "shortlist", "clustering")
    head = (
        f"{'n':>9} {'mode':>10} {'K':>3} {'cands':>10} "
        + " ".join(f"{s[:10]:>10}" for s in stages)
        + f" {'total s':>8} {'cpu s':>7} {'peak MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mode = r["mode"] if r["mode"] != "knn" else f"knn-{r['method']}"
        lines.append(
            f"{r['n']:>9} {mode:>10} {r['k'] or '':>3} {r['n_candidates']:>10} "
            + " ".join(f"{r['seconds'].get(s, 0.0):>10.2f}" for s in stages)
            + f" {r['seconds_total']:>8.1f} {r['cpu_seconds_total']:>7.1f}"
            f" {r['peak_rss_process_mb']:>8.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--k", type=int, default=10, help="K of the knn runs at every size")
    parser.add_argument(
        "--extra", default="10000:50,100000:50,1000000:50",
        help="more knn runs as n:K (the engine's default K = 50)",
    )
    parser.add_argument("--exact-check", default="100000", help="sizes also run with exact k-NN")
    parser.add_argument("--exhaustive-max", type=int, default=10_000)
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--labelled", type=int, default=300)
    parser.add_argument("--recall-queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check-engine", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "scale_selection.json"))
    # worker mode
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="knn", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--check-engine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args)))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    extra = [tuple(int(v) for v in e.split(":")) for e in args.extra.split(",") if e]
    exact_check = {int(s) for s in args.exact_check.split(",") if s}
    rows = []
    for n in sizes:
        rows.append(spawn(n, "knn", args.k, "auto", args))
        rows.extend(spawn(n, "knn", k, "auto", args) for en, k in extra if en == n)
        if n in exact_check and n > 20_000:
            rows.append(spawn(n, "knn", args.k, "exact", args))
        if n <= args.exhaustive_max:
            rows.append(spawn(n, "exhaustive", args.k, "auto", args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)

    # Ratios: knn against exhaustive at the same n; growth of the K = args.k runs.
    ratios: list[dict[str, Any]] = []
    for r in rows:
        if r["mode"] != "exhaustive":
            continue
        for q in rows:
            if q["n"] == r["n"] and q["mode"] == "knn":
                ratios.append({
                    "n": r["n"], "k": q["k"],
                    "time_knn_over_exhaustive": round(q["seconds_total"] / r["seconds_total"], 4),
                    "cpu_knn_over_exhaustive": round(
                        q["cpu_seconds_total"] / r["cpu_seconds_total"], 4
                    ),
                    "peak_rss_knn_over_exhaustive": round(
                        q["peak_rss_process_mb"] / r["peak_rss_process_mb"], 4
                    ),
                    "candidates_knn_over_exhaustive": round(
                        q["n_candidates"] / r["n_candidates"], 6
                    ),
                })
    base = [r for r in rows if r["mode"] == "knn" and r["k"] == args.k and r["method"] == "ivf"]
    growth = []
    for a, b in itertools.pairwise(base):
        growth.append({
            "from_n": a["n"], "to_n": b["n"], "n_ratio": b["n"] / a["n"],
            "time_ratio": round(b["seconds_total"] / a["seconds_total"], 2),
            "cpu_ratio": round(b["cpu_seconds_total"] / a["cpu_seconds_total"], 2),
            "neighbour_cpu_ratio": round(
                b["cpu_seconds"]["neighbours"] / a["cpu_seconds"]["neighbours"], 2
            ),
            "peak_rss_ratio": round(b["peak_rss_process_mb"] / a["peak_rss_process_mb"], 2),
        })
    exhaustive_pairs_per_s = [
        r["n_candidates"] / r["seconds_total"] for r in rows if r["mode"] == "exhaustive"
    ]
    extrapolated = []
    if exhaustive_pairs_per_s:
        rate = exhaustive_pairs_per_s[-1]
        for n in sizes:
            if n > args.exhaustive_max:
                pairs = n * (n - 1) // 2
                extrapolated.append(
                    {"n": n, "pairs": pairs, "seconds_estimate": round(pairs / rate)}
                )
    print()
    print(table(rows))
    print("\nknn / exhaustive:", json.dumps(ratios))
    print("growth:", json.dumps(growth))
    print("exhaustive extrapolated (not run):", json.dumps(extrapolated))
    out = {
        "synthetic": SYNTHETIC,
        "machine": {"cpus": os.cpu_count(), "note": "2-core machine shared with other jobs"},
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "n", "mode")},
        "results": rows,
        "ratios_knn_over_exhaustive": ratios,
        "growth": growth,
        "exhaustive_extrapolated": extrapolated,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
