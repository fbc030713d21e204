"""Average query expansion on real EuroSAT-MS data: what ``evaluate`` ranks with it, that it
changes what is retrieved and nothing the session trains or asks, and its setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError
from anneal_geo.pairs.store import PairStore
from anneal_geo.retrieval import evaluate, expand_queries, stratified_split
from anneal_geo.session import Session, SessionConfig


def features(pool: PatchPool) -> np.ndarray:
    """Per-band mean and standard deviation of each patch, standardised and L2-normalised."""
    x = pool.float_patches(np.arange(len(pool))).reshape(len(pool), len(pool.bands), -1)
    f = np.concatenate([x.mean(axis=2), x.std(axis=2)], axis=1).astype(np.float64)
    f = (f - f.mean(axis=0)) / f.std(axis=0)
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def test_evaluate_ranks_by_each_query_averaged_with_its_nearest_archive_items(pool) -> None:
    f, labels = features(pool), pool.single_labels()
    archive, query = stratified_split(labels, query_fraction=0.2, seed=0)
    a, q = f[archive].astype(np.float64), f[query].astype(np.float64)
    order = np.argsort(((q[:, None, :] - a[None]) ** 2).sum(-1), axis=1, kind="stable")
    plain = evaluate(f, labels, archive, query)
    assert evaluate(f, labels, archive, query, query_expansion=0) == plain
    for n in (1, 3, 5):
        expanded = (q + a[order[:, :n]].sum(axis=1)) / (n + 1)
        # The same archive, the expanded queries in the queries' place, ranked as they are.
        stacked = np.concatenate([a, expanded]).astype(np.float32)
        own = np.concatenate([labels[archive], labels[query]])
        ids = np.arange(len(archive) + len(query))
        expected = evaluate(stacked, own, ids[: len(archive)], ids[len(archive) :])
        got = evaluate(f, labels, archive, query, query_expansion=n)
        assert got == pytest.approx(expected, abs=1e-6)
        assert got["map@20"] != pytest.approx(plain["map@20"], abs=1e-4)  # it does something
    np.testing.assert_allclose(
        expand_queries(a, q, 2), (q + a[order[:, :2]].sum(axis=1)) / 3, atol=1e-6
    )


def test_query_expansion_is_a_whole_number_of_zero_or_more(pool) -> None:
    f = features(pool)
    for bad in (-1, True, 2.5):
        with pytest.raises(ConfigError, match="is not a whole number of neighbours"):
            expand_queries(f, f[:2], bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="query_expansion"):
        SessionConfig(query_expansion=-1).validate()
    assert SessionConfig().query_expansion == 5


def run_session(pool_dir: Path, directory: Path, expansion: int) -> tuple[list, np.ndarray, list]:
    config = SessionConfig(
        data=str(pool_dir), rounds=1, budget=20, initial=20, query_expansion=expansion
    )
    session = Session.create(directory, config, {"pool_dir": str(pool_dir)})
    with Engine(session, PatchPool.open(pool_dir), progress=False) as engine:
        history = engine.run()
        embeddings = np.asarray(engine.embeddings)
        archive, query = engine.archive_ids, engine.query_ids
    with PairStore(directory / "annotations.sqlite") as store:
        asked = [column.tolist() for column in store.answers(include_skipped=True)]
    return history, embeddings, [archive, query, asked]


def test_expansion_changes_what_is_retrieved_not_what_is_asked_or_trained(
    pool_dir: Path, pool, tmp_path: Path
) -> None:
    history0, emb0, (archive, query, asked0) = run_session(pool_dir, tmp_path / "off", 0)
    history3, emb3, (_, _, asked3) = run_session(pool_dir, tmp_path / "on", 3)
    assert asked3 == asked0  # the same pairs, in the same order
    np.testing.assert_array_equal(emb3, emb0)  # the same model
    labels = pool.single_labels()
    expected = evaluate(emb3, labels, archive, query, query_expansion=3)["map@20"]
    assert history3[-1]["map@20"] == pytest.approx(expected, abs=1e-5)
    assert history0[-1]["map@20"] == pytest.approx(
        evaluate(emb0, labels, archive, query)["map@20"], abs=1e-5
    )
    assert history3[-1]["map@20"] != history0[-1]["map@20"]
