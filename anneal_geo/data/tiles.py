"""Tile archives: Sentinel-2 scenes cut into patches through TorchGeo.

Two layouts are read, and may be mixed in one archive:

- **one file per band** (Major TOM ``<product>/B04.tif``, SAFE ``IMG_DATA/R10m/
  T48QUE_20200223T032739_B04_10m.jp2``, BigEarthNet ``<patch>_B04.tif``): the files of a
  scene are found by their band name; the bands at 20 m and 60 m are resampled by TorchGeo
  (bilinear) onto the grid of the finest requested band, or onto ``res``;
- **one multi-band file per scene** (GeoTIFF or JP2): band names come from the band
  descriptions, or from the band count (13: EuroSAT-MS order, 12: Level-2A order).

Each scene becomes one TorchGeo ``RasterDataset`` (:func:`dataset_classes`) in its **own
CRS**: scenes in different UTM zones are never reprojected into a common CRS and never
mosaicked together; every patch keeps its scene's CRS (the ``crs`` column of the
footprints), and the common EPSG:4326 ``geometry`` lets them be queried together. This also
keeps two acquisitions of the same place apart (a single dataset would merge them).

The patch grid of a scene is TorchGeo's ``GriddedPatchSampler``, restricted by a region of
interest to whole patches inside the scene (the remainder is split evenly between the
edges, as the sampler does), so no patch is padded with fill. The sampler's slices are
exact float64 coordinates, and the footprints and pixel windows are computed from them
(a sample's ``bounds`` tensor is float32, which rounds a UTM northing by up to 0.25 m).

TorchGeo indexes each scene (its files, CRS, resolution and bounds), decides whether a
file is read as it is or through a ``WarpedVRT``, and lays the patch grid; the pixels are
then read straight from the files it indexed, one big window per band and strip of patch
rows (the whole scene for a Major TOM cell), with the very call TorchGeo reads with
(``rasterio.merge.merge`` with its resampling, reduced to the resampled window read when
nothing can be masked), and cut into patches with numpy. Threads (``num_workers``) read
the bands and scenes in parallel; GDAL decodes and resamples without the GIL. With threads,
each band's first strip is read while TorchGeo is still indexing the scene, with the bounds
its grid will give worked out from the file header, and used only when it is exactly the
read then due (:func:`_read_early`). Reading
each patch through TorchGeo's ``__getitem__`` (a ``DataLoader`` over blocks of
``read_block x read_block`` patches; ``read_block=1``: each patch on its own) gives the
same values, slower: TorchGeo spends about 1 ms of Python per band and read.

Patches that are mostly nodata (every band equal to the nodata value, 0 for Sentinel-2
L2A files that declare none), or mostly cloud when a cloud mask is given (Major TOM's
``cloud_mask.tif``: non-zero is cloud), are skipped: a patch is kept when at most
``max_nodata`` of its pixels are nodata or cloud. :class:`IngestReport` counts them.
"""

from __future__ import annotations

import functools
import glob
import itertools
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np

from anneal_geo._memory import GDAL_CACHE_BYTES, cap_gdal_cache, release_free_memory
from anneal_geo.data import footprints as footprints_module
from anneal_geo.data.bands import S2_ALL_BANDS, infer_band_names, normalise_band_name
from anneal_geo.data.sources import GeoRef, natural_key, sha256_file
from anneal_geo.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_MAX_NODATA",
    "DEFAULT_PATCH_SIZE",
    "FOOTPRINT_CHUNK_ROWS",
    "TILE_SUFFIXES",
    "GeoRefs",
    "IngestReport",
    "ReportCallback",
    "Scene",
    "TileLayout",
    "TileRead",
    "dataset_classes",
    "find_scenes",
    "is_tile_archive",
    "patch_grid",
    "read_tiles",
]

#: Patch side in pixels when none is given (EuroSAT's 64 px at 10 m: 640 m).
DEFAULT_PATCH_SIZE = 64
#: Skip a patch when more than this share of its pixels is nodata or cloud.
DEFAULT_MAX_NODATA = 0.5
#: Raster files a tile archive may hold (JPEG/PNG previews are never scenes).
TILE_SUFFIXES = frozenset({".tif", ".tiff", ".jp2"})
# Pixels of one direct read (a strip of patch rows of one band): 16 MB as uint16.
_STRIP_PIXELS = 8 << 20
# Band reads between two hand-backs of freed heap memory while tiles are read: the reader
# threads free a strip's buffers into their own allocator arenas, which otherwise keep them.
_TRIM_EVERY_READS = 64
# A raster at least this large (and georeferenced) is a scene, not a patch, when telling a
# tile archive from a class-folder archive (EuroSAT 64 px, BigEarthNet 120, UC Merced 256).
_MIN_SCENE_SIDE = 512

# B4, B04, B8A, with an optional prefix (tile and date) and resolution suffix (_10m).
_BAND_FILE = re.compile(
    r"^(?:(?P<prefix>.+?)[_.-])?(?P<band>B(?:0?[1-9]|1[0-2]|8A))(?:_(?P<res>\d+)m)?"
    r"\.(?:tiff?|jp2)$",
    re.IGNORECASE,
)
_RESOLUTION_DIR = re.compile(r"^R\d+m$", re.IGNORECASE)
_MASK_STEM = "cloud_mask"


def _is_mask_name(path: Path) -> bool:
    stem = path.stem.lower()
    return stem == _MASK_STEM or stem.endswith("_" + _MASK_STEM)


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Scene:
    """One acquisition: its band files (per-band layout) or its multi-band file.

    Attributes:
        name: the scene as shown in messages (its folder or file, relative to the archive).
        band_files: band name -> file, for the one-file-per-band layout (else empty).
        file: the multi-band file, for the one-file-per-scene layout (else None).
        cloud_mask: the scene's cloud mask (non-zero = cloud), or None.
    """

    name: str
    band_files: dict[str, Path] = field(default_factory=dict)
    file: Path | None = None
    cloud_mask: Path | None = None


def _walk(root: Path) -> Iterator[tuple[Path, list[Path]]]:
    """(folder, raster files) for every folder under ``root``, in natural order."""
    for folder, dirs, files in os.walk(root):
        # Hidden and private folders (.git, __pycache__) never hold scenes.
        dirs[:] = sorted((d for d in dirs if not d.startswith((".", "_"))), key=natural_key)
        rasters = [Path(folder) / f for f in sorted(files, key=natural_key)]
        yield Path(folder), [p for p in rasters if p.suffix.lower() in TILE_SUFFIXES]


def _band_resolution(match: re.Match[str]) -> int:
    res = match.group("res")
    return int(res) if res else 0


def _resolve_mask(
    cloud_mask: str | Path | None, scene_dir: Path, candidates: Sequence[Path], where: str
) -> Path | None:
    if cloud_mask is None:
        return None
    text = str(cloud_mask)
    if text.lower() == "none":
        return None
    if text.lower() == "auto":
        return candidates[0] if candidates else None
    path = Path(text)
    if path.is_absolute() or path.is_file():
        if not path.is_file():
            raise DataError(f"cloud mask {path} does not exist; give an existing file or 'none'")
        return path
    found = scene_dir / path
    if not found.is_file():
        raise DataError(
            f"scene {where} has no cloud mask {found.name} (looked for {found}); add it, or "
            "pass --cloud-mask auto or none"
        )
    return found


def find_scenes(root: str | Path, cloud_mask: str | Path | None = "auto") -> list[Scene]:
    """The scenes of a tile archive, in natural order of their paths.

    A folder holding band files (``B04.tif``, ``..._B04_10m.jp2``) holds one scene per
    file-name prefix; its other rasters (cloud mask, SCL, TCI) are auxiliary. In a folder
    without band files every raster is a multi-band scene. ``root`` may also be one file.

    Args:
        root: the archive folder, or one multi-band scene file.
        cloud_mask: ``"auto"`` (``cloud_mask.tif`` beside the band files, or
            ``<scene>_cloud_mask.tif`` beside a multi-band file), ``None``/``"none"``, a
            file name looked up in every scene's folder, or the path of one mask file.

    Raises:
        DataError: the path does not exist, holds no rasters, or a band appears twice.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist; give the folder that holds your tiles")
    if root.is_file():
        if root.suffix.lower() not in TILE_SUFFIXES:
            raise DataError(
                f"{root} is not a GeoTIFF or JP2 raster; give a folder of Sentinel-2 tiles"
            )
        masks = [p for p in root.parent.glob(f"{glob.escape(root.stem)}_{_MASK_STEM}.*")]
        return [
            Scene(
                root.name,
                file=root,
                cloud_mask=_resolve_mask(cloud_mask, root.parent, masks, root.name),
            )
        ]
    grouped: dict[tuple[Path, str], dict[str, tuple[int, Path]]] = {}
    masks_in: dict[Path, list[Path]] = {}
    multi: list[Path] = []
    for folder, rasters in _walk(root):
        masks_in[folder] = [p for p in rasters if _is_mask_name(p)]
        bands = [(p, _BAND_FILE.match(p.name)) for p in rasters if not _is_mask_name(p)]
        if not any(m for _, m in bands):
            multi.extend(p for p, _ in bands)
            continue
        scene_dir = folder.parent if _RESOLUTION_DIR.match(folder.name) else folder
        for path, match in bands:
            if match is None:
                continue  # an auxiliary raster beside the band files (SCL, TCI, AOT)
            band = normalise_band_name(match.group("band"))
            assert band is not None  # the pattern only matches band names
            key = (scene_dir, (match.group("prefix") or "").lower())
            files = grouped.setdefault(key, {})
            res = _band_resolution(match)
            if band in files:
                old_res, old = files[band]
                if not res or not old_res or res == old_res:
                    raise DataError(
                        f"band {band} appears twice in one scene ({old} and {path}); keep one "
                        "file per band and scene"
                    )
                if res > old_res:
                    continue  # SAFE products repeat bands at coarser resolutions: keep finest
            files[band] = (res, path)

    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(root)) or path.name
        except ValueError:
            return str(path)

    scenes: list[Scene] = []
    for (scene_dir, prefix), files in grouped.items():
        name = rel(scene_dir) if not prefix else f"{rel(scene_dir)}/{prefix}"
        candidates = masks_in.get(scene_dir, [])
        scenes.append(
            Scene(
                name,
                band_files={b: p for b, (_, p) in files.items()},
                cloud_mask=_resolve_mask(cloud_mask, scene_dir, candidates, name),
            )
        )
    for path in multi:
        own = [
            m
            for m in masks_in.get(path.parent, [])
            if m.stem.lower() == (path.stem.lower() + "_" + _MASK_STEM)
        ]
        lone = len([p for p in multi if p.parent == path.parent]) == 1
        candidates = own or (
            [m for m in masks_in.get(path.parent, []) if m.stem.lower() == _MASK_STEM]
            if lone
            else []
        )
        scenes.append(
            Scene(
                rel(path),
                file=path,
                cloud_mask=_resolve_mask(cloud_mask, path.parent, candidates, rel(path)),
            )
        )
    if not scenes:
        raise DataError(
            f"{root} holds no rasters matching *.tif, *.tiff or *.jp2 (band files like B04.tif "
            "or T33UUP_20200601T101031_B04_10m.jp2, or multi-band scene files); point to the "
            "folder of your Sentinel-2 tiles"
        )
    scenes.sort(key=lambda s: natural_key(s.name))
    return scenes


def is_tile_archive(root: str | Path) -> bool:
    """Whether ``root`` looks like a tile archive rather than a folder of ready-cut patches.

    True when a folder holds band files of at least two bands (one file per band), or when
    the first raster found is georeferenced and at least 512 px on its shorter side.
    Reads at most one raster header.
    """
    root = Path(root)
    if root.is_file():
        return root.suffix.lower() in TILE_SUFFIXES
    if not root.is_dir():
        return False
    first: Path | None = None
    for _, rasters in _walk(root):
        bands = {m.group("band").upper() for p in rasters if (m := _BAND_FILE.match(p.name))}
        if len(bands) >= 2:
            return True
        if first is None and rasters:
            first = rasters[0]
    if first is None:
        return False
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(first) as src:
            return src.crs is not None and min(src.width, src.height) >= _MIN_SCENE_SIDE
    except RasterioError:
        return False


# ---------------------------------------------------------------------------- probing


@dataclass
class _Probe:
    """What the headers of one scene's files say (read once, before any pixel)."""

    scene: Scene
    bands: list[str]  # the bands this scene provides, in file (or ESA) order
    crs: str
    native_res: dict[str, tuple[float, float]]  # band -> pixel size (x, y)
    dtypes: dict[str, str]
    nodata: float | None


class _Handles:
    """Files opened to read their headers, kept open (up to ``limit``) for reading their
    pixels later, so a small archive's files are opened once."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._open: dict[str, Any] = {}
        self._lent: dict[str, Any] = {}  # path -> lock held while its handle is lent
        self._lock = threading.Lock()

    def keep(self, path: Path, src: Any) -> bool:
        """Keep ``src`` open for :meth:`take`; False (close it yourself) when full."""
        with self._lock:
            if len(self._open) >= self.limit or str(path) in self._open:
                return False
            self._open[str(path)] = src
            return True

    def take(self, path: str | Path) -> Any:
        """The open handle of ``path`` (now the caller's to close), or None; waits while
        it is lent (:meth:`borrow`)."""
        with self._lock:
            src = self._open.pop(str(path), None)
            lent = self._lent.get(str(path))
        if lent is not None:
            with lent:
                pass
        return src

    @contextmanager
    def borrow(self, path: str | Path) -> Iterator[Any]:
        """The kept handle of ``path`` for a while (None when it was taken already):
        :meth:`take` waits until it is given back."""
        key = str(path)
        with self._lock:
            src = self._open.get(key)
            lent = self._lent.setdefault(key, threading.Lock()) if src is not None else None
            if lent is not None:
                lent.acquire()
        try:
            yield src
        finally:
            if lent is not None:
                lent.release()

    def get(self, path: str | Path) -> Any:
        """The open handle of ``path``, opened now if need be and kept open for the next
        call (the least recently used one is closed beyond ``limit``); this object still
        owns it: do not close it."""
        import rasterio

        key = str(path)
        with self._lock:
            src = self._open.pop(key, None)
            if src is None:
                src = rasterio.open(key)
            self._open[key] = src  # now the most recently used
            while len(self._open) > self.limit:
                oldest = next(iter(self._open))
                self._open.pop(oldest).close()
            return src

    def close(self) -> None:
        """Close every handle not taken."""
        with self._lock:
            handles, self._open = list(self._open.values()), {}
        for src in handles:
            src.close()


# CRS text per WKT: EPSG look-ups cost about a millisecond, and every band file of an
# archive usually shares a handful of CRSs.
_CRS_TEXT: dict[str, str] = {}


def _crs_text(crs: Any) -> str:
    from anneal_geo.data.folders import crs_text

    wkt = crs.to_wkt()
    text = _CRS_TEXT.get(wkt)
    if text is None:
        text = _CRS_TEXT[wkt] = crs_text(crs)
    return text


def _open_header(path: Path, scene: str, handles: _Handles | None = None) -> dict[str, Any]:
    import rasterio
    from rasterio.errors import RasterioError

    try:
        src = rasterio.open(path)
    except RasterioError as exc:
        raise DataError(
            f"{path} of scene {scene} could not be read ({_reason(exc)}); re-download or remove it"
        ) from exc
    kept = False
    try:
        if src.crs is None:
            raise DataError(
                f"{path} has no CRS, so its patches cannot be placed on a map; give it one "
                f"(e.g. `rio edit-info --crs EPSG:32633 {path}`) or build the pool from "
                "class folders instead"
            )
        a, b, _, d, e, _ = tuple(src.transform)[:6]
        if b != 0 or d != 0 or a <= 0 or e >= 0:
            raise DataError(
                f"{path} is not north-up (transform {tuple(src.transform)[:6]}); warp it "
                "to a north-up grid first (e.g. gdalwarp)"
            )
        head = {
            "crs": _crs_text(src.crs),
            "res": (float(a), float(-e)),
            "count": src.count,
            "dtype": src.dtypes[0],
            "nodata": src.nodata,
            "descriptions": list(src.descriptions),
        }
        kept = handles is not None and handles.keep(path, src)
        return head
    except RasterioError as exc:
        raise DataError(
            f"{path} of scene {scene} could not be read ({_reason(exc)}); re-download or remove it"
        ) from exc
    finally:
        if not kept:
            src.close()


def _probe(
    scene: Scene, handles: _Handles | None = None, wanted: Sequence[str] | None = None
) -> _Probe:
    """Read the headers of a scene: its multi-band file, or its band files (of the
    ``wanted`` bands and the first band in ESA order, whose nodata value is the scene's;
    every band file when ``wanted`` is None)."""
    if scene.file is not None:
        head = _open_header(scene.file, scene.name, handles)
        try:
            names = infer_band_names(
                head["count"], head["descriptions"], rgb_image=False, where=str(scene.file)
            )
        except DataError as exc:
            raise DataError(
                f"{scene.file}: cannot tell the names of its {head['count']} band(s); set "
                "Sentinel-2 band descriptions (B02, B03, ...) on the file, e.g. with "
                "`rio edit-info --bidx 1 --description B02`"
            ) from exc
        return _Probe(
            scene,
            names,
            head["crs"],
            dict.fromkeys(names, head["res"]),
            dict.fromkeys(names, head["dtype"]),
            head["nodata"],
        )
    order = [b for b in S2_ALL_BANDS if b in scene.band_files]
    if wanted is None:
        opened = order
    else:
        asked = {normalise_band_name(name) or name for name in wanted}
        opened = [b for i, b in enumerate(order) if i == 0 or b in asked]
    heads = {band: _open_header(scene.band_files[band], scene.name, handles) for band in opened}
    crss = {h["crs"] for h in heads.values()}
    if len(crss) > 1:
        raise DataError(
            f"the band files of scene {scene.name} are in different CRSs "
            f"({', '.join(sorted(crss))}); re-download the scene"
        )
    first = heads[order[0]]
    return _Probe(
        scene,
        order,
        first["crs"],
        {b: h["res"] for b, h in heads.items()},
        {b: h["dtype"] for b, h in heads.items()},
        first["nodata"],
    )


def _select_bands(probe: _Probe, wanted: Sequence[str]) -> list[str]:
    chosen = []
    for name in wanted:
        band = normalise_band_name(name) or name
        if band not in probe.bands:
            raise DataError(
                f"band {name!r} is not in scene {probe.scene.name} (it has "
                f"{', '.join(probe.bands)}); drop it from --bands or add its file"
            )
        chosen.append(band)
    if len(set(chosen)) != len(chosen):
        raise DataError(f"bands {list(wanted)} name the same band twice; give each band once")
    return chosen


# ---------------------------------------------------------------------------- the grid


def patch_grid(height: int, width: int, size: int, stride: int) -> tuple[int, int, int, int]:
    """The whole-patch grid over a ``height x width`` raster.

    Returns:
        ``(rows, cols, row0, col0)``: patches per column and row and the pixel offset of the
        first patch; the pixels left over are split evenly between the edges (the extra
        one, if odd, at the bottom and right), as TorchGeo's ``GriddedPatchSampler`` centres
        its grid.

    Raises:
        DataError: the patch is larger than the raster (the caller names the raster).
    """
    if size > height or size > width:
        raise DataError(f"patch size {size} px is larger than the {width}x{height} px raster")
    rows = (height - size) // stride + 1
    cols = (width - size) // stride + 1
    row0 = (height - (rows - 1) * stride - size) // 2
    col0 = (width - (cols - 1) * stride - size) // 2
    return rows, cols, row0, col0


def _check_size(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive whole number of pixels")
    return int(value)


# ---------------------------------------------------------------------------- TorchGeo


@functools.cache
def dataset_classes() -> tuple[type[Any], type[Any], type[Any]]:
    """The TorchGeo ``RasterDataset`` subclasses, defined on first use (importing TorchGeo
    is slow, and importing this module must stay light).

    Returns:
        ``(Sentinel2BandFiles, MultiBandScene, CloudMask)``.
    """
    from torchgeo.datasets import RasterDataset

    class Sentinel2BandFiles(RasterDataset):
        """One scene stored as one file per band; bands resampled to one grid by TorchGeo.

        The files were found by band name beforehand (:func:`find_scenes`), so the
        reference band's file is the dataset's only indexed file and every other band is
        looked up by name (:meth:`_update_filepath`) wherever it lies (SAFE keeps bands in
        ``R10m``/``R20m``/``R60m`` folders).
        """

        separate_files = True
        all_bands = S2_ALL_BANDS
        rgb_bands = ("B04", "B03", "B02")
        filename_regex = r".*"

        def __init__(
            self,
            band_files: dict[str, Path],
            bands: Sequence[str],
            reference: str,
            res: tuple[float, float],
        ) -> None:
            self.band_files = {b: str(p) for b, p in band_files.items()}
            path = self.band_files[reference]
            self.filename_glob = glob.escape(os.path.basename(path))
            # TorchGeo takes the grid from the indexed (reference) file; list it first.
            super().__init__(paths=[path], res=res, bands=list(bands))

        def _update_filepath(self, band: str, filepath: str) -> str:
            return self.band_files[band]

    class MultiBandScene(RasterDataset):
        """One scene stored as one multi-band file; its band names are given."""

        separate_files = False
        filename_regex = r".*"

        def __init__(
            self,
            path: Path,
            file_bands: Sequence[str],
            bands: Sequence[str],
            res: tuple[float, float],
        ) -> None:
            self.all_bands = tuple(file_bands)
            self.filename_glob = glob.escape(path.name)
            super().__init__(paths=[str(path)], res=res, bands=list(bands))

    class CloudMask(RasterDataset):
        """A scene's cloud mask (non-zero = cloud), read with nearest-neighbour resampling."""

        is_image = False
        filename_regex = r".*"

        def __init__(self, path: Path, crs: Any, res: tuple[float, float]) -> None:
            self.filename_glob = glob.escape(path.name)
            super().__init__(paths=[str(path)], crs=crs, res=res)

    classes = (Sentinel2BandFiles, MultiBandScene, CloudMask)
    for cls in classes:
        # Importable as anneal_geo.data.tiles.<name> (module __getattr__), so DataLoader
        # workers started with spawn can unpickle the datasets.
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    return classes


def __getattr__(name: str) -> Any:
    """The TorchGeo dataset classes by name (defined on first use, see dataset_classes)."""
    if name in ("Sentinel2BandFiles", "MultiBandScene", "CloudMask"):
        return {cls.__name__: cls for cls in dataset_classes()}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run with one intra-op torch thread: the tensors per read are small, and several
    threads on a busy machine made TorchGeo's per-read tensor copies 50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- reading


@dataclass
class IngestReport:
    """What :func:`read_tiles` did.

    Attributes:
        scenes: scenes read.
        windows: whole-patch windows on the grids (patches before skipping).
        kept: patches kept (the pool's size).
        skipped_nodata: windows skipped because more than ``max_nodata`` of their pixels
            are nodata.
        skipped_cloud: windows skipped because nodata and cloud together exceed it.
        max_nodata: the threshold used.
        crs_patches: patches kept per CRS.
        seconds: wall time of reading (headers, pixels, skipping; not TorchGeo's import).
    """

    scenes: int = 0
    windows: int = 0
    kept: int = 0
    skipped_nodata: int = 0
    skipped_cloud: int = 0
    max_nodata: float = DEFAULT_MAX_NODATA
    crs_patches: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        """Windows skipped for nodata or cloud."""
        return self.skipped_nodata + self.skipped_cloud

    def summary(self) -> str:
        """One line for the CLI."""
        crs = ", ".join(f"{c}: {n}" for c, n in sorted(self.crs_patches.items()))
        return (
            f"read {self.windows} patch windows from {self.scenes} scene(s) in "
            f"{self.seconds:.1f} s: kept {self.kept}, skipped {self.skipped} "
            f"({self.skipped_nodata} mostly nodata, {self.skipped_cloud} mostly cloud; "
            f"max nodata+cloud {self.max_nodata:.0%}); patches per CRS: {crs or 'none'}"
        )


@dataclass
class TileRead:
    """The patches read from a tile archive, before they become a ``PatchPool``.

    Attributes:
        patches: (N, C, P, P) array (the source dtype when every band has the same
            integer dtype of at most 16 bits, else float32); (0, C, P, P), its dtype only,
            when read with ``keep_pixels=False``.
        bands: band names, one per channel.
        sources: per patch, its scene's reference file (the file its pixel window is in).
        crs: per patch, its scene's CRS (``"EPSG:32648"``).
        checksums: per patch, the SHA-256 of its source file.
        georefs: per patch, its exact grid (from the sampler's float64 slices).
        windows: (N, 2) int64 ``(row_off, col_off)`` of each patch in its scene's grid at
            ``resolution`` (the source file's own grid when that is its resolution).
        resolution: pixel size in CRS units.
        report: counts and timing.
        band_mean: per-band mean over all patches and pixels (float64), when computed while
            reading (integer sources), else None.
        band_std: per-band population standard deviation, likewise.
        nan_free: whether the patches cannot hold NaN (integer sources).
        layout: where each kept patch lies in its scene's files (what a pool that reads
            its pixels from the tiles keeps).
        prepared_footprints: ``footprints.gpkg`` of a small read, written beside the pixel
            reads (:class:`~anneal_geo.data.footprints.PreparedFootprints`), or None.
    """

    patches: np.ndarray
    bands: list[str]
    sources: list[str]
    crs: list[str]
    checksums: list[str]
    georefs: Sequence[GeoRef]
    windows: np.ndarray
    resolution: float
    report: IngestReport
    band_mean: np.ndarray | None = None
    band_std: np.ndarray | None = None
    nan_free: bool = False
    layout: TileLayout | None = None
    _frame: Any = field(default=None, repr=False, compare=False)
    prepared_footprints: footprints_module.PreparedFootprints | None = field(
        default=None, repr=False, compare=False
    )

    def footprints(self) -> Any:
        """The footprints GeoDataFrame (the columns of :mod:`anneal_geo.data.footprints`):
        the same frame as :func:`~anneal_geo.data.footprints.build_footprints`, to the bit."""
        if self._frame is not None:
            frame, self._frame = self._frame, None  # built while the pixels were read
            return frame
        return _footprint_frame(self.georefs, self.sources, self.windows)

    def footprint_chunks(self, rows: int | None = None) -> Iterator[Any]:
        """The same frame as :meth:`footprints`, ``rows`` patches at a time (patch ids
        counted from the first patch of the read), so a million footprints are never held
        at once: each chunk equals the matching rows of the whole frame (default
        :data:`FOOTPRINT_CHUNK_ROWS` rows)."""
        rows = FOOTPRINT_CHUNK_ROWS if rows is None else int(rows)
        for start in range(0, len(self.georefs), rows):
            part = slice(start, start + rows)
            yield _footprint_frame(
                self.georefs[part], self.sources[part], self.windows[part], first=start
            )


class GeoRefs(Sequence[GeoRef]):
    """Many patches' :class:`GeoRef` kept as arrays (a million ``GeoRef`` objects take
    about 400 MB; these 56 bytes a patch): indexing by position gives a ``GeoRef``, by a
    slice or an array of positions another ``GeoRefs``.

    Attributes:
        crs: per patch, its CRS string (shared objects, one per scene).
        transforms: (N, 6) float64 GDAL affine transforms.
        height, width: the patch grid's rows and columns (the same for all).
    """

    def __init__(self, crs: Sequence[str], transforms: np.ndarray, height: int, width: int):
        self.crs = list(crs)
        self.transforms = np.asarray(transforms, dtype=np.float64)
        self.height, self.width = int(height), int(width)
        if self.transforms.shape != (len(self.crs), 6):
            raise ValueError(f"{self.transforms.shape} transforms for {len(self.crs)} patches")

    def __len__(self) -> int:
        return len(self.crs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GeoRefs):
            return (
                self.crs == other.crs
                and (self.height, self.width) == (other.height, other.width)
                and np.array_equal(self.transforms, other.transforms)
            )
        if isinstance(other, Sequence):
            if len(self) != len(other):
                return False
            return all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @overload
    def __getitem__(self, index: int) -> GeoRef: ...

    @overload
    def __getitem__(self, index: slice | np.ndarray) -> GeoRefs: ...

    def __getitem__(self, index: int | slice | np.ndarray) -> GeoRef | GeoRefs:
        if isinstance(index, slice):
            return GeoRefs(self.crs[index], self.transforms[index], self.height, self.width)
        if isinstance(index, np.ndarray):
            positions = index.tolist()
            crs = [self.crs[i] for i in positions]
            return GeoRefs(crs, self.transforms[index], self.height, self.width)
        a, b, c, d, e, f = (float(v) for v in self.transforms[index])
        return GeoRef(self.crs[index], (a, b, c, d, e, f), self.height, self.width)


#: Footprints a tiles-store pool build holds and writes at a time (about 5 kB a patch).
FOOTPRINT_CHUNK_ROWS = 65536


@dataclass
class TileLayout:
    """Where the kept patches of a read lie in the tiles: enough to read them again.

    Attributes:
        size: patch side P in pixels.
        stride: pixels between neighbouring patches.
        scenes: per scene: ``name``, ``crs``, ``source`` (its reference file), ``sha256``
            (of the source), ``res`` (the grid's pixel size x, y), ``resampling`` (the
            rasterio resampling name TorchGeo reads with), ``row0``/``col0`` (the pixel
            offset of its first window), ``files`` (per channel, the file read) and
            ``indexes`` (per channel, the 1-based band index in that file).
        grids: per scene, the exact float64 ``(x_start, x_stop, y_start, y_stop)`` of its
            patch grid (columns west to east, rows north to south), as TorchGeo laid it.
        scene: (N,) int64 scene of each kept patch.
        warped: files TorchGeo read through a ``WarpedVRT`` (not in the scene's grid).
    """

    size: int
    stride: int
    scenes: list[dict[str, Any]]
    grids: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    scene: np.ndarray
    warped: list[str]


def _footprint_frame(
    georefs: Sequence[GeoRef], sources: Sequence[str], windows: np.ndarray, first: int = 0
) -> Any:
    """:func:`~anneal_geo.data.footprints.build_footprints` plus the pixel windows, with the
    corners of all patches computed at once rather than patch by patch (patch ids from
    ``first``)."""
    import geopandas as gpd
    import shapely

    from anneal_geo.data import footprints as fp

    n = len(georefs)
    if n == 0:
        return None
    if isinstance(georefs, GeoRefs):
        transforms = georefs.transforms
        heights = np.full(n, georefs.height, dtype=np.int64)
        widths = np.full(n, georefs.width, dtype=np.int64)
        crs_list: list[str] = georefs.crs
    else:
        transforms = np.array([g.transform for g in georefs], dtype=np.float64)
        heights = np.array([g.height for g in georefs], dtype=np.int64)
        widths = np.array([g.width for g in georefs], dtype=np.int64)
        crs_list = [g.crs for g in georefs]
    a, b, c, d, e, f = (transforms[:, k, None] for k in range(6))
    w, h = widths[:, None].astype(np.float64), heights[:, None].astype(np.float64)
    zero = np.zeros_like(w)
    cols = np.concatenate([zero, w, w, zero, zero], axis=1)  # GeoRef.corners() order
    rows = np.concatenate([zero, zero, h, h, zero], axis=1)
    rings = np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=2)
    native = shapely.polygons(rings)
    crs = np.array(crs_list, dtype=object)
    edge = np.maximum(
        widths * np.hypot(transforms[:, 0], transforms[:, 3]),
        heights * np.hypot(transforms[:, 1], transforms[:, 4]),
    )
    dense = shapely.segmentize(native, edge / fp._SEGMENTS_PER_EDGE)
    geographic = np.empty(n, dtype=object)
    for code in sorted(set(crs)):
        mask = crs == code
        series = gpd.GeoSeries(dense[mask], crs=code).to_crs("EPSG:4326")
        geographic[mask] = series.to_numpy()
    frame = {
        "patch_id": np.arange(first, first + n, dtype=np.int64),
        "source": list(sources),
        "crs": list(crs),
        "row_off": np.asarray(windows[:, 0], dtype=np.int64),
        "col_off": np.asarray(windows[:, 1], dtype=np.int64),
        "height": heights,
        "width": widths,
        "label": [None] * n,
        "geometry_native": shapely.to_wkt(native, rounding_precision=-1),
        # A geometry array with its CRS: the frame is then built without a check per row.
        "geometry": gpd.array.from_shapely(geographic, crs="EPSG:4326"),
    }
    return gpd.GeoDataFrame(frame, geometry="geometry")


@dataclass
class _Plan:
    """A scene ready to read: dataset arguments, its grid, and where its patches go."""

    probe: _Probe
    bands: list[str]
    reference_band: str
    grid: tuple[float, float]  # pixel size (x, y) the scene is read at
    rows: int = 0
    cols: int = 0
    left: float = 0.0  # top-left corner of the scene's pixel grid at ``grid``
    top: float = 0.0
    checksum: str = ""

    @property
    def source(self) -> Path:
        """The file the patches' pixel windows refer to (the reference band's file)."""
        scene = self.probe.scene
        return scene.file if scene.file is not None else scene.band_files[self.reference_band]


def _output_dtype(plans: Sequence[_Plan]) -> np.dtype[Any]:
    """The source dtype when every band of every scene shares one integer dtype of at most
    16 bits, resampled or not: GDAL resamples in the source dtype (TorchGeo's merge reads
    into it, then hands the values over as float32), so the values are those integers
    exactly. Otherwise float32 (what TorchGeo returns)."""
    dtypes = {np.dtype(p.probe.dtypes[b]) for p in plans for b in p.bands}
    if len(dtypes) == 1:
        dtype = dtypes.pop()
        if dtype.kind in "ui" and dtype.itemsize <= 2:
            return dtype
    return np.dtype(np.float32)


def _scene_dataset(plan: _Plan) -> Any:
    band_cls, multi_cls, mask_cls = dataset_classes()
    scene = plan.probe.scene
    try:
        if scene.file is not None:
            dataset = multi_cls(scene.file, plan.probe.bands, plan.bands, plan.grid)
        else:
            dataset = band_cls(scene.band_files, plan.bands, plan.reference_band, plan.grid)
        if scene.cloud_mask is not None:
            dataset = dataset & mask_cls(scene.cloud_mask, dataset.crs, dataset.res)
    except Exception as exc:  # TorchGeo raises many kinds; the headers were checked already
        raise DataError(
            f"TorchGeo could not open scene {scene.name} ({type(exc).__name__}: "
            f"{_reason(exc)}); check its files"
        ) from exc
    return dataset


@dataclass
class _Grid:
    """A scene's patch grid as TorchGeo's sampler lays it: exact float64 slice bounds per
    column (west to east) and per row (north to south)."""

    x_start: np.ndarray  # (cols,)
    x_stop: np.ndarray
    y_start: np.ndarray  # (rows,)
    y_stop: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return len(self.y_start), len(self.x_start)

    def slices(self) -> list[list[tuple[slice, slice]]]:
        """The sampler's ``(x, y)`` slices, row-major, north-west first."""
        xs = [slice(a, b) for a, b in zip(self.x_start.tolist(), self.x_stop.tolist(), strict=True)]
        ys = [slice(a, b) for a, b in zip(self.y_start.tolist(), self.y_stop.tolist(), strict=True)]
        return [[(x, y) for x in xs] for y in ys]

    def origins(self) -> np.ndarray:
        """(rows * cols, 2) float64 ``(x.start, y.stop)``: the exact top-left corner of
        each patch, row-major."""
        rows, cols = self.shape
        return np.stack([np.tile(self.x_start, rows), np.repeat(self.y_stop, cols)], axis=1).astype(
            np.float64, copy=False
        )


class _Region(NamedTuple):
    """A scene's whole-patch grid worked out from its bounds (see :func:`_patch_region`)."""

    width: int  # whole pixels at the grid's resolution
    height: int
    rows: int  # patch rows and columns; 0 when the patch is larger than the scene
    cols: int
    top: float  # the pixel grid's top edge, counted from the bottom
    x0: float  # the first patch's west and north edges
    y1: float
    roi: tuple[float, float, float, float]  # the grid shrunk by a hair (west, south, east, north)


def _patch_region(
    bounds: tuple[float, float, float, float], res: tuple[float, float], size: int, stride: int
) -> _Region:
    """The whole-patch grid (:func:`patch_grid`) over ``bounds`` at ``res``, and the region
    of interest that makes TorchGeo's sampler yield exactly that grid: the grid shrunk by a
    hair, so the sampler's ceil() cannot add a row."""
    left, bottom, right, top = bounds
    rx, ry = res
    # Whole pixels at (rx, ry), counted from the bottom-left corner, where the sampler
    # anchors its grid (the same as the file's grid when read at its own resolution).
    width = math.floor((right - left) / rx + 1e-6)
    height = math.floor((top - bottom) / ry + 1e-6)
    top = float(bottom + height * ry)
    try:
        rows, cols, row0, col0 = patch_grid(height, width, size, stride)
    except DataError:
        return _Region(width, height, 0, 0, top, left, top, (left, bottom, left, top))
    eps = 1e-3 * min(rx, ry)
    x0, y1 = left + col0 * rx, top - row0 * ry
    roi = (
        x0 + eps,
        y1 - ((rows - 1) * stride + size) * ry + eps,
        x0 + ((cols - 1) * stride + size) * rx - eps,
        y1 - eps,
    )
    return _Region(width, height, rows, cols, top, x0, y1, roi)


def _strip_rows(cols: int, size: int, step: int) -> int:
    """Patch rows read in one window per band: about ``_STRIP_PIXELS`` pixels, at least one
    row."""
    width = (cols - 1) * step + size
    return max(1, (max(size, _STRIP_PIXELS // width) - size) // step + 1)


def _scene_grid(dataset: Any, plan: _Plan, size: int, stride: int) -> _Grid:
    """The sampler's patch grid on a (rows x cols) grid, north-west patch first.

    TorchGeo's ``GriddedPatchSampler`` lays the grid; it yields the patches row by row
    (south first) at ``x = xmin + j * stride`` and ``y = ymin + i * stride``, testing each
    against the region of interest (about 20 us a patch). Its first row gives the columns
    exactly; the rows follow from its own expression, checked against its next patch.
    """
    import shapely
    from torchgeo.samplers import GriddedPatchSampler

    xs, ys, _ = dataset.bounds
    rx, ry = dataset.res
    region = _patch_region((xs.start, ys.start, xs.stop, ys.stop), (rx, ry), size, stride)
    plan.left, plan.top = float(xs.start), region.top
    if region.rows == 0:
        raise DataError(
            f"patch size {size} px is larger than scene {plan.probe.scene.name} "
            f"({region.width}x{region.height} px at {rx:g} m); use a smaller --patch-size"
        )
    rows, cols, x0, y1 = region.rows, region.cols, region.x0, region.y1
    roi = shapely.box(*region.roi)
    sampler = GriddedPatchSampler(dataset, size=size, stride=stride, roi=roi)
    samples = iter(sampler)
    first = list(itertools.islice(samples, cols + (1 if rows > 1 else 0)))
    step_y, size_y = sampler.stride[0], sampler.size[0]
    ymin = first[0][1].start if first else 0.0
    y_start = [ymin + i * step_y for i in range(rows)][::-1]  # the sampler's expression
    y_stop = [y + size_y for y in y_start]

    def where(x: slice, y: slice) -> tuple[float, float]:
        return (y1 - y.stop) / (stride * ry), (x.start - x0) / (stride * rx)

    expected = [(rows - 1, c) for c in range(cols)] + ([(rows - 2, 0)] if rows > 1 else [])
    placed = [where(x, y) for x, y in first]
    on_grid = len(first) == len(expected) and all(
        abs(r - er) <= 1e-6 and abs(c - ec) <= 1e-6
        for (r, c), (er, ec) in zip(placed, expected, strict=True)
    )
    if on_grid and rows > 1:
        # The second row's first patch: the row expression above, to the bit.
        on_grid = (first[-1][0].start, first[-1][1].start) == (first[0][0].start, y_start[-2])
    if not on_grid:
        raise DataError(
            f"TorchGeo's sampler yielded patches off the pixel grid of scene "
            f"{plan.probe.scene.name} ({first[:2]}); this TorchGeo version is not supported"
        )
    plan.rows, plan.cols = rows, cols
    row = first[:cols]
    return _Grid(
        np.array([x.start for x, _ in row], dtype=np.float64),
        np.array([x.stop for x, _ in row], dtype=np.float64),
        np.array(y_start, dtype=np.float64),
        np.array(y_stop, dtype=np.float64),
    )


def _blocks(
    grid: list[list[Any]], block: int
) -> list[tuple[tuple[slice, slice], int, int, int, int]]:
    """Group the patch grid into reads of up to ``block x block`` patches.

    Returns:
        per read: ``(slice, first row, first col, rows, cols)``.
    """
    rows, cols = len(grid), len(grid[0])
    reads = []
    for r in range(0, rows, block):
        for c in range(0, cols, block):
            nr, nc = min(block, rows - r), min(block, cols - c)
            top_left = grid[r][c]
            right = grid[r][c + nc - 1][0]
            bottom = grid[r + nr - 1][c][1]
            chip = (slice(top_left[0].start, right.stop), slice(bottom.start, top_left[1].stop))
            reads.append((chip, r, c, nr, nc))
    return reads


def _cut(array: np.ndarray, nr: int, nc: int, size: int, stride: int) -> np.ndarray:
    """(..., h, w) -> (nr * nc, ..., size, size): the patches of one block, row-major."""
    view = np.lib.stride_tricks.sliding_window_view(array, (size, size), axis=(-2, -1))
    view = view[..., ::stride, ::stride, :, :][..., :nr, :nc, :, :]
    lead = array.ndim - 2
    order = (lead, lead + 1, *range(lead), lead + 2, lead + 3)
    return view.transpose(order).reshape(nr * nc, *array.shape[:-2], size, size)


def _bad_pixels(patches: np.ndarray, nodata: float) -> np.ndarray:
    """(n, P, P) bool: pixels where every band is nodata (or any band is NaN)."""
    bad = (patches == nodata).all(axis=1)
    if patches.dtype.kind == "f":
        bad |= np.isnan(patches).any(axis=1)
    return bad


def _read_scene(
    plan: _Plan,
    dataset: Any,
    grid: list[list[Any]],
    out: np.ndarray,
    keep: np.ndarray,
    report: IngestReport,
    options: dict[str, Any],
    bar: Any,
) -> None:
    """Read one scene block by block into ``out`` (its rows x cols slots, row-major) and
    mark the patches to keep."""
    from torch.utils.data import DataLoader

    size, step = options["size"], options["stride"]
    max_nodata = options["max_nodata"]
    nodata = float(plan.probe.nodata) if plan.probe.nodata is not None else 0.0
    reads = _blocks(grid, options["block"])
    loader = DataLoader(
        dataset,
        sampler=[chip for chip, *_ in reads],
        batch_size=None,
        num_workers=options["num_workers"],
    )
    for sample, (_, r0, c0, nr, nc) in zip(loader, reads, strict=True):
        image = sample["image"].numpy()
        expect = (out.shape[1], (nr - 1) * step + size, (nc - 1) * step + size)
        if image.shape != expect:
            raise DataError(
                f"TorchGeo returned a {image.shape} block for scene {plan.probe.scene.name}, "
                f"expected {expect}; this TorchGeo version is not supported"
            )
        if out.dtype.kind in "ui" and not np.array_equal(image, image.astype(out.dtype)):
            raise DataError(
                f"TorchGeo returned values of scene {plan.probe.scene.name} that are not "
                f"{out.dtype} integers; this TorchGeo version is not supported"
            )
        patches = _cut(image, nr, nc, size, step)
        bad = _bad_pixels(patches, nodata)
        nodata_share = bad.mean(axis=(1, 2))
        if "mask" in sample:
            bad |= _cut(sample["mask"].numpy(), nr, nc, size, step) != 0
        good = bad.mean(axis=(1, 2)) <= max_nodata
        report.skipped_nodata += int(np.sum(~good & (nodata_share > max_nodata)))
        report.skipped_cloud += int(np.sum(~good & (nodata_share <= max_nodata)))
        rr, cc = np.divmod(np.arange(nr * nc), nc)
        slots = (r0 + rr) * plan.cols + (c0 + cc)
        out[slots] = patches
        keep[slots] = good
        bar.update(1)


# ---------------------------------------------------------------------------- direct reads


def _default_workers() -> int:
    """Reader threads when none are asked for: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _merge_read(
    src: Any,
    bounds: tuple[float, float, float, float],
    res: tuple[float, float],
    indexes: list[int] | None,
    resampling: Any,
) -> np.ndarray:
    """What ``rasterio.merge.merge([src], bounds=..., res=..., indexes=...)`` returns (the
    call TorchGeo's ``RasterDataset`` reads with), without its extra passes when they
    cannot change a value: the window lies wholly inside ``src`` and no pixel is masked
    (no nodata, mask or alpha band), so the merge is the resampled read itself.

    Returns:
        (bands, rows, cols) array in the file's dtype.
    """
    from affine import Affine
    from rasterio import windows
    from rasterio.enums import MaskFlags
    from rasterio.merge import merge

    bands = list(range(1, src.count + 1)) if indexes is None else list(indexes)
    dtypes = {src.dtypes[i - 1] for i in bands}
    all_valid = all(src.mask_flag_enums[i - 1] == [MaskFlags.all_valid] for i in bands)
    if len(dtypes) == 1 and all_valid:
        # merge()'s own arithmetic for the output grid and the source window.
        left, bottom, right, top = bounds
        width = round((right - left) / res[0])
        height = round((top - bottom) / res[1])
        transform = Affine(res[0], 0.0, left, 0.0, -res[1], top)
        chunk = windows.Window(0, 0, width, height)
        west, south, east, north = windows.bounds(chunk, transform)
        s_west, s_south, s_east, s_north = src.bounds
        inside = s_west <= west and east <= s_east and s_south <= south and north <= s_north
        if inside and src.transform.e < 0:
            target = windows.from_bounds(west, south, east, north, transform)
            aligned = (
                math.floor(target.col_off + 0.1),
                math.floor(target.row_off + 0.1),
                math.floor(target.width + 0.5),
                math.floor(target.height + 0.5),
            )
            if aligned == (0, 0, width, height):
                window = windows.from_bounds(west, south, east, north, src.transform)
                data: np.ndarray = src.read(
                    bands,
                    window=window,
                    out_shape=(len(bands), height, width),
                    resampling=resampling,
                )
                return data
    return merge([src], bounds=bounds, res=res, indexes=indexes, resampling=resampling)[0]


# TorchGeo's decision whether a file on a grid is warped to a CRS, by (dataset class, file
# CRS, transform, width, height, dataset CRS): a function of those values alone, asked again
# by every build of the same archive (about 1 ms a time), so remembered for the process.
_NEEDS_WARP: dict[tuple[Any, ...], bool] = {}


def _needs_warp(source: Any, src: Any) -> bool:
    """Whether TorchGeo's ``_load_warp_file`` warps the open file ``src`` for ``source``
    (its own ``_compute_affine_warp_grid``, remembered in ``_NEEDS_WARP``)."""
    from rasterio.crs import CRS

    dst = source.crs
    key = (
        type(source),
        src.crs.to_wkt(),
        tuple(src.transform),
        src.width,
        src.height,
        dst if isinstance(dst, str) else dst.to_wkt(),
    )
    needs = _NEEDS_WARP.get(key)
    if needs is None:
        needs = bool(
            source._compute_affine_warp_grid(
                src.crs, src.transform, src.width, src.height, CRS.from_user_input(dst)
            )[3]
        )
        if len(_NEEDS_WARP) >= 4096:
            _NEEDS_WARP.clear()
        _NEEDS_WARP[key] = needs
    return needs


def _open_like_torchgeo(source: Any, filepath: str, handles: _Handles | None) -> Any:
    """The handle TorchGeo's ``_load_warp_file(filepath, source.crs)`` would read from.

    A file already in the dataset's CRS and grid is read as it is (TorchGeo decides with its
    own ``_compute_affine_warp_grid``, see :func:`_needs_warp`): the handle opened for its
    header is reused. Anything else is opened by TorchGeo itself (a ``WarpedVRT``).
    """
    import rasterio

    src = handles.take(filepath) if handles is not None else None
    if src is None:
        src = rasterio.open(filepath)
    try:
        plain = source.nodata is None and not src.transform.is_identity
        plain = plain and not _needs_warp(source, src)
    except BaseException:
        src.close()
        raise
    if plain:
        return src
    src.close()
    return source._load_warp_file(filepath, source.crs)


@dataclass
class _Strip:
    """Patch rows ``r0 .. r0 + rows - 1`` of one scene, read in one window per band; the
    pixels that decide skipping are gathered here band by band."""

    scene: int
    r0: int
    rows: int
    bounds: tuple[float, float, float, float]
    pending: int  # band and mask reads still to come
    nodata: np.ndarray | None = None  # every band equal to nodata so far
    nan: np.ndarray | None = None  # any band NaN so far
    clear: bool = False  # no pixel is nodata in every band read so far
    cloud: np.ndarray | None = None


def _window_sums(
    pixels: np.ndarray,
    rows: int,
    cols: int,
    size: int,
    stride: int,
    accumulate: type[np.integer[Any]] = np.int64,
) -> np.ndarray:
    """(rows * cols,) int64: the exact sum of a (h, w) bool or integer image over each
    patch window of a strip (summed in ``accumulate``: uint64 is the faster for unsigned
    images).

    The image is summed in square cells of ``gcd(size, stride)`` pixels, which tile every
    window; windows that overlap (or leave gaps) then add up their cells from a
    summed-area table of the much smaller cell grid.
    """
    cell = math.gcd(size, stride)
    height, width = (rows - 1) * stride + size, (cols - 1) * stride + size
    grid = pixels[:height, :width].reshape(height // cell, cell, width // cell, cell)
    cells = grid.sum(axis=(1, 3), dtype=accumulate).astype(np.int64, copy=False)
    if stride == size:
        return cells.reshape(-1)
    table = np.zeros((cells.shape[0] + 1, cells.shape[1] + 1), dtype=np.int64)
    np.cumsum(cells, axis=0, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
    span, step = size // cell, stride // cell
    top = (np.arange(rows) * step)[:, None]
    left = (np.arange(cols) * step)[None, :]
    sums = (
        table[top + span, left + span]
        - table[top, left + span]
        - table[top + span, left]
        + table[top, left]
    )
    return sums.reshape(-1)


def _read_direct(
    plans: Sequence[_Plan],
    datasets: Sequence[Any],
    grids: Sequence[_Grid],
    out: np.ndarray,
    keep: np.ndarray,
    report: IngestReport,
    options: dict[str, Any],
    bar: Any,
    handles: _Handles | None = None,
    extra: Sequence[Callable[[], Any]] = (),
    early: dict[str, Any] | None = None,
) -> list[Any]:
    """Read every scene in big windows, one per band and strip of patch rows, straight
    from the files TorchGeo indexed, with TorchGeo's CRS, resolution and resampling (see
    :func:`_merge_read`), in ``options["workers"]`` threads; cut each window into its
    patches in ``out``, mark the patches to keep and, for integer sources, sum each
    patch's values and squares per band (``options["sums"]``, ``options["squares"]``).

    Returns:
        the results of the ``extra`` jobs, run in the calling thread beside the reads.
    """
    import threading
    from concurrent.futures import wait

    import rasterio

    size, step = options["size"], options["stride"]
    sums, squares = options.get("sums"), options.get("squares")  # per patch and band
    warped: list[str] = options.setdefault("warped", [])
    keep_pixels = bool(options.get("keep_pixels", True))
    max_nodata = options["max_nodata"]
    lock = threading.Lock()
    reads = itertools.count(1)  # (scene, band) reads, to hand freed memory back now and then
    offsets = np.cumsum([0, *(p.rows * p.cols for p in plans)])
    strips: list[list[_Strip]] = []
    tasks: list[tuple[int, int | None]] = []  # (scene, channel or None for the mask)
    for k, (plan, dataset, grid) in enumerate(zip(plans, datasets, grids, strict=True)):
        per_strip = _strip_rows(plan.cols, size, step)
        masked = dataset.__class__.__name__ == "IntersectionDataset"
        pending = len(plan.bands) + int(masked)
        scene_strips = []
        for r0 in range(0, plan.rows, per_strip):
            n = min(per_strip, plan.rows - r0)
            bounds = (
                float(grid.x_start[0]),
                float(grid.y_start[r0 + n - 1]),
                float(grid.x_stop[-1]),
                float(grid.y_stop[r0]),
            )
            scene_strips.append(_Strip(k, r0, n, bounds, pending))
        strips.append(scene_strips)
        tasks.extend((k, c) for c in range(len(plan.bands)))
        if masked:
            tasks.append((k, None))

    def finish(strip: _Strip) -> None:
        plan = plans[strip.scene]
        cols, area = plan.cols, size * size
        nodata = strip.nodata
        assert nodata is not None
        if strip.nan is not None:
            nodata |= strip.nan
        nodata_share = _window_sums(nodata, strip.rows, cols, size, step) / area
        bad_share = nodata_share
        if strip.cloud is not None:
            bad = nodata | strip.cloud
            bad_share = _window_sums(bad, strip.rows, cols, size, step) / area
        good = bad_share <= max_nodata
        first = int(offsets[strip.scene]) + strip.r0 * cols
        keep[first : first + strip.rows * cols] = good
        with lock:
            report.skipped_nodata += int(np.sum(~good & (nodata_share > max_nodata)))
            report.skipped_cloud += int(np.sum(~good & (nodata_share <= max_nodata)))

    def run(scene: int, channel: int | None) -> None:
        plan, dataset = plans[scene], datasets[scene]
        if channel is None:
            source = dataset.datasets[1]
        elif dataset.__class__.__name__ == "IntersectionDataset":
            source = dataset.datasets[0]
        else:
            source = dataset
        filepath = str(source.index.filepath.iloc[0])
        indexes: list[int] | None = None
        if channel is not None:
            if source.separate_files:
                filepath = source._update_filepath(plan.bands[channel], filepath)
            else:
                band_indexes = source.band_indexes
                indexes = [band_indexes[channel] if band_indexes else channel + 1]
        nodata = float(plan.probe.nodata) if plan.probe.nodata is not None else 0.0
        try:
            handle = _open_like_torchgeo(source, filepath, handles)
        except Exception as exc:  # rasterio and TorchGeo raise many kinds
            raise DataError(
                f"{filepath} of scene {plan.probe.scene.name} could not be opened "
                f"({type(exc).__name__}: {_reason(exc)}); check the file"
            ) from exc
        if not isinstance(handle, rasterio.io.DatasetReader):
            with lock:
                warped.append(filepath)
        ahead = early.pop(filepath, None) if early is not None else None
        if ahead is not None and ahead.cancel():
            ahead = None  # not started yet: read below
        done = ahead.result() if ahead is not None else None
        with rasterio.Env(), handle:
            for k, strip in enumerate(strips[scene]):
                expect = ((strip.rows - 1) * step + size, (plan.cols - 1) * step + size)
                try:
                    # The first strip may have been read while TorchGeo indexed the scene:
                    # used when it was the very read due now, else read here.
                    if k == 0 and done is not None and done.is_read(
                        handle, strip.bounds, source.res, indexes, source.resampling
                    ):
                        data = done.data[0]
                    else:
                        data = _merge_read(
                            handle, strip.bounds, source.res, indexes, source.resampling
                        )[0]
                except Exception as exc:
                    raise DataError(
                        f"{filepath} of scene {plan.probe.scene.name} could not be read "
                        f"({type(exc).__name__}: {_reason(exc)}); re-download or remove it"
                    ) from exc
                if data.shape != expect:
                    raise DataError(
                        f"a {data.shape} window was read from {filepath}, expected {expect}; "
                        "this rasterio version is not supported"
                    )
                if channel is None:
                    cloud, nodata_px, nan = data != 0, None, None
                else:
                    first = int(offsets[scene]) + strip.r0 * plan.cols
                    if keep_pixels:
                        target = out[first : first + strip.rows * plan.cols, channel]
                        view = np.lib.stride_tricks.sliding_window_view(data, (size, size))
                        view = view[::step, ::step][: strip.rows, : plan.cols]
                        np.copyto(target.reshape(strip.rows, plan.cols, size, size), view)
                    if sums is not None and squares is not None:
                        part = slice(first, first + strip.rows * plan.cols)
                        sums[part, channel] = _window_sums(data, strip.rows, plan.cols, size, step)
                        # Squares of at most 16-bit integers fit 32 bits.
                        signed = data.dtype.kind == "i"
                        wide = data.astype(np.int32 if signed else np.uint32)
                        np.multiply(wide, wide, out=wide)
                        squares[part, channel] = _window_sums(
                            wide,
                            strip.rows,
                            plan.cols,
                            size,
                            step,
                            np.int64 if signed else np.uint64,
                        )
                    # TorchGeo hands the pixels over as float32: compare those values.
                    exact = data.dtype.kind in "ui" and data.dtype.itemsize <= 2
                    values = data if exact else data.astype(np.float32)
                    # Once no pixel of the strip is nodata in every band so far, none is.
                    cloud, nodata_px = None, None if strip.clear else values == nodata
                    nan = np.isnan(values) if values.dtype.kind == "f" else None
                with lock:
                    if cloud is not None:
                        strip.cloud = cloud
                    elif nodata_px is not None:
                        if strip.nodata is None:
                            strip.nodata = nodata_px
                        else:
                            np.logical_and(strip.nodata, nodata_px, out=strip.nodata)
                        strip.clear = not strip.nodata.any()
                    if nan is not None:
                        strip.nan = nan if strip.nan is None else strip.nan | nan
                    strip.pending -= 1
                    done = strip.pending == 0
                if done:
                    finish(strip)
                bar.update(1)
        if next(reads) % _TRIM_EVERY_READS == 0:  # next() on a count is atomic in CPython
            release_free_memory()

    cap_gdal_cache()  # each strip is read once: GDAL's default cache would only fill up
    if options["workers"] <= 1 or (len(tasks) <= 1 and not extra):
        for task in tasks:
            run(*task)
        return [job() for job in extra]
    pool = _reader_pool(options["workers"])
    futures = [pool.submit(run, *task) for task in tasks]
    try:
        # The extra jobs run here, beside the reads, while this thread would only wait
        # (it does not read as well: a third reader on two cores leaves the last read
        # alone at the end).
        results = [job() for job in extra]
        for future in futures:
            future.result()
        return results
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)  # the reads already running finish before the files close
        raise


_READERS: dict[tuple[int, int], Any] = {}  # (process id, threads) -> ThreadPoolExecutor


def _reader_pool(workers: int) -> Any:
    """The process's pool of ``workers`` reader threads, started on first use and kept.

    A fresh thread pays GDAL's and PROJ's per-thread set-up (about 10 ms on the first
    CRS comparison), which a one-scene pool would pay on every build; kept threads pay it
    once per process. A forked child starts its own pool (the parent's threads are not
    there).
    """
    from concurrent.futures import ThreadPoolExecutor

    pid = os.getpid()
    for key in [k for k in _READERS if k[0] != pid]:
        del _READERS[key]  # inherited through fork: its threads do not exist here
    key = (pid, workers)
    if key not in _READERS:
        _READERS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-tiles")
    return _READERS[key]


def _moments(sums: np.ndarray, squares: np.ndarray, values: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and population standard deviation from exact per-patch sums of the
    values and of their squares ((N, C) int64 each) over ``values`` pixels per band: exact
    integer totals, so both are correctly rounded.

    Returns:
        ``(mean, std)``, each float64 (C,).
    """
    # Chunks whose int64 totals cannot overflow (a patch's sum of squares < 2**62 / step).
    most = max(1, int(np.abs(squares).max(initial=0)))
    step = max(1, (1 << 62) // most)
    mean, var = [], []
    for band in range(sums.shape[1]):
        total = sum(int(sums[i : i + step, band].sum()) for i in range(0, len(sums), step))
        square = sum(int(squares[i : i + step, band].sum()) for i in range(0, len(sums), step))
        mean.append(total / values)
        var.append((values * square - total * total) / (values * values))
    return np.array(mean, dtype=np.float64), np.sqrt(np.array(var, dtype=np.float64))


def read_tiles(
    root: str | Path,
    patch_size: int = DEFAULT_PATCH_SIZE,
    *,
    stride: int | None = None,
    bands: Sequence[str] | None = None,
    res: float | None = None,
    cloud_mask: str | Path | None = "auto",
    max_nodata: float = DEFAULT_MAX_NODATA,
    read_block: int | None = None,
    num_workers: int | None = None,
    progress: bool | None = None,
    keep_pixels: bool = True,
) -> TileRead:
    """Cut every scene of a tile archive into patches through TorchGeo.

    Args:
        root: the archive folder (or one scene file); see :func:`find_scenes`.
        patch_size: patch side P in pixels.
        stride: pixels between neighbouring patches (default P: no overlap, no gap).
        bands: band names to read, in this order (default: all bands of the first scene, in
            ESA order for band files, file order for multi-band files).
        res: pixel size in CRS units of the common grid (default: the finest requested band
            of the first scene, 10 m for Sentinel-2 with a 10 m band).
        cloud_mask: see :func:`find_scenes`.
        max_nodata: skip a patch when more than this share of its pixels is nodata or cloud
            (0 keeps only spotless patches; 1 keeps everything).
        read_block: read through TorchGeo's ``__getitem__`` in blocks of this many patches
            per side, through a ``DataLoader`` (default: direct windowed reads of the files
            TorchGeo indexed; the values are the same).
        num_workers: reader threads over scenes and bands (default: one per core, at most
            8; 0 or 1: read in the calling thread); the patches are the same whatever the
            number. With ``read_block``: the ``DataLoader``'s worker processes (default 0).
        progress: show a progress bar (None: only on a terminal).
        keep_pixels: keep the patches (False: read them to decide which to keep and to sum
            the band statistics, then let them go; ``patches`` is then empty, (0, C, P, P),
            and ``layout`` says where each kept patch lies; direct reads only).

    Returns:
        the patches, their exact footprints, their :class:`TileLayout` and an
        :class:`IngestReport`.

    Raises:
        DataError: no rasters, a raster without CRS, a requested band missing from a
            scene, a patch larger than a scene, or every patch skipped.
        ConfigError: a size, resolution or threshold out of range.
    """
    t0 = time.perf_counter()
    size = _check_size(patch_size, "patch_size")
    step = size if stride is None else _check_size(stride, "stride")
    block = None if read_block is None else _check_size(read_block, "read_block")
    if not 0.0 <= float(max_nodata) <= 1.0:
        raise ConfigError(f"max_nodata={max_nodata!r} must lie in [0, 1] (a share of pixels)")
    if res is not None and not (math.isfinite(res) and res > 0):
        raise ConfigError(f"res={res!r} must be a positive pixel size in CRS units (e.g. 10)")
    if num_workers is not None and (
        isinstance(num_workers, bool)
        or not isinstance(num_workers, (int, np.integer))
        or num_workers < 0
    ):
        raise ConfigError(f"num_workers={num_workers!r} must be a whole number, 0 or more")
    if not keep_pixels and block is not None:
        raise ConfigError(
            f"read_block={read_block!r} reads through TorchGeo's DataLoader, which a pool "
            "that reads its pixels from the tiles does not use; leave read_block out"
        )

    import rasterio

    # One rasterio environment for the whole read (each rasterio call would otherwise set
    # one up and tear it down); reader threads enter their own.
    handles = _Handles() if block is None else None
    try:
        with rasterio.Env():
            return _read_archive(
                root,
                size,
                step,
                bands,
                res,
                cloud_mask,
                float(max_nodata),
                block,
                num_workers,
                progress,
                handles,
                t0,
                keep_pixels,
            )
    finally:
        if handles is not None:
            handles.close()


@dataclass
class _Early:
    """A band's first strip read before TorchGeo indexed its scene (see :func:`_read_early`),
    with the arguments of that read."""

    handle: Any
    bounds: tuple[float, float, float, float]
    res: tuple[float, float]
    resampling: Any
    data: np.ndarray

    def is_read(
        self,
        handle: Any,
        bounds: tuple[float, float, float, float],
        res: Any,
        indexes: list[int] | None,
        resampling: Any,
    ) -> bool:
        """Whether ``_merge_read(handle, bounds, res, indexes, resampling)`` is the read
        this was: the same open file and the same arguments, to the bit."""
        return (
            handle is self.handle
            and indexes is None
            and tuple(bounds) == self.bounds
            and tuple(res) == tuple(self.res)
            and resampling == self.resampling
        )


def _first_strip_bounds(
    plan: _Plan, file_bounds: tuple[float, float, float, float], size: int, step: int
) -> tuple[float, float, float, float] | None:
    """The bounds of a scene's first strip of patch rows as :func:`_read_direct` will take
    them from TorchGeo's grid, worked out from the reference file's header alone: the
    arithmetic of :func:`_scene_grid` and of TorchGeo's ``GriddedPatchSampler`` over an
    index of that one file. A guess: the reads compare it with the real bounds."""
    from torchgeo.samplers.utils import convolution_arithmetic

    left, bottom = file_bounds[:2]
    rx, ry = plan.grid
    region = _patch_region(file_bounds, plan.grid, size, step)
    if region.rows == 0:
        return None
    rows, cols = region.rows, region.cols
    gx0, gy0, gx1, gy1 = region.roi
    size_y, size_x, step_y, step_x = size * ry, size * rx, step * ry, step * rx
    n_rows = convolution_arithmetic(gy1 - gy0, size_y, step_y)
    n_cols = convolution_arithmetic(gx1 - gx0, size_x, step_x)
    if (n_rows, n_cols) != (rows, cols):
        return None
    xmin = gx0 - (step_x * (n_cols - 1) + size_x - (gx1 - gx0)) / 2
    ymin = gy0 - (step_y * (n_rows - 1) + size_y - (gy1 - gy0)) / 2
    xmin = round((xmin - left) / rx) * rx + left
    ymin = round((ymin - bottom) / ry) * ry + bottom
    n = min(_strip_rows(cols, size, step), rows)
    return (
        float(xmin),
        float(ymin + (rows - n) * step_y),
        float(xmin + (cols - 1) * step_x + size_x),
        float(ymin + (rows - 1) * step_y + size_y),
    )


def _read_early(
    plans: Sequence[_Plan], handles: _Handles, size: int, step: int, readers: Any
) -> dict[str, Any]:
    """Start reading each band's first strip in the reader threads while TorchGeo indexes
    the scenes (the files' headers are open already), as :func:`_read_direct` will read it
    from TorchGeo's grid, up to a quarter of GDAL's block cache in all.

    Returns:
        file path -> future of an :class:`_Early` (None when not read).
    """
    from rasterio.enums import Resampling

    def read(path: str, bounds: tuple[float, float, float, float], res: Any) -> _Early | None:
        import rasterio

        with handles.borrow(path) as src:
            if src is None:
                return None
            try:
                with rasterio.Env():
                    data = _merge_read(src, bounds, res, None, Resampling.bilinear)
            except Exception:  # the read proper reports it
                return None
            return _Early(src, bounds, res, Resampling.bilinear, data)

    budget = GDAL_CACHE_BYTES // 4
    early: dict[str, Any] = {}
    for plan in plans:
        scene = plan.probe.scene
        if scene.file is not None:
            continue  # its bands are read through one handle each: one early read helps little
        with handles.borrow(scene.band_files[plan.reference_band]) as ref:
            if ref is None:
                break
            bounds = _first_strip_bounds(plan, tuple(ref.bounds), size, step)
        if bounds is None:
            continue
        pixels = (bounds[2] - bounds[0]) / plan.grid[0] * (bounds[3] - bounds[1]) / plan.grid[1]
        for band in plan.bands:
            budget -= int(pixels) * np.dtype(plan.probe.dtypes[band]).itemsize
            if budget < 0:
                return early
            path = str(scene.band_files[band])
            early[path] = readers.submit(read, path, bounds, plan.grid)
    return early


def _forget_early(early: dict[str, Any]) -> None:
    """Cancel the early reads not started and wait for the others (they read kept handles,
    which are closed next)."""
    from concurrent.futures import wait

    futures = list(early.values())
    early.clear()
    for future in futures:
        future.cancel()
    wait(futures)


def _read_archive(
    root: str | Path,
    size: int,
    step: int,
    bands: Sequence[str] | None,
    res: float | None,
    cloud_mask: str | Path | None,
    max_nodata: float,
    block: int | None,
    num_workers: int | None,
    progress: bool | None,
    handles: _Handles | None,
    t0: float,
    keep_pixels: bool = True,
) -> TileRead:
    """:func:`read_tiles` once its settings are checked."""
    from tqdm import tqdm

    scenes = find_scenes(root, cloud_mask)
    first = _probe(scenes[0], handles, list(bands) if bands else None)
    wanted = list(bands) if bands else first.bands
    probes = [first, *(_probe(s, handles, wanted) for s in scenes[1:])]
    plans = []
    for probe in probes:
        chosen = _select_bands(probe, wanted)
        # The reference band (its file is each patch's source and fixes the grid): one
        # already at ``res`` when there is one, so the pixel windows are that file's own;
        # else the finest band.
        at_res = [b for b in chosen if res is not None and probe.native_res[b][0] == res]
        finest = min(probe.native_res[b] for b in chosen)
        reference = (
            at_res[0] if at_res else next(b for b in chosen if probe.native_res[b] == finest)
        )
        # Each scene on ``res``, or on its own finest requested band (x and y sizes apart:
        # EuroSAT's pixels are 10.006 x 9.994 m), so no scene is resampled needlessly.
        spacing = (float(res), float(res)) if res is not None else probe.native_res[reference]
        plans.append(_Plan(probe, chosen, reference, spacing))
    names = plans[0].bands
    dtype = _output_dtype(plans)
    workers = _default_workers() if num_workers is None else max(1, num_workers)
    early: dict[str, Any] = {}
    if block is None and workers > 1 and handles is not None:
        # The reader threads start on the files while TorchGeo indexes the scenes.
        cap_gdal_cache()
        early = _read_early(plans, handles, size, step, _reader_pool(workers))

    t_import = time.perf_counter()
    dataset_classes()  # imports TorchGeo (seconds, once per process): not counted as reading
    t0 += time.perf_counter() - t_import
    datasets, grids = [], []
    try:
        for plan in plans:
            dataset = _scene_dataset(plan)
            grids.append(_scene_grid(dataset, plan, size, step))
            datasets.append(dataset)
    except BaseException:
        _forget_early(early)
        raise
    counts = [p.rows * p.cols for p in plans]
    total = sum(counts)
    # Every window has a slot in row-major order (scene by scene, north-west first), so the
    # patch ids do not depend on how the reads are split; skipped slots are dropped last.
    out = np.empty((total if keep_pixels else 0, len(names), size, size), dtype=dtype)
    keep = np.zeros(total, dtype=bool)
    report = IngestReport(scenes=len(plans), windows=total, max_nodata=float(max_nodata))
    options: dict[str, Any] = {"size": size, "stride": step, "max_nodata": float(max_nodata)}
    # Every source holds integers of at most 16 bits: so do the patches, resampled or not
    # (GDAL resamples in the source's dtype); their statistics are then exact sums.
    integers = all(
        np.dtype(p.probe.dtypes[b]).kind in "ui" and np.dtype(p.probe.dtypes[b]).itemsize <= 2
        for p in plans
        for b in p.bands
    )
    if block is None:
        options["workers"] = workers
        options["keep_pixels"] = keep_pixels
        if integers:
            options["sums"] = np.zeros((total, len(names)), dtype=np.int64)
            options["squares"] = np.zeros((total, len(names)), dtype=np.int64)
        reads = 0
        for plan, dataset in zip(plans, datasets, strict=True):
            per_strip = _strip_rows(plan.cols, size, step)
            masked = dataset.__class__.__name__ == "IntersectionDataset"
            reads += math.ceil(plan.rows / per_strip) * (len(plan.bands) + int(masked))
    else:
        options["block"] = block
        options["num_workers"] = 0 if num_workers is None else num_workers
        reads = sum(math.ceil(p.rows / block) * math.ceil(p.cols / block) for p in plans)
    bar = tqdm(
        total=reads,
        desc=f"reading {Path(root).name}",
        unit="read",
        disable=None if progress is None else not progress,
    )
    # Every window's place (the kept ones are picked once the pixels are read).
    scene_all = np.repeat(np.arange(len(plans)), counts)
    origins = np.concatenate([g.origins() for g in grids])
    # Windows in each scene's grid, from the exact corners (integers by construction).
    tops = np.array([p.top for p in plans])[scene_all]
    lefts = np.array([p.left for p in plans])[scene_all]
    res_xy = np.array([p.grid for p in plans], dtype=np.float64)[scene_all]
    windows_all = np.rint(
        np.stack([(tops - origins[:, 1]) / res_xy[:, 1], (origins[:, 0] - lefts) / res_xy[:, 0]], 1)
    ).astype(np.int64)
    crs_all = [plans[i].probe.crs for i in scene_all.tolist()]
    scene_sources = [str(p.source) for p in plans]  # one string per scene, shared
    sources_all = [scene_sources[i] for i in scene_all.tolist()]
    zero = np.zeros(total)
    transforms = np.stack(
        [res_xy[:, 0], zero, origins[:, 0], zero, -res_xy[:, 1], origins[:, 1]], axis=1
    )
    del zero, res_xy, tops, lefts
    georefs_all = GeoRefs(crs_all, transforms, size, size)

    def frame_of_all() -> Any:
        # Built beside the pixel reads; on any failure, footprints() builds it again later.
        try:
            frame = _footprint_frame(georefs_all, sources_all, windows_all)
        except Exception:
            return None, None
        # A small pool's footprints.gpkg is written now, beside the reads, rather than by
        # save() after them (a layer with a spatial index is left to save()).
        if total < footprints_module.SPATIAL_INDEX_MIN_ROWS:
            return frame, footprints_module.prepare_footprints(frame)
        return frame, None

    def checksums_of_all() -> list[str]:
        # Beside the pixel reads too: the files' bytes, not their pixels.
        return [sha256_file(p.source) for p in plans]

    prebuilt: list[Any] = []
    bounds = np.cumsum([0, *counts])
    try:
        with bar:
            if block is None:
                prebuilt = _read_direct(
                    plans,
                    datasets,
                    grids,
                    out,
                    keep,
                    report,
                    options,
                    bar,
                    handles,
                    early=early,
                    # A pool that reads from the tiles writes its footprints in chunks
                    # later (footprint_chunks): a million of them at once take gigabytes.
                    extra=[frame_of_all, checksums_of_all] if keep_pixels else [checksums_of_all],
                )
                checksums = prebuilt[-1]
            else:
                with _one_torch_thread():
                    for k, (plan, dataset, grid) in enumerate(
                        zip(plans, datasets, grids, strict=True)
                    ):
                        part = slice(int(bounds[k]), int(bounds[k + 1]))
                        _read_scene(
                            plan,
                            dataset,
                            grid.slices(),
                            out[part],
                            keep[part],
                            report,
                            options,
                            bar,
                        )
                checksums = checksums_of_all()
            for plan, checksum in zip(plans, checksums, strict=True):
                plan.checksum = checksum
    finally:
        _forget_early(early)
        # TorchGeo caches open file handles (and so every dataset) in a class-wide LRU
        # cache; empty it so the files are closed once the pool is read.
        from torchgeo.datasets import RasterDataset

        RasterDataset._cached_load_warp_file.cache_clear()
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise DataError(
            f"all {total} patches of {root} were skipped: more than {max_nodata:.0%} of each is "
            "nodata or cloud; raise --max-nodata or pass --cloud-mask none"
        )
    every = kept.size == total
    georefs = georefs_all if every else georefs_all[kept]
    crs = crs_all if every else [crs_all[i] for i in kept.tolist()]
    sources = sources_all if every else [sources_all[i] for i in kept.tolist()]
    scene_of = scene_all[kept].tolist()
    windows = windows_all[kept]
    frame, prepared = prebuilt[0] if keep_pixels and block is None else (None, None)
    if frame is not None and not every:
        frame = frame.iloc[kept].reset_index(drop=True)
        frame["patch_id"] = np.arange(len(frame), dtype=np.int64)
        if prepared is not None:
            prepared.discard()  # written for every window
            prepared = None
    patches = out if kept.size == total or not keep_pixels else out[kept]
    band_mean = band_std = None
    if "sums" in options:
        values = int(kept.size) * size * size
        band_mean, band_std = _moments(options["sums"][kept], options["squares"][kept], values)
    report.kept = int(kept.size)
    report.crs_patches = dict(Counter(crs))
    report.seconds = time.perf_counter() - t0
    return TileRead(
        band_mean=band_mean,
        band_std=band_std,
        nan_free=integers,
        patches=patches,
        bands=list(names),
        sources=sources,
        crs=crs,
        checksums=[plans[i].checksum for i in scene_of],
        georefs=georefs,
        windows=windows,
        resolution=float(np.median([p.grid[0] for p in plans])),
        report=report,
        layout=_layout(plans, datasets, grids, windows_all, bounds, scene_all[kept], options),
        _frame=frame,
        prepared_footprints=prepared,
    )


def _layout(
    plans: Sequence[_Plan],
    datasets: Sequence[Any],
    grids: Sequence[_Grid],
    windows_all: np.ndarray,
    bounds: np.ndarray,
    scene: np.ndarray,
    options: dict[str, Any],
) -> TileLayout:
    """The :class:`TileLayout` of a read: per scene its files and grid, per patch its scene."""
    scenes = []
    for k, (plan, dataset) in enumerate(zip(plans, datasets, strict=True)):
        source = (
            dataset.datasets[0] if dataset.__class__.__name__ == "IntersectionDataset" else dataset
        )
        if plan.probe.scene.file is not None:
            band_indexes = source.band_indexes
            files = [str(plan.probe.scene.file)] * len(plan.bands)
            indexes = [
                int(band_indexes[c]) if band_indexes else c + 1 for c in range(len(plan.bands))
            ]
        else:
            files = [str(plan.probe.scene.band_files[b]) for b in plan.bands]
            indexes = [1] * len(plan.bands)
        row0, col0 = (int(v) for v in windows_all[int(bounds[k])])
        scenes.append(
            {
                "name": plan.probe.scene.name,
                "crs": plan.probe.crs,
                "source": str(plan.source),
                "sha256": plan.checksum,
                "res": [float(plan.grid[0]), float(plan.grid[1])],
                "resampling": source.resampling.name,
                "row0": row0,
                "col0": col0,
                "files": files,
                "indexes": indexes,
            }
        )
    return TileLayout(
        size=int(options["size"]),
        stride=int(options["stride"]),
        scenes=scenes,
        grids=[(g.x_start, g.x_stop, g.y_start, g.y_stop) for g in grids],
        scene=np.asarray(scene, dtype=np.int64),
        warped=sorted(set(options.get("warped", []))),
    )


ReportCallback = Callable[[IngestReport], None]
