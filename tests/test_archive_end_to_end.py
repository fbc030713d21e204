"""benchmarks/archive_end_to_end.py stays runnable: its synthetic scenes are what they claim
(georeferencing, nodata, cloud, exact skip counts) and its chain runs at a tiny size on real
data, from ``anneal-geo pool build`` to a query, writing every JSON field."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import rasterio

from anneal_geo.data.dates import acquisition_date
from anneal_geo.data.pool import PatchPool

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "archive_end_to_end.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("archive_end_to_end", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_scene_with_nodata_and_cloud_is_read_as_planned(bench: ModuleType, tmp_path: Path) -> None:
    plan = bench.ArchivePlan(34)  # the plan gives this scene a nodata block and a cloud area
    assert plan.nodata_block is not None and plan.cloud_box is not None
    archive = bench.build_archive(tmp_path / "work", 1, progress=False)
    scene = tmp_path / "one" / plan.folder
    bench._write_scene(plan, scene)
    with rasterio.open(scene / "B02.tif") as src:
        assert src.crs.to_epsg() == plan.epsg
        assert (src.bounds.left, src.bounds.top) == plan.origin
        assert src.read(1)[0, 0] == 0  # the nodata block
    with rasterio.open(archive / bench.ArchivePlan(0).folder / "B05.tif") as src:
        assert src.crs.to_epsg() == bench.ArchivePlan(0).epsg
        assert src.read(1).min() > 0  # untouched band data
    assert acquisition_date(str(scene / "B04.tif")) == plan.acquired.isoformat()
    pool = PatchPool.from_tiles(tmp_path / "one", 32, progress=False)
    kept = plan.kept_patches(32, 32)
    assert kept < 1089
    assert len(pool) == kept
    # the pool's skipped windows are exactly the planned bad ones
    fp = pool.footprints
    bad = plan.bad_pixels()
    windows = zip(fp["row_off"].to_numpy(), fp["col_off"].to_numpy(), strict=True)
    assert all(bad[r : r + 32, c : c + 32].mean() <= 0.5 for r, c in windows)


def test_chain_at_a_tiny_size_writes_every_field(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    bench.main(["--sizes", "500", "--patch-size", "64", "--stride", "64", "--backbone",
                "spectral", "--budget", "20", "--initial", "20", "--workdir",
                str(tmp_path / "work"), "--out", str(out), "--no-progress"])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] >= 1
    assert set(data["targets"]) == {
        "chain_seconds", "peak_rss_mb", "round_after_first_seconds", "pool_disk_le_tiles"
    }  # fmt: skip
    (result,) = data["results"]
    assert result["patches"] == result["expected_patches"] == 512  # two clear scenes
    steps = result["steps"]
    assert list(steps) == ["pool_build", "features", "select_1", "annotate_1", "train_1",
                           "select_2", "annotate_2", "train_2", "index", "query"]  # fmt: skip
    for row in steps.values():
        assert row["seconds"] >= 0 and row["peak_rss_mb"] > 100
    assert steps["select_1"]["pairs"] == 20 and steps["select_2"]["pairs"] == 20
    assert steps["query"]["results"] == 20
    assert result["round_records"][1]["queried_pairs"] == 40
    assert result["disk"]["tiles_mb"] > 20 and result["disk"]["pool_mb"] > 0
    assert result["chain_seconds"] >= sum(r["seconds"] for r in steps.values()) - 1
    assert set(result["targets_met"]) == set(data["targets"])
    assert not (tmp_path / "work" / "archive").exists()  # written by the run, not kept
    assert np.isfinite(result["round_after_first_seconds"])
