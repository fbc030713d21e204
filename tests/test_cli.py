"""The `anneal-geo` command as a user runs it: real subprocesses on the shipped sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "anneal-geo"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "pool"
    result = cli("pool", "build", str(ROOT / "sample_tiles" / "eurosat_ms"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "283" in result.stdout
    return out


def test_pool_info_describes_the_pool(pool_dir):
    result = cli("pool", "info", str(pool_dir))
    assert result.returncode == 0, result.stderr
    assert "283" in result.stdout and "B8A" in result.stdout and "Forest" in result.stdout


def test_run_then_status_then_resume(pool_dir, tmp_path):
    out = tmp_path / "session"
    args = ["--data", str(pool_dir), "--rounds", "1", "--budget", "10", "--initial", "20",
            "--epochs", "5", "--out", str(out)]
    result = cli("run", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:1] == ["round"] for line in lines), result.stdout
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1]
    assert history[-1]["queried_pairs"] == 30
    for key in ("map@20", "map", "p@10", "seconds", "implied_pairs", "estimator", "seed"):
        assert key in history[-1]

    status = cli("session", "status", str(out))
    assert status.returncode == 0, status.stderr
    assert "rounds finished: 2 of 2" in status.stdout

    more = cli("resume", str(out), "--rounds", "1")
    assert more.returncode == 0, more.stderr
    history = (out / "history.jsonl").read_text().splitlines()
    assert len(history) == 3 and json.loads(history[-1])["queried_pairs"] == 40

    again = cli("run", *args)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("error:") and "already holds a session" in again.stderr
    assert "Traceback" not in again.stderr


def test_bad_input_is_one_line_error(pool_dir, tmp_path):
    unknown = cli("run", "--data", str(pool_dir), "--estimator", "nope", "--out",
                  str(tmp_path / "s"))
    assert unknown.returncode == 2
    assert "unknown estimator 'nope'" in unknown.stderr and "mgue" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1

    setting = cli("run", "--data", str(pool_dir), "--budget", "0", "--out", str(tmp_path / "t"))
    assert setting.returncode == 2 and "'budget'" in setting.stderr

    missing = cli("pool", "info", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
