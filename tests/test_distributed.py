"""Embedding a pool in chunks: in this process and on a real Dask LocalCluster of 2 worker
processes, against the single-process trunk and trainer on the EuroSAT-MS sample pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anneal_geo import plugins
from anneal_geo.data.pool import PatchPool
from anneal_geo.distributed import chunk_ranges, embed_pool
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.training import MetricModel, Trainer

EXE = Path(sys.executable).parent / "anneal-geo"


def trunk_features(pool: PatchPool, bands: list[str] | None = None) -> np.ndarray:
    """The single-process reference: the spectral trunk on pool.float_patches, 256 at a time."""
    if bands is not None:
        pool = pool.select_bands(bands)
    trunk = plugins.create("backbones", "spectral").checked_build(
        pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
    )
    with torch.inference_mode():
        parts = [
            trunk(torch.from_numpy(pool.float_patches(np.arange(lo, min(lo + 256, len(pool))))))
            for lo in range(0, len(pool), 256)
        ]
    return torch.cat(parts).numpy()


@pytest.fixture(scope="module")
def checkpoint(
    pool: PatchPool, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray]:
    """A head trained for one round on real answers, saved as a session saves it, and the
    embeddings the trainer itself gives the pool."""
    trunk = plugins.create("backbones", "spectral").checked_build(
        pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
    )
    trainer = Trainer(MetricModel(trunk, out_dim=16, seed=3), mode="head", seed=3, progress=False)
    trainer.cache_features(pool.float_patches, len(pool))
    labels = pool.single_labels()
    rng = np.random.default_rng(0)
    pairs = np.sort(rng.choice(len(pool), size=(200, 2)), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    trainer.train_round(pairs, (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int64))
    path = tmp_path_factory.mktemp("ckpt") / "round_001.pt"
    torch.save(trainer.state_dict(), path)
    return path, trainer.embed_patches(pool.float_patches, len(pool))


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, one thread each (shared by the module)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local


def test_chunk_ranges_cover_the_pool() -> None:
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(0, 4) == []
    with pytest.raises(ConfigError, match="chunk"):
        chunk_ranges(10, 0)


def test_in_process_chunks_match_the_trunk(pool_dir: Path, pool: PatchPool) -> None:
    want = trunk_features(pool)
    stats: dict = {}
    got = embed_pool(pool_dir, n_workers=0, chunk=100, progress=False, stats=stats)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert stats["n"] == len(pool) and stats["chunks"] == 3 and stats["workers"] == 0
    # The chunk size does not change a number: each patch is embedded on its own.
    one_chunk = embed_pool(pool_dir, n_workers=0, chunk=4096, progress=False)
    np.testing.assert_allclose(one_chunk, got, rtol=1e-6, atol=1e-7)


def test_band_subset_and_npy_output(pool_dir: Path, pool: PatchPool, tmp_path: Path) -> None:
    bands = ["B04", "B03", "B02", "B08"]
    out = tmp_path / "sub" / "features.npy"
    got = embed_pool(pool_dir, n_workers=0, bands=bands, out=out, chunk=128, progress=False)
    assert isinstance(got, np.memmap)
    on_disk = np.load(out)
    np.testing.assert_array_equal(on_disk, np.asarray(got))
    np.testing.assert_allclose(on_disk, trunk_features(pool, bands), rtol=1e-5, atol=1e-6)


def test_local_cluster_matches_single_process(
    pool_dir: Path, pool: PatchPool, cluster, checkpoint: tuple[Path, np.ndarray]
) -> None:
    stats: dict = {}
    # Small chunks: 5 tasks over 2 workers, more than the tasks kept in flight at once.
    features = embed_pool(pool_dir, scheduler=cluster, chunk=60, progress=False, stats=stats)
    assert stats["workers"] == 2 and stats["chunks"] == 5
    np.testing.assert_allclose(features, trunk_features(pool), rtol=1e-5, atol=1e-6)
    # The scheduler's address, as `anneal-geo embed --scheduler` passes it; a checkpoint
    # turns trunk features into the session's embeddings.
    path, want = checkpoint
    got = embed_pool(
        pool_dir, scheduler=cluster.scheduler_address, checkpoint=path, chunk=100, progress=False
    )
    assert got.shape == (len(pool), 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_bad_input_fails_before_any_worker(pool_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="B99"):
        embed_pool(pool_dir, n_workers=0, bands=["B04", "B99"], progress=False)
    with pytest.raises(DataError, match="not a saved pool"):
        embed_pool(tmp_path, n_workers=0, progress=False)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)
    with pytest.raises(DataError, match="no metric model"):
        embed_pool(pool_dir, n_workers=0, checkpoint=junk, progress=False)
    with pytest.raises(ConfigError, match="n_workers"):
        embed_pool(pool_dir, n_workers=-1, progress=False)
    with pytest.raises(ConfigError, match="scheduler must be"):
        embed_pool(pool_dir, scheduler=42, progress=False)


def test_import_is_light() -> None:
    code = (
        "import sys, anneal_geo.distributed, anneal_geo.cli.embed; "
        "print(sorted(m for m in ('torch', 'faiss', 'dask', 'distributed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_embed_writes_the_array(pool_dir: Path, pool: PatchPool, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "f.npy"
    run = subprocess.run(
        [str(EXE), "embed", str(pool_dir), "--out", str(out), "--chunk", "100"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"embedded {len(pool)} patches" in run.stdout and str(out) in run.stdout
    np.testing.assert_allclose(np.load(out), trunk_features(pool), rtol=1e-5, atol=1e-6)
    both = subprocess.run(
        [str(EXE), "embed", str(pool_dir), "--scheduler", "tcp://127.0.0.1:1",
         "--local-workers", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert both.returncode == 2
    assert both.stderr.strip().splitlines() == [
        "error: give --scheduler or --local-workers, not both"
    ]
