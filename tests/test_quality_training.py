"""Retrieval quality machinery on the real EuroSAT-MS sample: the ``texture`` trunk fitted by
the engine, the mixed retrieval embedding, and the bounded pair budget of a training round."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anneal_geo import plugins
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError
from anneal_geo.pairs.transitivity import Closure, closure
from anneal_geo.session import Session, SessionConfig
from anneal_geo.training import MetricModel, SharedFeatures, Trainer


def texture_config(pool_dir: Path, **overrides: object) -> SessionConfig:
    settings: dict[str, object] = dict(
        data=str(pool_dir),
        backbone="texture",
        rounds=2,
        budget=20,
        initial=40,
        epochs=10,
        seed=3,
        mix=0.5,
    )
    settings.update(overrides)
    return SessionConfig(**settings)  # type: ignore[arg-type]


def trunk_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("trunk.feature_")}


def test_texture_session_fits_its_trunk_and_resumes_with_identical_embeddings(
    pool: PatchPool, pool_dir: Path, tmp_path: Path
) -> None:
    session = Session.create(tmp_path / "s", texture_config(pool_dir), {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False) as engine:
        records = engine.run()
        embeddings = engine.embeddings.copy()
        trainer = engine.trainer
        assert bool(trainer.model.trunk.fitted)
        # The cached features are the fitted trunk's output on the pool.
        x = torch.from_numpy(pool.float_patches(np.arange(8)))
        with torch.inference_mode():
            direct = trainer.model.trunk(x).numpy()
        np.testing.assert_allclose(direct, trainer.features[:8], atol=1e-5)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert embeddings.shape == (len(pool), 128 + trainer.model.trunk_dim)

    # Every checkpoint holds the fitted statistics (not the identity they start from).
    latest = session.latest_checkpoint()
    assert latest is not None
    state = torch.load(latest[1], map_location="cpu", weights_only=True)["model"]
    assert bool(state["trunk.fitted"])
    buffers = trunk_buffers(state)
    assert float(buffers["trunk.feature_mean"].abs().max()) > 0.0
    assert not torch.allclose(
        buffers["trunk.feature_std"], torch.ones_like(buffers["trunk.feature_std"])
    )
    assert float(state["head.mix"]) == 0.5

    # Resuming rebuilds the same model: identical embeddings, and the next round runs.
    with Engine(Session.open(session.directory), pool, progress=False) as again:
        np.testing.assert_array_equal(again.embeddings, embeddings)
        more = again.run(1)
    assert [r["round"] for r in more] == [3]

    # The exported model embeds new patches with the saved statistics, as the session did.
    from anneal_geo.models.export import session_model

    model = session_model(session.directory)
    assert model.dim == embeddings.shape[1]
    with Engine(Session.open(session.directory), pool, progress=False, read_only=True) as view:
        np.testing.assert_allclose(model.embed(pool), view.embeddings, atol=1e-5)


def test_cached_features_without_a_checkpoint_keep_their_statistics(
    pool: PatchPool, pool_dir: Path, tmp_path: Path
) -> None:
    session = Session.create(tmp_path / "s", texture_config(pool_dir), {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False) as engine:
        first = engine.embeddings.copy()
        stats = trunk_buffers(
            {f"trunk.{k}": v for k, v in engine.trainer.model.trunk.state_dict().items()}
        )
    caches = sorted(session.directory.glob("trunk_features_*.npy"))
    states = sorted(session.directory.glob("trunk_features_*.trunk.pt"))
    assert len(caches) == 1 and len(states) == 1
    assert session.latest_checkpoint() is None

    # A cache hit with no checkpoint reads the statistics saved next to the cache.
    with Engine(Session.open(session.directory), pool, progress=False) as engine:
        trunk = engine.trainer.model.trunk
        assert bool(trunk.fitted)
        np.testing.assert_array_equal(engine.embeddings, first)
        for key, value in stats.items():
            torch.testing.assert_close(getattr(trunk, key.removeprefix("trunk.")), value)

    # Without them the trunk is fitted again (the features are recomputed with it).
    states[0].unlink()
    with Engine(Session.open(session.directory), pool, progress=False) as engine:
        assert bool(engine.trainer.model.trunk.fitted)
        np.testing.assert_allclose(engine.embeddings, first, atol=1e-6)
    assert states[0].exists()


def test_cache_features_fits_an_unfitted_trunk_once(pool: PatchPool) -> None:
    trunk = plugins.create("backbones", "texture").checked_build(
        pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
    )
    trainer = Trainer(MetricModel(trunk), mode="head", progress=False)
    assert trainer.trunk_fits_statistics and not trainer.trunk_fitted
    features = trainer.cache_features(pool.float_patches, len(pool))
    assert trainer.trunk_fitted
    # z-scored over the pool, then weighted per family: every feature is centred.
    assert np.abs(features.mean(axis=0)).max() < 1e-4
    mean = trunk.feature_mean.clone()
    # Never fitted again: other patches are embedded with the same statistics.
    other = trainer.cache_features(pool.float_patches(np.arange(50)))
    torch.testing.assert_close(trunk.feature_mean, mean)
    np.testing.assert_allclose(other, features[:50], atol=1e-5)


def test_mix_zero_is_the_plain_head_embedding_and_old_state_dicts_load(pool: PatchPool) -> None:
    bb = plugins.create("backbones", "spectral")
    trunk = bb.checked_build(pool.bands, pool.band_mean.tolist(), pool.band_std.tolist())
    x = torch.from_numpy(pool.float_patches(np.arange(32)))
    with torch.inference_mode():
        f = trunk(x)
    plain = MetricModel(trunk, out_dim=16, seed=1)
    with torch.inference_mode():
        want = F.normalize(plain.head(f), dim=1)
        assert torch.equal(plain.embed_features(f), want)
        assert torch.equal(plain(x), want)
    assert plain.embedding_dim == 16

    # A state dict from before the mix existed loads strictly, as mix = 0.
    old = {k: v for k, v in plain.state_dict().items() if k != "head.mix"}
    assert all(k.startswith(("trunk.", "head.0.", "head.2.")) for k in old)
    mixed = MetricModel(trunk, out_dim=16, seed=2, mix=0.7)
    mixed.load_state_dict(old, strict=True)
    assert float(mixed.mix) == 0.0
    with torch.inference_mode():
        assert torch.equal(mixed.embed_features(f), want)


def test_mixed_embedding_blends_learned_and_frozen_distances(pool: PatchPool) -> None:
    bb = plugins.create("backbones", "spectral")
    trunk = bb.checked_build(pool.bands, pool.band_mean.tolist(), pool.band_std.tolist())
    x = torch.from_numpy(pool.float_patches(np.arange(40)))
    with torch.inference_mode():
        f = trunk(x)
    mix = 0.5
    model = MetricModel(trunk, out_dim=16, seed=1, mix=mix)
    with torch.inference_mode():
        e = model.embed_features(f)
        h = F.normalize(model.head(f), dim=1)
        g = F.normalize(f, dim=1)
    assert e.shape == (40, 16 + trunk.out_dim) == (40, model.embedding_dim)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(40))
    d2 = torch.cdist(e, e).pow(2)
    blend = (torch.cdist(h, h).pow(2) + mix**2 * torch.cdist(g, g).pow(2)) / (1 + mix**2)
    torch.testing.assert_close(d2, blend, atol=1e-4, rtol=1e-4)
    # The weight travels in the state dict: a model built without it embeds the same.
    rebuilt = MetricModel(trunk, out_dim=16, seed=9)
    rebuilt.load_state_dict(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.embed_features(f), e)
    with pytest.raises(ValueError, match="mix"):
        MetricModel(trunk, mix=-0.1)
    with pytest.raises(ConfigError, match="mix"):
        SessionConfig(mix=-1.0).validate()
    with pytest.raises(ConfigError, match="pair_budget"):
        SessionConfig(pair_budget=1).validate()


def _labelled_sets(pool: PatchPool) -> tuple[np.ndarray, dict[int, Closure]]:
    """Real answers from the sample's classes (an oracle) and their transitive closures
    at two sizes: few and many implied pairs for the same number of queried ones."""
    labels = pool.single_labels()
    rng = np.random.default_rng(0)
    sets = {}
    for chain in (30, 250):
        # ``chain`` similar answers (linking patches of a class) imply many similar pairs;
        # the same 300 answers in all, the rest random pairs.
        similar = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            k = min(len(members) - 1, chain // len(np.unique(labels)))
            similar += [(members[i], members[i + 1]) for i in range(k)]
        pairs = {(int(i), int(j)) for i, j in similar}
        while len(pairs) < 300:
            i, j = (int(v) for v in rng.choice(len(pool), 2, replace=False))
            pairs.add((min(i, j), max(i, j)))
        arr = np.array(sorted(pairs), dtype=np.int64)
        answers = (labels[arr[:, 0]] == labels[arr[:, 1]]).astype(np.int64)
        sets[chain] = closure(arr, answers, n=len(pool))
    return labels, sets


def test_round_steps_do_not_grow_with_the_implied_pairs(pool: PatchPool) -> None:
    _, sets = _labelled_sets(pool)
    few, many = sets[30], sets[250]
    assert many.n_implied > 5 * few.n_implied > 0
    assert few.n_queried == many.n_queried == 300
    features = np.random.default_rng(1).standard_normal((len(pool), 12)).astype(np.float32)

    class Identity(torch.nn.Module):
        out_dim = 12

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    steps = {}
    for name, lab in (("few", few), ("many", many)):
        assert len(lab) > 500
        trainer = Trainer(
            MetricModel(Identity(), out_dim=8), mode="head", epochs=4, pair_budget=500,
            min_steps=1, progress=False,
        )  # fmt: skip
        trainer.set_features(features)
        stats = trainer.train_round(lab.pairs, lab.labels, implied=lab.implied)
        assert stats.n_pairs == len(lab) and stats.n_trained == 500
        steps[name] = stats.steps
        # Every queried pair is trained on; the implied ones fill the budget, balanced.
        rows = trainer._round_sample(lab.labels.astype(np.int64), lab.implied)
        assert len(rows) == 500 and len(np.unique(rows)) == 500
        assert set(np.flatnonzero(~lab.implied)) <= set(rows.tolist())
        implied_rows = rows[lab.implied[rows]]
        sim = int(np.sum(lab.labels[implied_rows] == 1))
        available_sim = int(np.sum(lab.labels[lab.implied] == 1))
        assert sim == min(available_sim, len(implied_rows) // 2)
    assert steps["few"] == steps["many"] == int(np.ceil(4 * 500 / 256))

    # pair_budget 0 trains on every pair: the steps then grow with them.
    trainer = Trainer(
        MetricModel(Identity(), out_dim=8), mode="head", epochs=4, pair_budget=0,
        min_steps=1, max_steps=100_000, progress=False,
    )  # fmt: skip
    trainer.set_features(features)
    stats = trainer.train_round(many.pairs, many.labels, implied=many.implied)
    assert stats.n_trained == len(many) and stats.steps == int(np.ceil(4 * len(many) / 256))


def test_run_command_takes_margin_and_mix(pool_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from anneal_geo.cli.root import app

    out = tmp_path / "session"
    result = CliRunner().invoke(
        app,
        ["run", "--data", str(pool_dir), "--rounds", "0", "--initial", "20", "--epochs", "2",
         "--margin", "1.0", "--mix", "0.5", "--transitivity", "full", "--repair", "split",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = tomllib.loads((out / "session.toml").read_text())["settings"]
    assert settings["margin"] == 1.0 and settings["mix"] == 0.5  # not the defaults
    assert settings["transitivity"] == "full" and settings["repair"] == "split"
    for option, value in (("--mix", "-1"), ("--repair", "maybe")):
        bad = CliRunner().invoke(
            app, ["run", "--data", str(pool_dir), option, value, "--out", str(tmp_path / "bad")]
        )
        assert bad.exit_code != 0 and option[2:] in str(bad.output) + str(bad.exception)
        assert not (tmp_path / "bad").exists()


def test_a_round_rewrites_the_embeddings_in_place_with_the_new_values(
    pool: PatchPool, pool_dir: Path, tmp_path: Path
) -> None:
    config = texture_config(pool_dir, rounds=1)
    session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False) as engine:
        before = engine.embeddings
        untrained = before.copy()
        engine.run()
        assert engine.embeddings is before  # no second copy of the pool's embeddings
        fresh = engine.trainer.embed()  # into a new array: the same values
        assert fresh is not before
        np.testing.assert_array_equal(engine.embeddings, fresh)
        assert not np.allclose(engine.embeddings, untrained)  # and they did change
        assert engine.embeddings_lock.acquire(blocking=False)
        engine.embeddings_lock.release()
    # An array that does not fit (shape, dtype, or the features themselves) is not written.
    trainer = engine.trainer
    features = trainer.features
    assert features is not None
    wrong = np.zeros((len(pool), 3), dtype=np.float32)
    assert trainer.embed_features(features, out=wrong) is not wrong and not wrong.any()
    as_float64 = np.zeros(fresh.shape)
    assert trainer.embed_features(features, out=as_float64) is not as_float64
    view = np.zeros((fresh.shape[1], fresh.shape[0]), dtype=np.float32).T  # not C-contiguous
    assert trainer.embed_features(features, out=view) is not view


def test_a_mixed_session_keeps_its_features_once_inside_the_embedding(
    pool: PatchPool, pool_dir: Path, tmp_path: Path
) -> None:
    # The random initial set and no weight average: the pairs this session asks, a quarter
    # of their answers flipped below, give split suspects.
    config = texture_config(pool_dir, rounds=1, repair="split", initial_design="random", ema=0.0)
    session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
    with Engine(session, pool, progress=False) as engine:
        shared = engine.trainer.features
        assert isinstance(shared, SharedFeatures)
        assert shared.embeddings is engine.embeddings  # no second (N, F) array
        assert shared.shape == (len(pool), engine.trainer.model.trunk_dim)
        # The rows read back are the cached features, to float32 rounding.
        cached = np.load(next(session.directory.glob("trunk_features_*.npy")))
        np.testing.assert_allclose(shared[np.arange(len(pool))], cached, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(shared), cached, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(shared[5:9], np.asarray(shared)[5:9])
        head = engine.trainer.model.out_dim
        frozen = engine.embeddings[:, head:].copy()
        engine.run()
        # A round rewrote the head's columns only; rows stay unit length.
        np.testing.assert_array_equal(engine.embeddings[:, head:], frozen)
        np.testing.assert_allclose(np.linalg.norm(engine.embeddings, axis=1), 1.0, atol=1e-5)
        # The repair step reads the answered rows and suspects what the full array would.
        pairs, labels = engine.store.answers()[:2]
        labels = np.where(np.arange(len(labels)) % 4 == 0, 1 - labels, labels)  # a tired expert
        rows = closure(pairs, labels, n=len(pool), repair="split", features=shared)
        full = closure(pairs, labels, n=len(pool), repair="split", features=cached)
        assert rows.suspects == full.suspects and len(rows.suspects) > 0
        np.testing.assert_array_equal(rows.pairs, full.pairs)


def test_features_are_not_shared_without_mixing(pool: PatchPool) -> None:
    trunk = plugins.create("backbones", "texture").checked_build(
        pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
    )
    plain = Trainer(MetricModel(trunk, out_dim=16, mix=0.0), mode="head", progress=False)
    plain.cache_features(pool.float_patches(np.arange(64)))
    embeddings = plain.embed()
    assert plain.share_features(embeddings) is False
    assert isinstance(plain.features, np.ndarray)
    mixed = Trainer(MetricModel(trunk, out_dim=16, mix=0.5), mode="head", progress=False)
    mixed.set_features(plain.features)
    assert mixed.share_features(np.zeros((64, 3), dtype=np.float32)) is False  # wrong shape
    embeddings = mixed.embed()
    before = embeddings.copy()
    assert mixed.share_features(embeddings) is True
    assert mixed.share_features(embeddings) is True  # already shared: unchanged
    np.testing.assert_allclose(embeddings, before, atol=1e-6)  # the same embedding
    np.testing.assert_array_equal(mixed.embed(), embeddings)  # a new array: same values
    given = np.zeros_like(embeddings)
    assert mixed.embed(out=given) is given  # an array that fits is written
    np.testing.assert_array_equal(given, embeddings)
    wrong = np.zeros((64, 3), dtype=np.float32)
    assert mixed.embed(out=wrong) is not wrong and not wrong.any()


def test_features_shared_from_the_saved_file_equal_those_shared_from_memory(
    pool: PatchPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anneal_geo.errors import DataError
    from anneal_geo.training import trainer as trainer_module

    # Blocks of 64 rows, so that the 283 patches are read back in several blocks.
    monkeypatch.setattr(trainer_module, "_NORMALISE_BLOCK", 64)
    trunk = plugins.create("backbones", "texture").checked_build(
        pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
    )
    model = MetricModel(trunk, out_dim=16, mix=0.5)
    held = Trainer(model, mode="head", progress=False)
    saved = tmp_path / "features.npy"
    held.cache_features(pool.float_patches, len(pool), path=saved)
    streamed = Trainer(model, mode="head", progress=False)
    assert streamed.can_share_features and held.can_share_features
    width = model.embedding_dim
    from_memory = np.empty((len(pool), width), dtype=np.float32)
    from_file = np.empty_like(from_memory)
    assert held.share_features(from_memory) is True
    assert streamed.share_features(from_file, saved) is True
    np.testing.assert_array_equal(from_file, from_memory)
    assert isinstance(streamed.features, SharedFeatures)
    assert streamed.features.embeddings is from_file
    np.testing.assert_array_equal(streamed.features.norms, held.features.norms)  # type: ignore[union-attr]
    # Features held are let go of: the file is read instead.
    again = Trainer(model, mode="head", progress=False)
    again.set_features(np.load(saved))
    other = np.empty_like(from_memory)
    assert again.share_features(other, saved) is True
    np.testing.assert_array_equal(other, from_memory)
    # A file that is not the trunk's features is a one-line error naming it.
    good = np.load(saved)
    for bad, message in (
        (good[:, :10], "holds (283, 10) features"),
        (np.where(np.arange(len(good))[:, None] == 200, np.nan, good), "NaN or infinite"),
        (good.astype(np.float64), "expected an (N, D) float32 matrix"),
    ):
        np.save(tmp_path / "bad.npy", bad)
        fresh = Trainer(model, mode="head", progress=False)
        with pytest.raises(DataError, match=re.escape(message)) as info:
            fresh.share_features(np.empty_like(from_memory), tmp_path / "bad.npy")
        assert "bad.npy" in str(info.value) and "\n" not in str(info.value)
    # Without mixing nothing is shared, from a file or not.
    plain = Trainer(MetricModel(trunk, out_dim=16, mix=0.0), mode="head", progress=False)
    assert not plain.can_share_features
    assert plain.share_features(np.empty((len(pool), 16), dtype=np.float32), saved) is False
