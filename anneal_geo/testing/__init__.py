"""The conformance kit: check that a plugin keeps its contract, on real Sentinel-2 data.

Plugin authors run it in their own tests, on a class::

    from anneal_geo.testing import check_estimator

    def test_my_estimator_keeps_the_contract():
        check_estimator(MyEstimator)

or on every plugin their installed distribution declares, with one parametrised test::

    import pytest
    from anneal_geo.testing import check_plugin, plugin_cases

    @pytest.mark.parametrize(("group", "name"), plugin_cases(distribution="my-dist"))
    def test_conformance(group, name):
        check_plugin(group, name)

Each ``check_*`` function runs all of its checks, then raises :class:`ConformanceError` (an
``AssertionError``, so pytest reports a plain test failure) whose first line names the plugin
and the failed checks, one further line per failure; on success it returns a
:class:`ConformanceReport` listing what passed and what was skipped.

The data is real: 283 EuroSAT-MS patches (Sentinel-2 L1C, 13 bands; Helber et al., MIT
licence) shipped inside the package as ``anneal_geo/testing_data/eurosat_ms_sample.npz``
(about 160 KB, see the README there): per-band statistics of every patch, from which the
embeddings the estimators and selectors see are computed, and 30 labelled 16 x 16 crops (3 per
class) that form the small :class:`~anneal_geo.data.pool.PatchPool` the backbones and
annotators see. So the kit behaves the same in a third-party package's CI as in ours, without
the repository's ``sample_tiles/`` and without reading a raster. ``load_sample(folder)``
builds the same kind of sample from any class-per-folder archive instead, and
:func:`write_sample_file` regenerates the shipped file from ``sample_tiles/eurosat_ms``.

Importing this package imports neither torch nor faiss nor rasterio; the backbone checks import
torch when they run.
"""

from __future__ import annotations

from anneal_geo.testing.annotators import check_annotator
from anneal_geo.testing.backbones import check_backbone
from anneal_geo.testing.core import CONTRACT_VERSIONS, contract_version
from anneal_geo.testing.estimators import check_estimator
from anneal_geo.testing.registry import check_plugin, plugin_cases
from anneal_geo.testing.report import ConformanceError, ConformanceReport
from anneal_geo.testing.sample import (
    SAMPLE_FILE,
    Sample,
    load_sample,
    sample_arrays,
    write_sample_file,
)
from anneal_geo.testing.sample import (
    spectral_embeddings as spectral_embeddings,  # documented in testing_data/README.md
)
from anneal_geo.testing.selectors import check_selector
from anneal_geo.testing.session import run_sample_session

__all__ = [
    "CONTRACT_VERSIONS",
    "SAMPLE_FILE",
    "ConformanceError",
    "ConformanceReport",
    "Sample",
    "check_annotator",
    "check_backbone",
    "check_estimator",
    "check_plugin",
    "check_selector",
    "contract_version",
    "load_sample",
    "plugin_cases",
    "run_sample_session",
    "sample_arrays",
    "write_sample_file",
]
