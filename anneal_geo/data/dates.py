"""Acquisition dates from Sentinel-2 file and folder names.

Sentinel-2 names carry the sensing time of the datatake:

- products and Major TOM folders: ``S2B_MSIL2A_20200223T032739_N9999_R018_T48QUE_...``;
- band files inside a SAFE granule: ``T48QUE_20200223T032739_B04_10m.jp2``;
- BigEarthNet patches: ``S2A_MSIL2A_20170617T113321_36_85`` (the time sometimes has five
  digits, ``T94033``; the date is what counts).

:func:`acquisition_date` looks at a path's components from the file name up to the top and
returns the first such date as ISO ``YYYY-MM-DD`` (UTC), or None when no component carries
one (class-folder archives, arrays). A product's later processing time (the last
timestamp of a product name) is never taken for its acquisition.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date
from pathlib import PurePath

__all__ = ["acquisition_date", "acquisition_dates", "check_dates"]

_PRODUCT = re.compile(r"(?:^|[^A-Z0-9])S2[A-D]_MSI(?:L1C|L2A)_(\d{8})T\d{4,6}(?:_|$|\.)")
_GRANULE_FILE = re.compile(r"(?:^|[^A-Z0-9])T\d{2}[A-Z]{3}_(\d{8})T\d{6}_")


def _parse(text: str) -> str | None:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])).isoformat()
    except ValueError:
        return None


def acquisition_date(source: str) -> str | None:
    """The acquisition date (``YYYY-MM-DD``) a Sentinel-2 path names, or None."""
    for part in reversed(PurePath(str(source)).parts):
        name = part.upper()
        for pattern in (_PRODUCT, _GRANULE_FILE):
            match = pattern.search(name)
            if match is not None:
                found = _parse(match.group(1))
                if found is not None:
                    return found
    return None


def acquisition_dates(sources: Sequence[str]) -> list[str | None]:
    """:func:`acquisition_date` of each source (each distinct source parsed once)."""
    seen: dict[str, str | None] = {}
    out: list[str | None] = []
    for source in sources:
        if source not in seen:
            seen[source] = acquisition_date(source)
        out.append(seen[source])
    return out


def check_dates(values: Sequence[object], n: int, where: str) -> list[str | None]:
    """Validated per-patch dates: ``n`` values, each None or an ISO ``YYYY-MM-DD`` text.

    Raises:
        ValueError: a wrong count or a value that is not an ISO date (the caller turns it
            into a DataError naming the pool).
    """
    if len(values) != n:
        raise ValueError(f"{len(values)} acquisition dates for {n} patches in {where}")
    out: list[str | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        text = str(value)[:10]
        try:
            out.append(date.fromisoformat(text).isoformat())
        except ValueError:
            raise ValueError(
                f"acquisition date {value!r} in {where} is not an ISO date (YYYY-MM-DD)"
            ) from None
    return out
