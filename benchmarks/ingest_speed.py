"""Ingest speed: patches per second from Sentinel-2 tiles to a saved pool, against the floor
of a plain rasterio windowed read of the same windows.

On the Major TOM cell in sample_tiles/ (12 bands at 10/20/60 m, or the four 10 m bands),
for several patch sizes:

- ``pool``: ``PatchPool.from_tiles`` (TorchGeo RasterDataset index and GriddedPatchSampler
  grid, then one windowed read per band of the files TorchGeo indexed, in reader threads,
  one per core, the first strips started while TorchGeo indexes) then ``pool.save``
  (patches.npy, footprints.gpkg, pool.json; a small pool's footprints.gpkg is written
  during ``from_tiles``, beside the reads, and copied by ``save``: both are timed), the
  path ``anneal-geo pool build`` takes, without the cloud mask (the floor does not read it
  either); ``pool + cloud mask`` with it (the default); ``pool, 1 worker``: the same in
  one thread (``num_workers=1``, ``--workers 1``);
- ``pool, read_block=1``: one TorchGeo ``__getitem__`` per patch, through a DataLoader;
- ``floor``: rasterio only, the same windows (from the pool's footprints), every band read
  with ``Window`` + ``out_shape`` and bilinear resampling onto the patch grid, into one
  array (no saving, no footprints, no statistics).

With ``--stores`` it compares the two pool kinds instead, per case: ``--store array``
(patches.npy) against ``--store tiles`` (windows.npz; pixels read from the tiles when
asked): build time to a saved pool, disk used, and the random-access read rate of 256
random patch ids (``pool.patches[ids]`` on a freshly opened pool, best of ``--repeat``),
the values checked equal. Those rows go under ``"stores"`` in the same JSON file.

Each timing is the best of ``--repeat`` runs after a warm-up (TorchGeo's import, about 5 s,
is paid once per process and not counted); a saved pool is timed until ``save`` returns
(removing the temporary pool afterwards is not counted). The floor's values are checked equal to the
pool's. Writes ``benchmarks/results/ingest_speed.json``.

    .venv/bin/python benchmarks/ingest_speed.py
    .venv/bin/python benchmarks/ingest_speed.py --stores --sizes 32,64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from anneal_geo.data.pool import PatchPool
from anneal_geo.data.tiles import find_scenes

RESULTS = Path(__file__).resolve().parent / "results"
CELL = Path(__file__).resolve().parent.parent / "sample_tiles" / "majortom_s2l2a_tile"


def floor_read(pool: PatchPool, band_files: dict[str, Path]) -> tuple[np.ndarray, float]:
    """Read the pool's windows band by band with plain rasterio; return (patches, seconds)."""
    fp = pool.footprints
    size = pool.patch_size[0]
    rows = fp["row_off"].to_numpy()
    cols = fp["col_off"].to_numpy()
    t0 = time.perf_counter()
    out = np.empty(pool.patches.shape, dtype=pool.patches.dtype)
    handles = [rasterio.open(band_files[b]) for b in pool.bands]
    try:
        reference = handles[0].res[0] if pool.resolution is None else pool.resolution
        for c, src in enumerate(handles):
            scale = reference / src.res[0]  # source pixels per pool pixel
            for i in range(len(rows)):
                window = Window(cols[i] * scale, rows[i] * scale, size * scale, size * scale)
                out[i, c] = src.read(
                    1, window=window, out_shape=(size, size), resampling=Resampling.bilinear
                )
    finally:
        for src in handles:
            src.close()
    return out, time.perf_counter() - t0


def timed_pool(options: dict[str, Any], repeat: int) -> tuple[PatchPool, float, float]:
    """Best (read, read + save) seconds of ``from_tiles`` and ``save``."""
    best_read, best_total = float("inf"), float("inf")
    pool = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        pool = PatchPool.from_tiles(CELL, progress=False, **options)
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            pool.save(tmp)
            t2 = time.perf_counter()
        best_read, best_total = min(best_read, t1 - t0), min(best_total, t2 - t0)
    assert pool is not None
    return pool, best_read, best_total


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def store_rows(sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    """Array store against tiles store: build, disk, random reads (see the module doc)."""
    rows = []
    ten_m = ["B02", "B03", "B04", "B08"]
    for bands in (None, ten_m):
        for size in sizes:
            options: dict[str, Any] = {"bands": bands, "progress": False}
            with tempfile.TemporaryDirectory() as tmp:
                build: dict[str, float] = {}
                for store in ("array", "tiles"):
                    best = float("inf")
                    for _ in range(repeat):
                        out = Path(tmp) / store
                        shutil.rmtree(out, ignore_errors=True)
                        t0 = time.perf_counter()
                        if store == "array":
                            PatchPool.from_tiles(CELL, size, **options).save(out)
                        else:
                            PatchPool.from_tiles(CELL, size, store="tiles", out=out, **options)
                        best = min(best, time.perf_counter() - t0)
                    build[store] = best
                n = len(PatchPool.open(Path(tmp) / "array"))
                ids = np.random.default_rng(0).integers(0, n, 256)
                read: dict[str, float] = {}
                values = {}
                for store in ("array", "tiles"):
                    best = float("inf")
                    for _ in range(repeat):
                        pool = PatchPool.open(Path(tmp) / store)  # fresh: no open handle
                        t0 = time.perf_counter()
                        values[store] = np.array(pool.patches[ids])
                        best = min(best, time.perf_counter() - t0)
                    read[store] = best
                tiles_pool = PatchPool.open(Path(tmp) / "tiles")
                used = tiles_pool.disk_bytes()
                row = {
                    "bands": len(tiles_pool.bands),
                    "patch_size": size,
                    "patches": n,
                    "dtype": str(tiles_pool.patches.dtype),
                    "array_build_s": round(build["array"], 3),
                    "tiles_build_s": round(build["tiles"], 3),
                    "array_pool_bytes": _dir_bytes(Path(tmp) / "array"),
                    "array_patches_npy_bytes": (Path(tmp) / "array" / "patches.npy").stat().st_size,
                    "tiles_pool_bytes": used["pool"],
                    "tiles_read_bytes": used["tiles"],
                    "array_random_patches_per_s": round(len(ids) / read["array"], 1),
                    "tiles_random_patches_per_s": round(len(ids) / read["tiles"], 1),
                    "values_equal": bool(np.array_equal(values["array"], values["tiles"])),
                }
            rows.append(row)
            print(
                f"{row['bands']:>2} bands {size:>3} px, {n:>4} patches: build array "
                f"{row['array_build_s']:.2f} s, tiles {row['tiles_build_s']:.2f} s; disk array "
                f"{row['array_pool_bytes'] / 1e6:.1f} MB, tiles {row['tiles_pool_bytes'] / 1e6:.2f}"
                f" MB (+ {row['tiles_read_bytes'] / 1e6:.1f} MB of tiles read); 256 random "
                f"patches: array {row['array_random_patches_per_s']:.0f}/s, tiles "
                f"{row['tiles_random_patches_per_s']:.0f}/s (equal: {row['values_equal']})",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,120")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dense-stride", type=int, default=16, help="extra 64 px run")
    parser.add_argument(
        "--stores", action="store_true", help="only compare --store array and --store tiles"
    )
    args = parser.parse_args()
    band_files = find_scenes(CELL)[0].band_files
    PatchPool.from_tiles(CELL, 64, bands=["B02"], progress=False)  # warm-up: imports
    if args.stores:
        rows = store_rows([int(s) for s in args.sizes.split(",")], args.repeat)
        target = RESULTS / "ingest_speed.json"
        saved = json.loads(target.read_text()) if target.is_file() else {}
        saved["stores"] = {
            "cell": "sample_tiles/majortom_s2l2a_tile",
            "repeat": args.repeat,
            "cores": len(os.sched_getaffinity(0)),
            "random_ids": 256,
            "results": rows,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"wrote {target} (stores)")
        return
    rows = []
    ten_m = ["B02", "B03", "B04", "B08"]
    runs: list[dict[str, Any]] = [
        {"patch_size": size, "bands": bands, "cloud_mask": None}
        for bands in (None, ten_m)
        for size in (int(s) for s in args.sizes.split(","))
    ]
    runs.append({"patch_size": 64, "stride": args.dense_stride, "bands": ten_m, "cloud_mask": None})
    for options in runs:
        pool, read_s, total_s = timed_pool(options, args.repeat)
        _, _, mask_total = timed_pool({**options, "cloud_mask": "auto"}, args.repeat)
        _, _, one_total = timed_pool({**options, "num_workers": 1}, args.repeat)
        _, block1_read, block1_total = timed_pool({**options, "read_block": 1}, 1)
        floor = min(floor_read(pool, band_files)[1] for _ in range(args.repeat))
        same = bool(np.array_equal(floor_read(pool, band_files)[0], pool.patches))
        n = len(pool)
        row = {
            "bands": len(pool.bands),
            "patch_size": options["patch_size"],
            "stride": options.get("stride") or options["patch_size"],
            "patches": n,
            "dtype": str(pool.patches.dtype),
            "pool_read_patches_per_s": round(n / read_s, 1),
            "pool_saved_patches_per_s": round(n / total_s, 1),
            "pool_cloud_mask_saved_patches_per_s": round(n / mask_total, 1),
            "pool_1worker_saved_patches_per_s": round(n / one_total, 1),
            "pool_read_block1_patches_per_s": round(n / block1_read, 1),
            "pool_saved_block1_patches_per_s": round(n / block1_total, 1),
            "floor_patches_per_s": round(n / floor, 1),
            "ratio_saved_pool_to_floor": round(floor / total_s, 3),
            "ratio_read_to_floor": round(floor / read_s, 3),
            "ratio_saved_1worker_to_floor": round(floor / one_total, 3),
            "ratio_saved_block1_to_floor": round(floor / block1_total, 3),
            "values_equal_to_floor": same,
        }
        rows.append(row)
        print(
            f"{row['bands']:>2} bands {row['patch_size']:>3} px stride {row['stride']:>3}, "
            f"{n:>4} patches: saved pool {row['pool_saved_patches_per_s']:>7.1f}/s (read only "
            f"{row['pool_read_patches_per_s']:>7.1f}/s; with cloud mask "
            f"{row['pool_cloud_mask_saved_patches_per_s']:>7.1f}/s; 1 worker "
            f"{row['pool_1worker_saved_patches_per_s']:>7.1f}/s; per-patch reads "
            f"{row['pool_saved_block1_patches_per_s']:>6.1f}/s), floor "
            f"{row['floor_patches_per_s']:>7.1f}/s -> ratio "
            f"{row['ratio_saved_pool_to_floor']:.2f} (1 worker "
            f"{row['ratio_saved_1worker_to_floor']:.2f}; equal values: {same})",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "cell": "sample_tiles/majortom_s2l2a_tile",
        "repeat": args.repeat,
        "cores": len(os.sched_getaffinity(0)),
        "results": rows,
    }
    previous = RESULTS / "ingest_speed.json"
    if previous.is_file() and "stores" in (old := json.loads(previous.read_text())):
        out["stores"] = old["stores"]  # written by --stores
    previous.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'ingest_speed.json'}")


if __name__ == "__main__":
    main()
