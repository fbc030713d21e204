"""Small things a newcomer hits: the default --out, counters that agree, help without
`<bool>`, setup.sh's choice of Python, the README's sample sizes, progress bars and the table."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from anneal_geo.cli.run import default_out
from anneal_geo.engine import Engine
from anneal_geo.pairs.store import PairStore
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "anneal-geo"
QUICK = ["--rounds", "0", "--initial", "6", "--epochs", "1"]


def cli(*args: str, cwd: Path = ROOT, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [str(EXE), *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env,
        timeout=600,
    )  # fmt: skip


def test_the_default_out_is_named_after_the_data(pool_dir, tmp_path):
    assert default_out(Path("sample_tiles/eurosat_rgb"), "mgue", "kmeans", "spectral", 0) == Path(
        "runs/eurosat_rgb-mgue-kmeans-spectral-seed0"
    )
    other = tmp_path / "other_pool"
    shutil.copytree(pool_dir, other)
    # Another pool gets a folder of its own (the name comes from the data, as above).
    assert default_out(other, "mgue", "kmeans", "texture", 0) != default_out(
        pool_dir, "mgue", "kmeans", "texture", 0
    )
    result = cli("run", "--data", str(other), *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert made == ["other_pool-mgue-kmeans-texture-seed0"]


def test_status_resume_and_label_count_rounds_and_answers_alike(pool_dir, pool, tmp_path):
    config = SessionConfig(data=str(pool_dir), initial=6, budget=4, rounds=1, epochs=1)
    session = Session.create(tmp_path / "s", config, {"pool_dir": str(pool_dir)})
    labels = pool.single_labels()
    with Engine(session, pool, progress=False) as engine:
        engine.run(1)
        # Round 1 by hand: three answers, the last undone, one answered again.
        pairs = engine.round_pairs().tolist()
        for i, j in pairs[:3]:
            engine.answer(i, j, int(labels[i] == labels[j]))
        engine.store.undo()
        i, j = pairs[2]
        seq = engine.answer(i, j, -1)
    assert seq == 6 + 3 + 1 + 1  # the number `anneal-geo label` prints as `saved answer N`

    status = cli("session", "status", str(session.directory))
    assert status.returncode == 0, status.stderr
    assert "rounds finished: 1 of 2; next: round 1 of 1" in status.stdout
    assert "answers: 9 answers stand" in status.stdout
    assert f"{seq} saved in all (10 answers, 1 undo)" in status.stdout
    with PairStore(session.store_path, read_only=True) as store:
        assert store.log_counts() == {"answers": 10, "undos": 1}
    resumed = cli("resume", str(session.directory), "--rounds", "0")
    assert resumed.returncode == 2 and "give 1 or more rounds" in resumed.stderr
    label = cli("label", str(session.directory))  # no input: shows the next pair and quits
    assert re.search(r"round 1 of 1\b", label.stdout), label.stdout
    resumed = cli("resume", str(session.directory))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "rounds finished: 1 of 2; next: round 1 of 1" in (
        resumed.stdout
    )


@pytest.mark.parametrize("command", [[], ["run"], ["query"], ["plugins", "check"]])
def test_help_shows_no_type_after_flags(command):
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout, result.stdout
    assert "--help" in result.stdout


def fake_python(path: Path, version: str) -> None:
    """An executable that answers like a Python of ``version`` to setup.sh's two probes."""
    major, minor = (int(v) for v in version.split(".")[:2])
    ok = 0 if (major, minor) >= (3, 12) else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\ncase "$2" in\n  *sys.exit*) exit {ok} ;;\n  *print*) echo {version} ;;\n'
        f'esac\n[ "$1" = "--version" ] && echo "Python {version}"\nexit 0\n'
    )
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("on_path", "expected"),
    [("3.12.4", "3.13.0 on pyenv"), ("3.14.1", "3.14.1 on PATH")],
)
def test_setup_picks_the_newest_python_and_says_so(tmp_path, on_path, expected):
    pyenv = tmp_path / "pyenv"
    for version in ("3.9.18", "3.12.1", "3.13.0", "3.11.7", "3.10.13"):
        fake_python(pyenv / "versions" / version / "bin" / "python", version)
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "basename", "sort", "sed"):
        (tools / tool).symlink_to(shutil.which(tool))
    fake_python(tmp_path / "bin" / "python3", on_path)
    env = {"PATH": f"{tmp_path / 'bin'}:{tools}", "PYENV_ROOT": str(pyenv), "HOME": str(tmp_path)}
    result = subprocess.run(
        ["/bin/bash", str(ROOT / "setup.sh"), "--which-python"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    version, where = expected.split(" on ")
    assert f"Python {version} (the newest >= 3.12" in result.stdout, result.stdout
    assert f"found on {where})" in result.stdout


def test_the_readme_says_which_rgb_numbers_come_from_which_data():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    shipped = len(list((ROOT / "sample_tiles" / "eurosat_rgb").glob("*/*.jpg")))
    assert shipped == 1000
    assert "| EuroSAT-RGB (4,000 patches) |" not in text
    assert "EuroSAT-RGB development set (4,000 patches)" in text
    assert "`sample_tiles/eurosat_rgb`\nhas 1,000 patches" in text


def test_progress_bars_never_share_a_line_with_the_table(pool_dir, tmp_path):
    """In a terminal (a pty), with the trunk features computed while the engine starts."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TERM": "xterm"}
    args = ["run", "--data", str(pool_dir), "--rounds", "1", "--initial", "6", "--budget", "4",
            "--epochs", "1", "--out", str(tmp_path / "s")]  # fmt: skip
    proc = subprocess.Popen(
        [str(EXE), *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=600) == 0
    os.close(master)
    text = b"".join(chunks).decode("utf-8", errors="replace")
    assert "batch" in text, "no progress bar was shown"
    table = re.compile(r"round\s+queried|\b\d+\s+\d+\s+\d+\s+\d\.\d\d\s")
    rows = [line for line in text.split("\n") if table.search(line)]
    assert len(rows) == 3, text  # the header and two rounds
    for line in rows:
        assert "batch" not in line and "%|" not in line, repr(line)
