"""Tests of the uncertainty estimators (mgue, bcgue, random) and of the Estimator contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from sklearn.metrics import roc_auc_score

from anneal_geo import plugins
from anneal_geo.errors import ConfigError, PluginError
from anneal_geo.estimators import bcgue as bcgue_module
from anneal_geo.estimators.base import Estimator
from anneal_geo.estimators.bcgue import BCGUEEstimator
from anneal_geo.estimators.mgue import MGUEEstimator, balanced_threshold, pair_distances
from anneal_geo.estimators.random import RandomEstimator

EUROSAT_MS = Path(__file__).resolve().parents[1] / "sample_tiles" / "eurosat_ms"


# -- shared data -------------------------------------------------------------------------


def _all_pairs(ids: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(ids), 1)
    return np.stack([ids[i], ids[j]], axis=1).astype(np.int64)


@pytest.fixture(scope="module")
def eurosat() -> tuple[np.ndarray, np.ndarray]:
    """Real embeddings: per-band mean and std of each EuroSAT-MS GeoTIFF, standardised and
    L2-normalised; labels from the class folder names (similar = same class)."""
    files = sorted(EUROSAT_MS.glob("*/*.tif"))
    assert len(files) == 283
    classes = sorted({f.parent.name for f in files})
    feats, labels = [], []
    for f in files:
        with rasterio.open(f) as src:
            x = src.read().astype(np.float64).reshape(src.count, -1)
        feats.append(np.concatenate([x.mean(axis=1), x.std(axis=1)]))
        labels.append(classes.index(f.parent.name))
    emb = np.asarray(feats)
    emb = (emb - emb.mean(axis=0)) / emb.std(axis=0)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), np.asarray(labels)


@pytest.fixture(scope="module")
def eurosat_split(
    eurosat: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2,000 labelled pairs among 170 patches; every pair of the other 113 held out."""
    emb, y = eurosat
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    train = _all_pairs(np.sort(perm[:170]))
    train = train[np.sort(rng.choice(len(train), 2000, replace=False))]
    test = _all_pairs(np.sort(perm[170:]))
    train_y = (y[train[:, 0]] == y[train[:, 1]]).astype(np.int8)
    test_y = (y[test[:, 0]] == y[test[:, 1]]).astype(np.int8)
    return emb, train, train_y, test, test_y


def _line(positions: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """1-D embeddings [0, x_1, x_2, ...] and the pairs (0, k), whose distances are x_k."""
    emb = np.array([[0.0], *[[p] for p in positions]], dtype=np.float32)
    pairs = np.stack([np.zeros(len(positions)), np.arange(1, len(positions) + 1)], axis=1)
    return emb, pairs.astype(np.int64)


def _random_embeddings(n: int = 60, d: int = 8, seed: int = 0) -> np.ndarray:
    emb = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


# -- registration and the contract -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("mgue", MGUEEstimator), ("bcgue", BCGUEEstimator), ("random", RandomEstimator)],
)
def test_entry_points_load_the_built_in_classes(name: str, cls: type) -> None:
    assert plugins.load("estimators", name) is cls
    assert isinstance(plugins.create("estimators", name, seed=3), cls)


def test_needs_labels_capability() -> None:
    assert MGUEEstimator.needs_labels and BCGUEEstimator.needs_labels
    assert not RandomEstimator.needs_labels


@pytest.mark.parametrize("name", ["mgue", "bcgue", "random"])
def test_checked_score_shape_and_finite(name: str, eurosat_split: tuple[np.ndarray, ...]) -> None:
    emb, train, train_y, test, _ = eurosat_split
    options = {"epochs": 5} if name == "bcgue" else {}
    est = plugins.create("estimators", name, seed=0, **options)
    before = est.checked_score(emb, test[:500])  # before any fit
    assert before.shape == (500,) and before.dtype == np.float64
    assert np.isfinite(before).all()
    est.checked_fit(emb, train, train_y)
    after = est.checked_score(emb, test)
    assert after.shape == (len(test),) and after.dtype == np.float64
    assert np.isfinite(after).all()
    assert est.checked_score(emb, np.zeros((0, 2), dtype=np.int64)).shape == (0,)


class _WrongShape(Estimator):
    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        return np.zeros(pairs.shape[0] + 1)


class _NaNScore(Estimator):
    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        out = np.zeros(pairs.shape[0])
        out[0] = np.nan
        return out


class _RaisingFit(Estimator):
    def fit(self, embeddings: np.ndarray, pairs: np.ndarray, labels: np.ndarray) -> None:
        raise KeyError("boom")

    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        return np.zeros(pairs.shape[0])


def test_base_class_rejects_a_broken_estimator() -> None:
    emb = _random_embeddings()
    pairs = np.array([[0, 1], [2, 3]], dtype=np.int64)
    with pytest.raises(PluginError, match=r"_WrongShape.*shape \(3,\), expected \(2\)"):
        _WrongShape().checked_score(emb, pairs)
    with pytest.raises(PluginError, match="1 NaN or infinite"):
        _NaNScore().checked_score(emb, pairs)
    with pytest.raises(PluginError, match="fit.. raised KeyError"):
        _RaisingFit().checked_fit(emb, pairs, np.array([1, 0]))


# -- MGUE --------------------------------------------------------------------------------


def _brute_force_best(distances: np.ndarray, similar: np.ndarray) -> float:
    """The best balanced accuracy over every realisable cut, by direct evaluation."""
    values = np.unique(distances)
    cuts = np.concatenate([[values[0]], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    predicted = distances[:, None] < cuts[None, :]
    tpr = predicted[similar].mean(axis=0)
    tnr = (~predicted[~similar]).mean(axis=0)
    return float((0.5 * (tpr + tnr)).max())


def _balanced_accuracy(distances: np.ndarray, similar: np.ndarray, tau: float) -> float:
    predicted = distances < tau
    return 0.5 * float(predicted[similar].mean() + (~predicted[~similar]).mean())


@pytest.mark.parametrize("seed", range(6))
def test_balanced_sweep_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(5, 300))
    similar = rng.random(m) < rng.uniform(0.05, 0.6)
    similar[:2] = [True, False]
    distances = np.where(similar, rng.normal(0.8, 0.3, m), rng.normal(1.2, 0.3, m)).clip(0)
    if seed % 2:  # ties, including ties across the two classes
        distances = np.round(distances, 1)
    tau, accuracy = balanced_threshold(distances, similar)
    best = _brute_force_best(distances, similar)
    assert accuracy == pytest.approx(best, abs=1e-12)
    assert _balanced_accuracy(distances, similar, tau) == pytest.approx(best, abs=1e-12)


def test_mgue_fit_matches_brute_force_on_embeddings() -> None:
    emb = _random_embeddings(80, 6, seed=1)
    pairs = _all_pairs(np.arange(80))
    d = pair_distances(emb, pairs)
    rng = np.random.default_rng(1)
    # Noisy labels that still depend on distance.
    labels = (d + rng.normal(0, 0.3, len(d)) < np.median(d)).astype(np.int8)
    est = MGUEEstimator()
    est.checked_fit(emb, pairs, labels)
    best = _brute_force_best(d, labels == 1)
    assert est.balanced_accuracy_ == pytest.approx(best, abs=1e-9)
    assert est.fallback_reason is None


def test_pair_distances_blockwise_equals_direct() -> None:
    emb = _random_embeddings(50, 5)
    pairs = _all_pairs(np.arange(50))
    direct = np.linalg.norm(emb[pairs[:, 0]] - emb[pairs[:, 1]], axis=1)
    np.testing.assert_allclose(pair_distances(emb, pairs, block=7), direct, rtol=1e-6)
    np.testing.assert_allclose(pair_distances(emb, pairs[:, ::-1]), direct, rtol=1e-6)
    assert pair_distances(emb, pairs.astype(np.int32), block=0).shape == direct.shape
    # faiss reads rows unchecked, so ids outside the embeddings are refused first.
    with pytest.raises(IndexError, match="pair ids must lie in"):
        pair_distances(emb, np.array([[0, 50]]))
    with pytest.raises(TypeError, match="integers"):
        pair_distances(emb, pairs.astype(np.float64))


def test_mgue_hand_made_thresholds() -> None:
    # similar at distances 0.1, 0.2, 0.6 (mean 0.3); dissimilar at 0.7, 0.8, 0.9 (mean 0.8)
    emb, pairs = _line([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    labels = np.array([1, 1, 1, 0, 0, 0], dtype=np.int8)
    expected = {"balanced": 0.65, "midpoint": 0.55}
    for threshold, tau in expected.items():
        est = MGUEEstimator(threshold=threshold)
        est.checked_fit(emb, pairs, labels)
        assert est.threshold_ == pytest.approx(tau, abs=1e-6), threshold
    balanced = MGUEEstimator()
    balanced.checked_fit(emb, pairs, labels)
    assert balanced.balanced_accuracy_ == 1.0


def _normal_pdf(x: float, values: np.ndarray) -> float:
    mu, sigma = values.mean(), values.std()
    return float(np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi)))


def test_mgue_gaussian_crossing() -> None:
    # A narrow similar class and a wide dissimilar one: the crossing is not the midpoint.
    pos, neg = np.array([0.2, 0.3, 0.4]), np.array([0.6, 1.0, 1.4])
    emb, pairs = _line([*pos, *neg])
    labels = np.array([1, 1, 1, 0, 0, 0], dtype=np.int8)
    est = MGUEEstimator(threshold="gaussian")
    est.checked_fit(emb, pairs, labels)
    tau = est.threshold_
    assert tau is not None and 0.3 < tau < 1.0
    assert abs(tau - 0.65) > 0.05  # not the midpoint
    assert _normal_pdf(tau, pos) == pytest.approx(_normal_pdf(tau, neg), rel=1e-4)
    assert est.fallback_reason is None


def test_mgue_gaussian_without_crossing_falls_back_to_midpoint() -> None:
    # A very wide similar class around 0.5 and a narrow dissimilar one at 0.6: the
    # dissimilar density is higher everywhere between the two means.
    emb, pairs = _line([0.0, 1.0, 0.5, 0.7])
    labels = np.array([1, 1, 0, 0], dtype=np.int8)
    est = MGUEEstimator(threshold="gaussian")
    est.checked_fit(emb, pairs, labels)
    assert est.threshold_ == pytest.approx(0.55, abs=1e-6)
    assert est.fallback_reason is not None and "midpoint" in est.fallback_reason


def test_mgue_score_peaks_at_tau() -> None:
    emb, pairs = _line([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    est = MGUEEstimator()
    est.checked_fit(emb, pairs, np.array([1, 1, 1, 0, 0, 0], dtype=np.int8))
    probe_emb, probe_pairs = _line([0.0, 0.3, 0.5, 0.65, 0.8, 1.5])
    score = est.checked_score(probe_emb, probe_pairs)
    assert int(np.argmax(score)) == 3  # the pair at distance tau = 0.65
    assert score[3] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(
        score, -np.abs(np.array([0, 0.3, 0.5, 0.65, 0.8, 1.5]) - 0.65), atol=1e-6
    )


def test_mgue_one_class_fallback() -> None:
    emb, pairs = _line([0.2, 0.4, 0.9])
    only_similar = MGUEEstimator()
    only_similar.checked_fit(emb, pairs, np.ones(3, dtype=np.int8))
    assert only_similar.fallback_reason is not None
    assert "only similar" in only_similar.fallback_reason
    assert only_similar.threshold_ is not None
    largest = float(pair_distances(emb, pairs).max())
    assert only_similar.threshold_ == np.nextafter(largest, np.inf)  # just above it
    assert only_similar.balanced_accuracy_ is None
    only_dissimilar = MGUEEstimator()
    only_dissimilar.checked_fit(emb, pairs, np.zeros(3, dtype=np.int8))
    assert only_dissimilar.threshold_ == pytest.approx(0.2, abs=1e-7)
    assert only_dissimilar.fallback_reason is not None
    assert "only dissimilar" in only_dissimilar.fallback_reason
    # A later fit with both classes clears the fallback.
    only_dissimilar.checked_fit(emb, pairs, np.array([1, 0, 0], dtype=np.int8))
    assert only_dissimilar.fallback_reason is None
    assert only_dissimilar.threshold_ == pytest.approx(0.3, abs=1e-6)


def test_mgue_before_fit_uses_median_and_ignores_skipped_labels() -> None:
    emb, pairs = _line([0.1, 0.3, 0.5, 0.7, 0.9])
    est = MGUEEstimator()
    assert est.threshold_ is None
    assert int(np.argmax(est.checked_score(emb, pairs))) == 2  # distance 0.5, the median
    # -1 (skipped) must not count as a class: with it ignored, the cut is 0.2.
    est.checked_fit(emb, pairs, np.array([1, 0, -1, -1, -1], dtype=np.int8))
    assert est.threshold_ == pytest.approx(0.2, abs=1e-6)


def test_mgue_rejects_unknown_threshold() -> None:
    with pytest.raises(ConfigError, match=r"threshold.*balanced, midpoint, gaussian.*'median'"):
        MGUEEstimator(threshold="median")
    with pytest.raises(ConfigError, match="mgue estimator: threshold"):
        plugins.create("estimators", "mgue", threshold="nope")


def test_mgue_on_real_embeddings(eurosat_split: tuple[np.ndarray, ...]) -> None:
    emb, train, train_y, test, test_y = eurosat_split
    est = plugins.create("estimators", "mgue")
    est.checked_fit(emb, train, train_y)
    assert est.balanced_accuracy_ is not None and est.balanced_accuracy_ > 0.7
    d = pair_distances(emb, test)
    held_out = _balanced_accuracy(d, test_y == 1, est.threshold_)
    assert held_out > 0.65


# -- BCGUE -------------------------------------------------------------------------------


def test_bcgue_learns_similarity_on_real_embeddings(
    eurosat_split: tuple[np.ndarray, ...],
) -> None:
    emb, train, train_y, test, test_y = eurosat_split
    est = plugins.create("estimators", "bcgue", seed=0)
    est.checked_fit(emb, train, train_y)
    proba = est.predict_proba(emb, test)
    assert proba.shape == (len(test),) and ((proba >= 0) & (proba <= 1)).all()
    assert roc_auc_score(test_y, proba) > 0.7
    score = est.checked_score(emb, test)
    np.testing.assert_allclose(score, 1 - np.abs(2 * proba - 1), atol=1e-6)
    assert est.train_loss_ is not None and est.fallback_reason is None


def test_bcgue_is_deterministic_under_seed(eurosat_split: tuple[np.ndarray, ...]) -> None:
    emb, train, train_y, test, _ = eurosat_split
    scores = []
    for seed in (5, 5, 6):
        est = BCGUEEstimator(seed=seed, epochs=5)
        est.checked_fit(emb, train, train_y)
        scores.append(est.checked_score(emb, test))
    np.testing.assert_array_equal(scores[0], scores[1])
    assert not np.array_equal(scores[0], scores[2])


def test_bcgue_leaves_the_global_torch_rng_alone(eurosat_split: tuple[np.ndarray, ...]) -> None:
    emb, train, train_y, _, _ = eurosat_split
    state = torch.get_rng_state()
    BCGUEEstimator(epochs=2).checked_fit(emb, train, train_y)
    assert torch.equal(state, torch.get_rng_state())


def test_bcgue_is_symmetric_in_pair_order(eurosat_split: tuple[np.ndarray, ...]) -> None:
    emb, train, train_y, test, _ = eurosat_split
    est = BCGUEEstimator(epochs=3)
    est.checked_fit(emb, train, train_y)
    np.testing.assert_array_equal(
        est.checked_score(emb, test), est.checked_score(emb, test[:, ::-1])
    )


def test_bcgue_scores_in_batches_like_in_one_go(
    eurosat_split: tuple[np.ndarray, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    emb, train, train_y, test, _ = eurosat_split
    est = BCGUEEstimator(epochs=3)
    est.checked_fit(emb, train, train_y)
    whole = est.checked_score(emb, test)
    monkeypatch.setattr(bcgue_module, "SCORE_BATCH", 1000)
    np.testing.assert_allclose(est.checked_score(emb, test), whole, rtol=1e-5, atol=1e-7)


def test_bcgue_warm_starts_only_when_the_dimension_is_unchanged(
    eurosat_split: tuple[np.ndarray, ...],
) -> None:
    emb, train, train_y, test, _ = eurosat_split
    est = BCGUEEstimator(epochs=2)
    est.checked_fit(emb, train, train_y)
    first = est._model
    weights = [p.detach().clone() for p in first.parameters()]
    est.checked_fit(emb, train, train_y)
    assert est._model is first  # continued, not re-initialised
    assert any(not torch.equal(a, b) for a, b in zip(weights, first.parameters(), strict=True))
    est.checked_fit(emb[:, :10], train, train_y)  # a new embedding size: a new network
    assert est._model is not first
    assert np.isfinite(est.checked_score(emb[:, :10], test)).all()


def test_bcgue_one_class_fit_is_recorded_not_fatal(
    eurosat_split: tuple[np.ndarray, ...],
) -> None:
    emb, train, _, test, _ = eurosat_split
    est = BCGUEEstimator()
    est.checked_fit(emb, train, np.zeros(len(train), dtype=np.int8))
    assert est.fallback_reason is not None and "0 similar" in est.fallback_reason
    assert np.isfinite(est.checked_score(emb, test)).all()


@pytest.mark.parametrize(
    ("option", "value"), [("dropout", 1.5), ("hidden", 0), ("lr", 0.0), ("epochs", 0)]
)
def test_bcgue_rejects_bad_settings(option: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"bcgue estimator: {option} must be"):
        BCGUEEstimator(**{option: value})


# -- random ------------------------------------------------------------------------------


def test_random_estimator_is_reproducible_and_uniform() -> None:
    emb = _random_embeddings()
    pairs = _all_pairs(np.arange(60))
    a, b = RandomEstimator(seed=1), RandomEstimator(seed=1)
    first, second = a.checked_score(emb, pairs), a.checked_score(emb, pairs)
    assert not np.array_equal(first, second)  # successive rounds differ
    np.testing.assert_array_equal(first, b.checked_score(emb, pairs))
    np.testing.assert_array_equal(second, b.checked_score(emb, pairs))
    assert not np.array_equal(first, RandomEstimator(seed=2).checked_score(emb, pairs))
    assert ((first >= 0) & (first < 1)).all()
    assert 0.45 < first.mean() < 0.55


# -- packaging ---------------------------------------------------------------------------


def test_importing_the_plugins_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "import anneal_geo.estimators.mgue, anneal_geo.estimators.bcgue\n"
        "import anneal_geo.estimators.random, anneal_geo.selectors.kmeans\n"
        "import anneal_geo.selectors.topk, anneal_geo.selectors.random\n"
        "import anneal_geo.selectors.descriptors, anneal_geo.estimators, anneal_geo.selectors\n"
        "heavy = {'torch', 'faiss', 'rasterio', 'torchgeo', 'sklearn'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
