"""What the readers hand to :class:`~anneal_geo.data.pool.PatchPool`, and shared file helpers.

The readers (:mod:`.folders`, :mod:`.bigearthnet`) return a :class:`RawPool`; only
:mod:`.pool` turns it into a ``PatchPool``, so readers never import the pool module.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "RGB_SUFFIXES",
    "TIFF_SUFFIXES",
    "GeoRef",
    "RawPool",
    "natural_key",
    "sha256_file",
    "sha256_files",
]

TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
RGB_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
IMAGE_SUFFIXES = TIFF_SUFFIXES | RGB_SUFFIXES

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``Forest_2`` before ``Forest_10`` (numbers compare as numbers)."""
    parts = _DIGITS.split(name)
    # (0, int) for digit runs and (1, str) for text keep the tuple comparable across names.
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts if p)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    """Hex SHA-256 over several files (name and bytes of each), e.g. a BigEarthNet patch folder."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


@dataclass(frozen=True)
class GeoRef:
    """Where one patch lies: its source's CRS and the affine transform of its pixel grid.

    Attributes:
        crs: the CRS as a string (``"EPSG:32631"``, or WKT when it has no EPSG code).
        transform: the GDAL-style affine ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``,
            ``y = d*col + e*row + f``.
        height: rows of the patch grid.
        width: columns of the patch grid.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    height: int
    width: int

    def corners(self) -> np.ndarray:
        """The patch outline as a closed ring (5, 2) of native coordinates."""
        a, b, c, d, e, f = self.transform
        cols = np.array([0, self.width, self.width, 0, 0], dtype=np.float64)
        rows = np.array([0, 0, self.height, self.height, 0], dtype=np.float64)
        return np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=1)

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units."""
        a, b, _, d, e, _ = self.transform
        return (float(np.hypot(a, d)), float(np.hypot(b, e)))


@dataclass
class RawPool:
    """The arrays and metadata a reader produced, before they become a ``PatchPool``."""

    patches: np.ndarray
    bands: list[str]
    sources: list[str]
    checksums: list[str]
    georefs: list[GeoRef | None]
    class_names: list[str] | None = None
    labels: np.ndarray | None = None
    multilabel: bool = False
