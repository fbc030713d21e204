"""Exported models on the real Major TOM cell: a session labels the left half of the cell
(a scripted annotator answers from NDVI), its model is exported, reloaded without the
session or the annotator (also in a fresh process), and indexes and queries a pool built
from the right half, whose extra bands are selected by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from typer.testing import CliRunner

import anneal_geo
from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.backbones.base import Backbone
from anneal_geo.cli import app
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError, DataError, PluginError, SessionError
from anneal_geo.models import CARD_FILE, export_model, load_model, read_card, session_model
from anneal_geo.pairs.store import PairStore
from anneal_geo.retrieval.geoindex import GeoIndex, build_index
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
CELL = ROOT / "sample_tiles" / "majortom_s2l2a_tile"
PRODUCT = next((CELL / "199U" / "199U_1099R").iterdir())
BANDS = ["B02", "B03", "B04", "B08"]


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def crop_half(out: Path, side: str) -> Path:
    """The left or right half of every raster of the cell, written with rasterio into
    ``out/<product>/`` (the product folder keeps its name, and so its date)."""
    target = out / PRODUCT.name
    target.mkdir(parents=True)
    for path in sorted(PRODUCT.glob("*.tif")):
        with rasterio.open(path) as src:
            width = src.width // 2
            window = Window(0 if side == "left" else width, 0, width, src.height)
            profile = src.profile
            profile.update(width=width, transform=src.window_transform(window))
            data = src.read(window=window)
        with rasterio.open(target / path.name, "w", **profile) as dst:
            dst.write(data)
    return out


def ndvi(pool: PatchPool, ids: np.ndarray) -> np.ndarray:
    patches = pool.float_patches(ids)
    red, nir = patches[:, pool.bands.index("B04")], patches[:, pool.bands.index("B08")]
    return ((nir - red) / np.maximum(nir + red, 1e-6)).mean(axis=(1, 2))


class NdviAnnotator(Annotator):
    """A scripted expert: two patches are similar when their mean NDVI differs by < 0.1."""

    def annotate(self, pairs, pool):
        ids = np.unique(pairs)
        values = np.zeros(len(pool))
        values[ids] = ndvi(pool, ids)
        for i, j in pairs.tolist():
            yield int(abs(values[i] - values[j]) < 0.1)


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("halves")
    return crop_half(base / "left", "left"), crop_half(base / "right", "right")


@pytest.fixture(scope="module")
def left_pool(halves, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pools") / "left"
    PatchPool.from_tiles(halves[0], 64, bands=BANDS, progress=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def right_pool(halves, tmp_path_factory) -> Path:
    """The other half with all 12 bands (the model needs 4 of them, in another order)."""
    directory = tmp_path_factory.mktemp("pools") / "right"
    PatchPool.from_tiles(halves[1], 64, progress=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def session(left_pool, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A finished session on the left half, and its final embeddings. The annotator is
    unregistered afterwards: exporting and loading must not need it."""
    directory = tmp_path_factory.mktemp("sessions") / "left"
    plugins.register(NdviAnnotator, name="ndvi-script")
    try:
        config = SessionConfig(
            data=str(left_pool),
            annotator="ndvi-script",
            rounds=1,
            budget=10,
            initial=20,
            epochs=5,
            embedding_dim=32,
        )
        created = Session.create(directory, config, {"pool_dir": str(left_pool)})
        with Engine(created, PatchPool.open(left_pool), progress=False) as engine:
            engine.run()
            embeddings = np.asarray(engine.embeddings)
    finally:
        plugins.unregister("ndvi-script", "annotators")
    return directory, embeddings


@pytest.fixture(scope="module")
def model_dir(session, tmp_path_factory) -> Path:
    return export_model(session[0], tmp_path_factory.mktemp("models") / "ndvi")


def test_export_writes_a_card_and_plain_weights(model_dir, session, left_pool) -> None:
    from safetensors.torch import load_file

    card = read_card(model_dir)
    pool = PatchPool.open(left_pool)
    assert card["format"] == "anneal-geo-model" and card["version"] == 1
    assert card["anneal_geo_version"] == anneal_geo.__version__
    assert card["input"]["bands"] == BANDS
    np.testing.assert_allclose(card["input"]["band_mean"], pool.band_mean)
    np.testing.assert_allclose(card["input"]["band_std"], pool.band_std)
    assert card["input"]["patch_size"] == [64, 64] and card["input"]["resolution"] == 10.0
    backbone = card["backbone"]
    # The default backbone, with its pool statistics among the buffers.
    assert backbone["name"] == "texture" and backbone["distribution"] == "anneal-geo"
    assert backbone["version"] == anneal_geo.__version__ and backbone["options"] == {}
    assert backbone["buffers"]["trunk.standardize.mean"] == [4, 1, 1]
    assert backbone["buffers"]["trunk.feature_mean"] == [backbone["out_dim"]]
    head = card["head"]
    assert (head["in_dim"], head["hidden"], head["out_dim"]) == (backbone["out_dim"], 256, 32)
    # The default embedding keeps the frozen features: head output + mixed-in features.
    assert head["mix"] == SessionConfig().mix > 0
    assert card["embedding"]["dim"] == 32 + backbone["out_dim"]
    # An index built with the model searches as the session evaluated.
    assert card["embedding"]["query_expansion"] == SessionConfig().query_expansion == 5
    with PairStore(Path(session[0]) / "annotations.sqlite") as store:
        counts = store.count_by_answer()
    assert card["session"]["answers"] == sum(counts.values()) == 30
    assert card["session"]["round"] == 1 and card["session"]["annotator"] == "ndvi-script"
    assert card["metrics"] == {}  # unlabelled pool: nothing to evaluate with
    assert card["weights"] == "weights.safetensors" and card["weights_format"] == "safetensors"
    state = load_file(str(model_dir / card["weights"]))
    assert {k.split(".")[0] for k in state} == {"trunk", "head"}  # the model only
    assert state["head.2.weight"].shape == (32, 256)
    with pytest.raises(DataError) as exc:
        export_model(session[0], model_dir)
    assert "already holds an exported model" in one_line(exc)


def test_the_loaded_model_embeds_as_the_session_did(model_dir, session, left_pool) -> None:
    model = anneal_geo.load_model(model_dir)
    assert model.bands == BANDS and model.dim == 32 + model.card["backbone"]["out_dim"]
    embeddings = model.embed(PatchPool.open(left_pool))
    assert embeddings.dtype == np.float32 and embeddings.shape == (128, model.dim)
    np.testing.assert_allclose(embeddings, session[1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(model.embed(left_pool), embeddings)  # a pool directory works too
    some = model.embed(PatchPool.open(left_pool), ids=[5, 3, 100])
    np.testing.assert_allclose(some, embeddings[[5, 3, 100]], atol=1e-6)
    in_memory = session_model(session[0]).embed(PatchPool.open(left_pool))
    np.testing.assert_allclose(in_memory, embeddings, atol=1e-6)


def test_a_fresh_process_reloads_identical_embeddings(model_dir, right_pool, tmp_path) -> None:
    out = tmp_path / "fresh.npy"
    code = (
        "import sys, numpy as np, anneal_geo\n"
        "model = anneal_geo.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], model.embed(sys.argv[2]))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(right_pool), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    here = load_model(model_dir).embed(PatchPool.open(right_pool))
    assert np.array_equal(np.load(out), here)


def test_bands_are_selected_by_name_and_a_missing_one_is_named(
    model_dir, right_pool, tmp_path
) -> None:
    model = load_model(model_dir)
    pool = PatchPool.open(right_pool)
    assert pool.n_bands == 12
    full = model.embed(pool)
    four = pool.select_bands(BANDS)
    np.testing.assert_array_equal(model.embed(np.asarray(four.patches)), full)
    reordered = pool.select_bands(["B08", "B04", "B03", "B02"])
    np.testing.assert_array_equal(
        model.embed(np.asarray(reordered.patches), bands=reordered.bands), full
    )
    lacking = pool.select_bands(["B02", "B03", "B04"])
    with pytest.raises(DataError) as exc:
        model.embed(lacking)
    assert "lacks band(s) B08" in one_line(exc)
    with pytest.raises(DataError) as exc:
        model.embed(np.asarray(lacking.patches))
    assert "the patches have 3 bands but the model" in one_line(exc)
    with pytest.raises(DataError) as exc:
        model.embed(np.zeros((2, 64, 64), dtype=np.float32))
    assert "(N, C, H, W)" in one_line(exc)


def test_index_a_new_pool_with_the_model_and_query_it(model_dir, right_pool, tmp_path) -> None:
    built = build_index(right_pool, tmp_path / "index", model=model_dir)
    assert built.meta["embedder"]["kind"] == "model"
    assert built.meta["embedder"]["bands"] == BANDS
    geo = GeoIndex.load(tmp_path / "index", pool=PatchPool.open(right_pool))
    vectors = geo.vectors(np.arange(len(geo)))
    np.testing.assert_allclose(vectors, load_model(model_dir).embed(geo.pool), atol=1e-6)
    distances = np.linalg.norm(vectors - vectors[40], axis=1)
    distances[40] = np.inf
    plain = np.argsort(distances, kind="stable")
    # The model's query expansion: patch 40 averaged with its 5 nearest other patches.
    assert built.meta["embedder"]["query_expansion"] == geo.query_expansion == 5
    expanded = (vectors[40] + vectors[plain[:5]].sum(axis=0)) / 6
    to_expanded = np.linalg.norm(vectors - expanded, axis=1)
    to_expanded[40] = np.inf
    results = geo.query_patch(40, k=5)
    assert results["patch_id"].tolist() == np.argsort(to_expanded, kind="stable")[:5].tolist()
    np.testing.assert_allclose(results["distance"], np.sort(to_expanded)[:5], atol=1e-5)
    _, ids = geo.search(vectors[40], 5, exclude=np.array([40]), query_expansion=0)
    assert ids.tolist() == plain[:5].tolist()
    assert set(results["acquired"]) == {"2020-02-23"}
    # A query image in the pool's own 12 bands is embedded by the model too.
    row, col = geo.pool.footprints.loc[77, ["row_off", "col_off"]]
    source = geo.pool.footprints.loc[77, "source"]
    with rasterio.open(source) as src:
        window = Window(int(col), int(row), 64, 64)
        profile = src.profile
        profile.update(
            count=len(BANDS), width=64, height=64, transform=src.window_transform(window)
        )
    data = [np.asarray(geo.pool.patches[77][geo.pool.bands.index(b)]) for b in BANDS]
    profile.update(dtype="float32")
    with rasterio.open(tmp_path / "patch.tif", "w", **profile) as dst:
        dst.write(np.stack(data).astype(np.float32))
        dst.descriptions = tuple(BANDS)
    found = geo.query_image(tmp_path / "patch.tif", k=3, query_expansion=0)  # a look-up
    geo.close()
    assert found["patch_id"].iloc[0] == 77 and found["distance"].iloc[0] < 1e-3
    with pytest.raises(DataError) as exc:
        build_index(tmp_path, model=model_dir)
    assert "--model indexes a pool directory" in one_line(exc)


def test_command_line_export_index_query(session, right_pool, tmp_path) -> None:
    import geopandas as gpd

    runner = CliRunner()
    model = tmp_path / "model"
    exported = runner.invoke(app, ["export", str(session[0]), "--out", str(model)])
    assert exported.exit_code == 0, exported.output
    assert "exported round 1" in exported.output and (model / CARD_FILE).is_file()
    again = runner.invoke(app, ["export", str(session[0]), "--out", str(model)])
    assert isinstance(again.exception, DataError)
    forced = runner.invoke(app, ["export", str(session[0]), "--out", str(model), "--force"])
    assert forced.exit_code == 0, forced.output
    pool = tmp_path / "pool"
    PatchPool.open(right_pool).save(pool)
    indexed = runner.invoke(app, ["index", str(pool), "--model", str(model)])
    assert indexed.exit_code == 0, indexed.output
    dim = anneal_geo.load_model(model).dim
    assert f"indexed 128 patches ({dim}-d embeddings of the model" in indexed.output
    import shapely

    footprints = gpd.read_file(pool / "footprints.gpkg").geometry
    corner = shapely.union_all(footprints.iloc[[0, 1, 8, 9]].to_numpy()).buffer(-1e-4)
    box = corner.bounds  # the half is 8 patches wide: 0, 1, 8 and 9 form its corner
    out = tmp_path / "within.gpkg"
    query = runner.invoke(
        app,
        [
            "query",
            str(pool),
            "--patch",
            "100",
            "--within",
            ",".join(f"{v:.6f}" for v in box),
            "--after",
            "2020-01-01",
            "-k",
            "3",
            "--out",
            str(out),
        ],
    )
    assert query.exit_code == 0, query.output
    results = gpd.read_file(out, layer="results")
    assert len(results) == 3 and set(results["patch_id"]) <= {0, 1, 8, 9}
    query_rows = gpd.read_file(out, layer="query")
    assert query_rows["rank"].tolist() == [0, 0] and query_rows["after"].iloc[0] == "2020-01-01"
    assert query_rows["role"].tolist() == ["query patches", "within"]
    assert query_rows["query_expansion"].tolist() == [5, 5]  # the model's setting
    # --query-expansion 0: ranked by the patch itself, as the index's plain search ranks.
    plain = runner.invoke(
        app,
        [
            "query",
            str(pool),
            "--patch",
            "100",
            "-k",
            "4",
            "--query-expansion",
            "0",
            "--out",
            str(out),
        ],
    )
    assert plain.exit_code == 0, plain.output
    assert "averaged with its" not in plain.output
    assert "ranked by the query averaged with its 5 nearest patches" in query.output
    geo = GeoIndex.load(pool)
    _, expected = geo.search(geo.vectors([100])[0], 4, exclude=np.array([100]), query_expansion=0)
    assert gpd.read_file(out, layer="results")["patch_id"].tolist() == expected.tolist()
    assert gpd.read_file(out, layer="query")["query_expansion"].tolist() == [0]
    wrong = runner.invoke(app, ["query", str(pool), "--patch", "1", "--query-expansion", "-1"])
    assert isinstance(wrong.exception, ConfigError)
    assert "query_expansion=-1 is not a whole number" in str(wrong.exception)


class FittedStats(Backbone):
    """Per-band mean and spread, z-scored with statistics kept as buffers (fitted on a pool
    after build, as the ``texture`` backbone does)."""

    trainable = False

    def build(self, bands, mean, std):
        return _FittedTrunk(len(bands))


class _FittedTrunk(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_dim = 2 * channels
        self.register_buffer("feature_mean", torch.zeros(self.out_dim))
        self.register_buffer("feature_std", torch.ones(self.out_dim))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((-2, -1)), x.std((-2, -1))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) - self.feature_mean) / self.feature_std


def test_fitted_trunk_buffers_round_trip(left_pool, tmp_path) -> None:
    plugins.register(FittedStats, name="fitted-stats")
    plugins.register(NdviAnnotator, name="ndvi-script")
    try:
        config = SessionConfig(
            data=str(left_pool),
            annotator="ndvi-script",
            backbone="fitted-stats",
            rounds=0,
            initial=20,
            epochs=3,
            embedding_dim=8,
        )
        session = Session.create(tmp_path / "s", config, {"pool_dir": str(left_pool)})
        pool = PatchPool.open(left_pool)
        with Engine(session, pool, progress=False) as engine:
            engine.run()
        # Fit the statistics into the checkpoint, as a backbone fitting on the pool would.
        raw = _FittedTrunk(4).raw(torch.from_numpy(pool.float_patches()))
        path = session.latest_checkpoint()[1]
        state = torch.load(path, weights_only=True)
        state["model"]["trunk.feature_mean"] = raw.mean(0)
        state["model"]["trunk.feature_std"] = raw.std(0)
        torch.save(state, path)
        model_dir = export_model(session.directory, tmp_path / "model")
        card = read_card(model_dir)
        assert card["backbone"]["buffers"] == {
            "trunk.feature_mean": [8],
            "trunk.feature_std": [8],
        }
        plugins.unregister("ndvi-script", "annotators")
        model = load_model(model_dir)
        assert torch.equal(model.module.trunk.feature_mean, raw.mean(0))
        assert torch.equal(model.module.trunk.feature_std, raw.std(0))
        features = model.module.trunk(torch.from_numpy(pool.float_patches([0, 1])))
        assert abs(float(features.mean())) < 5  # z-scored, not raw reflectance
        np.testing.assert_allclose(
            model.embed(pool), session_model(session.directory).embed(pool), atol=1e-6
        )
    finally:
        plugins.unregister("fitted-stats", "backbones")
        plugins.unregister("ndvi-script", "annotators")
    with pytest.raises(PluginError) as exc:
        load_model(model_dir)
    assert "needs backbone plugin 'fitted-stats'" in one_line(exc)


def test_damaged_or_missing_models_and_unfinished_sessions_are_refused(
    model_dir, left_pool, tmp_path
) -> None:
    with pytest.raises(DataError) as exc:
        load_model(tmp_path)
    assert "is not an exported model" in one_line(exc)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (CARD_FILE, "weights.safetensors"):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    load_model(copy)
    weights = bytearray((copy / "weights.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (copy / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(DataError) as exc:
        load_model(copy)
    assert "is corrupt or was replaced" in one_line(exc)
    card = (model_dir / CARD_FILE).read_text().replace("[head]", "[head_]")
    (copy / CARD_FILE).write_text(card)
    with pytest.raises(DataError) as exc:
        load_model(copy)
    assert "lacks the [head] table" in one_line(exc)
    (copy / "weights.safetensors").write_bytes((model_dir / "weights.safetensors").read_bytes())
    card = (model_dir / CARD_FILE).read_text()
    card = card.replace("query_expansion = 5", "query_expansion = -2")
    (copy / CARD_FILE).write_text(card)
    with pytest.raises(DataError) as exc:
        load_model(copy)
    assert "model.toml: [embedding] query_expansion = -2 is not a whole number" in one_line(exc)
    card = (model_dir / CARD_FILE).read_text().replace("query_expansion = 5\n", "")
    (copy / CARD_FILE).write_text(card)
    assert load_model(copy).query_expansion == 0  # exported before the setting: no expansion
    config = SessionConfig(data=str(left_pool), rounds=0, initial=20)
    fresh = Session.create(tmp_path / "fresh", config, {"pool_dir": str(left_pool)})
    with pytest.raises(SessionError) as exc:
        export_model(fresh.directory, tmp_path / "m")
    assert "no finished round yet" in one_line(exc)
    assert json.loads(json.dumps(read_card(model_dir)))  # the card is plain data


def test_the_texture_backbones_fitted_statistics_travel_with_the_model(left_pool, tmp_path):
    if plugins.find("backbones", "texture") is None:
        pytest.skip("the texture backbone is not installed")
    from anneal_geo.backbones._texture_net import fit_texture_trunk

    plugins.register(NdviAnnotator, name="ndvi-script")
    try:
        config = SessionConfig(
            data=str(left_pool),
            annotator="ndvi-script",
            backbone="texture",
            backbone_options={"scales": 2},
            rounds=0,
            initial=20,
            epochs=3,
            embedding_dim=8,
        )
        session = Session.create(tmp_path / "s", config, {"pool_dir": str(left_pool)})
        pool = PatchPool.open(left_pool)
        with Engine(session, pool, progress=False) as engine:
            engine.run()
            trunk = engine.trainer.model.trunk
            fit_texture_trunk(trunk, pool.float_patches, len(pool), progress=False)
            fitted = {k: v.clone() for k, v in trunk.state_dict().items()}
        path = session.latest_checkpoint()[1]
        state = torch.load(path, weights_only=True)
        state["model"].update({f"trunk.{k}": v for k, v in fitted.items()})
        torch.save(state, path)  # the statistics a fitting engine would have saved
        model_dir = export_model(session.directory, tmp_path / "model")
    finally:
        plugins.unregister("ndvi-script", "annotators")
    card = read_card(model_dir)
    assert card["backbone"]["name"] == "texture" and card["backbone"]["options"] == {"scales": 2}
    assert {"trunk.feature_mean", "trunk.feature_std", "trunk.fitted"} <= set(
        card["backbone"]["buffers"]
    )
    model = load_model(model_dir)
    loaded = model.module.trunk
    assert bool(loaded.fitted)
    assert torch.equal(loaded.feature_mean, fitted["feature_mean"])
    assert torch.equal(loaded.feature_std, fitted["feature_std"])
    assert not torch.all(loaded.feature_std == 1)  # really fitted, not the identity
    np.testing.assert_allclose(
        model.embed(pool), session_model(session.directory).embed(pool), atol=1e-6
    )
