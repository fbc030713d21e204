"""The ``texture`` backbone on real EuroSAT patches: shapes, edge inputs, pool statistics,
options, the conformance kit, and retrieval quality against ``spectral``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from anneal_geo import plugins
from anneal_geo.backbones._texture_net import TextureTrunk, fit_texture_trunk
from anneal_geo.backbones.spectral import SpectralBackbone
from anneal_geo.backbones.texture import TextureBackbone
from anneal_geo.data.pool import PatchPool
from anneal_geo.errors import ConfigError
from anneal_geo.retrieval.evaluate import evaluate
from anneal_geo.retrieval.split import stratified_split

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"


@pytest.fixture(scope="module")
def rgb() -> PatchPool:
    """1,000 EuroSAT-RGB patches (8-bit, B04, B03, B02)."""
    return PatchPool.load(SAMPLES / "eurosat_rgb")


@pytest.fixture(scope="module")
def ms() -> PatchPool:
    """283 EuroSAT-MS patches (13 bands, reflectance x 10000)."""
    return PatchPool.load(SAMPLES / "eurosat_ms")


def build(pool: PatchPool, bands: list[str] | None = None, **options: Any) -> TextureTrunk:
    bands = list(pool.bands) if bands is None else bands
    idx = [pool.bands.index(b) for b in bands]
    trunk = TextureBackbone(**options).checked_build(
        bands, pool.band_mean[idx].tolist(), pool.band_std[idx].tolist()
    )
    assert isinstance(trunk, TextureTrunk)
    return trunk


def patches(pool: PatchPool, ids: np.ndarray, bands: list[str] | None = None) -> torch.Tensor:
    x = pool.float_patches(ids)
    if bands is not None:
        x = x[:, [pool.bands.index(b) for b in bands]]
    return torch.from_numpy(np.ascontiguousarray(x))


def spread_ids(pool: PatchPool, n: int) -> np.ndarray:
    """n patch ids spread over the pool (so over its classes)."""
    return np.linspace(0, len(pool) - 1, n).round().astype(np.int64)


def run(trunk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return trunk(x)


@pytest.mark.parametrize(
    ("which", "bands"),
    [("rgb", None), ("ms", None), ("ms", ["B08"]), ("ms", ["B04", "B03"]), ("ms", ["B11", "B12"])],
)
def test_out_dim_and_feature_names_agree(
    which: str, bands: list[str] | None, request: pytest.FixtureRequest
) -> None:
    pool = request.getfixturevalue(which)
    trunk = build(pool, bands)
    assert trunk.out_dim == len(trunk.feature_names)
    assert len(set(trunk.feature_names)) == trunk.out_dim
    assert trunk.feature_weight.shape == (trunk.out_dim,)
    out = run(trunk, patches(pool, spread_ids(pool, 5), bands))
    assert out.shape == (5, trunk.out_dim)
    assert out.dtype == torch.float32
    used = bands or pool.bands
    assert all(f"{b}:mean" in trunk.feature_names for b in used)
    if bands is None:  # a superset of the spectral backbone's features
        spectral = SpectralBackbone().build(
            pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
        )
        assert set(cast(list[str], spectral.feature_names)) <= set(trunk.feature_names)
    assert 100 <= trunk.out_dim <= 300 or bands is not None


def test_finite_on_real_and_degenerate_patches(rgb: PatchPool, ms: PatchPool) -> None:
    cases: list[tuple[TextureTrunk, torch.Tensor]] = []
    for pool, bands in ((rgb, None), (ms, None), (ms, ["B08"]), (rgb, ["B03"])):
        trunk = build(pool, bands)
        real = patches(pool, spread_ids(pool, 6), bands)
        c = real.shape[1]
        cases += [
            (trunk, real),
            (trunk, torch.full((2, c, 64, 64), 7.0)),  # constant
            (trunk, torch.zeros(2, c, 64, 64)),  # all zero
            (trunk, real[:, :, :16, :16].contiguous()),  # small crops
            (trunk, real[:, :, :2, :3].contiguous()),  # smaller than every filter
        ]
    for trunk, x in cases:
        out = run(trunk, x)
        assert out.shape == (x.shape[0], trunk.out_dim)
        assert torch.isfinite(out).all(), (trunk.bands, tuple(x.shape))
    # The real 13-band input is in native units (reflectance x 10000), RGB in 0..255.
    assert float(patches(ms, spread_ids(ms, 6)).max()) > 1000
    assert float(patches(rgb, spread_ids(rgb, 6)).max()) <= 255


def test_features_do_not_depend_on_the_batch(rgb: PatchPool, ms: PatchPool) -> None:
    for pool in (rgb, ms):
        trunk = build(pool)
        x = patches(pool, spread_ids(pool, 6))
        together = run(trunk, x)
        alone = torch.cat([run(trunk, x[i : i + 1]) for i in range(len(x))])
        reordered = run(trunk, x.flip(0)).flip(0)
        torch.testing.assert_close(alone, together)
        torch.testing.assert_close(reordered, together)
        assert not torch.allclose(together[0], together[-1])  # patches do differ


def test_fitted_statistics_travel_in_the_state_dict(ms: PatchPool) -> None:
    trunk = build(ms)
    assert not bool(trunk.fitted)
    features = fit_texture_trunk(trunk, ms.float_patches, len(ms), chunk=150, progress=False)
    assert bool(trunk.fitted)
    assert features.shape == (len(ms), trunk.out_dim) and features.dtype == np.float32
    # z-scored over the pool, then weighted per feature family.
    weight = trunk.feature_weight.numpy()
    np.testing.assert_allclose(features.mean(0), 0.0, atol=1e-4)
    varying = features.std(0) > 1e-6
    np.testing.assert_allclose(features.std(0)[varying] / weight[varying], 1.0, rtol=1e-3)

    x = patches(ms, np.arange(0, len(ms), 7))
    fitted = run(trunk, x)
    np.testing.assert_allclose(fitted.numpy(), features[np.arange(0, len(ms), 7)], atol=1e-5)

    fresh = build(ms)
    unfitted = run(fresh, x)
    assert not torch.allclose(unfitted, fitted, atol=1e-3)  # identity statistics before fitting
    fresh.load_state_dict(trunk.state_dict())
    assert bool(fresh.fitted)
    assert torch.equal(run(fresh, x), fitted)


def test_fit_statistics_refuses_bad_input(rgb: PatchPool) -> None:
    trunk = build(rgb)
    with pytest.raises(ValueError, match="expected"):
        trunk.fit_statistics(np.zeros((4, trunk.out_dim + 1)))
    bad = np.zeros((4, trunk.out_dim))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        trunk.fit_statistics(bad)
    constant = np.ones((5, trunk.out_dim))
    trunk.fit_statistics(torch.from_numpy(constant))  # constant features: centred, not inf
    assert torch.isfinite(trunk.feature_std).all() and (trunk.feature_std > 0).all()


def test_a_large_pool_is_fitted_block_by_block_to_the_same_statistics(
    ms: PatchPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anneal_geo.backbones import _texture_net

    trunk = build(ms)
    with torch.inference_mode():
        raw = trunk.raw_features(patches(ms, np.arange(len(ms)))).numpy()
    trunk.fit_statistics(raw)
    whole = (trunk.feature_mean.clone(), trunk.feature_std.clone())
    # Blocks of 50 rows: six blocks, the last one short; NaN in the last block is still found.
    monkeypatch.setattr(_texture_net, "_FIT_BLOCK", 50)
    blocked = build(ms)
    blocked.fit_statistics(raw)
    torch.testing.assert_close(blocked.feature_mean, whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocked.feature_std, whole[1], rtol=1e-6, atol=1e-6)
    assert bool(blocked.fitted)
    raw[-1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build(ms).fit_statistics(raw)


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="histogram_binz"):
        TextureBackbone(histogram_binz=4)
    with pytest.raises(ConfigError, match="histogram_binz"):
        plugins.create("backbones", "texture", histogram_binz=4)
    with pytest.raises(ConfigError, match="scales"):
        TextureBackbone(scales=0)
    with pytest.raises(ConfigError, match="histogram_bins"):
        TextureBackbone(histogram_bins=2.5)
    with pytest.raises(ConfigError, match="lbp"):
        TextureBackbone(lbp="maybe")
    with pytest.raises(ConfigError, match="weights"):
        TextureBackbone(weights="some.pt")
    bb = plugins.create("backbones", "texture", scales=2, histogram_bins=3, lbp=False)
    assert isinstance(bb, TextureBackbone)
    assert (bb.scales, bb.histogram_bins, bb.lbp, bb.fft) == (2, 3, False, False)
    assert TextureBackbone.trainable is False


def test_options_change_the_features(rgb: PatchPool) -> None:
    base = build(rgb)
    assert build(rgb, lbp=False).out_dim == base.out_dim - 50  # 2 luminance + 3 band LBPs
    assert build(rgb, histogram_bins=3).out_dim == base.out_dim - 64 + 27
    assert build(rgb, scales=2).out_dim == base.out_dim - 3 - 4
    assert build(rgb, fft=True).out_dim == base.out_dim + 3 * 6


def test_conformance_kit() -> None:
    from anneal_geo.testing import check_backbone

    report = check_backbone(TextureBackbone)
    assert report is not None


def test_texture_beats_spectral_frozen_on_eurosat_rgb(rgb: PatchPool) -> None:
    """Frozen features, class-stratified 80/20 split, statistics fitted on the archive.

    Measured on this 1,000-patch sample: texture 0.60 against spectral 0.49 mAP@20
    (seed 0; +0.09 to +0.11 over seeds 0-4), so a 0.05 margin is conservative.
    """
    labels = rgb.single_labels()
    archive, queries = stratified_split(labels, query_fraction=0.2, seed=0)
    x = torch.from_numpy(rgb.float_patches())
    trunk = build(rgb)
    with torch.inference_mode():
        raw = trunk.raw_features(x)
        trunk.fit_statistics(raw[archive])  # what fit_texture_trunk does, on the archive
        texture = trunk.normalise(raw).numpy()
    spectral_trunk = SpectralBackbone().build(
        rgb.bands, rgb.band_mean.tolist(), rgb.band_std.tolist()
    )
    spectral = run(spectral_trunk, x).numpy()
    m_texture = evaluate(texture, labels, archive, queries)["map@20"]
    m_spectral = evaluate(spectral, labels, archive, queries)["map@20"]
    assert m_texture > m_spectral + 0.05, (m_texture, m_spectral)


def test_cached_features_are_normalised_block_by_block_to_the_same_values(
    ms: PatchPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anneal_geo.training import trainer as trainer_module
    from anneal_geo.training.heads import MetricModel
    from anneal_geo.training.trainer import Trainer

    x = ms.float_patches()

    def cached(block: int) -> tuple[np.ndarray, TextureTrunk]:
        monkeypatch.setattr(trainer_module, "_NORMALISE_BLOCK", block)
        trunk = build(ms)
        trainer = Trainer(MetricModel(trunk, seed=0), mode="head", seed=0)
        return trainer.cache_features(x), trunk

    whole, fitted = cached(1 << 20)
    blocked, _ = cached(50)  # six blocks, the last one short
    np.testing.assert_array_equal(blocked, whole)
    # And both equal the fitted trunk run on the patches.
    direct = run(fitted, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(direct, whole, rtol=1e-5, atol=1e-5)
