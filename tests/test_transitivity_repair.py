"""Answers from a person who errs: contradiction repair of the closure, weak links between
groups, small-loss trimming, and the engine leaving suspects out of training (never out of
the store)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.pairs.transitivity import (
    Closure,
    closure,
    suspect_answers,
    weak_links,
)
from anneal_geo.session import SETTINGS_ADDED_LATER, Session, SessionConfig

SAMPLE = Path(__file__).resolve().parents[1] / "sample_tiles"


def as_dict(c: Closure) -> dict[tuple[int, int], tuple[int, bool]]:
    """(i, j) -> (label, implied)."""
    return {
        (int(a), int(b)): (int(y), bool(m))
        for (a, b), y, m in zip(c.pairs, c.labels, c.implied, strict=True)
    }


def run(pairs: list[tuple[int, int]], labels: list[int], **kw: object) -> Closure:
    return closure(np.array(pairs, dtype=np.int64).reshape(-1, 2), np.array(labels), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ms_labels() -> np.ndarray:
    return PatchPool.load(SAMPLE / "eurosat_ms").single_labels()


def test_consistent_answers_give_the_same_closure_as_without_repair(ms_labels) -> None:
    """Oracle answers on the real EuroSAT-MS classes never contradict: nothing is suspected
    and the closure is identical, array for array."""
    rng = np.random.default_rng(0)
    n = len(ms_labels)
    for size in (30, 150, 600):
        pairs = rng.integers(0, n, size=(size, 2))
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        labels = (ms_labels[pairs[:, 0]] == ms_labels[pairs[:, 1]]).astype(np.int8)
        plain = closure(pairs, labels, n=n)
        repaired = closure(pairs, labels, n=n, repair="cut", features=rng.normal(size=(n, 4)))
        assert repaired.suspects == [] and repaired.contradictions == []
        for name in ("pairs", "labels", "implied"):
            assert np.array_equal(getattr(plain, name), getattr(repaired, name)), name
        assert plain.n_implied > 0


def two_groups_with_a_wrong_link() -> tuple[list[tuple[int, int]], list[int]]:
    """Group A = {0, 1, 2}, group B = {3, 4, 5} (chains of similar answers), dissimilar
    answers across (0, 3) and (1, 4), and a wrong "similar" (2, 5) joining the groups."""
    pairs = [(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)]
    labels = [1, 1, 1, 1, 0, 0, 1]
    return pairs, labels


def test_a_wrong_similar_answer_between_two_groups_is_cut() -> None:
    pairs, labels = two_groups_with_a_wrong_link()
    before = run(pairs, labels)  # today's closure: the merged component implies nothing
    assert sorted(before.contradictions) == [(0, 3), (1, 4)]
    assert before.n_implied == 0

    c = run(pairs, labels, repair="cut")
    assert c.suspects == [(2, 5)]
    assert c.contradictions == before.contradictions  # still reported as found
    got = as_dict(c)
    assert (2, 5) not in got, "a suspect answer must not be trained on"
    a, b = (0, 1, 2), (3, 4, 5)
    for i in a:
        for j in b:
            if (i, j) not in ((0, 3), (1, 4), (2, 5)):
                assert got[(i, j)] == (0, True), (i, j)  # implied dissimilar across
    assert got[(0, 2)] == (1, True) and got[(3, 5)] == (1, True)  # each group stays whole
    assert got[(0, 3)] == (0, False) and got[(1, 4)] == (0, False)
    assert len(got) == 6 + 9 - 1  # 3 + 3 similar pairs, 3 x 3 dissimilar but the suspect


def test_the_link_that_explains_most_contradictions_is_cut_then_the_farthest() -> None:
    # A chain 0 - 1 - 2 - 3; dissimilar (0, 3) and (1, 3): only cutting (2, 3) explains both.
    pairs = [(0, 1), (1, 2), (2, 3), (0, 3), (1, 3)]
    assert run(pairs, [1, 1, 1, 0, 0], repair="cut").suspects == [(2, 3)]
    # One contradiction (0, 2) on the chain 0 - 1 - 2: the link whose patches lie farther
    # apart in the features is cut, whichever it is.
    features = np.array([[0.0], [0.1], [5.0]])
    c = run([(0, 1), (1, 2), (0, 2)], [1, 1, 0], repair="cut", features=features)
    assert c.suspects == [(1, 2)]
    features = np.array([[0.0], [4.0], [4.1]])
    c = run([(0, 1), (1, 2), (0, 2)], [1, 1, 0], repair="cut", features=features)
    assert c.suspects == [(0, 1)]
    assert as_dict(c) == {(0, 2): (0, False), (1, 2): (1, False)}


def test_a_dissimilar_answer_against_two_independent_chains_is_suspected() -> None:
    # A cycle 0 ~ 1 ~ 2 ~ 3 ~ 0: no single similar answer separates 0 from 2, so the
    # dissimilar answer (0, 2), against two chains of similar answers, is suspected.
    c = run([(0, 1), (1, 2), (2, 3), (0, 3), (0, 2)], [1, 1, 1, 1, 0], repair="cut")
    assert c.suspects == [(0, 2)]
    assert as_dict(c)[(1, 3)] == (1, True)


def test_suspect_answers_leaves_a_consistent_rest(ms_labels) -> None:
    """10 % of oracle answers flipped on the real classes: after the repair no component
    holds a dissimilar answer, and every suspect is an answer that was given."""
    rng = np.random.default_rng(1)
    n = len(ms_labels)
    pairs = np.sort(rng.choice(n, size=(800, 2), replace=True), axis=1)
    pairs = np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)
    labels = (ms_labels[pairs[:, 0]] == ms_labels[pairs[:, 1]]).astype(np.int8)
    flip = rng.random(len(labels)) < 0.1
    labels[flip] = 1 - labels[flip]
    suspect = suspect_answers(pairs, labels)
    assert suspect.any()
    c = closure(pairs[~suspect], labels[~suspect], n=n)
    assert c.contradictions == []
    full = closure(pairs, labels, n=n, repair="cut")
    assert sorted(full.suspects) == sorted(map(tuple, pairs[suspect].tolist()))
    # The repaired closure implies far more than dropping the contradicted components, and
    # most of what it drops are wrong answers.
    assert full.n_implied > closure(pairs, labels, n=n).n_implied
    assert flip[suspect].mean() > flip.mean()


def test_excluded_answers_are_suspects_and_imply_nothing() -> None:
    pairs = np.array([[0, 1], [1, 2], [2, 3], [0, 4]])
    labels = np.array([1, 1, 1, 0])
    c = closure(pairs, labels, exclude=np.array([[2, 1]]))  # either order
    assert c.suspects == [(1, 2)]
    got = as_dict(c)
    assert (1, 2) not in got and (0, 2) not in got and (0, 3) not in got
    assert got[(1, 4)] == (0, True) and got[(2, 3)] == (1, False)


def test_bad_repair_is_refused() -> None:
    with pytest.raises(ValueError, match="repair"):
        run([(0, 1)], [1], repair="maybe")


# -- the engine: suspects in the history, stored answers untouched --------------------------


@pytest.fixture(scope="module")
def ms_pool(tmp_path_factory) -> tuple[PatchPool, Path]:
    directory = tmp_path_factory.mktemp("pool") / "eurosat_ms"
    PatchPool.load(SAMPLE / "eurosat_ms").save(directory)
    return PatchPool.open(directory), directory


def test_engine_leaves_suspects_out_but_keeps_every_answer(ms_pool, tmp_path) -> None:
    pool, pool_dir = ms_pool
    config = SessionConfig(
        data=str(pool_dir),
        rounds=3,
        budget=40,
        initial=60,
        epochs=5,
        seed=2,
        annotator_options={"noise": 0.3},
        repair="split",
        trim_loss=0.1,
    )
    session = Session.create(tmp_path / "session", config, {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False) as engine:
        records = engine.run()
        labelled = engine.labelled()
        pairs, labels, _ = engine.store.answers()
    assert [r["queried_pairs"] for r in records] == [60, 100, 140, 180]
    assert records[-1]["suspect_answers"] == len(labelled.suspects) > 0
    history = [json.loads(line) for line in session.history_path.read_text().splitlines()]
    assert [h["suspect_answers"] for h in history] == [r["suspect_answers"] for r in records]
    # Every answer stays in the store exactly as given; suspects are only left out of L.
    with sqlite3.connect(session.store_path) as db:
        stored = db.execute("SELECT i, j, answer FROM answers ORDER BY seq").fetchall()
    assert len(stored) == 180
    given = {(i, j): a for i, j, a in stored}
    assert {(int(i), int(j)): int(a) for (i, j), a in zip(pairs, labels, strict=True)} == given
    in_l = as_dict(labelled)
    assert all(s in given and s not in in_l for s in labelled.suspects)


def test_old_sessions_keep_today_s_closure() -> None:
    assert SETTINGS_ADDED_LATER["repair"] == "none"
    assert SETTINGS_ADDED_LATER["trim_loss"] == 0.0
    assert SessionConfig().repair == "none" and SessionConfig().trim_loss == 0.0


def test_weak_links_cuts_a_similar_answer_joining_two_distant_groups() -> None:
    # Two tight groups far apart (unit vectors at right angles), joined by one "similar"
    # (2, 5); a third group near the first joined properly. Dissimilar answers elsewhere.
    f = np.array(
        [[1, 0.0], [1, 0.05], [1, -0.05], [0, 1.0], [0.05, 1], [-0.05, 1], [1, 0.1], [1, 0.12]]
    )
    pairs = [(0, 1), (1, 2), (3, 4), (4, 5), (2, 5), (2, 6), (6, 7), (0, 3), (1, 4), (6, 3)]
    labels = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    prs = np.sort(np.array(pairs), axis=1)
    suspect = weak_links(prs, np.array(labels), f)
    assert [tuple(p) for p in prs[suspect].tolist()] == [(2, 5)]
    c = closure(np.array(pairs), np.array(labels), repair="split", features=f)
    assert c.suspects == [(2, 5)] and c.contradictions == [(0, 3), (1, 4), (3, 6)]
    # Without the far group the tight group keeps every link.
    keep = [k for k, (i, j) in enumerate(pairs) if max(i, j) < 3 or min(i, j) >= 6]
    sub = weak_links(prs[keep], np.array(labels)[keep], f)
    assert not sub.any()


def test_trimmed_contrastive_loss_leaves_out_the_worst_pairs() -> None:
    import torch

    from anneal_geo.training.losses import _contrastive_loss, _trimmed_contrastive_loss

    a = torch.tensor([[1.0, 0.0]] * 4)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])  # (1) a far "similar", (2) a near "dissimilar"
    full = _contrastive_loss(a, b, y, 1.4)
    trimmed = _trimmed_contrastive_loss(a, b, y, 1.4, 0.5)
    assert float(full) > 0.5 and float(trimmed) == pytest.approx(0.0, abs=1e-6)
    assert float(_trimmed_contrastive_loss(a, b, y, 1.4, 0.0)) == pytest.approx(float(full))


# -- repair = confirm: two groups join only on two agreeing answers ------------------------


def test_confirm_joins_two_groups_only_on_a_second_answer() -> None:
    first = [(0, 1), (2, 3), (1, 2)]
    c = run(first, [1, 1, 1], n=6, repair="confirm")
    got = as_dict(c)
    # (1, 2) stays an answer but joins nothing: no cross pair of {0, 1} x {2, 3} is implied.
    assert got == {(0, 1): (1, False), (2, 3): (1, False), (1, 2): (1, False)}
    assert c.suspects == []
    # Its check: one unasked pair across the two groups.
    assert len(c.checks) == 1
    i, j = c.checks[0].tolist()
    assert i in (0, 1) and j in (2, 3) and (i, j) not in got
    agreed = run([*first, (i, j)], [1, 1, 1, 1], n=6, repair="confirm")
    assert agreed.checks.shape == (0, 2)
    assert as_dict(agreed) == {
        (a, b): (1, (a, b) not in [*first, (i, j)]) for a in range(4) for b in range(a + 1, 4)
    }


def test_confirm_leaves_outvoted_and_tied_answers_out() -> None:
    tied = run([(0, 1), (2, 3), (1, 2), (0, 3)], [1, 1, 1, 0], n=6, repair="confirm")
    assert sorted(tied.suspects) == [(0, 3), (1, 2)]
    assert as_dict(tied) == {(0, 1): (1, False), (2, 3): (1, False)}
    assert tied.checks.tolist() == [[1, 3]]  # the one cross pair not asked yet: a third vote
    parted = run([(0, 1), (2, 3), (1, 2), (0, 3), (1, 3)], [1, 1, 1, 0, 0], n=6, repair="confirm")
    assert parted.suspects == [(1, 2)] and parted.checks.shape == (0, 2)
    got = as_dict(parted)
    assert got[(0, 2)] == (0, True) and got[(0, 3)] == (0, False) and got[(1, 3)] == (0, False)
    # One "dissimilar" alone between two groups parts them, as without confirm.
    lone = run([(0, 1), (2, 3), (1, 2)], [1, 1, 0], repair="confirm")
    assert lone.n_implied == 3 and bool(np.all(lone.labels[lone.implied] == 0))
    # The same answers without confirm: one contradicted group, cut apart the other way.
    assert run([(0, 1), (2, 3), (1, 2), (0, 3)], [1, 1, 1, 0], repair="none").n_implied == 0


def test_confirm_joins_single_patches_at_once_and_votes_add_up_when_groups_join() -> None:
    # Single patches meet at once: {0, 1}, {2, 3}, {4, 5}. (1, 2) waits; (3, 4) and (2, 5)
    # join {2, 3} and {4, 5}; the waiting (1, 2) now lies between {0, 1} and {2, 3, 4, 5},
    # where (0, 5) agrees with it: one group of six.
    pairs = [(0, 1), (2, 3), (4, 5), (1, 2), (3, 4), (2, 5), (0, 5)]
    c = run(pairs, [1] * 7, n=8, repair="confirm")
    assert c.suspects == [] and c.checks.shape == (0, 2)
    assert len(c) == 15 and bool(np.all(c.labels == 1))
    waiting = run(pairs[:6], [1] * 6, n=8, repair="confirm")
    assert len(waiting) == 1 + 6 + 1  # {0, 1}, the four, and the waiting answer
    assert waiting.checks.shape == (1, 2)
    i, j = waiting.checks[0].tolist()
    assert i == 0 and j in (3, 4, 5)  # the other patch of {0, 1}, one of the four but 2


def test_confirm_with_consistent_answers_implies_only_what_the_plain_closure_does(
    ms_labels,
) -> None:
    rng = np.random.default_rng(3)
    n = len(ms_labels)
    pairs = rng.integers(0, n, size=(600, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    labels = (ms_labels[pairs[:, 0]] == ms_labels[pairs[:, 1]]).astype(np.int8)
    plain = as_dict(closure(pairs, labels, n=n))
    confirmed = closure(pairs, labels, n=n, repair="confirm")
    assert confirmed.suspects == [] and 0 < confirmed.n_implied < len(plain) - 600
    assert all(plain[k] == v for k, v in as_dict(confirmed).items())
    # Every check crosses two groups with the same class (consistent answers), unasked.
    asked = {tuple(p) for p in np.sort(pairs, axis=1).tolist()}
    assert len(confirmed.checks) > 0
    for i, j in confirmed.checks.tolist():
        assert i < j and (i, j) not in asked and ms_labels[i] == ms_labels[j]


def _noisy_session(labels: np.ndarray, repair: str, rounds: int, seed: int) -> Closure:
    """Rounds of 40 unlabelled pairs, about 40 % of them similar (plus the closure's checks,
    first), answered by an expert who flips 10 % of the answers; the closure of it all."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    pairs = np.empty((0, 2), dtype=np.int64)
    answers = np.empty(0, dtype=np.int8)
    c = closure(pairs, answers, n=n, repair=repair)
    for _ in range(rounds):
        known = {tuple(p) for p in c.pairs.tolist()} | {tuple(p) for p in pairs.tolist()}
        new = [tuple(p) for p in c.checks[:20].tolist()]
        while len(new) < 40 + len(c.checks[:20]):
            # About 40 % of the pairs similar, as the selection asks them.
            i = int(rng.integers(n))
            same = labels == labels[i] if rng.random() < 0.4 else labels != labels[i]
            i, j = sorted((i, int(rng.choice(np.flatnonzero(same)))))
            if i != j and (i, j) not in known and (i, j) not in new:
                new.append((i, j))
        ask = np.array(new, dtype=np.int64)
        truth = (labels[ask[:, 0]] == labels[ask[:, 1]]).astype(np.int8)
        flip = rng.random(len(truth)) < 0.1
        pairs = np.concatenate([pairs, ask])
        answers = np.concatenate([answers, np.where(flip, 1 - truth, truth).astype(np.int8)])
        c = closure(pairs, answers, n=n, repair=repair)
    return c


def test_confirm_implies_fewer_wrong_similar_pairs_from_a_person_who_errs(ms_labels) -> None:
    """The same expert, who flips 10 % of the answers, over 20 rounds on the real classes:
    with confirm, far fewer of the similar pairs the closure implies are wrong than with
    cut, where one wrong "similar" joins two whole groups."""
    shares = {}
    for repair in ("cut", "confirm"):
        c = _noisy_session(ms_labels, repair, 20, seed=4)
        similar = c.implied & (c.labels == 1)
        assert similar.sum() > 50
        truth = ms_labels[c.pairs[similar, 0]] == ms_labels[c.pairs[similar, 1]]
        shares[repair] = 1.0 - truth.mean()
    assert shares["confirm"] < 0.75 * shares["cut"], shares


def test_engine_asks_the_checks_of_waiting_joins_first(ms_pool, tmp_path) -> None:
    pool, pool_dir = ms_pool
    config = SessionConfig(
        data=str(pool_dir), rounds=1, budget=30, initial=60, epochs=3, seed=5, repair="confirm"
    )
    session = Session.create(tmp_path / "session", config, {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False) as engine:
        engine.step()
        before = engine.labelled()
        checks = before.checks
        assert len(checks) > 0  # the first round leaves joins of small groups waiting
        asked = engine.round_pairs()
        k = min(len(checks), 15)  # at most half of a round
        assert np.array_equal(asked[:k], checks[:k])
        assert len(asked) == 30 and len({tuple(p) for p in asked.tolist()}) == 30
        assert engine.step().record["check_pairs"] == k
        after = engine.labelled()
    # The oracle is consistent: every check agrees, so the joins it waited for now imply.
    labels = pool.single_labels()
    for i, j in checks[:k].tolist():
        assert labels[i] == labels[j]
    implied = {tuple(p) for p in after.pairs[after.implied].tolist()}
    assert after.suspects == [] and len(implied) > before.n_implied
