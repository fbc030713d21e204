"""Read BigEarthNet-S2 (v1.0 layout) patch folders into a :class:`~.sources.RawPool`.

Layout: ``<root>/<patch>/<patch>_<BAND>.tif`` for the 12 Level-2A bands (B01..B12 with B8A,
no B10), each a single-band GeoTIFF at its native 10, 20 or 60 m resolution, plus
``<patch>_labels_metadata.json`` with ``{"labels": [...]}``.

Every band is resampled onto the patch's 10 m grid (the grid of B02, 120 x 120 px) with
bilinear interpolation (``rasterio.warp.reproject``) computed in float32, so the 20 m and
60 m bands are not rounded back to integers; the pool is therefore float32. Bilinear keeps
each band's mean and avoids the blocky edges of nearest neighbour, which a CNN would
otherwise learn as texture. The labels become a multi-hot matrix over the sorted union of
all labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.data.bands import S2_L2A_BANDS
from anneal_geo.data.folders import crs_text
from anneal_geo.data.sources import GeoRef, RawPool, natural_key, sha256_files
from anneal_geo.errors import DataError

__all__ = [
    "REFERENCE_BAND",
    "find_patch_folders",
    "is_bigearthnet",
    "patch_sha256",
    "read_bigearthnet",
]

#: The band whose 10 m grid every other band is resampled onto.
REFERENCE_BAND = "B02"


def _band_file(folder: Path, band: str) -> Path:
    return folder / f"{folder.name}_{band}.tif"


def _label_file(folder: Path) -> Path:
    return folder / f"{folder.name}_labels_metadata.json"


def patch_sha256(folder: Path) -> str:
    """SHA-256 of a patch folder: its band files in band order, then its label file if any."""
    files = [_band_file(folder, b) for b in S2_L2A_BANDS]
    if _label_file(folder).is_file():
        files.append(_label_file(folder))
    return sha256_files(files)


def find_patch_folders(root: str | Path) -> list[Path]:
    """The BigEarthNet patch folders under ``root`` (those holding ``<patch>_B??.tif``), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and next(p.glob(f"{p.name}_B??.tif"), None) is not None
    ]
    return sorted(found, key=lambda p: natural_key(p.name))


def is_bigearthnet(root: str | Path) -> bool:
    """True when ``root`` holds at least one BigEarthNet patch folder."""
    return bool(find_patch_folders(root))


def _read_labels(folder: Path) -> list[str] | None:
    path = _label_file(folder)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        labels = meta["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is not a BigEarthNet label file with a 'labels' list ({exc}); fix or remove it"
        ) from exc
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path}: 'labels' must be a list of strings; fix the file")
    return labels


def _read_patch(folder: Path, out: np.ndarray) -> GeoRef:
    """Fill ``out`` (C, H, W) float32 with the patch's bands on the 10 m grid; return its georef."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError
    from rasterio.warp import reproject

    missing = [b for b in S2_L2A_BANDS if not _band_file(folder, b).is_file()]
    if missing:
        raise DataError(
            f"{folder} lacks band file(s) {', '.join(missing)} "
            f"(expected {_band_file(folder, missing[0]).name}); add them or remove the folder"
        )
    ref_path = _band_file(folder, REFERENCE_BAND)
    grid: dict[str, Any] = {}
    # Open the reference first: it fixes the grid every other band is resampled onto.
    for k, band in enumerate([REFERENCE_BAND, *(b for b in S2_L2A_BANDS if b != REFERENCE_BAND)]):
        path = _band_file(folder, band)
        channel = S2_L2A_BANDS.index(band)
        try:
            with rasterio.open(path) as src:
                if src.count != 1 or src.crs is None:
                    raise DataError(
                        f"{path} should be a single-band georeferenced GeoTIFF; it has "
                        f"{src.count} band(s) and CRS {src.crs}; replace it"
                    )
                data = src.read(1).astype(np.float32)
                if k == 0:
                    if (src.height, src.width) != out.shape[1:]:
                        raise DataError(
                            f"{path} is {src.height}x{src.width} px but the first patch is "
                            f"{out.shape[1]}x{out.shape[2]} px at 10 m; all patches of a pool "
                            "must match: remove it"
                        )
                    grid = {"transform": src.transform, "crs": src.crs, "bounds": src.bounds}
                    out[channel] = data
                    continue
                if src.crs != grid["crs"] or not np.allclose(
                    tuple(src.bounds), tuple(grid["bounds"]), atol=1e-3 * src.res[0]
                ):
                    raise DataError(
                        f"{path} does not cover the same area as {ref_path.name} (CRS or bounds "
                        "differ); the patch folder is inconsistent: re-download it"
                    )
                dst = out[channel]
                dst.fill(np.nan)
                reproject(
                    data,
                    dst,
                    src_transform=src.transform,
                    src_crs=src.crs,
                    dst_transform=grid["transform"],
                    dst_crs=grid["crs"],
                    resampling=Resampling.bilinear,
                )
        except RasterioError as exc:
            raise DataError(
                f"{path} could not be read ({str(exc).splitlines()[0]}): the file is truncated "
                "or corrupt; re-download or remove it"
            ) from exc
    if np.isnan(out).any():
        raise DataError(f"{folder}: a band does not cover the 10 m grid of {ref_path.name}")
    transform = grid["transform"]
    return GeoRef(
        crs_text(grid["crs"]),
        (transform.a, transform.b, transform.c, transform.d, transform.e, transform.f),
        out.shape[1],
        out.shape[2],
    )


def read_bigearthnet(root: str | Path) -> RawPool:
    """Read every BigEarthNet patch folder under ``root``.

    Args:
        root: the folder that holds the patch folders.

    Returns:
        a float32 (N, 12, 120, 120) pool in :data:`~anneal_geo.data.bands.S2_L2A_BANDS` order,
        multi-label when the label JSON files are present (all or none of them).

    Raises:
        DataError: no patch folders, a missing or unreadable band file, label files present for
            some patches only, or a malformed label file.
    """
    import rasterio
    from tqdm import tqdm

    root = Path(root)
    folders = find_patch_folders(root)
    if not folders:
        raise DataError(
            f"{root} holds no BigEarthNet patch folders (<patch>/<patch>_B02.tif); give the "
            "folder that contains them"
        )
    try:
        with rasterio.open(_band_file(folders[0], REFERENCE_BAND)) as src:
            size = (src.height, src.width)
    except Exception as exc:
        raise DataError(
            f"{_band_file(folders[0], REFERENCE_BAND)} could not be opened "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "re-download or remove that patch"
        ) from exc
    patches = np.empty((len(folders), len(S2_L2A_BANDS), *size), dtype=np.float32)
    georefs: list[GeoRef | None] = []
    checksums: list[str] = []
    label_lists: list[list[str] | None] = []
    for i, folder in enumerate(
        tqdm(folders, desc=f"reading {root.name or root}", unit="patch", disable=None)
    ):
        georefs.append(_read_patch(folder, patches[i]))
        checksums.append(patch_sha256(folder))
        label_lists.append(_read_labels(folder))

    class_names: list[str] | None = None
    labels: np.ndarray | None = None
    have = [x is not None for x in label_lists]
    if any(have):
        if not all(have):
            lacking = folders[have.index(False)]
            raise DataError(
                f"{_label_file(lacking)} is missing while other patches have labels; add it or "
                "remove the folder"
            )
        class_names = sorted({name for lst in label_lists for name in lst or []})
        column = {name: j for j, name in enumerate(class_names)}
        labels = np.zeros((len(folders), len(class_names)), dtype=bool)
        for i, lst in enumerate(label_lists):
            labels[i, [column[name] for name in lst or []]] = True
    return RawPool(
        patches=patches,
        bands=list(S2_L2A_BANDS),
        sources=[str(f) for f in folders],
        checksums=checksums,
        georefs=georefs,
        class_names=class_names,
        labels=labels,
        multilabel=class_names is not None,
    )
