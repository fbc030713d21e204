"""Archive scale end to end: from a synthetic Sentinel-2 archive of many scenes to a labelled
round, an index and a query, each step timed with its peak memory and disk.

The archive is many copies of the real Major TOM cell in ``sample_tiles/`` (12 band
GeoTIFFs, LZW, 10/20/60 m, 1068 x 1068 px at 10 m, plus ``cloud_mask.tif``), each a scene
folder of its own named like a Sentinel-2 L2A product (so its acquisition date parses), with
shifted georeferencing: scenes laid side by side on a grid in four UTM zones (CRS and
transform rewritten in the file headers). Every 7th scene has a nodata block (band data
set to 0 in the north-west corner), every 5th a cloud-masked area of its own (a new
``cloud_mask.tif``). At 32 px patches stride 32 a clear scene gives 1,089 patches, so about
920 scenes (11 GB of tiles) make a million. The archive is built once under ``--workdir``
and reused by later runs (a larger size adds the scenes it lacks); each size reads the
first scenes it needs through a folder of links.

For each size of ``--sizes`` the chain runs in this process (the pool build in a child
process, the ``anneal-geo pool build`` command):

1. ``pool_build``: ``anneal-geo pool build VIEW --out POOL --workers 2 --store S``;
2. ``features``: the Engine set-up: trunk features of every patch (default backbone) and
   the first embedding;
3. ``select_1``: the first round's pairs (the initial set);
4. ``annotate_1``: a scripted annotator answers them (similar when the two patches' mean
   NDVI differs by less than 0.1; the archive has no labels);
5. ``train_1``: training on the answers and re-embedding every patch;
6. ``select_2``, ``annotate_2``, ``train_2``: the second round, the first one selected by
   the estimator (target: the machine time of a round after the first <= 60 s);
7. ``index``: the session's retrieval index (``anneal-geo index SESSION``'s function);
8. ``query``: one query by patch through the saved index (``anneal-geo query``'s).

Each step records wall seconds, the peak resident set (a psutil thread sampling at 20 Hz
this process, or the child and its children for the pool build) and the disk used by the
tiles, the pool and the session. Targets (2 cores): whole chain <= 45 min, peak memory
<= 4 GB, pool disk <= the tiles' size, a round after the first <= 60 s. Prints a table with
the targets and, for two sizes or more, the growth from the first to the last; writes
``benchmarks/results/archive_end_to_end.json``.

    flock /tmp/anneal-bench.lock .venv/bin/python benchmarks/archive_end_to_end.py \\
        --sizes 20000,100000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ArchivePlan",
    "build_archive",
    "main",
    "run_chain",
    "scene_view",
]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CELL = next((ROOT / "sample_tiles" / "majortom_s2l2a_tile").rglob("B02.tif")).parent
#: UTM zones (north) the scenes are spread over, round robin.
ZONES = (32647, 32648, 32649, 32633)
#: Scene side in 10 m pixels and metres.
SIDE_PX = 1068
SIDE_M = SIDE_PX * 10.0
#: Scenes per row of a zone's grid.
GRID_COLS = 50
#: Blocks are multiples of 96 px (32 px patches, 60 m pixels) so skip counts are exact.
BLOCK = 96
NODATA_EVERY = 7
CLOUD_EVERY = 5
ARCHIVE_FORMAT = 1

TARGETS = {
    "chain_seconds": 45 * 60,
    "peak_rss_mb": 4096,
    "round_after_first_seconds": 60,
}


# ------------------------------------------------------------------------------ archive


@dataclass(frozen=True)
class ArchivePlan:
    """Where scene ``i`` lies and what is masked in it (deterministic in ``i``)."""

    index: int

    @property
    def epsg(self) -> int:
        return ZONES[self.index % len(ZONES)]

    @property
    def origin(self) -> tuple[float, float]:
        """(west, north) in metres of the scene's zone."""
        j = self.index // len(ZONES)
        col, row = j % GRID_COLS, j // GRID_COLS
        return 200_000.0 + col * SIDE_M, 1_000_000.0 + (row + 1) * SIDE_M

    @property
    def acquired(self) -> date:
        return date(2020, 1, 1) + timedelta(days=self.index % 1461)

    @property
    def name(self) -> str:
        """A Sentinel-2 L2A product name carrying the acquisition date."""
        day = self.acquired.strftime("%Y%m%d")
        zone = self.epsg % 100
        return f"S2B_MSIL2A_{day}T032739_N9999_R018_T{zone}QUE_20230924T183543"

    @property
    def folder(self) -> str:
        return f"{self.index:05d}/{self.name}"

    @property
    def nodata_block(self) -> tuple[int, int] | None:
        """(rows, cols) in 10 m pixels of the zeroed north-west block, or None."""
        if self.index % NODATA_EVERY != NODATA_EVERY - 1:
            return None
        k = 2 + (self.index // NODATA_EVERY) % 4  # 2..5 blocks of 96 px
        return k * BLOCK, (k + 1) * BLOCK

    @property
    def cloud_box(self) -> tuple[int, int, int, int] | None:
        """(row0, row1, col0, col1) of the cloud-masked area, or None."""
        if self.index % CLOUD_EVERY != CLOUD_EVERY - 1:
            return None
        k = (self.index // CLOUD_EVERY) % 5
        r0, c0 = (1 + k) * BLOCK, (4 - k) * BLOCK + BLOCK
        return r0, r0 + 3 * BLOCK, c0, c0 + (2 + k % 3) * BLOCK

    def bad_pixels(self) -> np.ndarray:
        """(SIDE_PX, SIDE_PX) bool: nodata or cloud."""
        bad = np.zeros((SIDE_PX, SIDE_PX), dtype=bool)
        if self.nodata_block is not None:
            h, w = self.nodata_block
            bad[:h, :w] = True
        if self.cloud_box is not None:
            r0, r1, c0, c1 = self.cloud_box
            bad[r0:r1, c0:c1] = True
        return bad

    def kept_patches(self, patch: int, stride: int, max_bad: float = 0.5) -> int:
        """Patches ``pool build`` keeps from this scene (more than ``max_bad`` bad: skipped)."""
        bad = self.bad_pixels()
        starts = range(0, SIDE_PX - patch + 1, stride)
        return sum(
            1 for r in starts for c in starts if bad[r : r + patch, c : c + patch].mean() <= max_bad
        )


def _write_scene(plan: ArchivePlan, target: Path) -> None:
    """Copy the cell into ``target`` with the plan's CRS, origin, nodata and clouds."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    west, north = plan.origin
    crs = CRS.from_epsg(plan.epsg)
    for source in sorted(CELL.glob("*.tif")):
        out = tmp / source.name
        if source.stem == "cloud_mask":
            continue
        shutil.copyfile(source, out)
        with rasterio.open(out, "r+") as dst:
            res = dst.res[0]
            dst.crs = crs
            dst.transform = Affine(res, 0.0, west, 0.0, -res, north)
            if plan.nodata_block is not None:
                h, w = plan.nodata_block
                scale = res / 10.0
                data = dst.read(1)
                data[: int(h / scale), : int(w / scale)] = 0
                dst.write(data, 1)
    mask = np.zeros((SIDE_PX, SIDE_PX), dtype=np.uint8)
    if plan.cloud_box is not None:
        r0, r1, c0, c1 = plan.cloud_box
        mask[r0:r1, c0:c1] = 1
    profile = {
        "driver": "GTiff", "dtype": "uint8", "count": 1, "width": SIDE_PX, "height": SIDE_PX,
        "crs": crs, "transform": Affine(10.0, 0.0, west, 0.0, -10.0, north),
        "compress": "lzw", "tiled": True, "blockxsize": 512, "blockysize": 512,
    }  # fmt: skip
    with rasterio.open(tmp / "cloud_mask.tif", "w", **profile) as dst:
        dst.write(mask, 1)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def build_archive(workdir: Path, scenes: int, progress: bool = True) -> Path:
    """The archive of at least ``scenes`` scenes under ``workdir/archive`` (reused, extended)."""
    from tqdm import tqdm

    archive = workdir / "archive"
    manifest = archive / "archive.json"
    done = 0
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        if meta.get("format") == ARCHIVE_FORMAT:
            done = int(meta.get("scenes", 0))
        else:
            shutil.rmtree(archive)
    if done >= scenes:
        return archive
    archive.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(done, scenes), desc="writing scenes", disable=not progress,
                  initial=done, total=scenes):  # fmt: skip
        plan = ArchivePlan(i)
        _write_scene(plan, archive / plan.folder)
        if (i + 1) % 20 == 0 or i + 1 == scenes:
            manifest.write_text(json.dumps({"format": ARCHIVE_FORMAT, "scenes": i + 1}))
    return archive


def scene_view(archive: Path, scenes: int, view: Path) -> Path:
    """A folder of links to the files of the archive's first ``scenes`` scenes."""
    if view.exists():
        shutil.rmtree(view)
    for i in range(scenes):
        plan = ArchivePlan(i)
        src = archive / plan.folder
        dst = view / plan.folder
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).symlink_to(f.resolve())
    return view


def scenes_for(size: int, patch: int, stride: int) -> tuple[int, int]:
    """(scenes, patches) of the smallest prefix of the archive with at least ``size``."""
    total, i = 0, 0
    cache: dict[tuple[Any, Any], int] = {}
    while total < size:
        plan = ArchivePlan(i)
        key = (plan.nodata_block, plan.cloud_box)
        if key not in cache:
            cache[key] = plan.kept_patches(patch, stride)
        total += cache[key]
        i += 1
    return i, total


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links followed to their targets)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ measuring


def _anon_bytes(pid: int) -> int:
    """RssAnon of a process (its heap, not the pages of mapped files), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class PeakRss:
    """Samples the resident set (and its anonymous part) of this process, or of a child
    and its children, at ``hz``."""

    def __init__(self, hz: float = 20.0) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._watch: Any = self._me
        self._peak = (0, 0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._period = 1.0 / hz
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int]:
        procs = [self._watch]
        if self._watch is not self._me:
            with suppress(self._psutil.Error):
                procs += self._watch.children(recursive=True)
        rss = anon = 0
        for proc in procs:
            try:
                rss += int(proc.memory_info().rss)
                anon += _anon_bytes(proc.pid)
            except self._psutil.Error:
                pass
        return rss, anon

    def _update(self) -> None:
        rss, anon = self._sample()
        with self._lock:
            self._peak = (max(self._peak[0], rss), max(self._peak[1], anon))

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            self._update()

    def reset(self, pid: int | None = None) -> None:
        with self._lock:
            self._watch = self._me if pid is None else self._psutil.Process(pid)
            self._peak = (0, 0)
        self._update()

    def peak_mb(self) -> tuple[float, float]:
        """(peak RSS, peak RssAnon) in MB since the last :meth:`reset`."""
        self._update()
        with self._lock:
            return round(self._peak[0] / 2**20, 1), round(self._peak[1] / 2**20, 1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Steps:
    """Times steps and their peak memory into ``self.rows``."""

    def __init__(self, monitor: PeakRss) -> None:
        self.monitor = monitor
        self.rows: dict[str, dict[str, Any]] = {}

    @contextmanager
    def step(self, name: str, **extra: Any) -> Iterator[dict[str, Any]]:
        self.monitor.reset()
        row: dict[str, Any] = dict(extra)
        t0 = time.perf_counter()
        yield row
        row["seconds"] = round(time.perf_counter() - t0, 3)
        if "peak_rss_mb" not in row:
            row["peak_rss_mb"], row["peak_anon_mb"] = self.monitor.peak_mb()
        self.rows[name] = row
        print(f"  {name:<12} {row['seconds']:>9.2f} s  {row['peak_rss_mb']:>8.0f} MB RSS "
              f"({row['peak_anon_mb']:.0f} MB anonymous)", flush=True)  # fmt: skip


def _ndvi_rule_class() -> type:
    from anneal_geo.annotators.base import Annotator

    class NdviRule(Annotator):
        """Similar when the two patches' mean NDVI differs by less than 0.1 (a scripted
        person; reads only the patches it is asked about)."""

        interactive = True  # stands in for a person: the engine treats its answers as human

        def annotate(self, pairs: np.ndarray, pool: Any) -> Any:
            if not len(pairs):
                return
            ids = np.unique(pairs)
            red, nir = pool.bands.index("B04"), pool.bands.index("B08")
            ndvi: dict[int, float] = {}
            for start in range(0, len(ids), 1024):
                chunk = ids[start : start + 1024]
                means = pool.float_patches(chunk)[:, [red, nir]].mean(axis=(2, 3))
                values = (means[:, 1] - means[:, 0]) / (means[:, 1] + means[:, 0] + 1e-6)
                ndvi.update(zip(chunk.tolist(), values.tolist(), strict=True))
            for i, j in pairs.tolist():
                yield int(abs(ndvi[i] - ndvi[j]) < 0.1)

    return NdviRule


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "anneal-geo"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from anneal_geo.cli.root import main; main()"]


def _pool_build(view: Path, pool_dir: Path, args: argparse.Namespace, steps: Steps) -> str:
    command = [*_cli(), "pool", "build", str(view), "--out", str(pool_dir),
               "--patch-size", str(args.patch_size), "--stride", str(args.stride),
               "--workers", str(args.workers)]  # fmt: skip
    command += ["--store", args.store]
    with steps.step("pool_build") as row:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        steps.monitor.reset(child.pid)
        output, _ = child.communicate()
        row["peak_rss_mb"], row["peak_anon_mb"] = steps.monitor.peak_mb()
        steps.monitor.reset()
        if child.returncode != 0:
            raise SystemExit(f"pool build failed ({child.returncode}):\n{output[-3000:]}")
    return output


def run_chain(size: int, args: argparse.Namespace, archive: Path, progress: bool = True
              ) -> dict[str, Any]:  # fmt: skip
    """Run the chain on the first scenes of ``archive`` holding at least ``size`` patches."""
    from anneal_geo import plugins
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine
    from anneal_geo.retrieval.geoindex import GeoIndex, build_index
    from anneal_geo.session import Session, SessionConfig

    if "ndvi-rule" not in plugins.names("annotators"):
        plugins.register(_ndvi_rule_class(), name="ndvi-rule", group="annotators")
    scenes, expected = scenes_for(size, args.patch_size, args.stride)
    run_dir = Path(args.workdir) / f"run_{size}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    view = scene_view(archive, scenes, run_dir / "tiles")
    pool_dir, session_dir = run_dir / "pool", run_dir / "session"
    print(f"{size:,} patches: {scenes} scenes (expect {expected:,} patches)", flush=True)

    monitor = PeakRss()
    steps = Steps(monitor)
    t_chain = time.perf_counter()
    try:
        build_output = _pool_build(view, pool_dir, args, steps)
        pool = PatchPool.open(pool_dir)
        config = SessionConfig(
            data=str(pool_dir), annotator="ndvi-rule", rounds=1, budget=args.budget,
            initial=args.initial, backbone=args.backbone, seed=0,
        )  # fmt: skip
        session = Session.create(session_dir, config, {"pool_dir": str(pool_dir)})
        with steps.step("features"):
            engine = Engine(session, pool, progress=progress)
        records: list[dict[str, Any]] = []
        try:
            for r in (1, 2):
                with steps.step(f"select_{r}") as row:
                    pairs = engine.round_pairs()
                    row["pairs"] = len(pairs)
                with steps.step(f"annotate_{r}") as row:
                    answers = list(engine.annotator.checked_annotate(pairs, engine.pool))
                    for (i, j), value in zip(pairs.tolist(), answers, strict=True):
                        engine.answer(i, j, value)
                    row["similar"] = int(sum(answers))
                with steps.step(f"train_{r}"):
                    records.append(engine.finish_round())
        finally:
            engine.close()
        # The index builds the session's own engine: let this one's features go first.
        del engine
        gc.collect()
        with steps.step("index") as row:
            # Only the kind is kept: a query opens the saved index, as `anneal-geo query`
            # does in its own process, rather than holding the built one beside it.
            row["kind"] = build_index(session_dir, kind=args.index_kind).kind
        gc.collect()
        with steps.step("query") as row:
            geo = GeoIndex.load(session_dir)
            try:
                results = geo.query_patch(len(pool) // 2, 20)
                row["results"] = len(results)
            finally:
                geo.close()
        chain_seconds = time.perf_counter() - t_chain
    finally:
        monitor.close()

    disk = {
        "tiles_mb": round(disk_bytes(view) / 2**20, 1),
        "pool_mb": round(disk_bytes(pool_dir) / 2**20, 1),
        "session_mb": round(disk_bytes(session_dir) / 2**20, 1),
    }
    second = records[1]
    result = {
        "size": size,
        "scenes": scenes,
        "patches": len(pool),
        "expected_patches": expected,
        "bands": len(pool.bands),
        "store": args.store,
        "pool_build_summary": [line for line in build_output.splitlines() if line.strip()][:3],
        "steps": steps.rows,
        "chain_seconds": round(chain_seconds, 2),
        "peak_rss_mb": max(row["peak_rss_mb"] for row in steps.rows.values()),
        "peak_anon_mb": max(row["peak_anon_mb"] for row in steps.rows.values()),
        "round_after_first_seconds": round(
            steps.rows["select_2"]["seconds"] + steps.rows["train_2"]["seconds"], 3
        ),
        "round_records": records,
        "candidates_round_2": second.get("candidates"),
        "disk": disk,
    }
    result["targets_met"] = {
        "chain_seconds": result["chain_seconds"] <= TARGETS["chain_seconds"],
        "peak_rss_mb": result["peak_rss_mb"] <= TARGETS["peak_rss_mb"],
        "round_after_first_seconds": (
            result["round_after_first_seconds"] <= TARGETS["round_after_first_seconds"]
        ),
        "pool_disk_le_tiles": disk["pool_mb"] <= disk["tiles_mb"],
    }
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------ report


def _machine() -> dict[str, Any]:
    import psutil

    return {
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def growth(first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Ratios last / first of each step's seconds and peak memory, and of the totals."""
    out: dict[str, Any] = {"patches": round(last["patches"] / first["patches"], 2)}
    for name, row in last["steps"].items():
        before = first["steps"].get(name)
        if not before:
            continue
        out[name] = {
            "seconds": round(row["seconds"] / max(before["seconds"], 1e-3), 2),
            "peak_rss_mb": round(row["peak_rss_mb"] / max(before["peak_rss_mb"], 1e-3), 2),
            "peak_anon_mb": round(row["peak_anon_mb"] / max(before["peak_anon_mb"], 1e-3), 2),
        }
    out["chain_seconds"] = round(last["chain_seconds"] / first["chain_seconds"], 2)
    out["peak_rss_mb"] = round(last["peak_rss_mb"] / first["peak_rss_mb"], 2)
    out["peak_anon_mb"] = round(last["peak_anon_mb"] / max(first["peak_anon_mb"], 1e-3), 2)
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    """Seconds, peak RSS and peak anonymous memory of each step, per size, with targets."""
    names = list(results[0]["steps"])
    print("\n" + f"{'step':<14}" + "".join(
        f"{f'{r['patches']:,}: s':>16}{'RSS MB':>8}{'anon MB':>8}" for r in results
    ))  # fmt: skip
    for name in names:
        line = f"{name:<14}"
        for r in results:
            row = r["steps"].get(name, {})
            line += (
                f"{row.get('seconds', float('nan')):>16.2f}"
                f"{row.get('peak_rss_mb', 0):>8.0f}{row.get('peak_anon_mb', 0):>8.0f}"
            )
        print(line)
    print(
        f"{'chain':<14}"
        + "".join(
            f"{r['chain_seconds']:>16.1f}{r['peak_rss_mb']:>8.0f}{r['peak_anon_mb']:>8.0f}"
            for r in results
        )
        + f"   targets: <= {TARGETS['chain_seconds']} s, <= {TARGETS['peak_rss_mb']} MB"
    )
    print(
        f"{'round 2':<14}"
        + "".join(f"{r['round_after_first_seconds']:>16.2f}{'':>16}" for r in results)
        + f"   target: <= {TARGETS['round_after_first_seconds']} s"
    )
    for r in results:
        d = r["disk"]
        print(
            f"{r['patches']:,} patches ({r['scenes']} scenes, store {r['store']}): tiles "
            f"{d['tiles_mb']:,.0f} MB, pool {d['pool_mb']:,.0f} MB "
            f"({d['pool_mb'] / max(d['tiles_mb'], 1e-9):.2f}x the tiles; target <= 1), "
            f"session {d['session_mb']:,.0f} MB; targets met: {r['targets_met']}"
        )


def _check_disk(args: argparse.Namespace, sizes: list[int]) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    biggest = max(sizes)
    scenes, patches = scenes_for(biggest, args.patch_size, args.stride)
    archive = workdir / "archive"
    have = 0
    if (archive / "archive.json").is_file():
        have = int(json.loads((archive / "archive.json").read_text()).get("scenes", 0))
    scene_bytes = disk_bytes(CELL) - disk_bytes(CELL / "thumbnail.png")
    need = max(scenes - have, 0) * scene_bytes
    bands = 12
    if args.store == "array":
        need += patches * bands * args.patch_size**2 * 2  # uint16 patches.npy
    need += patches * (256 + 128) * 4 * 2 + 500 * 2**20  # features, embeddings, index, slack
    free = shutil.disk_usage(workdir).free
    if need > free:
        raise SystemExit(
            f"--workdir {workdir} has {free / 2**30:.1f} GB free; {biggest:,} patches need "
            f"about {need / 2**30:.1f} GB ({max(scenes - have, 0)} more scenes of "
            f"{scene_bytes / 2**20:.1f} MB"
            + (", a patches.npy pool" if args.store == "array" else "")
            + "); free space, choose another --workdir, or a smaller --sizes"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000",
                        help="comma-separated pool sizes in patches")  # fmt: skip
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument(
        "--store",
        default="tiles",
        choices=("tiles", "array"),
        help="`pool build --store`: tiles (windows only, pixels read from the "
        "tiles) or array (every patch copied into patches.npy)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backbone", default="texture")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--initial", type=int, default=100)
    parser.add_argument("--index-kind", default="auto")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "anneal-archive"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the archive, pools and sessions (default: delete them; an "
                             "archive already there before the run is kept)")  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS / "archive_end_to_end.json"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 2:
        raise SystemExit("--sizes: give pool sizes in patches, e.g. 20000,100000")
    progress = not args.no_progress

    _check_disk(args, sizes)
    workdir = Path(args.workdir)
    manifest = workdir / "archive" / "archive.json"
    existed = manifest.is_file()
    had = int(json.loads(manifest.read_text()).get("scenes", 0)) if existed else 0
    scenes, _ = scenes_for(max(sizes), args.patch_size, args.stride)
    t0 = time.perf_counter()
    archive = build_archive(workdir, scenes, progress=progress)
    archive_seconds = time.perf_counter() - t0
    how = "reused" if had >= scenes else f"{had} reused, {scenes - had} written"
    print(f"archive: {scenes} scenes in {archive} ({how}, {archive_seconds:.1f} s)",
          flush=True)  # fmt: skip

    results = []
    try:
        for size in sizes:
            results.append(run_chain(size, args, archive, progress=progress))
    finally:
        if not args.keep and not existed:
            shutil.rmtree(workdir / "archive", ignore_errors=True)
    print_table(results)
    out: dict[str, Any] = {
        "benchmark": "archive_end_to_end",
        "cell": "sample_tiles/majortom_s2l2a_tile",
        "patch_size": args.patch_size,
        "stride": args.stride,
        "store": args.store,
        "backbone": args.backbone,
        "workers": args.workers,
        "budget": args.budget,
        "initial": args.initial,
        "archive_scenes": scenes,
        "archive_seconds": round(archive_seconds, 1),
        "archive_reused": existed,
        "targets": {**TARGETS, "pool_disk_le_tiles": True},
        "machine": _machine(),
        "results": results,
    }
    if len(results) > 1:
        out["growth"] = growth(results[0], results[-1])
        print(f"growth {results[0]['patches']:,} -> {results[-1]['patches']:,}: "
              f"{json.dumps(out['growth'])}")  # fmt: skip
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
