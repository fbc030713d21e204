"""Transitivity closure: hand-made cases, real EuroSAT classes, a brute-force reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anneal_geo.pairs.transitivity import Closure, closure

EUROSAT_MS = Path(__file__).resolve().parents[1] / "sample_tiles" / "eurosat_ms"


def as_dict(c: Closure, implied: bool | None = None) -> dict[tuple[int, int], int]:
    """(i, j) -> label, optionally only the implied (True) or queried (False) pairs."""
    keep = np.ones(c.labels.size, bool) if implied is None else c.implied == implied
    return {
        (int(a), int(b)): int(y) for (a, b), y in zip(c.pairs[keep], c.labels[keep], strict=True)
    }


def run(pairs: list[tuple[int, int]], labels: list[int], **kw: object) -> Closure:
    return closure(np.array(pairs, dtype=np.int64).reshape(-1, 2), np.array(labels), **kw)  # type: ignore[arg-type]


def test_chain_implies_similar() -> None:
    c = run([(0, 1), (1, 2)], [1, 1])  # a~b, b~c
    assert as_dict(c, implied=True) == {(0, 2): 1}
    assert as_dict(c, implied=False) == {(0, 1): 1, (1, 2): 1}
    assert c.n_implied == 1 and c.n_queried == 2 and len(c) == 3
    assert c.contradictions == [] and not c.truncated
    assert c.pairs.dtype == np.int64 and c.labels.dtype == np.int8 and c.implied.dtype == bool


def test_dissimilar_between_components_implies_cross_pairs() -> None:
    a, b, c_, d = 10, 11, 12, 13
    c = run([(a, b), (c_, d), (b, c_)], [1, 1, 0])  # a~b, c~d, b!~c
    assert as_dict(c, implied=True) == {(a, c_): 0, (a, d): 0, (b, d): 0}
    assert c.pairs.tolist() == sorted(c.pairs.tolist())


def test_implies_similar_keeps_components_and_none_keeps_the_answers() -> None:
    pairs, labels = [(10, 11), (12, 13), (11, 12), (13, 14)], [1, 1, 0, 1]
    full = run(pairs, labels)
    assert as_dict(full, implied=True) == {
        (10, 12): 0, (10, 13): 0, (10, 14): 0, (11, 13): 0, (11, 14): 0, (12, 14): 1,
    }  # fmt: skip
    similar = run(pairs, labels, implies="similar")
    assert as_dict(similar, implied=True) == {(12, 14): 1}
    none = run(pairs, labels, implies="none")
    assert none.n_implied == 0 and as_dict(none) == as_dict(full, implied=False)
    with pytest.raises(ValueError, match="implies = 'some'"):
        run(pairs, labels, implies="some")


def test_the_transitivity_setting_reaches_the_engine(tmp_path: Path) -> None:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine
    from anneal_geo.errors import ConfigError
    from anneal_geo.session import Session, SessionConfig

    pool = PatchPool.load(EUROSAT_MS)
    implied = {}
    for mode in ("full", "none"):
        config = SessionConfig(
            data=str(EUROSAT_MS), rounds=0, initial=30, epochs=1, transitivity=mode
        )
        session = Session.create(tmp_path / mode, config)
        with Engine(session, pool, progress=False) as engine:
            engine.run()
            implied[mode] = engine.labelled().n_implied
    assert implied["full"] > 0 and implied["none"] == 0
    with pytest.raises(ConfigError, match="setting 'transitivity' is 'some'"):
        SessionConfig(transitivity="some").validate()


def test_two_dissimilar_imply_nothing() -> None:
    c = run([(0, 1), (1, 2)], [0, 0])
    assert c.n_implied == 0
    assert as_dict(c) == {(0, 1): 0, (1, 2): 0}


def test_dissimilar_to_singleton_spreads_over_component() -> None:
    c = run([(0, 1), (1, 2), (2, 5)], [1, 1, 0])
    assert as_dict(c, implied=True) == {(0, 2): 1, (0, 5): 0, (1, 5): 0}


def test_contradiction_is_reported_and_component_implies_nothing() -> None:
    # 0~1~2 but 0!~2: contradiction. 2!~9 and 3~4 with 4!~9 elsewhere.
    pairs = [(0, 1), (1, 2), (2, 0), (2, 9), (3, 4), (4, 9)]
    c = run(pairs, [1, 1, 0, 0, 1, 0])
    assert c.contradictions == [(0, 2)]
    # Queried pairs stay as answered, the contradicted one as dissimilar.
    assert as_dict(c, implied=False) == {
        (0, 1): 1,
        (1, 2): 1,
        (0, 2): 0,
        (2, 9): 0,
        (3, 4): 1,
        (4, 9): 0,
    }
    # The sound component {3, 4} still implies its cross pair with 9; {0, 1, 2} implies
    # neither inner pairs nor cross pairs.
    assert as_dict(c, implied=True) == {(3, 9): 0}


def test_duplicates_last_answer_wins_and_skips_are_ignored() -> None:
    c = run([(0, 1), (1, 0), (1, 2), (2, 3)], [0, 1, 1, -1])
    assert as_dict(c, implied=False) == {(0, 1): 1, (1, 2): 1}
    assert as_dict(c, implied=True) == {(0, 2): 1}


def test_empty_and_read_only() -> None:
    c = run([], [])
    assert c.pairs.shape == (0, 2) and c.labels.shape == (0,) and c.n_implied == 0
    c = run([(0, 1), (1, 2)], [1, 1])
    with pytest.raises(ValueError):
        c.pairs[0, 0] = 5


@pytest.mark.parametrize(
    ("pairs", "labels", "n", "match"),
    [
        ([(1, 1)], [1], None, "itself"),
        ([(-1, 2)], [1], None, "negative"),
        ([(0, 7)], [1], 5, "pool size"),
        ([(0, 1)], [2], None, "labels"),
        ([(0, 1), (1, 2)], [1], None, "labels"),
    ],
)
def test_bad_input(pairs: list, labels: list, n: int | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        closure(np.array(pairs), np.array(labels), n)


def same_matrix(pairs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """(n, n) bool: connected through similar answers (Warshall's transitive closure)."""
    same = np.eye(n, dtype=bool)
    for (i, j), y in zip(pairs, labels, strict=True):
        if y == 1:
            same[i, j] = same[j, i] = True
    for k in range(n):
        same |= same[:, k : k + 1] & same[k : k + 1, :]
    return same


def reference(pairs: np.ndarray, labels: np.ndarray, n: int) -> dict[tuple[int, int], int]:
    """Brute force on dense n x n matrices, written from METHOD.md 3.7 independently."""
    same = same_matrix(pairs, labels, n)
    dis = np.zeros((n, n), dtype=bool)
    bad = np.zeros(n, dtype=bool)
    for (i, j), y in zip(pairs, labels, strict=True):
        if y == 0:
            dis[i, j] = dis[j, i] = True
            if same[i, j]:
                bad |= same[i]
    cross = (same.astype(int) @ dis.astype(int) @ same.astype(int)) > 0
    out = {}
    for a in range(n):
        for b in range(a + 1, n):
            if bad[a] or bad[b]:
                continue
            if same[a, b]:
                out[(a, b)] = 1
            elif cross[a, b]:
                out[(a, b)] = 0
    for (i, j), y in zip(pairs, labels, strict=True):  # queried answers are kept as given
        out[(min(i, j), max(i, j))] = int(y)
    return out


def eurosat_classes() -> np.ndarray:
    files = sorted(EUROSAT_MS.glob("*/*.tif"))
    assert len(files) > 200
    names = sorted({f.parent.name for f in files})
    assert len(names) == 10
    return np.array([names.index(f.parent.name) for f in files])


def random_answers(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """m distinct random pairs among n patches (random row order)."""
    keys = rng.choice(n * (n - 1) // 2, size=m, replace=False)
    i, j = np.triu_indices(n, 1)
    pairs = np.stack((i[keys], j[keys]), axis=1)
    flip = rng.random(m) < 0.5
    pairs[flip] = pairs[flip, ::-1]
    return pairs, keys


@pytest.mark.parametrize("seed", range(5))
def test_closure_on_eurosat_classes_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes_all = eurosat_classes()
    # 40 real patches, 100 random questions, answered by their real classes.
    patches = rng.choice(classes_all.size, size=40, replace=False)
    classes = classes_all[patches]
    pairs, _ = random_answers(rng, 40, 100)
    labels = (classes[pairs[:, 0]] == classes[pairs[:, 1]]).astype(np.int8)
    c = closure(pairs, labels, n=40)
    assert c.contradictions == []  # true class labels cannot contradict each other
    got = as_dict(c)
    want = reference(pairs, labels, 40)
    assert got == want
    assert c.n_implied == len(want) - 100 > 0
    for (a, b), y in as_dict(c, implied=True).items():
        assert y == int(classes[a] == classes[b])


@pytest.mark.parametrize("seed", range(5))
def test_closure_with_noisy_answers_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    classes = rng.integers(0, 6, size=40)
    pairs, _ = random_answers(rng, 40, 70)
    labels = (classes[pairs[:, 0]] == classes[pairs[:, 1]]).astype(np.int8)
    flip = rng.random(labels.size) < 0.1  # a 10 % noisy annotator
    labels[flip] = 1 - labels[flip]
    c = closure(pairs, labels, n=40)
    assert as_dict(c) == reference(pairs, labels, 40)
    assert c.n_implied > 0
    same = same_matrix(pairs, labels, 40)
    want_contra = sorted(
        (int(min(i, j)), int(max(i, j)))
        for (i, j), y in zip(pairs, labels, strict=True)
        if y == 0 and same[i, j]
    )
    assert sorted(c.contradictions) == want_contra


def test_max_implied_keeps_a_seeded_subset() -> None:
    # Component {0..59} (1770 pairs, 59 queried) and a dissimilar link to {60..99}.
    chain = [(k, k + 1) for k in range(59)] + [(k, k + 1) for k in range(60, 99)]
    pairs = [*chain, (0, 60)]
    labels = [1] * len(chain) + [0]
    full = run(pairs, labels)
    assert not full.truncated
    assert full.n_implied == 1770 - 59 + 780 - 39 + 60 * 40 - 1
    full_implied = as_dict(full, implied=True)

    a = run(pairs, labels, max_implied=500, seed=1)
    b = run(pairs, labels, max_implied=500, seed=1)
    other = run(pairs, labels, max_implied=500, seed=2)
    assert a.truncated and a.n_implied == 500 and a.n_queried == len(pairs)
    assert a.pairs.tolist() == b.pairs.tolist()
    assert a.pairs.tolist() != other.pairs.tolist()
    sub = as_dict(a, implied=True)
    assert all(full_implied[p] == y for p, y in sub.items())  # right labels, right pairs
    assert {1, 0} == set(sub.values())
    assert len({tuple(p) for p in a.pairs.tolist()}) == len(a)
    assert run(pairs, labels, max_implied=full.n_implied).truncated is False


def test_large_component_is_not_enumerated() -> None:
    # One chain over 200k patches implies ~2e10 pairs: only the capped sample is built.
    n = 200_000
    pairs = np.stack((np.arange(n - 1), np.arange(1, n)), axis=1)
    c = closure(pairs, np.ones(n - 1, dtype=np.int8), max_implied=10_000)
    assert c.truncated and c.n_implied == 10_000
    imp = c.pairs[c.implied]
    assert (imp[:, 0] < imp[:, 1]).all() and (imp[:, 1] - imp[:, 0] >= 2).all()
