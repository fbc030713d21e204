"""Embedding a large pool: streamed chunks from the memory-mapped patches, bounded memory.

Writes a synthetic pool directory (default 50,000 patches of 13 x 32 x 32 uint16, 1.3 GB;
real-looking per-class band levels, not real images) and embeds it with the spectral trunk
five ways, each in a fresh process so its memory is its own:

- ``in-process``: :func:`anneal_geo.distributed.embed_pool` without Dask, result to .npy;
- ``trainer``: the engine's path, ``Trainer.cache_features(pool.float_patches, n)``;
- ``trainer-memmap``: ``Trainer.cache_features(pool.patches)``, the memory map itself;
- ``local-cluster``: ``embed_pool`` on a Dask LocalCluster of 2 worker processes;
- ``head-only``: a round's re-embedding in head mode, the head on cached trunk features.

For each: wall time, patches per second, and the peak anonymous memory (RssAnon: the
process's own allocations) next to the peak file-backed memory (RssFile: pages of the
memory-mapped patches, which the kernel reclaims under pressure; they grow with what was
read, not with what is held). All results are checked equal to the in-process one. The load
average before and after each run is recorded: the machine is shared.

    .venv/bin/python benchmarks/scale_embedding.py                 # 50k patches
    .venv/bin/python benchmarks/scale_embedding.py --n 10000       # quicker

Writes ``benchmarks/results/scale_embedding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12",
         "B8A"]


class ProcMemory:
    """Peak RssAnon and RssFile of this process (from /proc/self/status), sampled in a thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in self.peak:
                    out[key] = int(value.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.read().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.01)

    def close(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {f"peak_{k.lower()}_mb": round(v / 2**20, 1) for k, v in self.peak.items()}


def write_pool(directory: Path, n: int, size: int, seed: int) -> dict[str, Any]:
    """A synthetic 13-band uint16 pool of ``n`` patches, written chunk by chunk."""
    from anneal_geo.data.pool import PatchPool

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory.parent / (directory.name + "-raw.npy")
    patches = np.lib.format.open_memmap(raw, mode="w+", dtype=np.uint16, shape=(n, 13, size, size))
    levels = rng.uniform(300, 4000, size=(10, 13))  # ten "classes" of band levels
    step = 2048
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        cls = rng.integers(0, 10, hi - lo)
        base = levels[cls][:, :, None, None]
        texture = rng.normal(0, 1, (hi - lo, 1, size, size)) * base * 0.15
        noise = rng.normal(0, 40, (hi - lo, 13, size, size))
        patches[lo:hi] = np.clip(base + texture + noise, 0, 65535).astype(np.uint16)
    patches.flush()
    pool = PatchPool(patches, BANDS)  # band statistics are computed block by block
    pool.save(directory)
    del pool, patches
    raw.unlink()
    return {
        "n": n,
        "shape": [n, 13, size, size],
        "bytes": int(n * 13 * size * size * 2),
        "seconds_write": round(time.perf_counter() - t0, 1),
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One way of embedding, measured in this (fresh) process."""
    import torch  # noqa: F401  (imported before the baseline: every way needs it)

    from anneal_geo import plugins
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.distributed import embed_pool
    from anneal_geo.training import MetricModel, Trainer

    memory = ProcMemory()
    baseline = memory.read()  # the interpreter, torch and anneal-geo, before any patch
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    out = Path(args.workdir) / f"{args.way}.npy"
    extra: dict[str, Any] = {}
    if args.way == "in-process":
        embed_pool(args.pool, n_workers=0, chunk=args.chunk, out=out, progress=True)
    elif args.way == "local-cluster":
        stats: dict[str, Any] = {}
        embed_pool(
            args.pool, n_workers=args.workers, chunk=args.chunk, out=out, progress=True,
            stats=stats,
        )
        extra["workers"] = stats["workers"]
    elif args.way in ("trainer", "trainer-memmap"):
        pool = PatchPool.open(args.pool)
        trunk = plugins.create("backbones", "spectral").checked_build(
            pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
        )
        trainer = Trainer(MetricModel(trunk), mode="head", progress=True)
        if args.way == "trainer":  # what the engine passes: a get_batch function
            trainer.cache_features(pool.float_patches, len(pool), path=out)
        else:  # the memory-mapped array itself: the trainer reads consecutive ids as a slice
            trainer.cache_features(pool.patches, path=out)
    elif args.way == "head-only":
        pool = PatchPool.open(args.pool)
        trunk = plugins.create("backbones", "spectral").checked_build(
            pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
        )
        trainer = Trainer(MetricModel(trunk), mode="head", progress=False)
        features = np.load(Path(args.workdir) / "in-process.npy")
        t0 = time.perf_counter()  # only the re-embedding, as a round does it
        np.save(out, trainer.embed_features(features))
    seconds = time.perf_counter() - t0
    result = np.load(out, mmap_mode="r")
    peaks = memory.close()
    row = {
        "way": args.way,
        "seconds": round(seconds, 2),
        "patches_per_second": round(result.shape[0] / seconds, 1),
        "shape": list(result.shape),
        **extra,
        **peaks,
        "baseline_rssanon_mb": round(baseline["RssAnon"] / 2**20, 1),
        "baseline_rssfile_mb": round(baseline["RssFile"] / 2**20, 1),
        "added_rssanon_mb": round(peaks["peak_rssanon_mb"] - baseline["RssAnon"] / 2**20, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    return row


def spawn(way: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", "--way", way, "--pool", str(args.pool),
        "--workdir", str(args.workdir), "--chunk", str(args.chunk),
        "--workers", str(args.workers),
    ]
    print(f"... {way}", flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{way} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=32, help="patch side in pixels")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic pool")
    parser.add_argument("--out", default=str(RESULTS / "scale_embedding.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="anneal-embed-bench-"))
    try:
        args.pool = workdir / "pool"
        args.workdir = workdir
        print(f"writing a {args.n} x 13 x {args.size} x {args.size} uint16 pool ...", flush=True)
        pool_info = write_pool(args.pool, args.n, args.size, args.seed)
        ways = ("in-process", "trainer", "trainer-memmap", "local-cluster")
        rows = [spawn(way, args) for way in ways]
        rows.append(spawn("head-only", args))
        reference = np.load(workdir / "in-process.npy")
        for row in rows[1:4]:
            other = np.load(workdir / f"{row['way']}.npy")
            row["max_abs_difference_to_in_process"] = float(np.abs(other - reference).max())
        float32_bytes = pool_info["bytes"] * 2
        print()
        print(
            f"{'way':>14} {'seconds':>8} {'patch/s':>8} {'anon MB':>8} {'+anon MB':>8} "
            f"{'file MB':>8}"
        )
        for r in rows:
            print(
                f"{r['way']:>14} {r['seconds']:>8.1f} {r['patches_per_second']:>8.0f} "
                f"{r['peak_rssanon_mb']:>8.0f} {r['added_rssanon_mb']:>8.0f} "
                f"{r['peak_rssfile_mb']:>8.0f}"
            )
        print(
            f"pool on disk {pool_info['bytes'] / 2**20:.0f} MB; as float32 in memory it would "
            f"be {float32_bytes / 2**20:.0f} MB"
        )
        out = {
            "pool": pool_info,
            "backbone": "spectral",
            "chunk": args.chunk,
            "pool_as_float32_mb": round(float32_bytes / 2**20, 1),
            "machine": {"cpus": os.cpu_count(), "note": "2-core machine shared with other jobs"},
            "results": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    main()
