"""Read class-per-folder patch archives (EuroSAT-style) into a :class:`~.sources.RawPool`.

Layout: ``<root>/<Class>/<anything>.{tif,tiff,jpg,jpeg,png}``, one folder per class. Files at
the top level that are not images (README.md, MANIFEST.csv) are ignored; a folder whose top
level holds images and no class folders is read as one unlabelled pool. Classes are sorted by
name and files by natural order (``_2`` before ``_10``), so the patch ids are reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.data.bands import check_band_names, infer_band_names
from anneal_geo.data.sources import (
    IMAGE_SUFFIXES,
    RGB_SUFFIXES,
    GeoRef,
    RawPool,
    natural_key,
    sha256_file,
)
from anneal_geo.errors import DataError

__all__ = ["crs_text", "find_class_folders", "read_class_folders", "read_image_files"]

_SUFFIX_TEXT = "*.tif, *.tiff, *.jpg, *.jpeg, *.png"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: natural_key(p.name))


def find_class_folders(root: str | Path) -> tuple[list[str] | None, list[list[Path]]]:
    """List the classes and image files of a class-per-folder archive.

    Args:
        root: the archive folder.

    Returns:
        ``(class_names, files)``: sorted class names and, per class, its image files in natural
        order. For a flat folder of images (no class folders) ``class_names`` is None and
        ``files`` has one list.

    Raises:
        DataError: the folder is missing, holds no images, or mixes top-level images with
            class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder; give the folder that holds one subfolder per class"
        )
    # Hidden and private folders (.git, __pycache__, .ipynb_checkpoints) are never classes.
    subfolders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
        key=lambda p: p.name,
    )
    classes: list[str] = []
    files: list[list[Path]] = []
    for folder in subfolders:
        images = _images_in(folder)
        if images:
            classes.append(folder.name)
            files.append(images)
    top_images = _images_in(root)
    if classes and top_images:
        raise DataError(
            f"{top_images[0]} lies next to the class folders of {root}; move it into its class "
            "folder or remove it"
        )
    if classes:
        return classes, files
    if top_images:
        return None, [top_images]
    raise DataError(
        f"{root} has no class subfolders with images ({_SUFFIX_TEXT}); put each class's patches "
        f"in its own subfolder, e.g. {root / 'Forest' / 'Forest_1.tif'}"
    )


def crs_text(crs: Any) -> str:
    """A CRS as ``"EPSG:<code>"`` when it has one, else its WKT."""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())


def _is_rgb_image(src: Any, path: Path) -> bool:
    from rasterio.enums import ColorInterp

    if src.dtypes[0] != "uint8":
        return False
    if path.suffix.lower() in RGB_SUFFIXES:
        return True
    return tuple(src.colorinterp[:3]) == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


def _image_bands(src: Any, path: Path) -> list[int]:
    """1-based band indexes to read: all, except a trailing alpha band of an RGBA image."""
    from rasterio.enums import ColorInterp

    indexes = list(range(1, src.count + 1))
    if src.count == 4 and _is_rgb_image(src, path) and src.colorinterp[3] == ColorInterp.alpha:
        indexes = indexes[:3]
    return indexes


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def read_image_files(
    paths: Sequence[Path],
    bands: Sequence[str] | None = None,
    *,
    description: str = "reading patches",
) -> tuple[np.ndarray, list[str], list[GeoRef | None], list[str]]:
    """Read same-sized image files into one (N, C, H, W) array of their native dtype.

    Args:
        paths: the files, in patch-id order.
        bands: band names in file order; inferred from the first file when None (see
            :func:`~anneal_geo.data.bands.infer_band_names`).
        description: the progress bar's label.

    Returns:
        ``(patches, band_names, georefs, sha256)``, one georef (None without a CRS) and one
        checksum per file.

    Raises:
        DataError: a file is not an image, is truncated, or differs in size, band count or
            dtype from the first file; ``bands`` does not fit.
    """
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from tqdm import tqdm

    if not paths:
        raise DataError("no image files to read; give a folder with patches")
    first = paths[0]
    patches = np.empty(0)
    names: list[str] = []
    expect: tuple[int, int, int, str] = (0, 0, 0, "")
    georefs: list[GeoRef | None] = []
    checksums: list[str] = []
    with warnings.catch_warnings():
        # JPEG/PNG patches carry no georeference; that is expected, not worth a warning each.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for i, path in enumerate(tqdm(paths, desc=description, unit="patch", disable=None)):
            try:
                src = rasterio.open(path)
            except RasterioError as exc:
                raise DataError(
                    f"{path} is not a readable image ({_reason(exc)}); remove it or replace it "
                    "with a valid GeoTIFF, JPEG or PNG"
                ) from exc
            with src:
                indexes = _image_bands(src, path)
                shape = (len(indexes), src.height, src.width, src.dtypes[0])
                if i == 0:
                    expect = shape
                    names = (
                        check_band_names(bands, len(indexes), str(path))
                        if bands is not None
                        else infer_band_names(
                            len(indexes),
                            [src.descriptions[k - 1] for k in indexes],
                            rgb_image=_is_rgb_image(src, path),
                            where=str(path),
                        )
                    )
                    patches = np.empty((len(paths), *shape[:3]), dtype=np.dtype(shape[3]))
                elif shape != expect:
                    raise DataError(
                        f"{path} is {shape[1]}x{shape[2]} px with {shape[0]} bands ({shape[3]}) "
                        f"but {first} is {expect[1]}x{expect[2]} px with {expect[0]} bands "
                        f"({expect[3]}); all patches of a pool must match: resample or remove it"
                    )
                try:
                    src.read(indexes=indexes, out=patches[i])
                except RasterioError as exc:
                    raise DataError(
                        f"{path} could not be read: the file is truncated or corrupt; "
                        "re-download or remove it"
                    ) from exc
                georefs.append(
                    None
                    if src.crs is None
                    else GeoRef(crs_text(src.crs), tuple(src.transform)[:6], src.height, src.width)
                )
            checksums.append(sha256_file(path))
    return patches, names, georefs, checksums


def read_class_folders(root: str | Path, bands: Sequence[str] | None = None) -> RawPool:
    """Read a class-per-folder archive.

    Args:
        root: the archive folder (see the module docstring for the layout).
        bands: band names in file order, overriding the inferred ones.

    Returns:
        the patches with single labels (one True per row), or unlabelled for a flat folder.
    """
    root = Path(root)
    class_names, files = find_class_folders(root)
    paths = [p for group in files for p in group]
    patches, names, georefs, checksums = read_image_files(
        paths, bands, description=f"reading {root.name or root}"
    )
    labels = None
    if class_names is not None:
        class_index = np.repeat(np.arange(len(files)), [len(group) for group in files])
        labels = np.zeros((len(paths), len(class_names)), dtype=bool)
        labels[np.arange(len(paths)), class_index] = True
    return RawPool(
        patches=patches,
        bands=names,
        sources=[str(p) for p in paths],
        checksums=checksums,
        georefs=georefs,
        class_names=class_names,
        labels=labels,
        multilabel=False,
    )
