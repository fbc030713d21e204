"""faiss search, stratified split and end-to-end retrieval evaluation on real sample tiles."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from anneal_geo.errors import ConfigError, DataError
from anneal_geo.retrieval import (
    evaluate,
    exact_search,
    rank_all,
    relevance_matrix,
    strata,
    stratified_split,
)

# The package re-exports the function evaluate(), which hides the module of the same name.
evaluate_module = importlib.import_module("anneal_geo.retrieval.evaluate")

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"
EUROSAT_MS = SAMPLES / "eurosat_ms"
BIGEARTHNET = SAMPLES / "bigearthnet_s2_tiny"


def _band_statistics(arrays: list[np.ndarray]) -> np.ndarray:
    """Per-band mean and std of each (C, H, W) patch, L2-normalised."""
    feats = np.stack([np.concatenate([a.mean(axis=(1, 2)), a.std(axis=(1, 2))]) for a in arrays])
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def eurosat() -> tuple[np.ndarray, np.ndarray]:
    """Features and class ids of the real EuroSAT-MS sample (283 GeoTIFFs, 10 classes)."""
    classes = sorted(p.name for p in EUROSAT_MS.iterdir() if p.is_dir())
    arrays, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((EUROSAT_MS / name).glob("*.tif")):
            with rasterio.open(path) as src:
                arrays.append(src.read().astype(np.float64))
            labels.append(index)
    return _band_statistics(arrays), np.asarray(labels, dtype=np.int64)


@pytest.fixture(scope="module")
def bigearthnet() -> tuple[np.ndarray, np.ndarray, list[set[str]]]:
    """Features (10 m bands), multi-hot labels and label sets of the BigEarthNet sample."""
    arrays, label_sets = [], []
    for patch in sorted(p for p in BIGEARTHNET.iterdir() if p.is_dir()):
        bands = []
        for band in ("B02", "B03", "B04", "B08"):
            with rasterio.open(patch / f"{patch.name}_{band}.tif") as src:
                bands.append(src.read(1).astype(np.float64))
        arrays.append(np.stack(bands))
        meta = json.loads((patch / f"{patch.name}_labels_metadata.json").read_text())
        label_sets.append(set(meta["labels"]))
    names = sorted(set().union(*label_sets))
    hot = np.array([[name in s for name in names] for s in label_sets], dtype=bool)
    return _band_statistics(arrays), hot, label_sets


# -- exact search -------------------------------------------------------------------------


def test_exact_search_equals_brute_force(eurosat: tuple[np.ndarray, np.ndarray]) -> None:
    feats, labels = eurosat
    archive, queries = stratified_split(labels, 0.2, seed=1)
    a, q = feats[archive].astype(np.float64), feats[queries].astype(np.float64)
    distances, indices = exact_search(feats[archive], feats[queries], k=15)
    assert distances.shape == indices.shape == (queries.size, 15)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    brute = np.sqrt(((q[:, None, :] - a[None, :, :]) ** 2).sum(axis=2))
    expected_order = np.argsort(brute, axis=1, kind="stable")[:, :15]
    expected_dist = np.take_along_axis(brute, expected_order, axis=1)
    np.testing.assert_allclose(distances, expected_dist, atol=2e-4)
    # The distance of each returned item, recomputed exactly, is the brute-force sorted one.
    np.testing.assert_allclose(np.take_along_axis(brute, indices, axis=1), expected_dist, atol=1e-6)
    # Same order wherever neighbours are not near-tied.
    gaps = np.diff(brute[np.arange(len(q))[:, None], expected_order], axis=1)
    clear = np.ones_like(indices, dtype=bool)
    clear[:, 1:] &= gaps > 1e-5
    clear[:, :-1] &= gaps > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(indices[clear], expected_order[clear])


def test_exact_search_clips_k_and_finds_identical_vectors_at_zero(
    eurosat: tuple[np.ndarray, np.ndarray],
) -> None:
    feats, _ = eurosat
    archive = feats[:40]
    distances, indices = exact_search(archive, archive[[3, 17]], k=1000)
    assert indices.shape == (2, 40)
    np.testing.assert_array_equal(indices[:, 0], [3, 17])
    assert (distances[:, 0] == 0).all()
    assert (np.diff(distances, axis=1) >= 0).all()


def test_rank_all_ranks_the_whole_archive(eurosat: tuple[np.ndarray, np.ndarray]) -> None:
    feats, _ = eurosat
    _, indices = rank_all(feats[:200], feats[200:])
    assert indices.shape == (feats.shape[0] - 200, 200)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.tile(np.arange(200), (83, 1)))


def test_exact_search_errors() -> None:
    archive = np.eye(4, dtype=np.float32)
    with pytest.raises(DataError, match="3 dimensions but the archive has 4"):
        exact_search(archive, np.zeros((2, 3), dtype=np.float32), k=2)
    with pytest.raises(ConfigError, match="k=0"):
        exact_search(archive, archive, k=0)
    with pytest.raises(DataError, match="NaN"):
        exact_search(archive, np.full((1, 4), np.nan, dtype=np.float32), k=1)
    with pytest.raises(DataError, match="empty"):
        exact_search(np.zeros((0, 4), dtype=np.float32), archive, k=1)
    distances, indices = exact_search(archive, np.zeros((0, 4), dtype=np.float32), k=2)
    assert distances.shape == indices.shape == (0, 2)


def test_importing_retrieval_does_not_import_faiss() -> None:
    code = "import sys, anneal_geo.retrieval; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- stratified split ---------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_complete(eurosat: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = eurosat
    archive, queries = stratified_split(labels, query_fraction=0.2, seed=0)
    assert archive.dtype == queries.dtype == np.int64
    assert (np.diff(archive) > 0).all() and (np.diff(queries) > 0).all()
    assert np.intersect1d(archive, queries).size == 0
    np.testing.assert_array_equal(np.union1d(archive, queries), np.arange(labels.size))
    assert queries.size == round(0.2 * labels.size)
    sizes = np.bincount(labels)
    per_class = np.bincount(labels[queries], minlength=sizes.size)
    # Largest remainder: every class gets floor or ceil of its share.
    assert (np.abs(per_class - 0.2 * sizes) < 1).all()
    assert (np.bincount(labels[archive], minlength=sizes.size) >= 1).all()


def test_split_is_deterministic_per_seed(eurosat: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = eurosat
    first = stratified_split(labels, 0.2, seed=7)
    again = stratified_split(labels, 0.2, seed=7)
    other = stratified_split(labels, 0.2, seed=8)
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_split_keeps_small_classes_in_the_archive() -> None:
    # Class 1 has one member, class 2 two members: a large fraction still leaves each one
    # archive member, and the lone member never becomes an unscorable query.
    labels = np.array([0] * 10 + [1] + [2] * 2)
    archive, _ = stratified_split(labels, query_fraction=0.9, seed=0)
    assert 10 in archive
    assert np.isin(np.array([11, 12]), archive).any()
    assert (labels[archive] == 0).sum() >= 1


def test_split_rejects_bad_fraction() -> None:
    labels = np.arange(10) % 2
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="query_fraction"):
            stratified_split(labels, bad)
    with pytest.raises(DataError, match="at least 2"):
        stratified_split(np.array([0]), 0.5)


def test_multilabel_strata_use_the_rarest_label(
    bigearthnet: tuple[np.ndarray, np.ndarray, list[set[str]]],
) -> None:
    _, hot, label_sets = bigearthnet
    names = sorted(set().union(*label_sets))
    counts = {name: sum(name in s for s in label_sets) for name in names}
    # Hand rule: the label with the fewest patches, ties to the alphabetically first name.
    rarest = [min(s, key=lambda name: (counts[name], names.index(name))) for s in label_sets]
    stratum = strata(hot)
    for i in range(len(label_sets)):
        for j in range(len(label_sets)):
            assert (stratum[i] == stratum[j]) == (rarest[i] == rarest[j])
    archive, queries = stratified_split(hot, 0.3, seed=0)
    assert np.intersect1d(archive, queries).size == 0
    assert archive.size + queries.size == hot.shape[0]


# -- evaluation ---------------------------------------------------------------------------


def test_evaluate_real_features_beat_random_embeddings(
    eurosat: tuple[np.ndarray, np.ndarray],
) -> None:
    feats, labels = eurosat
    archive, queries = stratified_split(labels, 0.2, seed=0)
    real = evaluate(feats, labels, archive, queries)
    assert set(real) == {
        "map@20",
        "map",
        "p@10",
        "p@20",
        "p@50",
        "map@r",
        "n_queries",
        "n_unscorable_queries",
    }
    assert real["n_queries"] == queries.size and real["n_unscorable_queries"] == 0
    noise = np.random.default_rng(0).normal(size=feats.shape)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    baseline = evaluate(noise, labels, archive, queries)
    assert real["map@20"] > baseline["map@20"] + 0.1
    assert real["map"] > baseline["map"] + 0.1
    for key in ("map@20", "map", "p@10", "p@20", "p@50", "map@r"):
        assert 0.0 <= real[key] <= 1.0


def test_evaluate_matches_a_direct_numpy_computation(
    eurosat: tuple[np.ndarray, np.ndarray],
) -> None:
    feats, labels = eurosat
    archive, queries = stratified_split(labels, 0.2, seed=3)
    result = evaluate(feats, labels, archive, queries, ks=(5, 10), map_k=10)
    dist = np.linalg.norm(
        feats[queries].astype(np.float64)[:, None] - feats[archive].astype(np.float64)[None],
        axis=2,
    )
    order = np.argsort(dist, axis=1, kind="stable")
    ranked = labels[archive][order] == labels[queries][:, None]
    assert result["p@5"] == pytest.approx(ranked[:, :5].mean(), abs=1e-9)
    assert result["p@10"] == pytest.approx(ranked[:, :10].mean(), abs=1e-9)
    n_rel = ranked.sum(axis=1)
    precision = np.cumsum(ranked, axis=1) / np.arange(1, ranked.shape[1] + 1)
    ap10 = (precision[:, :10] * ranked[:, :10]).sum(axis=1) / np.minimum(10, n_rel)
    assert result["map@10"] == pytest.approx(ap10.mean(), abs=1e-9)
    assert "map@20" not in result and "p@50" not in result


def test_evaluate_in_blocks_gives_the_same_numbers(
    eurosat: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    feats, labels = eurosat
    archive, queries = stratified_split(labels, 0.2, seed=0)
    whole = evaluate(feats, labels, archive, queries)
    # A block bound below one archive row forces one query per block.
    monkeypatch.setattr(evaluate_module, "_BLOCK_ENTRIES", 1)
    blocks = evaluate(feats, labels, archive, queries)
    assert blocks == pytest.approx(whole, abs=1e-12)


def test_evaluate_counts_queries_without_relevant_archive_items(
    eurosat: tuple[np.ndarray, np.ndarray],
) -> None:
    feats, labels = eurosat
    archive, queries = stratified_split(labels, 0.2, seed=0)
    relabelled = labels.copy()
    relabelled[queries[:3]] = 99  # a class no archive patch has
    result = evaluate(feats, relabelled, archive, queries)
    assert result["n_unscorable_queries"] == 3
    assert result["n_queries"] == queries.size - 3


def test_evaluate_multilabel_shares_a_label(
    bigearthnet: tuple[np.ndarray, np.ndarray, list[set[str]]],
) -> None:
    feats, hot, label_sets = bigearthnet
    by_sets = np.array([[bool(a & b) for b in label_sets] for a in label_sets])
    np.testing.assert_array_equal(relevance_matrix(hot, hot), by_sets)
    archive, queries = np.arange(0, 8), np.arange(8, hot.shape[0])
    result = evaluate(feats, hot, archive, queries, ks=(5,), map_k=5)
    # Direct full mAP with set-based relevance.
    aps: list[float] = []
    for q in queries:
        dist = np.linalg.norm(feats[archive] - feats[q], axis=1)
        hits, total = 0, 0.0
        for rank, a in enumerate(archive[np.argsort(dist)], start=1):
            if label_sets[q] & label_sets[a]:
                hits += 1
                total += hits / rank
        aps.append(total / hits)
    assert result["map"] == pytest.approx(float(np.mean(aps)), abs=1e-6)


def test_evaluate_rejects_overlap_and_bad_input(eurosat: tuple[np.ndarray, np.ndarray]) -> None:
    feats, labels = eurosat
    with pytest.raises(DataError, match="never be in the archive"):
        evaluate(feats, labels, np.arange(0, 200), np.arange(150, 283))
    with pytest.raises(DataError, match="one row per embedding"):
        evaluate(feats, labels[:10], np.arange(0, 200), np.arange(200, 283))
    with pytest.raises(DataError, match="outside"):
        evaluate(feats, labels, np.arange(0, 200), np.array([400]))
    with pytest.raises(DataError, match="at least one"):
        evaluate(feats, labels, np.arange(0, 200), np.array([], dtype=np.int64))
    with pytest.raises(ConfigError, match="map_k"):
        evaluate(feats, labels, np.arange(0, 200), np.arange(200, 283), map_k=0)
