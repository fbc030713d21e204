"""The simulated oracle on real labels: EuroSAT-MS class folders and BigEarthNet JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from anneal_geo.annotators import SKIP, OracleAnnotator
from anneal_geo.errors import AnnealError, ConfigError, DataError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"


@dataclass
class LabelledPool:
    """Stand-in for PatchPool with only what the oracle reads."""

    labels: np.ndarray | None
    multilabel: bool
    class_names: list[str] | None

    def __len__(self) -> int:
        return 0 if self.labels is None else int(self.labels.shape[0])


def _eurosat_pool() -> tuple[LabelledPool, np.ndarray]:
    root = SAMPLES / "eurosat_ms"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    classes = np.array(
        [i for i, name in enumerate(names) for _ in sorted((root / name).glob("*.tif"))]
    )
    hot = np.zeros((classes.size, len(names)), dtype=bool)
    hot[np.arange(classes.size), classes] = True
    return LabelledPool(hot, False, names), classes


def _bigearthnet_pool() -> tuple[LabelledPool, list[str], list[set[str]]]:
    root = SAMPLES / "bigearthnet_s2_tiny"
    patches = sorted(p.name for p in root.iterdir() if p.is_dir())
    sets = [
        set(json.loads((root / p / f"{p}_labels_metadata.json").read_text())["labels"])
        for p in patches
    ]
    names = sorted(set().union(*sets))
    hot = np.array([[name in s for name in names] for s in sets], dtype=bool)
    return LabelledPool(hot, True, names), patches, sets


@pytest.fixture(scope="module")
def eurosat() -> tuple[LabelledPool, np.ndarray]:
    return _eurosat_pool()


@pytest.fixture(scope="module")
def bigearthnet() -> tuple[LabelledPool, list[str], list[set[str]]]:
    return _bigearthnet_pool()


def _all_pairs(n: int) -> np.ndarray:
    i, j = np.triu_indices(n, k=1)
    return np.stack([i, j], axis=1).astype(np.int64)


def _random_pairs(n: int, m: int, seed: int) -> np.ndarray:
    pairs = _all_pairs(n)
    return pairs[np.random.default_rng(seed).choice(len(pairs), size=m, replace=False)]


# -- single-label -------------------------------------------------------------------------


def test_single_label_answers_follow_the_class(eurosat: tuple[LabelledPool, np.ndarray]) -> None:
    pool, classes = eurosat
    oracle = OracleAnnotator()
    oracle.prepare(pool)
    pairs = _all_pairs(len(pool))
    answers = oracle.answers(pairs, pool)
    np.testing.assert_array_equal(answers, classes[pairs[:, 0]] == classes[pairs[:, 1]])
    # About one pair in ten is similar with 10 balanced classes.
    assert 0.07 < answers.mean() < 0.13


def test_noise_flips_at_the_given_rate_reproducibly(
    eurosat: tuple[LabelledPool, np.ndarray],
) -> None:
    pool, classes = eurosat
    pairs = _random_pairs(len(pool), 5000, seed=0)
    truth = classes[pairs[:, 0]] == classes[pairs[:, 1]]
    noisy = OracleAnnotator(seed=3, noise=0.2)
    first = noisy.answers(pairs, pool)
    assert abs((first != truth).mean() - 0.2) < 0.03
    # The same seed reproduces the flips; the next call (round) draws fresh ones.
    np.testing.assert_array_equal(OracleAnnotator(seed=3, noise=0.2).answers(pairs, pool), first)
    second = noisy.answers(pairs, pool)
    assert not np.array_equal(first, second)
    assert abs((second != truth).mean() - 0.2) < 0.03
    assert not np.array_equal(OracleAnnotator(seed=4, noise=0.2).answers(pairs, pool), first)
    # Resuming the stream: an oracle told it has made one call repeats the second round.
    resumed = OracleAnnotator(seed=3, noise=0.2)
    resumed.calls = 1
    np.testing.assert_array_equal(resumed.answers(pairs, pool), second)
    # Noise 0.5 is pure guessing, about half the answers wrong.
    guess = OracleAnnotator(seed=0, noise=0.5).answers(pairs, pool)
    assert abs((guess != truth).mean() - 0.5) < 0.03


# -- multi-label --------------------------------------------------------------------------


def test_multilabel_jaccard_matches_hand_computation(
    bigearthnet: tuple[LabelledPool, list[str], list[set[str]]],
) -> None:
    pool, patches, sets = bigearthnet
    index = {name: i for i, name in enumerate(patches)}
    a = index["S2A_MSIL2A_20170617T113321_36_85"]  # {Non-irrigated arable land, Pastures}
    b = index["S2A_MSIL2A_20170617T113321_4_55"]  # {Pastures}
    c = index["S2B_MSIL2A_20170924T093019_43_47"]  # {Coniferous forest, Transitional ...}
    d = index["S2A_MSIL2A_20180510T94033_19_86"]  # {Coniferous forest, Peatbogs}
    e = index["S2B_MSIL2A_20180421T114349_47_56"]  # {Non-irrigated arable land, Pastures}
    assert sets[a] == {"Non-irrigated arable land", "Pastures"} and sets[b] == {"Pastures"}
    assert sets[c] & sets[d] == {"Coniferous forest"} and sets[e] == sets[a]
    pairs = np.array([[a, b], [c, d], [a, c], [a, e]], dtype=np.int64)
    # Jaccard by hand: 1/2, 1/3, 0/4, 2/2.
    np.testing.assert_array_equal(OracleAnnotator(jaccard=0.5).answers(pairs, pool), [1, 0, 0, 1])
    np.testing.assert_array_equal(OracleAnnotator(jaccard=0.3).answers(pairs, pool), [1, 1, 0, 1])
    np.testing.assert_array_equal(OracleAnnotator(jaccard=0.6).answers(pairs, pool), [0, 0, 0, 1])
    np.testing.assert_array_equal(
        OracleAnnotator(jaccard=1.0, any_shared=True).answers(pairs, pool), [1, 1, 0, 1]
    )


def test_multilabel_all_pairs_match_set_jaccard(
    bigearthnet: tuple[LabelledPool, list[str], list[set[str]]],
) -> None:
    pool, _, sets = bigearthnet
    pairs = _all_pairs(len(pool))
    for threshold in (0.25, 0.5, 0.75, 1.0):
        expected = [
            len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold for i, j in pairs.tolist()
        ]
        got = OracleAnnotator(jaccard=threshold).answers(pairs, pool)
        np.testing.assert_array_equal(got, expected)
    shared = [bool(sets[i] & sets[j]) for i, j in pairs.tolist()]
    np.testing.assert_array_equal(OracleAnnotator(any_shared=True).answers(pairs, pool), shared)


# -- the generator through the contract ---------------------------------------------------


def test_checked_annotate_yields_one_valid_answer_per_pair(
    eurosat: tuple[LabelledPool, np.ndarray],
) -> None:
    pool, classes = eurosat
    pairs = _random_pairs(len(pool), 137, seed=1)
    oracle = OracleAnnotator(seed=0, noise=0.1)
    answers = list(oracle.checked_annotate(pairs, pool))
    assert len(answers) == 137
    assert set(answers) <= {0, 1} and SKIP not in answers
    assert all(type(x) is int for x in answers)
    flipped = np.asarray(answers) != (classes[pairs[:, 0]] == classes[pairs[:, 1]])
    assert 0 < flipped.sum() < 40
    assert list(oracle.checked_annotate(np.zeros((0, 2), dtype=np.int64), pool)) == []
    # One answer at a time: a consumer may stop after any answer.
    stream = iter(OracleAnnotator().checked_annotate(pairs, pool))
    assert next(stream) in (0, 1)


def test_pair_ids_out_of_range_are_refused(eurosat: tuple[LabelledPool, np.ndarray]) -> None:
    pool, _ = eurosat
    with pytest.raises(DataError, match="pair ids must lie in"):
        OracleAnnotator().answers(np.array([[0, len(pool)]]), pool)
    with pytest.raises(AnnealError, match="pair ids must lie in"):
        list(OracleAnnotator().checked_annotate(np.array([[0, len(pool)]]), pool))


# -- errors -------------------------------------------------------------------------------


def test_unlabelled_pool_is_refused() -> None:
    pool = LabelledPool(None, False, None)
    with pytest.raises(DataError, match=r"has no labels.*human annotator"):
        OracleAnnotator().prepare(pool)
    with pytest.raises(DataError, match="has no labels"):
        OracleAnnotator().answers(np.array([[0, 1]]), pool)


def test_one_class_pool_is_refused(eurosat: tuple[LabelledPool, np.ndarray]) -> None:
    pool, classes = eurosat
    assert pool.labels is not None and pool.class_names is not None
    forest = pool.class_names.index("Forest")
    only_forest = LabelledPool(pool.labels[classes == forest], False, pool.class_names)
    with pytest.raises(DataError, match=r"only 1 class \('Forest'\).*teach nothing"):
        OracleAnnotator().prepare(only_forest)
    # Two classes are enough.
    two = LabelledPool(pool.labels[classes <= 1], False, pool.class_names)
    OracleAnnotator().prepare(two)


def test_single_label_pool_with_a_row_without_class_is_refused(
    eurosat: tuple[LabelledPool, np.ndarray],
) -> None:
    pool, _ = eurosat
    assert pool.labels is not None
    broken = pool.labels.copy()
    broken[5] = False
    with pytest.raises(DataError, match="exactly one class"):
        OracleAnnotator().prepare(LabelledPool(broken, False, pool.class_names))


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"noise": 0.6}, "noise"),
        ({"noise": -0.1}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"noise": "lots"}, "noise"),
        ({"jaccard": 0.0}, "jaccard"),
        ({"jaccard": 1.5}, "jaccard"),
        ({"any_shared": "yes"}, "any_shared"),
        ({"threshold": 0.5}, "unknown option"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        OracleAnnotator(**options)  # type: ignore[arg-type]


def test_capabilities() -> None:
    assert OracleAnnotator.needs_labels is True
    assert OracleAnnotator.interactive is False
    oracle = OracleAnnotator(seed=5, noise=0.25, jaccard=0.4)
    assert (oracle.seed, oracle.noise, oracle.jaccard, oracle.any_shared) == (5, 0.25, 0.4, False)
