"""Embedding tiles read where they lie, on a real Dask LocalCluster of 2 worker processes,
against the single-process path: ``PatchPool.from_tiles`` on the same folder, then that pool
embedded in one process (the trunk on ``pool.float_patches``, the trainer's fit for the
``texture`` trunk, ``load_model(...).embed(pool)`` for an exported model).

The archive is the real Major TOM cell three times under three scene names (links to its
files): the cell itself, an earlier acquisition whose cloud mask covers the northern third,
and one entirely under cloud, so scene order, skipped windows and a scene without a single
kept patch all count."""

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

from anneal_geo import plugins
from anneal_geo.data.pool import PatchPool
from anneal_geo.distributed import embed_pool, embed_tiles, output_files
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.models.card import sha256_file, write_card
from anneal_geo.models.model import load_model
from anneal_geo.training import MetricModel, Trainer

ROOT = Path(__file__).resolve().parent.parent
CELL = ROOT / "sample_tiles" / "majortom_s2l2a_tile"
PRODUCT = next((CELL / "199U" / "199U_1099R").iterdir())
EXE = Path(sys.executable).parent / "anneal-geo"
#: Scene names: natural order puts the two S2A acquisitions before the original S2B one.
CLOUDY_THIRD = "S2A_MSIL2A_20200204T032739_N9999_R018_T48QUE_20230924T183543"
OVERCAST = "S2A_MSIL2A_20200214T032739_N9999_R018_T48QUE_20230924T183543"


def linked_scene(folder: Path, mask_rows: float | None) -> None:
    """The cell's band files as links in ``folder``, with its own cloud mask covering the
    top ``mask_rows`` share of the rows (None: a link to the cell's clear mask)."""
    folder.mkdir(parents=True)
    for path in PRODUCT.glob("*.tif"):
        if path.name != "cloud_mask.tif":
            os.symlink(path, folder / path.name)
    if mask_rows is None:
        os.symlink(PRODUCT / "cloud_mask.tif", folder / "cloud_mask.tif")
        return
    with rasterio.open(PRODUCT / "cloud_mask.tif") as src:
        profile, mask = src.profile, src.read(1)
    mask[: round(mask.shape[0] * mask_rows)] = 1
    with rasterio.open(folder / "cloud_mask.tif", "w", **profile) as dst:
        dst.write(mask, 1)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiles") / "archive"
    cell = root / "199U" / "199U_1099R"
    linked_scene(cell / PRODUCT.name, None)
    linked_scene(cell / CLOUDY_THIRD, 1 / 3)
    linked_scene(cell / OVERCAST, 1.0)
    return root


@pytest.fixture(scope="module")
def reference(archive: Path) -> tuple[PatchPool, object]:
    """The single-process pool of the archive and the reader's report."""
    reports: list[object] = []
    pool = PatchPool.from_tiles(archive, 64, on_report=reports.append, progress=False)
    return pool, reports[0]


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, one thread each (shared by the module)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local


def trunk_of(pool: PatchPool, backbone: str, **options: object) -> torch.nn.Module:
    return plugins.create("backbones", backbone, **options).checked_build(
        pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
    )


def spectral_features(pool: PatchPool) -> np.ndarray:
    """The spectral trunk on pool.float_patches, in one process."""
    trunk = trunk_of(pool, "spectral")
    with torch.inference_mode():
        return trunk(torch.from_numpy(pool.float_patches())).numpy()


def test_scene_order_and_skipping_of_the_archive(reference) -> None:
    pool, report = reference
    # 256 windows per scene: the clear scene keeps all, the cloudy third about two thirds,
    # the overcast one none (the reader skips it without failing the archive).
    assert report.scenes == 3 and report.windows == 3 * 256
    assert 256 < len(pool) < 2 * 256 and report.skipped_cloud == 3 * 256 - len(pool)
    assert CLOUDY_THIRD in pool.sources[0] and PRODUCT.name in pool.sources[-1]


def test_cluster_matches_the_single_process_pool_spectral(
    archive: Path, reference, cluster, tmp_path: Path
) -> None:
    pool, report = reference
    out = tmp_path / "emb" / "spectral.npy"
    stats: dict = {}
    got = embed_tiles(archive, scheduler=cluster, out=out, progress=False, stats=stats)
    assert stats["workers"] == 2 and stats["scenes"] == 3 and stats["passes"] == 2
    assert isinstance(got.embeddings, np.memmap) and got.embeddings.shape == (len(pool), 86)
    np.testing.assert_allclose(got.embeddings, spectral_features(pool), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(out), np.asarray(got.embeddings))
    # The band statistics the workers merged are the pool's.
    np.testing.assert_allclose(got.band_mean, pool.band_mean, rtol=1e-12)
    np.testing.assert_allclose(got.band_std, pool.band_std, rtol=1e-12)
    assert got.bands == pool.bands
    # Row i is patch i of the pool: same footprints, windows, sources, dates.
    mine, theirs = got.footprints, pool.footprints
    for column in ("patch_id", "source", "crs", "row_off", "col_off", "height", "width"):
        assert mine[column].tolist() == theirs[column].tolist(), column
    assert mine.geometry.geom_equals_exact(theirs.geometry, tolerance=1e-12).all()
    assert mine["acquired"].tolist() == pool.acquired
    assert (got.report.windows, got.report.kept, got.report.skipped_cloud) == (
        report.windows,
        report.kept,
        report.skipped_cloud,
    )
    files = output_files(out)
    assert got.files == {k: files[k] for k in ("embeddings", "footprints", "meta")}
    meta = json.loads(files["meta"].read_text())
    assert meta["n"] == len(pool) and meta["bands"] == pool.bands
    assert meta["report"]["skipped_cloud"] == report.skipped_cloud
    import geopandas as gpd

    on_disk = gpd.read_file(files["footprints"])
    assert on_disk["row_off"].tolist() == theirs["row_off"].tolist()


@pytest.mark.slow  # the spectral and CLI cases run by default
def test_texture_is_fitted_on_all_patches_as_the_trainer_fits_it(
    archive: Path, reference, cluster, tmp_path: Path
) -> None:
    pool, _ = reference
    trainer = Trainer(MetricModel(trunk_of(pool, "texture"), out_dim=8), mode="head")
    want = trainer.cache_features(pool.float_patches, len(pool))
    out = tmp_path / "texture.npy"
    got = embed_tiles(archive, "texture", scheduler=cluster, out=out, progress=False)
    np.testing.assert_allclose(got.embeddings, want, rtol=1e-5, atol=1e-5)
    # The fitted statistics are written beside the embeddings and embed new patches alike.
    state = torch.load(got.files["trunk_state"], weights_only=True)
    assert bool(state["fitted"]) and not torch.all(state["feature_std"] == 1)
    again = trunk_of(pool, "texture")
    again.load_state_dict(state)
    with torch.inference_mode():
        np.testing.assert_allclose(
            again(torch.from_numpy(pool.float_patches(np.arange(5)))).numpy(),
            want[:5],
            rtol=1e-5,
            atol=1e-5,
        )
    # A saved pool is fitted the same way (it was embedded unfitted before).
    saved = tmp_path / "pool"
    pool.save(saved)
    from_pool = embed_pool(saved, "texture", scheduler=cluster, progress=False)
    np.testing.assert_allclose(from_pool, want, rtol=1e-5, atol=1e-5)


def write_model(directory: Path, pool: PatchPool) -> Path:
    """A model directory as `anneal-geo export` writes it: a texture trunk whose statistics
    were fitted on ``pool`` and a seeded projection head with mixed-in features."""
    trunk = trunk_of(pool, "texture", scales=2)
    Trainer(MetricModel(trunk, out_dim=8), mode="head").cache_features(
        pool.float_patches, len(pool)
    )
    model = MetricModel(trunk, out_dim=8, hidden=16, seed=5, mix=0.25)
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / "weights.pt")
    write_card(
        directory,
        {
            "format": "anneal-geo-model",
            "version": 1,
            "weights": "weights.pt",
            "weights_format": "torch",
            "weights_sha256": sha256_file(directory / "weights.pt"),
            "input": {
                "bands": pool.bands,
                "band_mean": pool.band_mean.tolist(),
                "band_std": pool.band_std.tolist(),
                "resolution": 10.0,
            },
            "backbone": {"name": "texture", "options": {"scales": 2}, "seed": 0},
            "head": {"in_dim": trunk.out_dim, "hidden": 16, "out_dim": 8},
            "embedding": {"dim": model.embedding_dim, "metric": "l2"},
        },
    )
    return directory


@pytest.mark.slow  # the spectral and CLI cases run by default
def test_a_saved_model_carries_its_statistics_in_one_pass(
    archive: Path, reference, cluster, tmp_path: Path
) -> None:
    pool, _ = reference
    # Fitted on four bands of another pool (the clear cell alone): the model's band and
    # feature statistics are not the archive's, and they must be the ones applied.
    model_dir = write_model(
        tmp_path / "model",
        PatchPool.from_tiles(CELL, 64, bands=["B08", "B04", "B03", "B02"], progress=False),
    )
    model = load_model(model_dir)
    want = model.embed(pool)
    stats: dict = {}
    got = embed_tiles(
        archive,
        model=model_dir,
        scheduler=cluster.scheduler_address,
        progress=False,
        stats=stats,
    )
    assert stats["passes"] == 1 and got.bands == ["B08", "B04", "B03", "B02"]
    assert got.band_mean is None and got.embeddings.shape == (len(pool), model.dim)
    np.testing.assert_allclose(got.embeddings, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got.embeddings, axis=1), 1.0, rtol=1e-5)
    # The same model on the saved pool, through embed_pool.
    saved = tmp_path / "pool"
    pool.save(saved)
    np.testing.assert_allclose(
        embed_pool(saved, model=model_dir, n_workers=0, progress=False), want, atol=1e-6
    )
    with pytest.raises(DataError, match="B11"):
        embed_tiles(archive, model=model_dir, bands=["B04", "B11"], n_workers=0)


def test_bad_input_is_one_line_naming_the_fix(archive: Path, tmp_path: Path) -> None:
    eurosat = ROOT / "sample_tiles" / "eurosat_ms"
    with pytest.raises(DataError, match="is not a tile archive") as exc:
        embed_tiles(eurosat, n_workers=0)
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="does not exist"):
        embed_tiles(tmp_path / "nowhere", n_workers=0)
    with pytest.raises(DataError, match=r"band 'B10' is not in scene .*drop it from --bands"):
        embed_tiles(archive, bands=["B04", "B10"], n_workers=0)
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:1"):
        embed_tiles(archive, scheduler="tcp://127.0.0.1:1", connect_timeout=1, progress=False)
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at nonsense"):
        embed_tiles(archive, scheduler="nonsense", progress=False)
    with pytest.raises(ConfigError, match="max_nodata"):
        embed_tiles(archive, max_nodata=2.0, n_workers=0)
    with pytest.raises(ConfigError, match="--model applies"):
        embed_tiles(archive, "texture", model=tmp_path, n_workers=0)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(EXE), "embed", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_embeds_tiles_on_a_running_scheduler(archive: Path, cluster, tmp_path: Path) -> None:
    bands = ["B02", "B03", "B04", "B08"]
    # The tile options of `pool build` pass through: overlapping patches, no cloud mask.
    pool = PatchPool.from_tiles(CELL, 64, stride=48, bands=bands, cloud_mask=None, progress=False)
    out = tmp_path / "cli.npy"
    run = run_cli(
        str(CELL),
        "--scheduler",
        cluster.scheduler_address,
        "--bands",
        ",".join(bands),
        "--stride",
        "48",
        "--cloud-mask",
        "none",
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stderr
    assert f"embedded {len(pool)} patches" in run.stdout and "2 passes" in run.stdout
    assert f"kept {len(pool)}" in run.stdout
    assert output_files(out)["footprints"].is_file()
    np.testing.assert_allclose(np.load(out), spectral_features(pool), rtol=1e-5, atol=1e-6)
    # The messages themselves are tested through the API above; here, that the command
    # prints one of them as a single line and exits 2.
    bad = run_cli(
        str(archive),
        "--scheduler",
        "tcp://127.0.0.1:1",
        "--connect-timeout",
        "1",
        "--out",
        str(tmp_path / "bad.npy"),
    )
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in lines[0]


def test_multi_band_scene_files_in_this_process(tmp_path: Path) -> None:
    """One multi-band GeoTIFF per scene (band names from its descriptions), embedded
    without Dask: the same patches and features as the pool of that folder."""
    folder = tmp_path / "multi"
    folder.mkdir()
    bands = ["B02", "B03", "B04", "B08"]
    stack = []
    for band in bands:
        with rasterio.open(PRODUCT / f"{band}.tif") as src:
            profile = src.profile
            stack.append(src.read(1))
    profile.update(count=len(bands))
    with rasterio.open(folder / "T48QUE_20200223.tif", "w", **profile) as dst:
        dst.write(np.stack(stack))
        dst.descriptions = tuple(bands)
    pool = PatchPool.from_tiles(folder, 128, progress=False)
    stats: dict = {}
    got = embed_tiles(folder, patch_size=128, n_workers=0, progress=False, stats=stats)
    assert stats["workers"] == 0 and got.bands == pool.bands == bands
    np.testing.assert_allclose(got.embeddings, spectral_features(pool), rtol=1e-5, atol=1e-6)
    assert got.footprints["source"].tolist() == pool.sources
    with pytest.raises(DataError, match=r"band 'B05' is not in scene .*T48QUE_20200223"):
        embed_tiles(folder, bands=["B04", "B05"], n_workers=0, progress=False)
