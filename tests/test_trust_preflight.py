"""Everything is checked before anything is written: a bad setting, plugin, option or band
leaves no session folder behind, so the corrected command simply works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import check_settings
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.session import SessionConfig

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "anneal-geo"
SAMPLE = ROOT / "sample_tiles"
QUICK = ["--rounds", "0", "--initial", "6", "--epochs", "1"]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    """A flat folder of real EuroSAT-MS GeoTIFFs: a pool without labels."""
    folder = tmp_path_factory.mktemp("flat") / "tiles"
    folder.mkdir()
    for path in sorted((SAMPLE / "eurosat_ms").glob("*/*.tif"))[::10]:
        shutil.copy(path, folder / path.name)
    return folder


BAD = {
    "unknown estimator": (["--estimator", "nosuch"], "unknown estimator 'nosuch'"),
    "unknown band": (["--bands", "B04,BXX"], "band 'BXX' is not in this pool"),
    "noise out of range": (["--noise", "2.0"], "noise=2.0 must lie in [0, 0.5]"),
    "widget from the command line": (["--annotator", "widget"], "answers in a Jupyter notebook"),
    "option typo": (["--estimator-option", "kk=3"], "has no option 'kk'; it accepts: threshold"),
    "full training of a fixed trunk": (["--train-mode", "full"], "has no trainable trunk"),
    "budget beyond every pair": (
        ["--rounds", "1", "--budget", "100000"],
        "budget of 100000 pairs per round is larger than the 25",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_setting_leaves_nothing_behind(pool_dir, tmp_path, case):
    args, expected = BAD[case]
    out = tmp_path / "session"
    result = cli("run", "--data", str(pool_dir), *QUICK, *args, "--out", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert expected in message, message
    assert not out.exists(), f"{case}: {sorted(p.name for p in out.iterdir())}"


def test_the_corrected_command_then_just_works(pool_dir, tmp_path):
    out = tmp_path / "session"
    assert cli("run", "--data", str(pool_dir), *QUICK, "--estimator", "nosuch", "--out",
               str(out)).returncode == 2  # fmt: skip
    fixed = cli("run", "--data", str(pool_dir), *QUICK, "--out", str(out))
    assert fixed.returncode == 0, fixed.stderr
    assert "already holds a session" not in fixed.stderr
    assert (out / "history.jsonl").is_file()
    again = cli("resume", str(out))
    assert again.returncode == 0, again.stderr
    assert "is finished" in again.stdout and "nothing left to do" in again.stdout
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def test_the_oracle_on_an_unlabelled_pool_leaves_nothing_behind(unlabelled, tmp_path):
    out = tmp_path / "session"
    result = cli("run", "--data", str(unlabelled), *QUICK, "--out", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "label" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_budget_hints_fit_the_candidate_mode(pool):
    archive = 226  # 80 % of the 283 patches
    exhaustive = SessionConfig(rounds=1, budget=30_000, initial=20)
    with pytest.raises(ConfigError, match=r"exhaustive candidates\); lower --budget or --rounds"):
        check_settings(exhaustive, pool)
    knn = SessionConfig(rounds=1, budget=20_000, initial=20, candidates="knn")
    hint = rf"knn candidate pairs \(50 neighbours per patch of {archive}\).*raise knn_k"
    with pytest.raises(ConfigError, match=hint):
        check_settings(knn, pool)
    uniform = SessionConfig(rounds=1, budget=30_000, initial=20, estimator="random")
    with pytest.raises(ConfigError, match=r"uniform candidates\); lower --budget \(uniform"):
        check_settings(uniform, pool)
    many = SessionConfig(rounds=300, budget=100, initial=20)
    with pytest.raises(ConfigError, match="would ask 30020 pairs .* has only 25425"):
        check_settings(many, pool)
    assert check_settings(SessionConfig(rounds=1, budget=100, initial=20), pool)


def test_check_settings_returns_the_plugins_provenance(pool):
    provenance = check_settings(
        SessionConfig(estimator_options={"threshold": "midpoint"}, initial=20, rounds=1), pool
    )
    assert provenance["estimator"] == {
        "name": "mgue",
        "target": "anneal_geo.estimators.mgue:MGUEEstimator",
        "distribution": "anneal-geo",
        "version": provenance["estimator"]["version"],
        "contract_version": 1,
        "options": {"threshold": "midpoint"},
    }
    assert set(provenance) == {"estimator", "selector", "backbone", "annotator"}


def test_an_unlabelled_pool_is_refused_by_the_oracle_before_a_session_exists(unlabelled):
    pool = PatchPool.load(unlabelled)
    with pytest.raises(DataError):
        check_settings(SessionConfig(initial=6, rounds=0), pool)
