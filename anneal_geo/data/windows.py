"""A pool that reads its patches from the tiles: windows kept, pixels not copied.

``anneal-geo pool build TILES --out POOL --store tiles`` (``PatchPool.from_tiles(...,
store="tiles", out=POOL)``) keeps, instead of ``patches.npy``, where each patch lies:

- ``pool.json`` (``"store": "tiles"``): the usual metadata, with a **scene table** in
  place of the per-patch lists (``scenes``: per scene its CRS, reference file and its
  SHA-256, the grid's pixel size, the resampling TorchGeo reads with and, per channel, the
  file read, as an absolute path and relative to the pool, with its size and mtime);
- ``windows.npz``: per patch its scene, and its ``row``/``col`` pixel offset in the
  scene's grid (int32), and per scene the exact float64 bounds of its patch grid;
- ``footprints.gpkg``: as for any georeferenced pool.

:class:`TileWindows` is the pool's ``patches``: an (N, C, P, P) array-like whose items are
read from the tile files when asked, with the very reads (:func:`~anneal_geo.data.tiles.
_merge_read`: the bounds, resolution and resampling TorchGeo reads with) that built the
pool, so the values equal those ``--store array`` saves, to the bit.

Opening checks every tile file (it exists, with the size and mtime recorded); the
relative paths are tried first, so a pool and its archive moved together keep working.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo._memory import cap_gdal_cache
from anneal_geo.errors import DataError

if TYPE_CHECKING:
    from anneal_geo.data.tiles import TileLayout

__all__ = [
    "STORE_ARRAY",
    "STORE_TILES",
    "WINDOWS_FILE",
    "TileWindows",
    "retarget_table",
    "scene_table",
    "tiles_bytes",
    "windows_from_layout",
    "windows_from_store",
    "write_windows",
]

STORE_ARRAY = "array"
STORE_TILES = "tiles"
WINDOWS_FILE = "windows.npz"

# A grid row of a scene is read in one window when at least this share of its span is asked.
_DENSE = 0.25


@dataclass
class _SceneFiles:
    """What reading one scene's patches needs."""

    files: list[str]  # per channel, the file read (resolved)
    indexes: list[int]  # per channel, the 1-based band index in that file
    res: tuple[float, float]
    resampling: str
    row0: int
    col0: int
    x_start: np.ndarray
    x_stop: np.ndarray
    y_start: np.ndarray
    y_stop: np.ndarray


class TileWindows:
    """The (N, C, P, P) patches of a tiles-store pool, read from the tiles when indexed.

    Supports ``shape``, ``dtype``, ``ndim``, ``len()``, indexing by an int, a slice, an int
    array (any order, repeats allowed) or a bool mask, or a tuple whose first item is one
    of those (the rest is applied to the patches read, as numpy would: ``w[ids, 1:3]``,
    ``w[ids, [0, 2]]`` pairs ``ids`` with the bands like ``array[ids, [0, 2]]``), and
    ``np.asarray``. The patches are always read whole (all channels), then indexed. Reads are
    grouped by scene and by grid row (a row is read in one window when enough of it is
    asked), reuse open file handles, and hold a lock: two threads may read at once.

    Args:
        scenes: per scene, its files and grid.
        scene: (N,) scene of each patch.
        row: (N,) pixel row offset of each patch in its scene's grid.
        col: (N,) pixel column offset.
        size: patch side P.
        stride: pixels between neighbouring patches of the grid.
        dtype: the pool's dtype (what ``--store array`` would hold).
        channels: the channels of the scenes' files to read, in this order (default all).
    """

    def __init__(
        self,
        scenes: list[_SceneFiles],
        scene: np.ndarray,
        row: np.ndarray,
        col: np.ndarray,
        size: int,
        stride: int,
        dtype: np.dtype[Any] | str,
        channels: list[int] | None = None,
    ) -> None:
        from anneal_geo.data.tiles import _Handles

        self._scenes = scenes
        self.scene = np.asarray(scene, dtype=np.int32)
        self.row = np.asarray(row, dtype=np.int32)
        self.col = np.asarray(col, dtype=np.int32)
        self.size, self.stride = int(size), int(stride)
        n_channels = len(scenes[0].files) if scenes else 0
        self.channels = list(range(n_channels)) if channels is None else list(channels)
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        row0 = np.array([s.row0 for s in scenes], dtype=np.int64)
        col0 = np.array([s.col0 for s in scenes], dtype=np.int64)
        self._grid_row = (self.row - row0[self.scene]) // self.stride
        self._grid_col = (self.col - col0[self.scene]) // self.stride
        self._lock = threading.Lock()
        self._handles = _Handles(limit=64)

    # -- the array protocol ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, P, P)."""
        return (len(self.scene), len(self.channels), self.size, self.size)

    @property
    def ndim(self) -> int:
        """4."""
        return 4

    @property
    def nbytes(self) -> int:
        """Bytes the patches would take in memory."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.scene)

    def __repr__(self) -> str:
        return f"TileWindows(shape={self.shape}, dtype={self.dtype}, scenes={len(self._scenes)})"

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = (key[0] if key else slice(None)), key[1:]
        n = len(self)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"patch {i} is out of range for {n} patches")
            out = self.read(np.array([i % n]))[0]
            return out[rest] if rest else out
        if isinstance(key, slice):
            ids = np.arange(n)[key]
        elif key is Ellipsis:
            ids = np.arange(n)
            rest = (Ellipsis, *rest)
        else:
            arr = np.asarray(key)
            if arr.dtype == bool:
                if arr.shape != (n,):
                    raise IndexError(f"a bool mask of shape {arr.shape} for {n} patches")
                ids = np.flatnonzero(arr)
            elif arr.dtype.kind in "iu" or arr.size == 0:
                if arr.ndim != 1:
                    raise IndexError(f"patch ids must be one-dimensional, got shape {arr.shape}")
                ids = arr.astype(np.int64)
                if ids.size and (ids.min() < -n or ids.max() >= n):
                    raise IndexError(f"patch ids out of range for {n} patches")
                ids = ids % n if ids.size else ids
            else:
                raise IndexError(f"cannot index patches with {type(key).__name__} {key!r}")
        out = self.read(ids)
        if not rest:
            return out
        if isinstance(key, slice):
            return out[(slice(None), *rest)]
        # The ids' place taken by positions in ``out``: numpy's own broadcasting of several
        # index arrays, as ``array[ids, ...]`` would do.
        return out[(np.arange(len(ids)), *rest)]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"], state["_handles"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from anneal_geo.data.tiles import _Handles

        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._handles = _Handles(limit=64)

    # -- views -------------------------------------------------------------------------------
    def with_channels(self, index: list[int]) -> TileWindows:
        """The same windows with only the channels ``index`` (of this object's), in order."""
        view = TileWindows.__new__(TileWindows)
        view.__setstate__(self.__getstate__())
        view.channels = [self.channels[i] for i in index]
        return view

    def grids(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per scene, its grid's ``(x_start, x_stop, y_start, y_stop)``."""
        return [(s.x_start, s.x_stop, s.y_start, s.y_stop) for s in self._scenes]

    def scene_files(self, k: int) -> list[str]:
        """The files scene ``k`` is read from, per channel of the scene (as resolved)."""
        return list(self._scenes[k].files)

    def files(self) -> list[str]:
        """Every file the windows read from (each once)."""
        seen = {s.files[c]: None for s in self._scenes for c in self.channels}
        return list(seen)

    def close(self) -> None:
        """Close the open file handles (they reopen on the next read); waits for a read
        in progress on another thread, whose handles it would close under it."""
        with self._lock:
            self._handles.close()

    # -- reading -----------------------------------------------------------------------------
    def read(self, ids: np.ndarray) -> np.ndarray:
        """The patches ``ids`` (1-D, in range), in that order: (len(ids), C, P, P)."""
        import rasterio

        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), len(self.channels), self.size, self.size), dtype=self.dtype)
        if not len(ids):
            return out
        scenes = self.scene[ids]
        order = np.argsort(scenes, kind="stable")
        cuts = np.flatnonzero(np.diff(scenes[order])) + 1
        cap_gdal_cache()
        with self._lock, rasterio.Env():
            for group in np.split(order, cuts):
                self._read_scene(int(scenes[group[0]]), ids[group], group, out)
        return out

    def _read_scene(self, k: int, ids: np.ndarray, slots: np.ndarray, out: np.ndarray) -> None:
        scene = self._scenes[k]
        rows, cols = self._grid_row[ids], self._grid_col[ids]
        order = np.lexsort((cols, rows))
        cuts = np.flatnonzero(np.diff(rows[order])) + 1
        for group in np.split(order, cuts):
            r = int(rows[group[0]])
            js = cols[group]
            lo, hi = int(js.min()), int(js.max())
            if len(np.unique(js)) >= _DENSE * (hi - lo + 1):
                self._read_block(scene, r, lo, hi, js, slots[group], out)
            else:
                for j, slot in zip(js.tolist(), slots[group].tolist(), strict=True):
                    self._read_block(scene, r, j, j, np.array([j]), np.array([slot]), out)

    def _read_block(
        self,
        scene: _SceneFiles,
        r: int,
        c0: int,
        c1: int,
        js: np.ndarray,
        slots: np.ndarray,
        out: np.ndarray,
    ) -> None:
        """Read grid row ``r``, columns ``c0..c1``, in one window per channel; put the
        patches of columns ``js`` into ``out[slots]``."""
        from rasterio.enums import Resampling

        from anneal_geo.data.tiles import _merge_read

        size, step = self.size, self.stride
        bounds = (
            float(scene.x_start[c0]),
            float(scene.y_start[r]),
            float(scene.x_stop[c1]),
            float(scene.y_stop[r]),
        )
        resampling = Resampling[scene.resampling]
        offsets = (js - c0) * step
        for channel, c in enumerate(self.channels):
            path = scene.files[c]
            try:
                handle = self._handles.get(path)
                data = _merge_read(handle, bounds, scene.res, [scene.indexes[c]], resampling)[0]
            except Exception as exc:  # rasterio raises many kinds
                raise DataError(
                    f"{path} could not be read ({type(exc).__name__}: "
                    f"{(str(exc).splitlines() or [''])[0]}); put the tile back or rebuild the "
                    "pool"
                ) from exc
            expect = (size, (c1 - c0) * step + size)
            if data.shape != expect:
                raise DataError(
                    f"a {data.shape} window was read from {path}, expected {expect}; the tile "
                    "is not the one the pool was built from: rebuild the pool"
                )
            for slot, x in zip(slots.tolist(), offsets.tolist(), strict=True):
                out[slot, channel] = data[:, x : x + size]


# ------------------------------------------------------------------------------ on disk


def _stat(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return int(info.st_size), int(info.st_mtime_ns)


def _relative(path: str, directory: Path) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(directory)).replace(
            os.sep, "/"
        )
    except ValueError:  # another drive
        return os.path.abspath(path)


def scene_table(layout: TileLayout, directory: Path) -> list[dict[str, Any]]:
    """The ``scenes`` of ``pool.json``: per scene its CRS, source and checksum, grid, and
    per channel its file (absolute and relative to ``directory``) with size and mtime."""
    from anneal_geo.data.dates import acquisition_date

    table = []
    for scene in layout.scenes:
        files = []
        for path, index in zip(scene["files"], scene["indexes"], strict=True):
            size, mtime = _stat(path)
            files.append(
                {
                    "path": os.path.abspath(path),
                    "relative": _relative(path, directory),
                    "band_index": int(index),
                    "size": size,
                    "mtime_ns": mtime,
                }
            )
        table.append(
            {
                "name": scene["name"],
                "crs": scene["crs"],
                "source": scene["source"],
                "source_relative": _relative(scene["source"], directory),
                "sha256": scene["sha256"],
                "acquired": acquisition_date(scene["source"]),
                "res": list(scene["res"]),
                "resampling": scene["resampling"],
                "row0": int(scene["row0"]),
                "col0": int(scene["col0"]),
                "files": files,
            }
        )
    return table


def retarget_table(
    table: list[dict[str, Any]], patches: TileWindows, directory: Path
) -> list[dict[str, Any]]:
    """The scene table of ``patches`` for a pool saved in ``directory``: the files where
    they are now, their relative paths from ``directory``."""
    out = []
    for k, entry in enumerate(table):
        files = []
        for item, path in zip(entry["files"], patches.scene_files(k), strict=True):
            files.append(
                {**item, "path": os.path.abspath(path), "relative": _relative(path, directory)}
            )
        source = str(entry["source"])
        out.append({**entry, "source_relative": _relative(source, directory), "files": files})
    return out


def write_windows(
    directory: Path,
    scene: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    grids: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Write ``windows.npz`` (under a temporary name, then renamed)."""
    col_offsets = np.cumsum([0, *(len(g[0]) for g in grids)]).astype(np.int64)
    row_offsets = np.cumsum([0, *(len(g[2]) for g in grids)]).astype(np.int64)

    def joined(k: int) -> np.ndarray:
        parts = [np.asarray(g[k], dtype=np.float64) for g in grids]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)

    tmp = directory / ("partial-" + WINDOWS_FILE)
    with open(tmp, "wb") as fh:
        np.savez(
            fh,
            scene=np.asarray(scene, dtype=np.int32),
            row=np.asarray(row, dtype=np.int32),
            col=np.asarray(col, dtype=np.int32),
            x_start=joined(0),
            x_stop=joined(1),
            y_start=joined(2),
            y_stop=joined(3),
            col_offsets=col_offsets,
            row_offsets=row_offsets,
        )
    os.replace(tmp, directory / WINDOWS_FILE)


def windows_from_layout(
    layout: TileLayout, windows: np.ndarray, dtype: np.dtype[Any] | str
) -> TileWindows:
    """The :class:`TileWindows` of a fresh read (``windows``: (N, 2) row, col offsets)."""
    scenes = [
        _SceneFiles(
            files=list(s["files"]),
            indexes=[int(i) for i in s["indexes"]],
            res=(float(s["res"][0]), float(s["res"][1])),
            resampling=str(s["resampling"]),
            row0=int(s["row0"]),
            col0=int(s["col0"]),
            x_start=g[0],
            x_stop=g[1],
            y_start=g[2],
            y_stop=g[3],
        )
        for s, g in zip(layout.scenes, layout.grids, strict=True)
    ]
    return TileWindows(
        scenes, layout.scene, windows[:, 0], windows[:, 1], layout.size, layout.stride, dtype
    )


def _resolve(entry: dict[str, Any], directory: Path, pool_file: Path) -> str:
    """The file of a scene-table entry: relative to the pool when it is there, else its
    absolute path; checked against the recorded size and mtime."""
    relative = directory / entry["relative"]
    path = os.path.normpath(os.path.abspath(relative)) if relative.is_file() else entry["path"]
    try:
        size, mtime = _stat(path)
    except OSError:
        raise DataError(
            f"tile {entry['path']} read by the pool {directory} is missing (not at "
            f"{relative} either); put the tiles back, or rebuild the pool with "
            "`anneal-geo pool build <tiles> --out <pool> --store tiles`"
        ) from None
    if (size, mtime) != (int(entry["size"]), int(entry["mtime_ns"])):
        what = "size" if size != int(entry["size"]) else "modification time"
        raise DataError(
            f"tile {path} changed since the pool {directory} was built (its {what} differs "
            f"from {pool_file.name}); put the original tile back, or rebuild the pool with "
            "`anneal-geo pool build <tiles> --out <pool> --store tiles`"
        )
    return path


def windows_from_store(
    directory: Path, meta: dict[str, Any], pool_file: Path
) -> tuple[TileWindows, list[str], list[str], list[str]]:
    """Open the windows of a tiles-store pool directory, checking its tiles.

    Returns:
        ``(patches, sources, crs, sha256)``, the last three per patch (lists that share one
        string per scene).

    Raises:
        DataError: a tile is missing or changed, or ``windows.npz`` is damaged.
    """
    try:
        with np.load(directory / WINDOWS_FILE) as data:
            arrays = {k: data[k] for k in data.files}
        table = meta["scenes"]
        shape, dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])
        size, stride = int(meta["patch_size"][0]), int(meta["stride"])
        scene = arrays["scene"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{directory} is a damaged pool ({exc}); rebuild it from its tiles"
        ) from exc
    cols, rows = arrays["col_offsets"], arrays["row_offsets"]
    scenes = []
    seen: dict[str, str] = {}
    for k, entry in enumerate(table):
        files = []
        for item in entry["files"]:
            key = str(item["path"])
            if key not in seen:
                seen[key] = _resolve(item, directory, pool_file)
            files.append(seen[key])
        c, r = slice(int(cols[k]), int(cols[k + 1])), slice(int(rows[k]), int(rows[k + 1]))
        scenes.append(
            _SceneFiles(
                files=files,
                indexes=[int(item["band_index"]) for item in entry["files"]],
                res=(float(entry["res"][0]), float(entry["res"][1])),
                resampling=str(entry["resampling"]),
                row0=int(entry["row0"]),
                col0=int(entry["col0"]),
                x_start=arrays["x_start"][c],
                x_stop=arrays["x_stop"][c],
                y_start=arrays["y_start"][r],
                y_stop=arrays["y_stop"][r],
            )
        )
    channels = meta.get("channels") or None
    patches = TileWindows(
        scenes, scene, arrays["row"], arrays["col"], size, stride, dtype, channels=channels
    )
    if patches.shape != shape:
        raise DataError(
            f"{directory / WINDOWS_FILE} holds {patches.shape[0]} windows of "
            f"{patches.shape[1:]} but {pool_file} says {shape}; the pool is damaged: rebuild it"
        )
    scene_list = scene.tolist()

    def per_patch(values: list[str]) -> list[str]:
        return [values[s] for s in scene_list]

    sources = []
    for entry in table:
        # As recorded (as the array store keeps it) while the tile is where it was.
        recorded = str(entry["source"])
        found = seen.get(os.path.abspath(recorded), recorded)
        sources.append(recorded if found == os.path.abspath(recorded) else found)
    return (
        patches,
        per_patch(sources),
        per_patch([str(e["crs"]) for e in table]),
        per_patch([str(e["sha256"]) for e in table]),
    )


def tiles_bytes(patches: TileWindows) -> int:
    """Bytes of the tile files the windows read (each file once)."""
    total = 0
    for path in patches.files():
        with contextlib.suppress(OSError):
            total += os.path.getsize(path)
    return total
