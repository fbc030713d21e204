"""Sentinel-2 band names: the known orders, how a file's bands are named, selecting by name.

Band names follow the Sentinel-2 convention ``B01`` ... ``B12`` plus ``B8A``. A pool always
carries one name per channel, so every consumer (backbones, pretrained weights, the RGB
preview) asks for bands by name and never by position.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from anneal_geo.errors import DataError

__all__ = [
    "EUROSAT_MS_BANDS",
    "RGB_BANDS",
    "S2_ALL_BANDS",
    "S2_L2A_BANDS",
    "band_indices",
    "check_band_names",
    "infer_band_names",
    "normalise_band_name",
]

#: EuroSAT-MS file order: the 13 L1C bands with B8A stored *last*.
EUROSAT_MS_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07",
    "B08", "B09", "B10", "B11", "B12", "B8A",
)  # fmt: skip

#: All 13 Sentinel-2 bands in ESA's order (B8A after B08), as in an L1C product.
S2_ALL_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07",
    "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip

#: The 12 bands of a Level-2A product (ESA order, no B10 cirrus band), as in BigEarthNet-S2
#: and Major TOM Core-S2L2A. A 12-band GeoTIFF without band descriptions is assumed to be
#: stacked in this order.
S2_L2A_BANDS: tuple[str, ...] = tuple(b for b in S2_ALL_BANDS if b != "B10")

#: True colour as stored in 8-bit RGB images (EuroSAT-RGB): red, green, blue.
RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")

# "B4", "b04", "B8a", "B08A" -> canonical; anything else (e.g. "Red") is not a band name.
_BAND_PATTERN = re.compile(r"^B0?(1[0-2]|[1-9]|8A)$", re.IGNORECASE)


def normalise_band_name(text: str | None) -> str | None:
    """Return the canonical Sentinel-2 name for ``text`` (``"B4"`` -> ``"B04"``), else None."""
    if text is None:
        return None
    match = _BAND_PATTERN.match(text.strip())
    if match is None:
        return None
    core = match.group(1).upper()
    return "B8A" if core == "8A" else f"B{int(core):02d}"


def check_band_names(names: Sequence[str], count: int, where: str) -> list[str]:
    """Validate user-given band names against a band count.

    Args:
        names: one name per band, in file order.
        count: the number of bands in the data.
        where: the file or pool the names are for (named in errors).

    Returns:
        the names as a list of str.

    Raises:
        DataError: wrong number of names, empty or duplicate names.
    """
    if isinstance(names, str):
        raise DataError(
            f"bands={names!r} for {where}: pass a list of names, e.g. {list(RGB_BANDS)}"
        )
    out = [str(n) for n in names]
    if len(out) != count:
        raise DataError(
            f"bands= gives {len(out)} names but {where} has {count} bands; pass exactly {count}"
        )
    if any(not n.strip() for n in out):
        raise DataError(f"bands= for {where} contains an empty name; give every band a name")
    duplicates = sorted({n for n in out if out.count(n) > 1})
    if duplicates:
        raise DataError(f"bands= for {where} repeats {', '.join(duplicates)}; names must be unique")
    return out


def infer_band_names(
    count: int,
    descriptions: Sequence[str | None],
    *,
    rgb_image: bool,
    where: str,
) -> list[str]:
    """Name the bands of a raster that came without explicit ``bands=``.

    The rules, in order:

    1. band descriptions that all look like Sentinel-2 band names (and are unique) are used;
    2. a 3-band 8-bit RGB image (JPEG/PNG, or a GeoTIFF with red/green/blue colour
       interpretation) is ``B04, B03, B02``;
    3. 13 bands are EuroSAT-MS order (:data:`EUROSAT_MS_BANDS`, B8A last);
    4. 12 bands are Level-2A order without B10 (:data:`S2_L2A_BANDS`);
    5. anything else raises :class:`DataError` asking for ``bands=``.

    Args:
        count: number of bands.
        descriptions: the raster's band descriptions (None where unset).
        rgb_image: the file is an 8-bit RGB image.
        where: the file (named in errors).

    Returns:
        one name per band, in file order.
    """
    described = [normalise_band_name(d) for d in descriptions]
    if count > 0 and all(described) and len(set(described)) == count:
        return [d for d in described if d is not None]
    if rgb_image and count == 3:
        return list(RGB_BANDS)
    if count == len(EUROSAT_MS_BANDS):
        return list(EUROSAT_MS_BANDS)
    if count == len(S2_L2A_BANDS):
        return list(S2_L2A_BANDS)
    raise DataError(
        f"{where}: cannot tell the names of its {count} band(s) (no Sentinel-2 band "
        f"descriptions); pass bands=[...] with {count} names in file order"
    )


def band_indices(available: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Positions of ``wanted`` band names within ``available``.

    Args:
        available: the pool's band names.
        wanted: the names to select, in the order wanted.

    Returns:
        the channel index of each wanted band.

    Raises:
        DataError: a wanted band is not available (the message lists the available ones), or
            a band is asked for twice.
    """
    if isinstance(wanted, str):
        wanted = [wanted]
    index = {name: i for i, name in enumerate(available)}
    out: list[int] = []
    for name in wanted:
        if name not in index:
            canonical = normalise_band_name(name)
            if canonical is None or canonical not in index:
                raise DataError(
                    f"band {name!r} is not in this pool; available bands: {', '.join(available)}"
                )
            name = canonical
        out.append(index[name])
    if len(set(out)) != len(out):
        raise DataError(f"bands {list(wanted)} name the same band twice; give each band once")
    return out
