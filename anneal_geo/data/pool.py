"""``PatchPool``: the N x C x H x W patches of an archive, their band names, labels and footprints.

A pool is read once from rasters (class folders, BigEarthNet, ...) and saved as a pool
directory; reopening memory-maps the patches and never touches a raster again. The row index
``0..N-1`` is the one patch id used everywhere (pairs, embeddings, faiss, exports).

Pool directory (format ``anneal-geo-pool``, version 1):

- ``pool.json``: bands, shape, dtype, classes, normalisation statistics, sources with their
  SHA-256 and CRS, creation time, and (optional, absent in pools saved before it existed)
  ``acquired``: per patch its acquisition date ``YYYY-MM-DD`` or null;
- ``patches.npy``: the (N, C, H, W) array in its native dtype (``.npy``, memory-mappable);
- ``labels.npy``: (N, L) bool multi-hot, when labelled;
- ``footprints.gpkg``: one row per patch id, when the sources are georeferenced.

A pool cut from tiles may instead keep only where each patch lies and read its pixels from
the tiles when asked (``"store": "tiles"`` in ``pool.json``, ``windows.npz`` in place of
``patches.npy``; see :mod:`anneal_geo.data.windows`): its ``patches`` is then a
:class:`~anneal_geo.data.windows.TileWindows`, an array-like that gives the same values.

Readers and converters depend on this module, never the other way round: the xarray
conversion lives in :mod:`anneal_geo.data.cube` (``pool_from_xarray``, ``pool_to_xarray``,
also exported from :mod:`anneal_geo.data`), which imports :class:`PatchPool`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.data.bands import RGB_BANDS, band_indices, check_band_names
from anneal_geo.data.dates import acquisition_dates, check_dates
from anneal_geo.data.sources import RawPool
from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    from anneal_geo.data.windows import TileWindows

#: What a pool's ``patches`` is: an array (memory-mapped once saved), or windows into tiles.
type Patches = np.ndarray | TileWindows

__all__ = [
    "FOOTPRINTS_FILE",
    "FORMAT",
    "LABELS_FILE",
    "PATCHES_FILE",
    "POOL_FILE",
    "STORES",
    "VERSION",
    "PatchPool",
    "band_statistics",
    "build_pool_cli_summary",
    "check_nan",
]

FORMAT = "anneal-geo-pool"
VERSION = 1
POOL_FILE = "pool.json"
PATCHES_FILE = "patches.npy"
LABELS_FILE = "labels.npy"
FOOTPRINTS_FILE = "footprints.gpkg"
#: How a pool keeps its pixels: ``array`` (patches.npy) or ``tiles`` (read from the tiles).
STORES = ("array", "tiles")

# Rows per block when streaming statistics or copying to disk: bounded memory for big pools.
_BLOCK_BYTES = 64 << 20

FootprintSource = Callable[[], Any]

#: Pools with more patches than this answer footprint lookups (rows by id, patches in an
#: area) from footprints.gpkg without reading all of it: a million footprints take GBs.
FOOTPRINTS_IN_MEMORY = 200_000


def _block_rows(patches: Patches) -> int:
    row_bytes = max(1, int(np.prod(patches.shape[1:])) * 8)
    return max(1, _BLOCK_BYTES // row_bytes)


def band_statistics(patches: Patches) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and (population) standard deviation over all patches and pixels.

    Computed block by block in float64 and merged with Chan's parallel formula, so a
    memory-mapped pool is never copied whole into memory.

    Args:
        patches: (N, C, H, W) array of any numeric dtype.

    Returns:
        ``(mean, std)``, each float64 (C,).
    """
    n_channels = patches.shape[1]
    count = 0
    mean = np.zeros(n_channels, dtype=np.float64)
    m2 = np.zeros(n_channels, dtype=np.float64)
    step = _block_rows(patches)
    for start in range(0, patches.shape[0], step):
        block = np.asarray(patches[start : start + step], dtype=np.float64)
        n_block = block.shape[0] * block.shape[2] * block.shape[3]
        if n_block == 0:
            continue
        block_mean = block.mean(axis=(0, 2, 3))
        block_m2 = ((block - block_mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))
        total = count + n_block
        delta = block_mean - mean
        mean = mean + delta * (n_block / total)
        m2 = m2 + block_m2 + delta**2 * (count * n_block / total)
        count = total
    std = np.sqrt(m2 / count) if count else np.zeros(n_channels, dtype=np.float64)
    return mean, std


def _relative_sources(sources: Sequence[str]) -> dict[str, str]:
    """Each distinct source relative to their common folder, so the fingerprint ignores where
    the archive was mounted or how its path was spelled."""
    distinct = set(sources)
    try:
        common = os.path.commonpath(list({os.path.dirname(s) or "." for s in distinct}))
        # Once per distinct source: a tile pool repeats its scenes' files per patch.
        return {s: os.path.relpath(s, common).replace(os.sep, "/") for s in distinct}
    except ValueError:  # mixed absolute and relative paths: no common folder
        return {s: s for s in distinct}


def _fingerprint(
    bands: Sequence[str], shape: Sequence[int], dtype: np.dtype[Any], sources: Sequence[str]
) -> str:
    """16 hex digits of the SHA-256 of ``json.dumps({"bands", "dtype", "shape", "sources"},
    sort_keys=True)``, hashed run by run of equal sources (a tile pool repeats each scene's
    file over its patches) rather than as one string of every source."""
    relative = _relative_sources(sources)
    head = json.dumps(
        {"bands": list(bands), "dtype": dtype.str, "shape": [int(v) for v in shape]},
        sort_keys=True,
    )
    digest = hashlib.sha256((head[:-1] + ', "sources": [').encode())
    first = True
    for source, run in itertools.groupby(sources):
        count = sum(1 for _ in run)
        item = json.dumps(relative[source])
        if first:
            digest.update(item.encode())
            count, first = count - 1, False
        if count:
            digest.update((", " + item).encode() * count)
    digest.update(b"]}")
    return digest.hexdigest()[:16]


def _directory_bytes(directory: Path) -> int:
    total = 0
    for entry in directory.iterdir():
        with contextlib.suppress(OSError):
            total += entry.stat().st_size if entry.is_file() else 0
    return total


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot write the pool to {directory} ({exc.strerror or exc}); choose a writable "
            "folder"
        ) from exc
    if not os.access(directory, os.W_OK):
        raise DataError(f"cannot write the pool to {directory} (not writable); choose another")


def check_nan(
    patches: Patches,
    sources: Sequence[str],
    bands: Sequence[str],
    *,
    fill: bool = False,
) -> int:
    """Find NaN pixels in float patches read from rasters; refuse them, or fill them.

    NaN in a pool would make its band statistics NaN and the model's features NaN later,
    far from the file at fault; so a pool is checked when it is built.

    Args:
        patches: (N, C, H, W) array, changed in place when ``fill``.
        sources: per patch, its source file (named in the error).
        bands: the band names (named when a band has no valid pixel at all).
        fill: treat NaN as nodata: replace each NaN pixel by its band's mean over the valid
            pixels of the pool, so it carries no signal once normalised.

    Returns:
        the number of patches that held NaN (0 for integer patches).

    Raises:
        DataError: NaN found and not ``fill`` (naming the files and the option), or a band
            without a single valid pixel.
    """
    if patches.dtype.kind != "f" or not len(patches):
        return 0
    step = _block_rows(patches)
    rows: list[np.ndarray] = []
    total = np.zeros(patches.shape[1], dtype=np.float64)
    count = np.zeros(patches.shape[1], dtype=np.float64)
    for start in range(0, patches.shape[0], step):
        block = np.asarray(patches[start : start + step])
        bad = np.isnan(block)
        rows.append(np.flatnonzero(bad.any(axis=(1, 2, 3))) + start)
        total += np.where(bad, 0.0, block).sum(axis=(0, 2, 3), dtype=np.float64)
        count += (~bad).sum(axis=(0, 2, 3))
    found = np.concatenate(rows)
    if not found.size:
        return 0
    files = list(dict.fromkeys(str(sources[int(i)]) for i in found))
    if not fill:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataError(
            f"{found.size} patches hold NaN pixels ({shown}); rebuild with --nan-as-nodata "
            "(PatchPool.load(..., nan_as_nodata=True)) to treat NaN as nodata, or fix the rasters"
        )
    empty = [bands[int(c)] for c in np.flatnonzero(count == 0)]
    if empty:
        raise DataError(
            f"band(s) {', '.join(empty)} hold no valid pixel (all NaN) in {files[0]} and the "
            "rest of the pool; leave them out with --bands"
        )
    mean = (total / count).astype(patches.dtype)
    for start in range(0, patches.shape[0], step):
        block = patches[start : start + step]
        fill_value = np.broadcast_to(mean[None, :, None, None], block.shape)
        np.copyto(block, fill_value, where=np.isnan(block))
    return int(found.size)


class PatchPool:
    """N patches x C bands x H x W pixels with band names, optional labels and footprints.

    Build one with :meth:`load` (auto-detects the layout), :meth:`from_folder`,
    :meth:`from_bigearthnet` or :meth:`open`, or directly from arrays.

    Attributes:
        patches: (N, C, H, W) array in its native dtype (uint16 for EuroSAT-MS and
            Sentinel-2 tiles, uint8 for JPEG, float32 for BigEarthNet's resampled bands); a
            read-only ``np.memmap`` once opened,
            or, for the tiles store, a :class:`~anneal_geo.data.windows.TileWindows` that
            reads the same values from the tiles when indexed.
        bands: one name per channel, e.g. ``["B04", "B03", "B02"]``.
        class_names: the label columns, or None when unlabelled.
        labels: (N, L) bool multi-hot over ``class_names`` (one True per row unless
            ``multilabel``), or None.
        multilabel: whether a patch may carry several labels.
        sources: per patch, the source file (or BigEarthNet patch folder) as given.
        source_crs: per patch, its source's CRS (``"EPSG:32631"``) or None.
        source_sha256: per patch, the SHA-256 of its source, or None when built from arrays.
        band_mean: float64 (C,) per-band mean, computed once when the pool was built.
        band_std: float64 (C,) per-band standard deviation (population).
        resolution: pixel size in CRS units (metres for UTM) when georeferenced, else None.
        acquired: per patch, its acquisition date ``YYYY-MM-DD`` (UTC) or None when unknown;
            read from Sentinel-2 file and folder names (:mod:`anneal_geo.data.dates`)
            unless given.
        created: ISO time the pool was built.
        path: the pool directory when saved or opened, else None.

    Args:
        patches: (N, C, H, W) array, or the windows of a tiles store.
        bands: one name per channel.
        class_names: label names (required with ``labels``).
        labels: (N, L) bool multi-hot, or (N,) int class indices for single-label data.
        multilabel: allow several (or zero) labels per patch.
        sources: per patch, where it came from; defaults to ``array:<id>``.
        band_mean: precomputed per-band mean (computed when None).
        band_std: precomputed per-band std (computed when None).
        source_crs: per patch CRS text.
        source_sha256: per patch source checksum.
        footprints: a GeoDataFrame, or a zero-argument callable that builds or reads one
            (called on first access of :attr:`footprints`).
        resolution: pixel size in CRS units.
        acquired: per patch acquisition date (ISO ``YYYY-MM-DD``) or None; when not given,
            taken from the sources' Sentinel-2 names.
        created: ISO creation time (now when None).
        path: the pool directory, when it lives on disk.
    """

    def __init__(
        self,
        patches: Patches,
        bands: Sequence[str],
        *,
        class_names: Sequence[str] | None = None,
        labels: np.ndarray | None = None,
        multilabel: bool = False,
        sources: Sequence[str] | None = None,
        band_mean: np.ndarray | Sequence[float] | None = None,
        band_std: np.ndarray | Sequence[float] | None = None,
        source_crs: Sequence[str | None] | None = None,
        source_sha256: Sequence[str] | None = None,
        footprints: Any = None,
        resolution: float | None = None,
        created: str | None = None,
        path: str | Path | None = None,
        acquired: Sequence[str | None] | None = None,
    ) -> None:
        from anneal_geo.data.windows import TileWindows

        if not isinstance(patches, np.ndarray | TileWindows) or patches.ndim != 4:
            raise DataError(
                f"patches must be an (N, C, H, W) array, got {getattr(patches, 'shape', patches)}"
            )
        if patches.dtype.kind not in "uif":
            raise DataError(f"patches have dtype {patches.dtype}; use an integer or float dtype")
        n, c = patches.shape[:2]
        where = "this pool" if path is None else str(path)
        self.patches: Patches = patches
        self.bands: list[str] = check_band_names(bands, c, where)
        self.multilabel = bool(multilabel)
        self.class_names: list[str] | None = None if class_names is None else list(class_names)
        self.labels: np.ndarray | None = self._checked_labels(labels, n)
        self.sources: list[str] = (
            [f"array:{i}" for i in range(n)] if sources is None else [str(s) for s in sources]
        )
        if len(self.sources) != n:
            raise DataError(f"{len(self.sources)} sources given for {n} patches; give one each")
        self.source_crs: list[str | None] = [None] * n if source_crs is None else list(source_crs)
        self.source_sha256: list[str] | None = (
            None if source_sha256 is None else [str(s) for s in source_sha256]
        )
        if band_mean is None or band_std is None:
            band_mean, band_std = band_statistics(patches)
        self.band_mean: np.ndarray = np.asarray(band_mean, dtype=np.float64)
        self.band_std: np.ndarray = np.asarray(band_std, dtype=np.float64)
        if self.band_mean.shape != (c,) or self.band_std.shape != (c,):
            raise DataError(f"band_mean and band_std must have one value per band ({c})")
        self.resolution = None if resolution is None else float(resolution)
        if acquired is None:
            self.acquired: list[str | None] = acquisition_dates(self.sources)
        else:
            try:
                self.acquired = check_dates(list(acquired), n, where)
            except ValueError as exc:
                raise DataError(f"{exc}; give one ISO date (or None) per patch") from None
        self.created = created or datetime.now(UTC).isoformat(timespec="seconds")
        self.path: Path | None = None if path is None else Path(path)
        self._footprints: Any = None
        self._footprint_source: FootprintSource | None = None
        # The saved footprints.gpkg (lookups read from it in big pools), whether the pool is
        # known to be georeferenced without building its footprints, and footprint chunks
        # still to write (a tiles-store build).
        self._footprints_file: Path | None = None
        self._georeferenced: bool | None = None
        self._footprint_chunks: Callable[[], Any] | None = None
        # footprints.gpkg written ahead from the footprints in memory (a small build from
        # tiles), used by save() while those footprints have not been handed out.
        self._prepared_footprints: Any = None
        if callable(footprints):
            self._footprint_source = footprints
        else:
            self._footprints = footprints
        self._fingerprint: str | None = None
        # The tiles store's scene table and grid stride (see anneal_geo.data.windows).
        self._scene_table: list[dict[str, Any]] | None = None
        self._stride: int | None = None

    def _checked_labels(self, labels: np.ndarray | None, n: int) -> np.ndarray | None:
        if labels is None:
            if self.class_names is not None:
                raise DataError("class_names given without labels; pass both or neither")
            return None
        if self.class_names is None:
            raise DataError("labels given without class_names; pass the name of each class")
        arr = np.asarray(labels)
        n_classes = len(self.class_names)
        if arr.ndim == 1 and arr.dtype.kind in "iu":
            if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
                raise DataError(f"label indices must lie in 0..{n_classes - 1}")
            onehot = np.zeros((arr.shape[0], n_classes), dtype=bool)
            onehot[np.arange(arr.shape[0]), arr] = True
            arr = onehot
        if arr.shape != (n, n_classes):
            raise DataError(
                f"labels have shape {arr.shape}, expected ({n}, {n_classes}) for {n} patches and "
                f"{n_classes} classes"
            )
        arr = arr.astype(bool, copy=False)
        if not self.multilabel:
            bad = np.flatnonzero(arr.sum(axis=1) != 1)
            if bad.size:
                raise DataError(
                    f"patch {int(bad[0])} has {int(arr[bad[0]].sum())} labels in a single-label "
                    "pool; give exactly one per patch or pass multilabel=True"
                )
        return arr

    # ------------------------------------------------------------------ building

    @classmethod
    def _from_raw(cls, raw: RawPool, nan_as_nodata: bool = False) -> PatchPool:
        from anneal_geo.data.footprints import build_footprints

        check_nan(raw.patches, raw.sources, raw.bands, fill=nan_as_nodata)

        georefs = raw.georefs
        located = [g for g in georefs if g is not None]
        resolution = (
            float(np.median([g.resolution[0] for g in located]))
            if located and len(located) == len(georefs)
            else None
        )
        pool = cls(
            raw.patches,
            raw.bands,
            class_names=raw.class_names,
            labels=raw.labels,
            multilabel=raw.multilabel,
            sources=raw.sources,
            source_crs=[None if g is None else g.crs for g in georefs],
            source_sha256=raw.checksums,
            resolution=resolution,
        )
        # Reprojecting outlines needs geopandas; defer it until someone asks for footprints.
        pool._footprint_source = lambda: build_footprints(
            georefs, pool.sources, [pool.label_text(i) for i in range(len(pool))]
        )
        return pool

    @classmethod
    def from_folder(
        cls, path: str | Path, bands: Sequence[str] | None = None, *, nan_as_nodata: bool = False
    ) -> PatchPool:
        """Read a class-per-folder archive (``<path>/<Class>/*.tif|jpg|png``).

        Args:
            path: the archive folder; top-level non-image files are ignored.
            bands: band names in file order; inferred when None (13 bands: EuroSAT-MS order
                with B8A last; 12: Level-2A order without B10; 3-band 8-bit: B04, B03, B02;
                band descriptions win when they are band names).
            nan_as_nodata: fill NaN pixels of float rasters (see :func:`check_nan`);
                without it NaN is a DataError naming the files.

        Returns:
            a single-label pool (or unlabelled, for a flat folder of images).
        """
        from anneal_geo.data.folders import read_class_folders

        return cls._from_raw(read_class_folders(path, bands), nan_as_nodata)

    @classmethod
    def from_bigearthnet(cls, path: str | Path, *, nan_as_nodata: bool = False) -> PatchPool:
        """Read BigEarthNet-S2 patch folders, resampled to the 10 m grid (float32, 12 bands).

        Args:
            path: the folder holding ``<patch>/<patch>_<BAND>.tif`` folders.
            nan_as_nodata: as for :meth:`from_folder`.

        Returns:
            a multi-label pool (unlabelled when no label JSON files exist).
        """
        from anneal_geo.data.bigearthnet import read_bigearthnet

        return cls._from_raw(read_bigearthnet(path), nan_as_nodata)

    @classmethod
    def from_tiles(
        cls,
        path: str | Path,
        patch_size: int = 64,
        *,
        on_report: Callable[[Any], None] | None = None,
        nan_as_nodata: bool = False,
        store: str = "array",
        out: str | Path | None = None,
        **options: Any,
    ) -> PatchPool:
        """Cut a folder of Sentinel-2 tiles into patches through TorchGeo (unlabelled).

        With ``store="tiles"`` the pool keeps only each patch's window and reads its pixels
        from the tiles when asked (:mod:`anneal_geo.data.windows`): the same patches, in the
        same order, with the same statistics, footprints and dates; it is written to
        ``out`` as it is built (the pixels are read once, for the nodata and cloud tests
        and the statistics, and never held all at once) and returned opened from there.

        Args:
            path: the tile archive (one file per band, or one multi-band file per scene).
            patch_size: patch side in pixels.
            on_report: called with the :class:`~anneal_geo.data.tiles.IngestReport`
                (patches read, kept, skipped as nodata or cloud).
            nan_as_nodata: fill the NaN pixels left in kept patches (NaN already counts as
                nodata when patches are skipped); without it they are a DataError (the
                tiles store cannot fill them: build it from integer tiles, or use the array
                store).
            store: ``"array"`` (the patches in memory; :meth:`save` writes patches.npy) or
                ``"tiles"`` (windows into the tiles, saved to ``out``).
            out: the pool directory, for ``store="tiles"`` (required there).
            **options: ``stride``, ``bands``, ``res``, ``cloud_mask``, ``max_nodata``,
                ``read_block``, ``num_workers``, ``progress`` of
                :func:`~anneal_geo.data.tiles.read_tiles`.
        """
        from anneal_geo.data.tiles import read_tiles

        if store not in STORES:
            raise ConfigError(f"store={store!r} is not one of {', '.join(STORES)}; pick one")
        if store == "tiles":
            if out is None:
                raise ConfigError(
                    "store='tiles' writes the pool as it is built: give its folder with out="
                )
            _check_writable(Path(out))
            read = read_tiles(path, patch_size, keep_pixels=False, **options)
            if on_report is not None:
                on_report(read.report)
            return cls._save_tiles_read(read, Path(out), nan_as_nodata)
        read = read_tiles(path, patch_size, **options)
        if on_report is not None:
            on_report(read.report)
        if not read.nan_free:
            check_nan(read.patches, read.sources, read.bands, fill=nan_as_nodata)
        pool = cls(
            read.patches,
            read.bands,
            sources=read.sources,
            band_mean=read.band_mean,
            band_std=read.band_std,
            source_crs=list(read.crs),
            source_sha256=read.checksums,
            footprints=read.footprints,
            resolution=read.resolution,
        )
        pool._prepared_footprints = read.prepared_footprints
        return pool

    @classmethod
    def _save_tiles_read(cls, read: Any, directory: Path, nan_as_nodata: bool) -> PatchPool:
        """Write a tiles-store pool from a ``read_tiles(..., keep_pixels=False)`` read."""
        from anneal_geo.data.windows import (
            WINDOWS_FILE,
            scene_table,
            windows_from_layout,
            write_windows,
        )

        layout = read.layout
        assert layout is not None
        if layout.warped:
            raise DataError(
                f"{layout.warped[0]} is not on its scene's grid (TorchGeo warps it), which the "
                "tiles store does not read; build this archive with --store array"
            )
        windows = np.asarray(read.windows)
        dtype = read.patches.dtype
        patches = windows_from_layout(layout, windows, dtype)
        band_mean, band_std = read.band_mean, read.band_std
        if not read.nan_free:
            try:
                check_nan(patches, read.sources, read.bands)  # streams from the tiles
            except DataError as exc:
                fill = " (--nan-as-nodata fills them in the array store only)"
                raise DataError(
                    f"{str(exc).split(';')[0]}; the tiles store reads the pixels as they are and "
                    f"cannot fill NaN{fill if nan_as_nodata else ''}: build with --store array "
                    "--nan-as-nodata, or fix the rasters"
                ) from exc
        if band_mean is None or band_std is None:
            band_mean, band_std = band_statistics(patches)  # streams from the tiles
        pool = cls(
            patches,
            read.bands,
            sources=read.sources,
            band_mean=band_mean,
            band_std=band_std,
            source_crs=list(read.crs),
            source_sha256=read.checksums,
            resolution=read.resolution,
        )
        # Tiles always carry a CRS; the footprints are written chunk by chunk.
        pool._georeferenced = True
        pool._footprint_chunks = read.footprint_chunks
        pool._scene_table = scene_table(layout, directory)
        pool._stride = layout.stride
        target = directory / WINDOWS_FILE
        try:
            write_windows(directory, layout.scene, windows[:, 0], windows[:, 1], layout.grids)
            pool._write_rest(directory)
        except OSError as exc:
            raise DataError(
                f"cannot write {target} ({exc.strerror or exc}); free space or choose another "
                "folder"
            ) from exc
        pool.path = directory
        return pool

    @classmethod
    def load(
        cls, source: str | Path, bands: Sequence[str] | None = None, *, nan_as_nodata: bool = False
    ) -> PatchPool:
        """Open a pool directory, or read a BigEarthNet or class-folder archive.

        Args:
            source: a saved pool directory (has ``pool.json``), a BigEarthNet folder, a tile
                archive (read with :meth:`from_tiles` at its defaults) or a class-folder
                archive.
            bands: band names for a class-folder archive, the bands to read from a tile
                archive (ignored otherwise).
            nan_as_nodata: fill NaN pixels of float rasters (see :func:`check_nan`).

        Raises:
            DataError: ``source`` is none of the accepted layouts.
        """
        from anneal_geo.data.bigearthnet import is_bigearthnet
        from anneal_geo.data.folders import find_class_folders
        from anneal_geo.data.tiles import is_tile_archive

        source = Path(source)
        if (source / POOL_FILE).is_file():
            return cls.open(source)
        if is_bigearthnet(source):
            return cls.from_bigearthnet(source, nan_as_nodata=nan_as_nodata)
        if is_tile_archive(source):
            # Tiles are cut into 64 px patches here; `pool build --patch-size` chooses.
            return cls.from_tiles(source, bands=bands, nan_as_nodata=nan_as_nodata)
        try:
            find_class_folders(source)
        except DataError as exc:
            raise DataError(
                f"{source} is not a pool directory ({POOL_FILE}), a BigEarthNet folder "
                "(<patch>/<patch>_B02.tif), a tile archive (<scene>/B04.tif or multi-band "
                "scenes) or a class-folder archive (<Class>/*.tif|*.jpg|*.png); "
                "point to one of these"
            ) from exc
        return cls.from_folder(source, bands, nan_as_nodata=nan_as_nodata)

    # ------------------------------------------------------------------ saving

    def _metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "store": self.store,
            "created": self.created,
            "n_patches": len(self),
            "bands": self.bands,
            "shape": list(self.patches.shape),
            "patch_size": list(self.patch_size),
            "dtype": self.patches.dtype.str,
            "resolution": self.resolution,
            "class_names": self.class_names,
            "multilabel": self.multilabel,
            "band_mean": self.band_mean.tolist(),
            "band_std": self.band_std.tolist(),
            "georeferenced": self.georeferenced,
            "fingerprint": self.fingerprint,
        }
        if self.store == "tiles":
            # One row per scene, not one string per patch: patches name their scene in
            # windows.npz, and sources, checksums, CRSs and dates follow from it.
            meta.update(
                stride=self._stride, channels=self._tile_channels(), scenes=self._scene_table
            )
        else:
            meta.update(
                sources=self.sources,
                sha256=self.source_sha256,
                crs=self.source_crs,
                acquired=self.acquired,
            )
        return meta

    def save(self, directory: str | Path) -> Path:
        """Write the pool directory (see the module docstring) and return its path.

        Files are written under temporary names and renamed, ``pool.json`` last, so an
        interrupted save never looks like a complete pool.

        Raises:
            DataError: the directory cannot be created or written.
        """
        directory = Path(directory)
        if self.path is not None and directory.resolve() == self.path.resolve():
            return directory  # already stored there; rewriting would clobber the memmap
        from anneal_geo.data.windows import WINDOWS_FILE, TileWindows, retarget_table, write_windows

        _check_writable(directory)
        target = directory
        try:
            if isinstance(self.patches, TileWindows):
                # The same windows into the same tiles, their relative paths from here.
                target = directory / WINDOWS_FILE
                windows = self.patches
                write_windows(directory, windows.scene, windows.row, windows.col, windows.grids())
                self._scene_table = retarget_table(self._scene_table or [], windows, directory)
                (directory / PATCHES_FILE).unlink(missing_ok=True)
            else:
                tmp = directory / (PATCHES_FILE + ".partial")
                target = directory / PATCHES_FILE
                # Written through the file (a memory-mapped pool streams from its pages), not
                # into a writable memmap, whose flush waits for the disk.
                with open(tmp, "wb") as fh:
                    np.lib.format.write_array(fh, self.patches, allow_pickle=False)
                os.replace(tmp, target)
                (directory / WINDOWS_FILE).unlink(missing_ok=True)
            self._write_rest(directory)
        except OSError as exc:
            raise DataError(
                f"cannot write {target} ({exc.strerror or exc}); free space or choose another "
                "folder"
            ) from exc
        self.path = directory
        return directory

    def _write_rest(self, directory: Path) -> None:
        """Write labels, footprints and ``pool.json`` (last) beside the pixels or windows."""
        target = directory / LABELS_FILE
        if self.labels is not None:
            with open(directory / (LABELS_FILE + ".partial"), "wb") as fh:
                np.save(fh, self.labels)
            os.replace(directory / (LABELS_FILE + ".partial"), target)
        else:
            target.unlink(missing_ok=True)

        target = directory / FOOTPRINTS_FILE
        tmp = directory / ("partial-" + FOOTPRINTS_FILE)
        if self._footprint_chunks is not None:
            from anneal_geo.data.footprints import read_footprints, write_footprint_chunks

            tmp.unlink(missing_ok=True)
            write_footprint_chunks(self._footprint_chunks(), tmp, len(self))
            os.replace(tmp, target)
            self._footprint_chunks = None
            self._footprint_source = partial(read_footprints, target)
            self._footprints_file = target
        elif self._copied_prepared_footprints(tmp):
            os.replace(tmp, target)
        elif self.georeferenced:
            from anneal_geo.data.footprints import write_footprints

            tmp.unlink(missing_ok=True)
            write_footprints(self.footprints, tmp)
            os.replace(tmp, target)
        else:
            target.unlink(missing_ok=True)

        target = directory / POOL_FILE
        tmp = directory / (POOL_FILE + ".partial")
        tmp.write_text(json.dumps(self._metadata(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, target)

    def _copied_prepared_footprints(self, tmp: Path) -> bool:
        """Copy footprints.gpkg written ahead by ``from_tiles`` to ``tmp``; False when there
        is none (or it is gone: then save() writes the footprints itself)."""
        prepared = self._prepared_footprints
        if prepared is None or prepared.path is None:
            return False
        try:
            shutil.copyfile(prepared.path, tmp)
        except FileNotFoundError:
            self._prepared_footprints = None
            return False
        return True

    @classmethod
    def open(cls, directory: str | Path) -> PatchPool:
        """Open a saved pool: memory-maps ``patches.npy``; reads no raster. A tiles-store
        pool opens its windows instead, checking that every tile it reads is there, with
        the size and mtime recorded (one ``stat`` per file; no pixel is read).

        Raises:
            DataError: not a pool directory, another format or version, damaged files, or
                (tiles store) a tile missing or changed since the pool was built.
        """
        directory = Path(directory)
        meta_path = directory / POOL_FILE
        if not meta_path.is_file():
            raise DataError(
                f"{meta_path} not found: {directory} is not a saved pool; build one with "
                "PatchPool.load(<archive>).save(<folder>)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_path} is not readable JSON ({exc}); rebuild the pool") from exc
        if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (
            FORMAT,
            VERSION,
        ):
            found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else None
            raise DataError(
                f"{meta_path} is format/version {found}, not ({FORMAT!r}, {VERSION}); "
                "rebuild the pool from its sources with this version of anneal-geo"
            )
        if meta.get("store", "array") == "tiles":
            return cls._open_tiles(directory, meta, meta_path)
        patches_path = directory / PATCHES_FILE
        try:
            patches = np.load(patches_path, mmap_mode="r")
            shape, dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])
            labels = (
                np.load(directory / LABELS_FILE) if meta.get("class_names") is not None else None
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{directory} is a damaged pool ({exc}); rebuild it from its sources"
            ) from exc
        if patches.shape != shape or patches.dtype != dtype:
            raise DataError(
                f"{patches_path} holds {patches.shape} {patches.dtype} but {meta_path} says "
                f"{shape} {dtype}; the pool is damaged: rebuild it"
            )
        footprints: Any = None
        if meta.get("georeferenced"):
            from anneal_geo.data.footprints import read_footprints

            # Read on first access: opening a pool stays a millisecond affair.
            footprints = partial(read_footprints, directory / FOOTPRINTS_FILE)

        try:
            pool = cls(
                patches,
                meta["bands"],
                class_names=meta.get("class_names"),
                labels=labels,
                multilabel=bool(meta.get("multilabel", False)),
                sources=meta["sources"],
                band_mean=meta["band_mean"],
                band_std=meta["band_std"],
                source_crs=meta.get("crs"),
                source_sha256=meta.get("sha256"),
                footprints=footprints,
                resolution=meta.get("resolution"),
                created=meta.get("created"),
                path=directory,
                acquired=meta.get("acquired"),
            )
        except (KeyError, TypeError) as exc:
            raise DataError(f"{meta_path} lacks {exc}; rebuild the pool") from exc
        pool._opened_footprints(directory, meta)
        return pool

    def _opened_footprints(self, directory: Path, meta: dict[str, Any]) -> None:
        """Record what a pool opened from ``directory`` knows of its footprints file."""
        self._georeferenced = bool(meta.get("georeferenced"))
        if self._georeferenced:
            self._footprints_file = directory / FOOTPRINTS_FILE

    @classmethod
    def _open_tiles(cls, directory: Path, meta: dict[str, Any], meta_path: Path) -> PatchPool:
        from anneal_geo.data.windows import windows_from_store

        patches, sources, crs, sha256 = windows_from_store(directory, meta, meta_path)
        footprints: Any = None
        if meta.get("georeferenced"):
            from anneal_geo.data.footprints import read_footprints

            footprints = partial(read_footprints, directory / FOOTPRINTS_FILE)
        try:
            labels = (
                np.load(directory / LABELS_FILE) if meta.get("class_names") is not None else None
            )
            pool = cls(
                patches,
                meta["bands"],
                class_names=meta.get("class_names"),
                labels=labels,
                multilabel=bool(meta.get("multilabel", False)),
                sources=sources,
                band_mean=meta["band_mean"],
                band_std=meta["band_std"],
                source_crs=crs,
                source_sha256=sha256,
                footprints=footprints,
                resolution=meta.get("resolution"),
                created=meta.get("created"),
                path=directory,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{meta_path} is damaged ({exc}); rebuild the pool") from exc
        pool._scene_table = meta["scenes"]
        pool._stride = int(meta["stride"])
        pool._opened_footprints(directory, meta)
        # Recorded at build time from the same bands, shape, dtype and sources.
        if isinstance(meta.get("fingerprint"), str):
            pool._fingerprint = meta["fingerprint"]
        return pool

    def _tile_channels(self) -> list[int]:
        from anneal_geo.data.windows import TileWindows

        return list(self.patches.channels) if isinstance(self.patches, TileWindows) else []

    # ------------------------------------------------------------------ views

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def __repr__(self) -> str:
        h, w = self.patch_size
        classes = "unlabelled" if self.class_names is None else f"{len(self.class_names)} classes"
        return (
            f"PatchPool({len(self)} patches, {self.n_bands} bands, {h}x{w}, "
            f"{self.patches.dtype}, {classes})"
        )

    @property
    def n_bands(self) -> int:
        """Number of bands (channels) C."""
        return int(self.patches.shape[1])

    @property
    def patch_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.patches.shape[2]), int(self.patches.shape[3])

    @property
    def has_labels(self) -> bool:
        """Whether the pool carries labels."""
        return self.labels is not None

    @property
    def footprints(self) -> Any:
        """GeoDataFrame of patch footprints (EPSG:4326 ``geometry``), or None without georeference.

        Built or read from ``footprints.gpkg`` on first access, then cached.
        """
        if self._footprint_source is not None:
            self._footprints = self._footprint_source()
            self._footprint_source = None
        if self._prepared_footprints is not None:
            # Handed out, the frame may be changed: save() writes it afresh.
            self._prepared_footprints.discard()
            self._prepared_footprints = None
        return self._footprints

    @property
    def georeferenced(self) -> bool:
        """Whether the pool has footprints (known without reading them when opened from
        disk or built from tiles)."""
        if self._georeferenced is None:
            self._georeferenced = self.footprints is not None
        return self._georeferenced

    def _lookup_file(self) -> Path | None:
        """footprints.gpkg when lookups should read it rather than all footprints: a big
        saved pool whose footprints are not in memory already."""
        if self._footprints is not None or len(self) <= FOOTPRINTS_IN_MEMORY:
            return None
        file = self._footprints_file
        return file if file is not None and file.is_file() else None

    def footprint_rows(self, ids: Sequence[int] | np.ndarray) -> Any:
        """The footprints of patches ``ids``, in that order (index reset), or None without
        georeference; a big saved pool reads just those rows from footprints.gpkg."""
        if not self.georeferenced:
            return None
        ids = np.asarray(ids, dtype=np.int64).ravel()
        file = self._lookup_file()
        if file is not None:
            from anneal_geo.data.footprints import read_footprint_rows

            return read_footprint_rows(file, ids)
        return self.footprints.iloc[ids].reset_index(drop=True)

    def patches_intersecting(self, geometry: Any) -> np.ndarray:
        """Sorted ids of the patches whose EPSG:4326 footprint intersects ``geometry``
        (empty without georeference); a big saved pool asks footprints.gpkg's spatial
        index instead of reading every footprint."""
        if not self.georeferenced:
            return np.zeros(0, dtype=np.int64)
        file = self._lookup_file()
        if file is not None:
            from anneal_geo.data.footprints import footprint_ids_intersecting

            return footprint_ids_intersecting(file, geometry)
        footprints = self.footprints
        hits = footprints.sindex.query(geometry, predicate="intersects")
        return np.sort(footprints["patch_id"].to_numpy(dtype=np.int64)[hits])

    def footprint_bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in degrees of all footprints (georeferenced pools)."""
        file = self._lookup_file()
        if file is not None:
            from anneal_geo.data.footprints import footprint_bounds

            return footprint_bounds(file)
        west, south, east, north = (float(v) for v in self.footprints.total_bounds)
        return west, south, east, north

    @property
    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of band names, shape, dtype and sources.

        Sources enter relative to their common folder, so moving the archive or spelling its
        path differently keeps the fingerprint.
        """
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(
                self.bands, self.patches.shape, self.patches.dtype, self.sources
            )
        return self._fingerprint

    def has_fingerprint(self, recorded: str | None) -> bool:
        """Whether ``recorded`` (a fingerprint a session or an index wrote) names this pool.

        A pool cut from tiles whose bands were resampled was float32 before it kept the
        tiles' integer dtype: the same values, another fingerprint. Such a recorded
        fingerprint still names this pool when it is that of this pool as float32.
        """
        if recorded == self.fingerprint:
            return True
        dtype = self.patches.dtype
        if recorded is None or dtype.kind not in "ui" or dtype.itemsize > 2:
            return False
        legacy = _fingerprint(self.bands, self.patches.shape, np.dtype(np.float32), self.sources)
        return recorded == legacy

    @property
    def store(self) -> str:
        """How the pixels are kept: ``"array"`` (an array, ``patches.npy`` once saved) or
        ``"tiles"`` (windows read from the tile files when asked)."""
        from anneal_geo.data.windows import TileWindows

        return "tiles" if isinstance(self.patches, TileWindows) else "array"

    def disk_bytes(self) -> dict[str, int]:
        """Disk used: ``pool`` (the pool directory's files; 0 when not saved) and, for the
        tiles store, ``tiles`` (the tile files it reads, each once)."""
        from anneal_geo.data.windows import TileWindows, tiles_bytes

        used = {"pool": 0 if self.path is None else _directory_bytes(self.path)}
        if isinstance(self.patches, TileWindows):
            used["tiles"] = tiles_bytes(self.patches)
        return used

    def _check_ids(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu" and arr.size:
            raise DataError(f"patch ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        bad = arr[(arr < 0) | (arr >= len(self))]
        if bad.size:
            raise DataError(f"patch id {int(bad[0])} is out of range 0..{len(self) - 1}")
        return arr

    def float_patches(self, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The patches ``ids`` (all when None) as float32 (len(ids), C, H, W), native units."""
        if ids is None:
            return np.array(self.patches, dtype=np.float32)
        index = self._check_ids(ids)
        if index.ndim != 1:
            raise DataError(f"patch ids must be one-dimensional, got shape {index.shape}")
        return np.array(self.patches[index], dtype=np.float32)

    def close_files(self) -> None:
        """Close the tile files a tiles-store pool keeps open between reads, which frees
        the blocks GDAL caches for them (about 300 MB after reading 210,000 patches); they
        reopen on the next read. Nothing to do for a pool whose pixels are in its folder."""
        from anneal_geo.data.windows import TileWindows

        if isinstance(self.patches, TileWindows):
            self.patches.close()

    def single_labels(self) -> np.ndarray:
        """(N,) int64 class index of each patch.

        Raises:
            DataError: the pool is unlabelled or multi-label.
        """
        if self.labels is None:
            raise DataError("this pool has no labels; build it from class folders to get some")
        if self.multilabel:
            raise DataError(
                "this pool is multi-label; use pool.labels (N, L) instead of single_labels()"
            )
        return np.argmax(self.labels, axis=1).astype(np.int64)

    def label_text(self, patch_id: int) -> str | None:
        """The patch's label(s) as text (``"; "``-joined when multi-label), None if unlabelled."""
        if self.labels is None or self.class_names is None:
            return None
        names = self.class_names
        return "; ".join(names[j] for j in np.flatnonzero(self.labels[patch_id]))

    def class_counts(self) -> dict[str, int]:
        """Patches per class (a multi-label patch counts for each of its labels)."""
        if self.labels is None or self.class_names is None:
            return {}
        counts = self.labels.sum(axis=0)
        return {name: int(k) for name, k in zip(self.class_names, counts, strict=True)}

    def select_bands(self, names: Sequence[str]) -> PatchPool:
        """A new pool with only ``names``, in that order (in memory unless all bands are kept).

        Raises:
            DataError: a band is not in the pool (the message lists the available ones).
        """
        from anneal_geo.data.windows import TileWindows

        index = band_indices(self.bands, names)
        # Selecting every band in order shares the (possibly memory-mapped) array: no copy.
        same = index == list(range(self.n_bands))
        patches: Patches
        if same:
            patches = self.patches
        elif isinstance(self.patches, TileWindows):
            patches = self.patches.with_channels(index)  # still windows: no pixel read
        else:
            patches = np.ascontiguousarray(self.patches[:, index])
        pool = PatchPool(
            patches,
            [self.bands[i] for i in index],
            class_names=self.class_names,
            labels=self.labels,
            multilabel=self.multilabel,
            sources=self.sources,
            band_mean=self.band_mean[index],
            band_std=self.band_std[index],
            source_crs=self.source_crs,
            source_sha256=self.source_sha256,
            resolution=self.resolution,
            created=self.created,
            acquired=self.acquired,
        )
        # Same patches, same footprints: share them lazily instead of rebuilding.
        pool._footprint_source = lambda: self.footprints
        pool._footprints_file, pool._georeferenced = self._footprints_file, self._georeferenced
        pool._scene_table, pool._stride = self._scene_table, self._stride
        return pool

    def rgb(self, patch_id: int) -> np.ndarray:
        """A true-colour preview: (H, W, 3) uint8 from B04/B03/B02 with a 2-98 % stretch.

        Falls back to the first three bands (or repeats the first band) when the pool has
        no red, green and blue bands. Each band is stretched between its own 2nd and 98th
        percentile, which hides sensor units and outliers alike.
        """
        index = self._check_ids(patch_id)
        if index.ndim != 0:
            raise DataError("rgb() takes one patch id")
        if all(b in self.bands for b in RGB_BANDS):
            channels = band_indices(self.bands, RGB_BANDS)
        elif self.n_bands >= 3:
            channels = [0, 1, 2]
        else:
            channels = [0, 0, 0]
        image = np.asarray(self.patches[int(index)][channels], dtype=np.float32)
        low, high = np.percentile(image, [2.0, 98.0], axis=(1, 2))
        span = np.where(high > low, high - low, 1.0)
        scaled = (image - low[:, None, None]) / span[:, None, None]
        return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)

    def check_sources(self) -> list[str]:
        """Sources that are missing or whose SHA-256 differs from build time (reads the files).

        Returns:
            the changed or missing sources; empty when all match or no checksums are known.
        """
        from anneal_geo.data.bigearthnet import patch_sha256
        from anneal_geo.data.sources import sha256_file

        if self.source_sha256 is None:
            return []
        changed = []
        checked: dict[tuple[str, str], bool] = {}  # a tile pool repeats a scene's file
        for source, digest in zip(self.sources, self.source_sha256, strict=True):
            ok = checked.get((source, digest))
            if ok is None:
                path = Path(source)
                try:
                    ok = (patch_sha256(path) if path.is_dir() else sha256_file(path)) == digest
                except OSError:
                    ok = False
                checked[(source, digest)] = ok
            if not ok:
                changed.append(source)
        return changed

    def describe(self) -> str:
        """A multi-line human summary (for ``anneal-geo pool info``)."""
        h, w = self.patch_size
        lines = [
            f"patches:     {len(self)}",
            f"bands:       {self.n_bands} ({', '.join(self.bands)})",
            f"patch size:  {h} x {w} px"
            + ("" if self.resolution is None else f" at {self.resolution:.4g} m/px"),
            f"dtype:       {self.patches.dtype}",
        ]
        from anneal_geo.data.windows import TileWindows

        used = self.disk_bytes()
        if isinstance(self.patches, TileWindows):
            n_files = len(self.patches.files())
            lines.append(f"store:       tiles (windows read from {n_files} tile files)")
            disk = f"{_megabytes(used['pool'])} pool directory"
            lines.append(f"disk:        {disk} + {_megabytes(used['tiles'])} of tiles read")
        else:
            lines.append("store:       array (patches.npy)")
            saved = f"{_megabytes(used['pool'])} pool directory" if self.path else "not saved"
            lines.append(f"disk:        {saved}")
        if self.class_names is None:
            lines.append("labels:      none")
        else:
            kind = "multi-label" if self.multilabel else "single-label"
            lines.append(f"labels:      {len(self.class_names)} classes, {kind}")
            lines.extend(f"  {name}: {k}" for name, k in self.class_counts().items())
        crs_counts = Counter(c for c in self.source_crs if c is not None)
        if crs_counts:
            lines.append(
                "CRS:         " + ", ".join(f"{c} ({k})" for c, k in sorted(crs_counts.items()))
            )
        else:
            lines.append("CRS:         none (no footprints)")
        dates = Counter(d for d in self.acquired if d is not None)
        if dates:
            unknown = len(self) - sum(dates.values())
            shown = ", ".join(f"{d} ({k})" for d, k in sorted(dates.items())[:6])
            more = f", ... ({len(dates)} dates)" if len(dates) > 6 else ""
            lines.append(
                f"acquired:    {shown}{more}" + (f", unknown ({unknown})" if unknown else "")
            )
        lines.append(
            "band mean:   "
            + " ".join(f"{b}={m:.4g}" for b, m in zip(self.bands, self.band_mean, strict=True))
        )
        lines.append(f"fingerprint: {self.fingerprint}")
        lines.append(f"path:        {self.path if self.path is not None else '(not saved)'}")
        return "\n".join(lines)


def build_pool_cli_summary(pool: PatchPool) -> str:
    """The text ``anneal-geo pool info`` prints: :meth:`PatchPool.describe`."""
    return pool.describe()
