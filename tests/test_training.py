"""The metric-learning trainer, on real EuroSAT-MS patches and their spectral features."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from anneal_geo.backbones.smallcnn import SmallCNNBackbone
from anneal_geo.backbones.spectral import SpectralBackbone
from anneal_geo.data.bands import EUROSAT_MS_BANDS
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.training import MetricModel, RoundStats, Trainer

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"
MS_BANDS = list(EUROSAT_MS_BANDS)


def load_ms() -> tuple[np.ndarray, np.ndarray]:
    """All real EuroSAT-MS patches (283, 13, 64, 64) float32, class index from the folder."""
    folders = sorted(p for p in (SAMPLES / "eurosat_ms").iterdir() if p.is_dir())
    patches, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.glob("*.tif")):
            with rasterio.open(path) as src:
                patches.append(src.read())
            labels.append(label)
    return np.stack(patches).astype(np.float32), np.array(labels)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny head steps are dominated by thread synchronisation: one thread is several times
    # faster on 2 busy cores. Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """Archive/query split 80/20 per class (seeded), archive statistics, spectral features."""
    x, y = load_ms()
    rng = np.random.default_rng(0)
    query = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        query[rng.choice(members, size=round(0.2 * len(members)), replace=False)] = True
    xa, ya, xq, yq = x[~query], y[~query], x[query], y[query]
    mean, std = xa.mean(axis=(0, 2, 3)), xa.std(axis=(0, 2, 3))
    trunk = SpectralBackbone().build(MS_BANDS, mean, std)
    with torch.inference_mode():
        fa = trunk(torch.from_numpy(xa)).numpy()
        fq = trunk(torch.from_numpy(xq)).numpy()
    i, j = np.triu_indices(len(ya), 1)
    return {
        "xa": xa, "ya": ya, "xq": xq, "yq": yq, "mean": mean, "std": std, "fa": fa, "fq": fq,
        "pairs": np.stack([i, j], axis=1).astype(np.int64),
        "labels": (ya[i] == ya[j]).astype(np.int64),
    }  # fmt: skip


def spectral_model(d: dict[str, np.ndarray], seed: int = 0) -> torch.nn.Module:
    trunk = SpectralBackbone().build(MS_BANDS, d["mean"], d["std"])
    return MetricModel(trunk, out_dim=32, hidden=64, seed=seed)


def head_trainer(d: dict[str, np.ndarray], seed: int = 0, **kwargs: object) -> Trainer:
    trainer = Trainer(spectral_model(d, seed), mode="head", seed=seed, **kwargs)  # type: ignore[arg-type]
    trainer.set_features(d["fa"])
    return trainer


def subset(d: dict[str, np.ndarray], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rows = np.random.default_rng(seed).choice(len(d["pairs"]), size=n, replace=False)
    return d["pairs"][rows], d["labels"][rows]


def class_gap(emb: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean distance of same-class and of different-class pairs."""
    i, j = np.triu_indices(len(y), 1)
    dist = np.linalg.norm(emb[i] - emb[j], axis=1)
    same = y[i] == y[j]
    return float(dist[same].mean()), float(dist[~same].mean())


def test_metric_model_outputs_unit_vectors(data: dict[str, np.ndarray]) -> None:
    model = spectral_model(data)
    assert isinstance(model, torch.nn.Module) and model.out_dim == 32
    with torch.inference_mode():
        emb = model(torch.from_numpy(data["xa"][:5]))
        head_only = model.embed_features(torch.from_numpy(data["fa"][:5]))
    assert emb.shape == (5, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(emb, head_only, rtol=1e-5, atol=1e-5)


def test_contrastive_loss_matches_its_formula() -> None:
    from anneal_geo.training import _contrastive_loss

    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    y = torch.tensor([1.0, 0.0, 0.0])
    d = torch.linalg.norm(a - b, dim=1)
    expect = (d[0] ** 2 + torch.clamp(0.5 - d[1], min=0) ** 2 + torch.clamp(0.5 - d[2], 0) ** 2) / 3
    torch.testing.assert_close(_contrastive_loss(a, b, y, 0.5), expect)
    assert d[2] > 0.5  # this dissimilar pair is beyond the margin and costs nothing


def test_head_training_separates_held_out_classes(data: dict[str, np.ndarray]) -> None:
    trainer = head_trainer(data, max_steps=150)
    before_same, before_diff = class_gap(trainer.embed_features(data["fq"]), data["yq"])
    stats = trainer.train_round(data["pairs"], data["labels"])
    # 20 epochs over the round's 2,048 sampled pairs would be 160 steps: capped at 150.
    assert isinstance(stats, RoundStats) and stats.steps == 150 and stats.mode == "head"
    assert stats.n_pairs == len(data["pairs"]) and stats.n_similar == int(data["labels"].sum())
    assert stats.loss_last < 0.5 * stats.loss_first
    assert stats.seconds > 0 and stats.as_dict()["loss_name"] == "contrastive"
    same, diff = class_gap(trainer.embed_features(data["fq"]), data["yq"])
    assert same < diff
    # Learned, not inherited: same-class pairs got much closer relative to the others.
    assert same / diff < 0.8 * before_same / before_diff
    emb = trainer.embed()
    assert emb.shape == (len(data["ya"]), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_batches_are_class_balanced() -> None:
    from anneal_geo.training import _balanced_rows

    similar, dissimilar = np.array([3]), np.arange(10, 500)
    rows = _balanced_rows(similar, dissimilar, 64, torch.Generator().manual_seed(0))
    assert (rows == 3).sum() == 32 and np.isin(rows[32:], dissimilar).all()
    only = _balanced_rows(np.array([], dtype=np.int64), dissimilar, 8, torch.Generator())
    assert len(only) == 8 and np.isin(only, dissimilar).all()


def test_warm_start_continues_from_the_previous_round(data: dict[str, np.ndarray]) -> None:
    pairs, labels = subset(data, 1000)
    trainer = head_trainer(data, max_steps=100, min_steps=100)
    first = trainer.train_round(pairs, labels)
    after_first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    second = trainer.train_round(pairs, labels)
    # Round 2 started where round 1 ended, and Adam's step count carries on.
    assert second.loss_first < first.loss_first
    assert second.round == 2
    step = trainer.optimizer.state_dict()["state"][0]["step"]
    assert int(step) == first.steps + second.steps
    assert any(not torch.equal(after_first[k], v) for k, v in trainer.model.state_dict().items())


def test_training_is_deterministic_under_the_seed(data: dict[str, np.ndarray]) -> None:
    pairs, labels = subset(data, 500)
    runs = []
    for seed in (5, 5, 6):
        trainer = head_trainer(data, seed=seed, max_steps=30, min_steps=30)
        trainer.train_round(pairs, labels)
        runs.append(trainer.embed())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_triplet_loss_trains_and_forms_valid_triplets(data: dict[str, np.ndarray]) -> None:
    from anneal_geo.training import _TripletSampler

    pairs, labels = subset(data, 3000)
    sampler = _TripletSampler(pairs, labels)
    t = sampler.sample(500, torch.Generator().manual_seed(0))
    answer = {(int(i), int(j)): int(y) for (i, j), y in zip(pairs, labels, strict=True)}

    def label(i: int, j: int) -> int:
        return answer[(min(i, j), max(i, j))]

    assert all(label(a, p) == 1 and label(a, n) == 0 for a, p, n in t.tolist())
    trainer = head_trainer(data, loss="triplet", max_steps=120)
    stats = trainer.train_round(pairs, labels)
    assert stats.loss_name == "triplet" and stats.loss_last < stats.loss_first


def test_head_mode_caches_features_and_leaves_the_trunk_alone(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    xa = data["xa"][:40]
    trunk = SmallCNNBackbone(seed=0).build(MS_BANDS, data["mean"], data["std"])
    trainer = Trainer(MetricModel(trunk, seed=0), mode="head", seed=0, max_steps=5)
    cached = trainer.cache_features(xa, batch_size=16, path=tmp_path / "features.npy")
    assert cached.shape == (40, 256)
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), cached)
    # A get_batch function gives the same features as the array.
    via_fn = trainer.cache_features(lambda ids: xa[ids], n=40, batch_size=7)
    np.testing.assert_allclose(via_fn, cached, rtol=1e-5, atol=1e-5)
    trunk_before = {k: v.clone() for k, v in trunk.state_dict().items()}
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    trainer.train_round(pairs, np.array([1, 0, -1, 0]))
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k]), k
    # Head-only re-embedding equals running the whole model on the patches.
    np.testing.assert_allclose(trainer.embed(), trainer.embed_patches(xa), rtol=1e-4, atol=1e-5)


def test_full_mode_trains_the_trunk_on_real_patches(data: dict[str, np.ndarray]) -> None:
    xa, ya = data["xa"][::7], data["ya"][::7]
    i, j = np.triu_indices(len(ya), 1)
    pairs, labels = np.stack([i, j], axis=1), (ya[i] == ya[j]).astype(int)
    trunk = SmallCNNBackbone(seed=0, widths=(16, 32, 64)).build(MS_BANDS, data["mean"], data["std"])
    trainer = Trainer(
        MetricModel(trunk, seed=0), mode="full", seed=0, batch_pairs=16, min_steps=3, max_steps=3
    )
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"head", "trunk"}
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    stats = trainer.train_round(pairs, labels, source=xa)
    assert stats.steps == 3 and stats.mode == "full" and np.isfinite(stats.loss)
    assert not torch.equal(trunk.state_dict()["features.0.weight"], before["features.0.weight"])
    emb = trainer.embed(xa, batch_size=10)
    assert emb.shape == (len(xa), 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(DataError, match="source"):
        trainer.train_round(pairs, labels)


def test_augmentation_flips_and_rotates_each_patch() -> None:
    from anneal_geo.training import _dihedral

    x = torch.arange(2 * 5 * 16, dtype=torch.float32).reshape(5, 2, 4, 4).repeat(8, 1, 1, 1)
    out = _dihedral(x, torch.Generator().manual_seed(0))
    again = _dihedral(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    variants = {
        torch.rot90(v, k, (-2, -1)).numpy().tobytes()
        for k in range(4)
        for v in (x[0], x[0].flip(-1))
    }
    assert all(out[i].numpy().tobytes() in variants for i in range(0, 40, 5))
    assert not torch.equal(out, x)  # 40 patches: some were transformed


def test_state_dict_round_trip_with_weights_only(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    pairs, labels = subset(data, 800)
    trainer = head_trainer(data, max_steps=40, min_steps=40)
    trainer.train_round(pairs, labels)
    torch.save(trainer.state_dict(), tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    restored = head_trainer(data, seed=99, max_steps=40, min_steps=40)
    assert not np.allclose(restored.embed(), trainer.embed())
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.embed(), trainer.embed())
    assert restored.rounds == 1
    # The generator and optimizer state came along: the next rounds match exactly.
    trainer.train_round(pairs, labels)
    restored.train_round(pairs, labels)
    np.testing.assert_array_equal(restored.embed(), trainer.embed())
    full = Trainer(spectral_model(data), mode="full")
    with pytest.raises(ConfigError, match="mode"):
        full.load_state_dict(state)


def test_bad_inputs_raise_one_line_errors(data: dict[str, np.ndarray]) -> None:
    trainer = Trainer(spectral_model(data), mode="head")
    with pytest.raises(DataError, match="cache_features"):
        trainer.train_round(np.array([[0, 1]]), np.array([1]))
    trainer.set_features(data["fa"])
    n = len(data["fa"])
    with pytest.raises(DataError, match=rf"0\.\.{n - 1}"):
        trainer.train_round(np.array([[0, n]]), np.array([1]))
    with pytest.raises(DataError, match="itself"):
        trainer.train_round(np.array([[0, 1], [3, 3]]), np.array([1, 0]))
    with pytest.raises(DataError, match="no labelled pairs"):
        trainer.train_round(np.array([[0, 1]]), np.array([-1]))
    with pytest.raises(DataError, match="labels must be"):
        trainer.train_round(np.array([[0, 1]]), np.array([2]))
    with pytest.raises(DataError, match=r"\(M, 2\)"):
        trainer.train_round(np.array([0, 1]), np.array([1]))
    with pytest.raises(DataError, match="expected"):
        trainer.set_features(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="mode"):
        Trainer(spectral_model(data), mode="both")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="margin"):
        Trainer(spectral_model(data), margin=0)


def test_pair_lookup_finds_every_labelled_pair_among_a_batch(data: dict[str, np.ndarray]) -> None:
    from anneal_geo.training import _PairLookup

    pairs, labels = subset(data, 4000)
    n = len(data["ya"])
    lookup = _PairLookup(pairs, labels, n)
    ids = np.unique(np.random.default_rng(1).choice(n, size=60, replace=False))
    a, b, found = lookup.among(ids)
    got = {(int(ids[i]), int(ids[j]), int(y)) for i, j, y in zip(a, b, found, strict=True)}
    chosen = set(ids.tolist())
    expect = {
        (int(i), int(j), int(y))
        for (i, j), y in zip(pairs, labels, strict=True)
        if i in chosen and j in chosen
    }
    assert got == expect and len(expect) > 0


def test_the_weight_average_follows_every_step_and_training_continues_unaveraged(
    data: dict[str, np.ndarray],
) -> None:
    """With ``ema``, a round leaves the model holding the moving average of the weights of
    each step (from the weights the round started with), and keeps the trained weights
    aside: they are where the next round continues. Checked against the same steps taken
    one round at a time without averaging."""
    pairs, labels = subset(data, 800)
    steps, decay = 6, 0.5
    stepwise = head_trainer(data, max_steps=1, min_steps=1)
    trajectory = []
    for _ in range(steps):
        stepwise.train_round(pairs, labels)
        trajectory.append([p.detach().clone() for p in stepwise.model.head.parameters()])

    averaged = head_trainer(data, max_steps=steps, min_steps=steps, ema=decay)
    expected = [p.detach().clone() for p in averaged.model.head.parameters()]
    averaged.train_round(pairs, labels)
    for weights in trajectory:
        expected = [e.lerp(w, 1.0 - decay) for e, w in zip(expected, weights, strict=True)]
    held = list(averaged.model.head.parameters())
    for got, want in zip(held, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert averaged._train_weights is not None
    for got, want in zip(averaged._train_weights, trajectory[-1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(h, w) for h, w in zip(held, trajectory[-1], strict=True))
    # The embedding is the averaged model's.
    model = spectral_model(data)
    model.load_state_dict(averaged.model.state_dict())
    with torch.inference_mode():
        want_emb = model.embed_features(torch.from_numpy(data["fa"])).numpy()
    np.testing.assert_allclose(averaged.embed(), want_emb, rtol=1e-5, atol=1e-6)

    # The next round starts from the trained weights, not from the average: its first step
    # is the stepwise trainer's seventh.
    one_more = head_trainer(data, max_steps=1, min_steps=1, ema=decay)
    one_more.load_state_dict(averaged.state_dict())
    one_more.train_round(pairs, labels)
    stepwise.train_round(pairs, labels)
    assert one_more._train_weights is not None
    for got, want in zip(one_more._train_weights, stepwise.model.head.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)


def test_an_averaging_trainer_resumes_exactly_from_its_checkpoint(
    data: dict[str, np.ndarray], tmp_path: Path
) -> None:
    pairs, labels = subset(data, 800)
    trainer = head_trainer(data, max_steps=20, min_steps=20, ema=0.9)
    trainer.train_round(pairs, labels)
    torch.save(trainer.state_dict(), tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(state["train_weights"]) == len(list(trainer.model.head.parameters()))
    restored = head_trainer(data, seed=99, max_steps=20, min_steps=20, ema=0.9)
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.embed(), trainer.embed())
    trainer.train_round(pairs, labels)
    restored.train_round(pairs, labels)
    np.testing.assert_array_equal(restored.embed(), trainer.embed())
    # A checkpoint without averaging has no trained weights to keep.
    plain = head_trainer(data, max_steps=5, min_steps=5)
    plain.train_round(pairs, labels)
    assert "train_weights" not in plain.state_dict()
    bad = dict(state, train_weights=state["train_weights"][:1])
    with pytest.raises(DataError, match="train_weights do not fit"):
        restored.load_state_dict(bad)


@pytest.mark.parametrize("ema", [-0.1, 1.0, 1.5])
def test_a_weight_average_decay_out_of_range_is_refused(
    data: dict[str, np.ndarray], ema: float
) -> None:
    with pytest.raises(ConfigError, match=r"ema must lie in \[0, 1\)"):
        head_trainer(data, ema=ema)
