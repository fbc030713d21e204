"""Pictures of patches: the one renderer every picture a person sees goes through.

The terminal labeller's PNG, the web page and the Jupyter widget
(:mod:`anneal_geo.labelling`), ``anneal-geo query --plot``
(:mod:`anneal_geo.retrieval.plots`) and the notebooks all draw patches with
:class:`PatchRenderer`, so a patch looks the same everywhere and colours can be compared
across pictures.

A composite takes three bands by name (true colour B04/B03/B02 by default, or the
false-colour preset B08/B04/B03 where vegetation shows red) and stretches each band
linearly between two percentiles. By default the percentiles are taken over a sample of
the whole pool, not per patch, so that the same reflectance gives the same colour in every
picture: a dark water patch next to a bright field looks dark, which is what an expert
needs to judge whether two patches are alike.

Only numpy and Pillow are used here (Pillow is a core dependency); geopandas is touched
only through ``pool.footprints`` when places are asked for.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from anneal_geo.data.bands import RGB_BANDS, band_indices
from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool

__all__ = ["PRESETS", "PatchRenderer", "available_presets", "patch_places"]

#: Named band combinations (red, green, blue channels of the picture).
PRESETS: dict[str, tuple[str, ...]] = {
    "true": RGB_BANDS,  # ("B04", "B03", "B02"): what the eye would see
    "false": ("B08", "B04", "B03"),  # colour infrared: healthy vegetation shows bright red
}

#: Patches sampled to fix a pool-wide stretch; enough for stable 1/99 % percentiles.
_STRETCH_SAMPLE = 256
#: Pixel values per band used for the pool-wide percentiles (pixels are strided beyond it).
_STRETCH_VALUES = 1_000_000

Stretch = Literal["pool", "patch"]


def available_presets(bands: Sequence[str]) -> list[str]:
    """The preset names whose three bands the pool has, in :data:`PRESETS` order."""
    have = set(bands)
    return [name for name, wanted in PRESETS.items() if set(wanted) <= have]


def _channels(pool_bands: Sequence[str], bands: str | Sequence[str] | None) -> list[int]:
    """Channel indices of the picture's red, green and blue.

    ``None`` or ``"true"`` falls back like :meth:`PatchPool.rgb` (first three bands, or the
    first band three times) when the pool has no B04/B03/B02; any other preset or explicit
    band list must exist in the pool.
    """
    if bands is None or bands == "true":
        if set(RGB_BANDS) <= set(pool_bands):
            return band_indices(pool_bands, RGB_BANDS)
        return [0, 1, 2] if len(pool_bands) >= 3 else [0, 0, 0]
    if isinstance(bands, str):
        if bands in PRESETS:
            wanted: Sequence[str] = PRESETS[bands]
        elif "," in bands:
            wanted = [b.strip() for b in bands.split(",") if b.strip()]
        else:
            raise ConfigError(
                f"bands={bands!r} is neither a preset ({', '.join(PRESETS)}) nor three "
                "comma-separated band names such as B08,B04,B03"
            )
    else:
        wanted = list(bands)
    if len(wanted) != 3:
        raise ConfigError(
            f"a colour picture needs three bands (red, green, blue), got {list(wanted)}"
        )
    return band_indices(pool_bands, wanted)


def patch_places(pool: PatchPool) -> np.ndarray | None:
    """(N, 2) float64 lon/lat of each patch's footprint centroid, or None without footprints."""
    footprints = pool.footprints
    if footprints is None or len(footprints) == 0:
        return None
    import shapely

    # Centroids of the EPSG:4326 polygons: at patch scale (a few km) the difference from a
    # centroid taken in the native UTM CRS is far below a pixel.
    centroids = shapely.centroid(np.asarray(footprints.geometry.values))
    out = np.full((len(pool), 2), np.nan)
    ids = np.asarray(footprints["patch_id"], dtype=np.int64)
    out[ids, 0] = shapely.get_x(centroids)
    out[ids, 1] = shapely.get_y(centroids)
    return out


def _place_text(lon: float, lat: float) -> str:
    ns = "N" if lat >= 0 else "S"
    ew = "E" if lon >= 0 else "W"
    return f"{abs(lat):.4f}°{ns} {abs(lon):.4f}°{ew}"


class PatchRenderer:
    """Colour composites, side-by-side pair pictures and short descriptions of patches.

    Args:
        pool: the pool the patch ids refer to.
        bands: a preset name (``"true"``, ``"false"``), three comma-separated band names,
            or a sequence of three names. ``None`` means true colour.
        stretch: ``"pool"`` (percentiles over a sample of the whole pool; comparable
            colours across patches) or ``"patch"`` (each patch stretched on its own).
        percentiles: the low and high percentile mapped to black and white (1 and 99 by
            default: bright roofs and sand keep their texture, water stays dark).
        size: the longer side of each patch picture in pixels; small patches are enlarged
            by an integer factor with nearest-neighbour sampling (sharp pixels).
        seed: seed of the patch sample used for the pool-wide stretch.

    Raises:
        ConfigError: a malformed band setting or percentiles.
        DataError: a band the pool lacks (the message lists the pool's bands).
    """

    def __init__(
        self,
        pool: PatchPool,
        bands: str | Sequence[str] | None = None,
        *,
        stretch: Stretch = "pool",
        percentiles: tuple[float, float] = (1.0, 99.0),
        size: int = 256,
        seed: int = 0,
    ) -> None:
        if stretch not in ("pool", "patch"):
            raise ConfigError(f"stretch={stretch!r}; use 'pool' or 'patch'")
        low, high = float(percentiles[0]), float(percentiles[1])
        if not 0.0 <= low < high <= 100.0:
            raise ConfigError(f"percentiles={percentiles!r} must satisfy 0 <= low < high <= 100")
        self.pool = pool
        self.stretch: Stretch = stretch
        self.percentiles = (low, high)
        self.size = int(size)
        self.seed = int(seed)
        self._places: np.ndarray | None = None
        self._places_known = False
        self.channels: list[int] = []
        self._limits: np.ndarray | None = None
        self.set_bands(bands)

    # -- bands and stretch ------------------------------------------------------------------
    def set_bands(self, bands: str | Sequence[str] | None) -> None:
        """Switch the band combination (e.g. to the ``"false"`` preset)."""
        self.channels = _channels(self.pool.bands, bands)
        self.band_names = [self.pool.bands[c] for c in self.channels]
        self._limits = self._pool_limits() if self.stretch == "pool" else None

    def _pool_limits(self) -> np.ndarray:
        """(2, 3) low/high value of each picture channel over a sample of the pool."""
        n = len(self.pool)
        rng = np.random.default_rng(self.seed)
        take = np.sort(rng.choice(n, size=min(n, _STRETCH_SAMPLE), replace=False))
        h, w = self.pool.patch_size
        step = max(1, math.ceil(math.sqrt(len(take) * h * w / _STRETCH_VALUES)))
        sample = np.asarray(self.pool.patches[take][:, self.channels, ::step, ::step])
        return np.percentile(sample, self.percentiles, axis=(0, 2, 3))

    # -- pictures ---------------------------------------------------------------------------
    def composite(self, patch_id: int) -> np.ndarray:
        """(H, W, 3) uint8 colour composite of one patch, at native resolution."""
        if not 0 <= int(patch_id) < len(self.pool):
            raise DataError(f"patch id {patch_id} is out of range 0..{len(self.pool) - 1}")
        image = np.asarray(self.pool.patches[int(patch_id)][self.channels], dtype=np.float32)
        if self._limits is None:
            low, high = np.percentile(image, self.percentiles, axis=(1, 2))
        else:
            low, high = self._limits
        span = np.where(high > low, high - low, 1.0)
        scaled = (image - low[:, None, None]) / span[:, None, None]
        return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)

    def composite_array(self, patch: np.ndarray, bands: Sequence[str] | None = None) -> np.ndarray:
        """(H, W, 3) uint8 composite of a patch that is not in the pool (a query image).

        Args:
            patch: (C, H, W) array in the pool's units.
            bands: the names of its C bands (default: the pool's bands, in order).

        The pool's stretch is used when the patch has the picture's bands; otherwise its
        first three bands are stretched on their own.
        """
        array = np.asarray(patch, dtype=np.float32)
        names = list(self.pool.bands if bands is None else bands)
        if array.ndim != 3 or array.shape[0] != len(names):
            raise DataError(
                f"a patch to draw must be (bands, height, width) with {len(names)} bands, "
                f"got shape {array.shape}"
            )
        if set(self.band_names) <= set(names):
            image = array[[names.index(b) for b in self.band_names]]
            limits = self._limits
        else:
            image = array[[0, 1, 2] if len(names) >= 3 else [0, 0, 0]]
            limits = None
        if limits is None:
            low, high = np.percentile(image, self.percentiles, axis=(1, 2))
        else:
            low, high = limits
        span = np.where(high > low, high - low, 1.0)
        scaled = (image - low[:, None, None]) / span[:, None, None]
        return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)

    def enlarged(self, patch_id: int) -> np.ndarray:
        """The composite enlarged by an integer factor towards :attr:`size` pixels."""
        image = self.composite(patch_id)
        factor = max(1, self.size // max(image.shape[:2]))
        if factor > 1:
            image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
        return image

    def pair(self, i: int, j: int, *, captions: bool = True, gap: int = 8) -> np.ndarray:
        """(H', W', 3) uint8 picture of patch ``i`` left of patch ``j`` (ids below each)."""
        left, right = self.enlarged(i), self.enlarged(j)
        height = max(left.shape[0], right.shape[0])
        caption_h = 18 if captions else 0
        canvas = np.full(
            (height + caption_h, left.shape[1] + gap + right.shape[1], 3), 255, dtype=np.uint8
        )
        canvas[: left.shape[0], : left.shape[1]] = left
        canvas[: right.shape[0], left.shape[1] + gap :] = right
        if not captions:
            return canvas
        from PIL import Image, ImageDraw

        picture = Image.fromarray(canvas)
        draw = ImageDraw.Draw(picture)
        draw.text((2, height + 3), f"patch {int(i)}", fill=(0, 0, 0))
        draw.text((left.shape[1] + gap + 2, height + 3), f"patch {int(j)}", fill=(0, 0, 0))
        return np.asarray(picture)

    @staticmethod
    def png(image: np.ndarray) -> bytes:
        """PNG bytes of an (H, W, 3) uint8 image (fast, light compression)."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def patch_png(self, patch_id: int) -> bytes:
        """PNG bytes of one enlarged patch composite."""
        return self.png(self.enlarged(patch_id))

    def write_pair(self, i: int, j: int, path: str | Path) -> Path:
        """Write the side-by-side picture of the pair as PNG, atomically; return the path.

        Atomic (temporary file, then rename) so an image viewer that reloads the file on
        change never sees half a picture.
        """
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        try:
            tmp.write_bytes(self.png(self.pair(i, j)))
            os.replace(tmp, target)
        except OSError as exc:
            raise DataError(
                f"cannot write the pair picture {target}: {exc.strerror}; "
                "check that its folder exists and is writable"
            ) from exc
        return target

    # -- descriptions -----------------------------------------------------------------------
    @property
    def places(self) -> np.ndarray | None:
        """(N, 2) lon/lat of each patch centroid (computed once), None without footprints."""
        if not self._places_known:
            self._places = patch_places(self.pool)
            self._places_known = True
        return self._places

    def place(self, patch_id: int) -> str:
        """Where the patch is, as ``"44.0352°N 28.5591°E"``, or a note that it is unknown."""
        places = self.places
        if places is None or not np.isfinite(places[int(patch_id)]).all():
            return "place unknown (no georeference)"
        lon, lat = places[int(patch_id)]
        return _place_text(float(lon), float(lat))

    def size_text(self) -> str:
        """Patch size in pixels and, for georeferenced pools, on the ground."""
        h, w = self.pool.patch_size
        res = self.pool.resolution
        if res:
            return f"{h} x {w} px, {h * res:.0f} m x {w * res:.0f} m"
        return f"{h} x {w} px"

    def describe(self, patch_id: int) -> str:
        """One line: id, place and size."""
        return f"patch {int(patch_id)}: {self.place(patch_id)}, {self.size_text()}"
