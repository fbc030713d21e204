"""anneal-geo-coreset: a k-center greedy (core-set) selector plugin for anneal-geo.

Installed, it registers the selector ``coreset`` (entry point group
``anneal_geo.selectors``)::

    anneal-geo run --selector coreset
"""

from __future__ import annotations

from anneal_geo_coreset.coreset import CoresetSelector, covering_radius, k_center_greedy

__all__ = ["CoresetSelector", "__version__", "covering_radius", "k_center_greedy"]

__version__ = "0.1.0"
