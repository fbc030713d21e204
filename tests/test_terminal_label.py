"""Labelling in the terminal: `anneal-geo label`, the `terminal` annotator, pair pictures.

Real sessions over the EuroSAT-MS sample, real SQLite, real training; the kill test runs
`anneal-geo label` in a subprocess, feeds it answers through a pipe and kills it with
SIGKILL.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from typer.testing import CliRunner

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.annotators.render import PatchRenderer, available_presets
from anneal_geo.annotators.terminal import TerminalAnnotator, TerminalLabeller
from anneal_geo.cli import app
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.session import Session, SessionConfig

SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"
QUESTION = re.compile(r"· patches (\d+) and (\d+)$")
ACK = re.compile(r"saved answer (\d+): patches (\d+) and (\d+) (similar|dissimilar|skipped)")
WORD = {"y": 1, "n": 0, "s": -1}

# Runs the real CLI; registers the `terminal` annotator in-process when its entry point is
# not installed yet, so the test works before and after pyproject declares it.
LAUNCH = (
    "import sys\n"
    "from anneal_geo import plugins\n"
    "from anneal_geo.annotators.terminal import TerminalAnnotator\n"
    "if 'terminal' not in plugins.names('annotators'):\n"
    "    plugins.register(TerminalAnnotator, name='terminal', group='annotators')\n"
    "from anneal_geo.cli import main\n"
    "sys.argv[0] = 'anneal-geo'\n"
    "main()\n"
)


def new_session(directory: Path, pool_dir: Path, rounds: int = 1, initial: int = 10) -> Session:
    config = SessionConfig(
        data=str(pool_dir),
        annotator="terminal",
        initial=initial,
        budget=5,
        rounds=rounds,
        epochs=5,
        seed=2,
    )
    return Session.create(directory, config, {"pool_dir": str(pool_dir)})


def rows(session_dir: Path) -> list[tuple[int, int, int, int, int | None, str]]:
    with sqlite3.connect(Path(session_dir) / "annotations.sqlite") as db:
        return db.execute(
            "SELECT round, i, j, answer, undoes, annotator FROM answers ORDER BY seq"
        ).fetchall()


def truth(pool: PatchPool, i: int, j: int) -> str:
    labels = pool.single_labels()
    return "y" if labels[i] == labels[j] else "n"


# -- anneal-geo label, in-process ------------------------------------------------------------


def test_piped_answers_land_in_sqlite_and_rounds_are_trained(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        first = engine.round_pairs().tolist()
    answers = [truth(pool, i, j) for i, j in first]
    # A typo, then undo of the second answer (asked again, answered by a skip).
    script = [answers[0], answers[1], "what?", "u", "s", *answers[2:], "y", "n", "y", "n", "y"]

    result = CliRunner().invoke(app, ["label", str(session.directory)], input="\n".join(script))
    assert result.exit_code == 0, result.output
    stored = rows(session.directory)
    effective = [r for r in stored if r[4] is None]
    assert [(i, j) for _, i, j, _, _, _ in effective[:11]] == [
        tuple(p) for p in [first[0], first[1], first[1], *first[2:]]
    ]
    assert [a for _, _, _, a, _, _ in effective[:11]] == [
        WORD[answers[0]],
        WORD[answers[1]],
        -1,
        *(WORD[a] for a in answers[2:]),
    ]
    assert stored[2][4] is not None and stored[2][1:3] == tuple(first[1]), "undo row missing"
    assert [r[0] for r in effective] == [0] * 11 + [1] * 5
    assert all(r[5] == "terminal" for r in stored)
    history = session.history()
    assert [h["round"] for h in history] == [0, 1]
    out = result.output
    assert "type y (similar)" in out and "undone: patches" in out
    assert len(ACK.findall(out)) == 16
    assert "round 0 done in" in out and "session finished" in out
    picture = Image.open(session.directory / "current_pair.png")
    assert picture.size[0] > 2 * 256 and picture.mode == "RGB"
    assert f"image: {session.directory / 'current_pair.png'}" in out

    again = CliRunner().invoke(app, ["label", str(session.directory)], input="y\n")
    assert again.exit_code == 0 and "has finished all 2 rounds" in again.output
    assert len(rows(session.directory)) == len(stored)


def test_run_with_terminal_annotator_undoes_then_label_finishes(tmp_path, pool_dir, pool):
    out = tmp_path / "run"
    args = ["run", "--data", str(pool_dir), "--annotator", "terminal", "--rounds", "0",
            "--initial", "4", "--epochs", "5", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args, input="y\nu\nn\nq\n")
    assert result.exit_code == 0, result.output
    # `run` labels like `label`: it points at the web page, undo works, and the picture is
    # in the session directory (not a shared temporary file).
    assert f"anneal-geo label {out} --web" in result.output
    assert "undone: patches" in result.output and "paused after 0 rounds" in result.output
    assert f"image: {out / 'current_pair.png'}" in result.output
    assert (out / "current_pair.png").is_file()
    stored = rows(out)
    assert [(r[3], r[4] is not None) for r in stored] == [(1, False), (1, True), (0, False)]
    assert stored[0][1:3] == stored[2][1:3], "the undone pair is asked again"
    assert result.output.count("saved answer") == 2

    labelled = CliRunner().invoke(app, ["label", str(out)], input="s\ns\ns\n")
    assert labelled.exit_code == 0, labelled.output
    assert [r[3] for r in rows(out) if r[4] is None] == [1, 0, -1, -1, -1]
    assert "round 0 done" in labelled.output and "session finished" in labelled.output


def test_terminal_annotator_pulled_by_the_engine_keeps_its_picture_private(tmp_path, pool):
    annotator = TerminalAnnotator()
    annotator.input, annotator.output = io.StringIO("u\ny\n"), io.StringIO()
    assert list(annotator.annotate(np.array([[0, 1], [2, 3]]), pool)) == [1]
    text = annotator.output.getvalue()
    assert "undo needs the session's answers" in text
    assert annotator.png is not None and annotator.png.is_file()
    assert annotator.png.parent != Path(tempfile.gettempdir()), "a shared /tmp path"
    assert "anneal-geo-pair.png" not in text


def test_labeller_with_text_streams_quits_at_end_of_input(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    output = io.StringIO()
    with Engine(session, pool, progress=False) as engine:
        first = engine.round_pairs().tolist()
        labeller = TerminalLabeller(
            engine, bands="false", input=io.StringIO("y\nn\n"), output=output
        )
        summary = labeller.run()
    assert summary.quit and summary.answered == 2 and summary.rounds_finished == 0
    assert [(i, j) for _, i, j, _, _, _ in rows(session.directory)] == [tuple(p) for p in first[:2]]
    assert "quit: 2 answers are saved" in output.getvalue()
    assert labeller.prompt.renderer.band_names == ["B08", "B04", "B03"]


def test_terminal_annotator_is_a_valid_plugin():
    cls = plugins.load("annotators", "terminal")
    assert issubclass(cls, Annotator) and cls.interactive and not cls.needs_labels
    with pytest.raises(ConfigError, match="unknown option"):
        TerminalAnnotator(colour="red")


# -- kill -9 ---------------------------------------------------------------------------------


class Labeller:
    """`anneal-geo label` in a subprocess, with its output read line by line in a thread."""

    def __init__(self, session_dir: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "label", str(session_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 120.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no {pattern.pattern!r} in:\n" + "\n".join(self.log)
                ) from None
            if line is None:
                raise AssertionError(
                    f"labeller ended before {pattern.pattern!r}:\n" + "\n".join(self.log)
                )
            self.log.append(line)
            match = pattern.search(line)
            if match:
                return match

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def test_every_acknowledged_answer_survives_kill_9_and_rerun_continues(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir, rounds=0, initial=8)
    directory = session.directory

    first = Labeller(directory)
    acknowledged: list[tuple[int, int, int]] = []
    try:
        for _ in range(4):
            i, j = map(int, first.wait_for(QUESTION).groups())
            answer = truth(pool, i, j)
            first.send(answer)
            ack = first.wait_for(ACK)
            assert (int(ack[2]), int(ack[3])) == (i, j)
            acknowledged.append((i, j, WORD[answer]))
        i, j = map(int, first.wait_for(QUESTION).groups())
        first.send(truth(pool, i, j))  # in flight when the process dies: may or may not land
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
    assert first.proc.returncode == -signal.SIGKILL

    stored = [(i, j, a) for _, i, j, a, _, _ in rows(directory)]
    assert stored[:4] == acknowledged, "an acknowledged answer was lost or reordered"
    assert len(stored) <= 5

    second = Labeller(directory)
    try:
        asked = []
        pending = None
        for _ in range(8 - len(stored)):
            i, j = map(int, second.wait_for(QUESTION).groups())
            if pending is None:  # read only: the labeller holds the session's writer lock
                pending = [tuple(p) for p in Session.open(directory).load_pending()[1]]
            asked.append((i, j))
            second.send(truth(pool, i, j))
            second.wait_for(ACK)
        assert not {(i, j) for i, j, _ in stored} & set(asked), "an answered pair was asked again"
        assert [(i, j) for i, j, _ in stored] + asked == pending
        second.wait_for(re.compile(r"session finished"))
        assert second.proc.wait(timeout=60) == 0
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
            second.proc.wait(timeout=30)
    assert len(Session.open(directory).history()) == 1


# -- pictures --------------------------------------------------------------------------------


def test_composites_follow_band_names_and_a_pool_wide_stretch(pool):
    true = PatchRenderer(pool)
    assert true.band_names == ["B04", "B03", "B02"]
    false = PatchRenderer(pool, "false")
    assert false.band_names == ["B08", "B04", "B03"]
    assert available_presets(pool.bands) == ["true", "false"]
    # Red of the false-colour picture is B08 stretched between the pool-wide limits.
    b08 = np.asarray(pool.patches[7][pool.bands.index("B08")], dtype=np.float64)
    low, high = false._limits[:, 0]
    expected = np.clip((b08 - low) / (high - low), 0, 1) * 255 + 0.5
    np.testing.assert_array_equal(false.composite(7)[:, :, 0], expected.astype(np.uint8))
    # The same stretch for every patch: a dark patch stays darker than a bright one.
    brightness = [true.composite(k).mean() for k in range(len(pool))]
    assert max(brightness) - min(brightness) > 100
    per_patch = PatchRenderer(pool, stretch="patch")
    assert np.ptp([per_patch.composite(k).mean() for k in range(20)]) < np.ptp(brightness[:20])

    picture = true.pair(3, 4)
    assert picture.shape == (256 + 18, 256 + 8 + 256, 3) and picture.dtype == np.uint8
    explicit = PatchRenderer(pool, "B12,B8A,B04")
    assert explicit.band_names == ["B12", "B8A", "B04"]


def test_places_are_footprint_centroids_and_bad_bands_are_named(pool, tmp_path):
    renderer = PatchRenderer(pool)
    footprints = pool.footprints
    row = footprints[footprints["patch_id"] == 11].iloc[0]
    lon, lat = renderer.places[11]
    assert row.geometry.contains(shapely.Point(lon, lat))
    assert renderer.place(11) == f"{lat:.4f}°N {lon:.4f}°E"
    assert "640 m x 640 m" in renderer.describe(11)

    with pytest.raises(DataError, match="band 'B99' is not in this pool.*B8A"):
        PatchRenderer(pool, "B99,B04,B03")
    with pytest.raises(ConfigError, match="three bands"):
        PatchRenderer(pool, ["B04", "B03"])
    with pytest.raises(ConfigError, match="neither a preset"):
        PatchRenderer(pool, "infrared")
    for name in ("Forest", "River"):  # a small class-folder pool of 8-bit RGB JPEGs
        (tmp_path / "rgb" / name).mkdir(parents=True)
        for jpg in sorted((SAMPLE / "eurosat_rgb" / name).glob("*.jpg"))[:3]:
            (tmp_path / "rgb" / name / jpg.name).write_bytes(jpg.read_bytes())
    rgb = PatchPool.load(tmp_path / "rgb")
    with pytest.raises(DataError, match="'B08' is not in this pool"):
        PatchRenderer(rgb, "false")
    jpeg = PatchRenderer(rgb)
    assert jpeg.place(0) == "place unknown (no georeference)"
    with pytest.raises(DataError, match="cannot write the pair picture"):
        jpeg.write_pair(0, 1, tmp_path / "missing" / "pair.png")
