"""The ANNEAL loop end to end on the real EuroSAT-MS sample: sessions, resume, bad input."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine, cluster_initial_pairs, initial_pairs
from anneal_geo.errors import ConfigError, DataError, PluginError, SessionError
from anneal_geo.estimators.base import Estimator
from anneal_geo.session import Session, SessionConfig

SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"
REQUIRED = {
    "round",
    "queried_pairs",
    "implied_pairs",
    "map@20",
    "map",
    "p@10",
    "seconds",
    "estimator",
    "selector",
    "backbone",
    "seed",
}


@pytest.fixture(scope="module")
def ms_pool(tmp_path_factory) -> tuple[PatchPool, Path]:
    directory = tmp_path_factory.mktemp("pool") / "eurosat_ms"
    PatchPool.load(SAMPLE / "eurosat_ms").save(directory)
    return PatchPool.open(directory), directory


def small_config(pool_dir: Path, **overrides) -> SessionConfig:
    settings = dict(data=str(pool_dir), rounds=2, budget=20, initial=40, epochs=10, seed=3)
    settings.update(overrides)
    return SessionConfig(**settings)


def new_session(tmp_path: Path, pool_dir: Path, **overrides) -> Session:
    return Session.create(
        tmp_path / "session", small_config(pool_dir, **overrides), {"pool_dir": str(pool_dir)}
    )


def stored_pairs(session: Session) -> list[tuple[int, int, int, int]]:
    with sqlite3.connect(session.store_path) as db:
        return db.execute("SELECT round, i, j, answer FROM answers ORDER BY seq").fetchall()


def test_full_run_writes_history_and_every_answer(ms_pool, tmp_path):
    pool, pool_dir = ms_pool
    session = new_session(tmp_path, pool_dir)
    with Engine(session, pool, progress=False) as engine:
        records = engine.run()
    assert [r["round"] for r in records] == [0, 1, 2]
    history = [json.loads(line) for line in session.history_path.read_text().splitlines()]
    assert history == records
    for record in history:
        assert set(record) >= REQUIRED
        assert 0.0 <= record["map@20"] <= 1.0
    assert [r["queried_pairs"] for r in history] == [40, 60, 80]
    rows = stored_pairs(session)
    assert len(rows) == 80
    assert len({(i, j) for _, i, j, _ in rows}) == 80, "a pair was asked twice"
    assert all(i < j for _, i, j, _ in rows)
    # Pairs use archive patches only: the held-out queries are never shown to the annotator.
    archive, query = session.load_split()
    used = {i for _, i, j, _ in rows} | {j for _, i, j, _ in rows}
    assert used <= set(archive) and not used & set(query)
    # The oracle's answers agree with the class labels.
    labels = pool.single_labels()
    assert all(ans == int(labels[i] == labels[j]) for _, i, j, ans in rows)
    # Implied pairs follow from transitivity and are counted apart from queried ones.
    assert history[-1]["implied_pairs"] >= 0
    assert history[-1]["labelled_pairs"] >= history[-1]["queried_pairs"]


def test_anneal_rounds_ask_more_informative_pairs_than_random(ms_pool, tmp_path):
    """MGUE + k-means asks about pairs near the threshold: far more similar pairs than the
    ~1/10 that random pairs give on a 10-class archive."""
    pool, pool_dir = ms_pool
    anneal = new_session(tmp_path / "a", pool_dir, rounds=2, budget=30)
    rand = new_session(
        tmp_path / "r", pool_dir, rounds=2, budget=30, estimator="random", selector="random"
    )
    with Engine(anneal, pool, progress=False) as engine:
        a = engine.run()
    with Engine(rand, pool, progress=False) as engine:
        r = engine.run()
    a_similar = sum(x["round_similar"] for x in a[1:])
    r_similar = sum(x["round_similar"] for x in r[1:])
    assert a_similar > r_similar


def test_same_seed_same_pairs(ms_pool, tmp_path):
    pool, pool_dir = ms_pool
    first = new_session(tmp_path / "1", pool_dir, rounds=1)
    second = new_session(tmp_path / "2", pool_dir, rounds=1)
    for session in (first, second):
        with Engine(session, pool, progress=False) as engine:
            engine.run()
    assert stored_pairs(first) == stored_pairs(second)


class StopAfter(Annotator):
    """Answers like the oracle, then raises KeyboardInterrupt after `limit` answers."""

    limit = 5

    def annotate(self, pairs, pool):
        labels = pool.single_labels()
        for count, (i, j) in enumerate(pairs):
            if count == self.limit:
                raise KeyboardInterrupt
            yield int(labels[i] == labels[j])


def test_ctrl_c_mid_round_keeps_answers_and_resume_finishes(ms_pool, tmp_path):
    pool, pool_dir = ms_pool
    plugins.register(StopAfter, name="stop-after", group="annotators")
    try:
        session = new_session(tmp_path, pool_dir, annotator="stop-after", rounds=1)
        with Engine(session, pool, progress=False) as engine, pytest.raises(KeyboardInterrupt):
            engine.run()
        kept = stored_pairs(session)
        assert len(kept) == StopAfter.limit
        assert session.load_pending() is not None
    finally:
        plugins.unregister("stop-after", "annotators")

    resumed = Session.open(session.directory)
    resumed.config.annotator = "oracle"
    with Engine(resumed, pool, progress=False) as engine:
        records = engine.run()
    rows = stored_pairs(resumed)
    assert rows[: StopAfter.limit] == kept, "answers given before Ctrl-C were changed"
    assert len(rows) == 40 + 20
    assert len({(i, j) for _, i, j, _ in rows}) == len(rows), "a pair was asked twice"
    assert [r["round"] for r in records] == [0, 1]
    # The interrupted round finished with exactly the pairs it had chosen.
    round0 = [(i, j) for r, i, j, _ in rows if r == 0]
    assert len(round0) == 40


def test_resume_of_finished_rounds_continues_with_more_rounds(ms_pool, tmp_path):
    pool, pool_dir = ms_pool
    session = new_session(tmp_path, pool_dir, rounds=1)
    with Engine(session, pool, progress=False) as engine:
        engine.run()
    reopened = Session.open(session.directory)
    with Engine(reopened, pool, progress=False) as engine:
        more = engine.run(rounds=1)
    assert [r["round"] for r in more] == [2]
    rows = stored_pairs(reopened)
    assert len(rows) == 40 + 20 + 20 and len({(i, j) for _, i, j, _ in rows}) == len(rows)


class NanEstimator(Estimator):
    """Returns NaN uncertainty."""

    def score(self, embeddings, pairs):
        return np.full(len(pairs), np.nan)


def test_bad_plugin_is_named_and_answers_stay_intact(ms_pool, tmp_path):
    pool, pool_dir = ms_pool
    plugins.register(NanEstimator, name="nan-estimator", group="estimators")
    try:
        session = new_session(tmp_path, pool_dir, estimator="nan-estimator")
        with (
            Engine(session, pool, progress=False) as engine,
            pytest.raises(PluginError, match="nan-estimator.*NaN"),
        ):
            engine.run()
    finally:
        plugins.unregister("nan-estimator", "estimators")
    assert len(stored_pairs(session)) == 40  # the initial round's answers are all there
    assert len(session.history()) == 1


def test_unknown_plugin_lists_known_ones(ms_pool, tmp_path):
    pool, pool_dir = ms_pool
    session = new_session(tmp_path, pool_dir, selector="kmeanz")
    with pytest.raises(PluginError, match=r"unknown selector 'kmeanz'.*kmeans.*random.*topk"):
        Engine(session, pool, progress=False)


def test_budget_larger_than_candidates(ms_pool, tmp_path):
    pool, pool_dir = ms_pool
    session = new_session(tmp_path, pool_dir, budget=1_000_000, rounds=1)
    # Refused when the engine opens the session, before the initial set is asked.
    with pytest.raises(ConfigError, match="budget of 1000000 pairs per round is larger than"):
        Engine(session, pool, progress=False)
    assert not session.store_path.exists() and not session.pending_path.exists()


def test_oracle_refuses_one_class_pool(tmp_path):
    one_class = tmp_path / "one"
    shutil.copytree(SAMPLE / "eurosat_ms" / "Forest", one_class / "Forest")
    pool = PatchPool.load(one_class)
    pool_dir = tmp_path / "pool"
    pool.save(pool_dir)
    session = new_session(tmp_path, pool_dir)
    with pytest.raises(DataError, match="only 1 class"):
        Engine(session, PatchPool.open(pool_dir), progress=False)


def test_session_from_incompatible_version(ms_pool, tmp_path):
    _, pool_dir = ms_pool
    session = new_session(tmp_path, pool_dir)
    text = session.toml_path.read_text().replace("session_format = 1", "session_format = 99")
    session.toml_path.write_text(text)
    with pytest.raises(SessionError, match="session_format 99"):
        Session.open(session.directory)


def test_session_refuses_to_overwrite(ms_pool, tmp_path):
    _, pool_dir = ms_pool
    new_session(tmp_path, pool_dir)
    with pytest.raises(SessionError, match="already holds a session"):
        new_session(tmp_path, pool_dir)


def test_initial_pairs_mix_neighbours_and_random(ms_pool):
    pool, _ = ms_pool
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(pool), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(len(pool), dtype=np.int64)
    pairs, is_nn = initial_pairs(emb, ids, 60, 0.5, rng)
    assert pairs.shape == (60, 2) and is_nn.sum() == 30
    assert (pairs[:, 0] < pairs[:, 1]).all()
    keys = pairs[:, 0] * len(pool) + pairs[:, 1]
    assert np.unique(keys).size == 60
    with pytest.raises(ConfigError, match="initial"):
        initial_pairs(emb, ids[:5], 11, 0.5, rng)


def _blobs(rng: np.random.Generator, groups: int, each: int) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(groups, 16)) * 10.0
    blob = np.repeat(np.arange(groups), each)
    emb = (centres[blob] + rng.normal(size=(groups * each, 16))).astype(np.float32)
    return emb, blob


def test_cluster_initial_pairs_spread_over_the_archive():
    rng = np.random.default_rng(0)
    emb, blob = _blobs(rng, 3, 60)
    ids = np.arange(len(emb), dtype=np.int64)
    pairs, within = cluster_initial_pairs(emb, ids, 24, np.random.default_rng(1))
    assert pairs.shape == (24, 2) and within.sum() == 12  # 12 groups, one member pair each
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert np.unique(pairs[:, 0] * len(emb) + pairs[:, 1]).size == 24
    # Three well-separated blobs cut into 12 groups: each member pair lies inside one blob,
    # every blob has some, and no patch is the medoid of two groups.
    inside = pairs[within]
    assert (blob[inside[:, 0]] == blob[inside[:, 1]]).all()
    assert set(blob[inside[:, 0]].tolist()) == {0, 1, 2}
    medoids = set(inside.ravel().tolist()) & set(pairs[~within].ravel().tolist())
    assert len(medoids) >= 10  # the boundary pairs start at the same medoids


def test_cluster_initial_pairs_do_not_depend_on_the_chunking(monkeypatch):
    import anneal_geo.engine as engine_module

    rng = np.random.default_rng(2)
    emb, _ = _blobs(rng, 8, 50)
    ids = np.arange(0, len(emb), 2, dtype=np.int64)  # an archive of every other patch
    whole = cluster_initial_pairs(emb, ids, 16, np.random.default_rng(3))
    monkeypatch.setattr(engine_module, "_INITIAL_CHUNK", 7)
    chunked = cluster_initial_pairs(emb, ids, 16, np.random.default_rng(3))
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])
    assert np.isin(whole[0], ids).all()  # only archive patches are paired


def test_cluster_initial_pairs_skip_asked_pairs_and_refuse_too_many(ms_pool):
    pool, _ = ms_pool
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(pool), 16)).astype(np.float32)
    ids = np.arange(len(pool), dtype=np.int64)
    first, _ = cluster_initial_pairs(emb, ids, 40, np.random.default_rng(5))
    again, _ = cluster_initial_pairs(emb, ids, 40, np.random.default_rng(5), exclude=first)
    keys = lambda p: set((p[:, 0] * len(pool) + p[:, 1]).tolist())  # noqa: E731
    assert len(again) == 40 and not keys(first) & keys(again)
    with pytest.raises(ConfigError, match="initial"):
        cluster_initial_pairs(emb, ids[:5], 11, rng)


def test_knn_k_follows_pool_size_unless_set():
    from anneal_geo.engine import select_pairs
    from anneal_geo.estimators.mgue import MGUEEstimator
    from anneal_geo.selectors.topk import TopKSelector

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2000, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64)
    none = np.zeros((0, 2), dtype=np.int64)
    args = (emb, ids, none, MGUEEstimator(), TopKSelector(), 10)
    _, auto = select_pairs(*args, np.random.default_rng(1))
    _, fixed = select_pairs(*args, np.random.default_rng(1), knn_k=5)
    assert auto["candidates"] == "knn" and auto["knn_k"] == 50
    assert fixed["knn_k"] == 5 and fixed["n_candidates"] < auto["n_candidates"]
    with pytest.raises(ConfigError, match="knn_k"):
        SessionConfig(knn_k=-1).validate()


def test_the_learning_rate_setting_trains_the_head(ms_pool, tmp_path):
    """``lr`` is the head's Adam step size: it reaches the optimiser, and a larger one moves
    the head further from the same start in the same steps."""
    pool, pool_dir = ms_pool
    moved = {}
    for lr in (1e-4, 1e-3):
        session = Session.create(
            tmp_path / f"lr{lr}",
            small_config(pool_dir, rounds=0, lr=lr),
            {"pool_dir": str(pool_dir)},
        )
        with Engine(session, pool, progress=False) as engine:
            start = [p.detach().clone() for p in engine.trainer.model.head.parameters()]
            engine.run()
            groups = engine.trainer.optimizer.param_groups
            assert [g["lr"] for g in groups if g["name"] == "head"] == [lr]
            after = list(engine.trainer.model.head.parameters())
            moved[lr] = sum(float((a - b).norm()) for a, b in zip(after, start, strict=True))
    assert moved[1e-3] > 2 * moved[1e-4] > 0


@pytest.mark.parametrize("ema", [-0.5, 1.0])
def test_a_weight_average_out_of_range_is_refused_by_name(ema):
    with pytest.raises(ConfigError, match=r"setting 'ema' must be in \[0, 1\)"):
        SessionConfig(ema=ema).validate()


def test_a_session_with_a_weight_average_resumes_as_if_never_stopped(ms_pool, tmp_path):
    """The trained weights an averaging session continues from are in its checkpoint: a
    session stopped after a round and resumed embeds and asks exactly as one that ran on."""
    pool, pool_dir = ms_pool
    straight = Session.create(
        tmp_path / "straight",
        small_config(pool_dir, rounds=2, ema=0.9),
        {"pool_dir": str(pool_dir)},
    )
    with Engine(straight, pool, progress=False) as engine:
        engine.run()
        whole = engine.embeddings.copy()
    stopped = Session.create(
        tmp_path / "stopped", small_config(pool_dir, rounds=2, ema=0.9), {"pool_dir": str(pool_dir)}
    )
    with Engine(stopped, pool, progress=False) as engine:
        engine.run(rounds=2)  # the initial round and round 1
    with Engine(Session.open(stopped.directory), pool, progress=False) as engine:
        assert [r["round"] for r in engine.run()] == [2]
        resumed = engine.embeddings.copy()
    assert stored_pairs(stopped) == stored_pairs(straight)
    np.testing.assert_array_equal(resumed, whole)


@pytest.mark.parametrize("lr", [0.0, -1e-3, 2.0])
def test_a_learning_rate_out_of_range_is_refused_by_name(lr):
    with pytest.raises(ConfigError, match="setting 'lr' must be above 0 and at most 1"):
        SessionConfig(lr=lr).validate()
