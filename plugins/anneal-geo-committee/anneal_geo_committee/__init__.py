"""anneal-geo-committee: a query-by-committee uncertainty estimator plugin for anneal-geo.

Installed, it registers the estimator ``committee`` (entry point group
``anneal_geo.estimators``)::

    anneal-geo run --estimator committee
"""

from __future__ import annotations

from anneal_geo_committee.committee import CommitteeEstimator, vote_entropy

__all__ = ["CommitteeEstimator", "__version__", "vote_entropy"]

__version__ = "0.1.0"
