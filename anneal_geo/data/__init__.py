"""Patch pools and their sources: class folders (EuroSAT-style), BigEarthNet, saved pools.

Importing this package imports neither rasterio nor geopandas; readers import them when used.
"""

from __future__ import annotations

from anneal_geo.data.bands import (
    EUROSAT_MS_BANDS,
    RGB_BANDS,
    S2_ALL_BANDS,
    S2_L2A_BANDS,
    band_indices,
)
from anneal_geo.data.cube import pool_from_xarray, pool_to_xarray
from anneal_geo.data.pool import PatchPool, band_statistics, build_pool_cli_summary

__all__ = [
    "EUROSAT_MS_BANDS",
    "RGB_BANDS",
    "S2_ALL_BANDS",
    "S2_L2A_BANDS",
    "PatchPool",
    "band_indices",
    "band_statistics",
    "build_pool_cli_summary",
    "pool_from_xarray",
    "pool_to_xarray",
]
