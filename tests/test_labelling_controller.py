"""The labelling controller every front end drives, the scene locator and the web API.

Real sessions over the EuroSAT-MS sample and over a pool cut from the Major TOM cell
(real SQLite, real training); the web API is served in-process by uvicorn and called over
HTTP on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.labelling import locator as locator_module
from anneal_geo.labelling.controller import LabellingConflict, LabellingController
from anneal_geo.labelling.locator import LEFT_COLOUR, RIGHT_COLOUR, SceneLocator
from anneal_geo.session import Session, SessionConfig

SAMPLE = Path(__file__).resolve().parent.parent / "sample_tiles"
CELL = SAMPLE / "majortom_s2l2a_tile"


def new_session(directory: Path, pool_dir: Path, **settings: Any) -> Session:
    config = SessionConfig(
        data=str(pool_dir),
        annotator="widget",
        initial=settings.pop("initial", 6),
        budget=settings.pop("budget", 4),
        rounds=settings.pop("rounds", 1),
        epochs=5,
        seed=4,
        **settings,
    )
    return Session.create(directory, config, {"pool_dir": str(pool_dir)})


def stored(session: Session) -> list[tuple[int, int, int, int | None]]:
    with sqlite3.connect(session.store_path) as db:
        return db.execute("SELECT i, j, answer, undoes FROM answers ORDER BY seq").fetchall()


@pytest.fixture(scope="module")
def tile_pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Major TOM cell cut into 64 px patches (four 10 m bands), saved as a pool."""
    directory = tmp_path_factory.mktemp("tiles") / "majortom_pool"
    PatchPool.from_tiles(CELL, 64, bands=["B02", "B03", "B04", "B08"], progress=False).save(
        directory
    )
    return directory


def test_state_answer_skip_undo_and_training(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        controller = LabellingController(engine, "tester")
        round_pairs = [tuple(p) for p in engine.round_pairs().tolist()]
        state = controller.state(prefetch=2)
        assert json.loads(json.dumps(state)) == state, "the state must be JSON as it is"
        assert state["phase"] == "answering" and state["undo"] is None
        assert (state["pair"]["i"], state["pair"]["j"]) == round_pairs[0]
        assert [tuple(p) for p in state["upcoming"]] == round_pairs[1:3]
        assert set(state["patches"]) == {str(p) for pair in round_pairs[:3] for p in pair}
        assert state["progress"]["budget_total"] == 6 + 4
        assert [p["value"] for p in state["bands"]["presets"]] == ["true", "false"]
        assert state["locator"] is False  # EuroSAT patches do not share scenes

        first = controller.answer("similar", pair=round_pairs[0])
        assert first.seq == 1 and not first.repeated and "saved answer 1" in first.message()
        assert stored(session) == [(*round_pairs[0], 1, None)]
        # Repeated (a retried request): acknowledged, not written again.
        again = controller.answer(1, pair=round_pairs[0])
        assert again.repeated and again.seq is None and len(stored(session)) == 1
        # A different answer for an answered pair, or any answer for a pair not yet shown,
        # is refused.
        with pytest.raises(LabellingConflict, match="not the pair being asked"):
            controller.answer("dissimilar", pair=round_pairs[0])
        with pytest.raises(LabellingConflict, match="not the pair being asked"):
            controller.answer("similar", pair=round_pairs[2])
        with pytest.raises(ConfigError, match="must be similar"):
            controller.answer("perhaps")
        controller.skip(pair=round_pairs[1])
        assert controller.undo_target() == round_pairs[1]
        with pytest.raises(LabellingConflict, match="nothing was undone"):
            controller.undo(pair=round_pairs[0])
        assert controller.undo(pair=round_pairs[1]) == round_pairs[1]
        assert controller.next_pair() == round_pairs[1]
        assert controller.undo() == round_pairs[0]
        assert controller.undo() is None and "nothing to undo" in controller.last_message
        assert len(engine.store) == 0

        for pair in round_pairs:
            controller.answer("dissimilar" if pair[0] % 2 else "similar", pair=pair)
        assert controller.round_complete and controller.state()["phase"] == "round_complete"
        with pytest.raises(LabellingConflict, match="fully answered"):
            controller.answer("similar")
        assert controller.training_estimate() is None
        record = controller.finish_round()
        assert record["round"] == 0 and controller.train_seconds[0] > 0
        # The next round's pairs are chosen within finish_round: the wait is one call.
        assert session.load_pending()[0] == 1
        assert controller.training_estimate() == controller.train_seconds[0]
        state = controller.state()
        assert state["progress"]["round"] == 1 and state["history"][0]["queried_pairs"] == 6
        assert controller.undo_target() is None, "a trained round's answers are kept"
        assert {row[0:2] for row in stored(session)} == set(round_pairs)
        with sqlite3.connect(session.store_path) as db:
            assert {r[0] for r in db.execute("SELECT annotator FROM answers")} == {"tester"}


def test_pictures_bands_and_neighbours(tmp_path, pool_dir, pool):
    session = new_session(tmp_path / "s", pool_dir)
    with Engine(session, pool, progress=False) as engine:
        controller = LabellingController(engine, bands="B12,B8A,B04")
        assert controller.bands == "B12,B8A,B04"
        picture = Image.open(io.BytesIO(controller.patch_png(3)))
        assert picture.size == pool.patch_size[::-1] and picture.mode == "RGB"
        # The pool-wide stretch: the same pixels as the renderer's composite.
        np.testing.assert_array_equal(
            np.asarray(picture), controller.renderer("B12,B8A,B04").composite(3)
        )
        assert controller.set_bands("false") == "false"
        assert controller.state()["bands"]["current"] == "false"
        with pytest.raises(DataError, match="B99"):
            controller.set_bands("B99,B04,B03")
        with pytest.raises(ConfigError, match="three bands"):
            controller.patch_png(3, "B04,B03")

        embeddings = engine.embeddings
        expected = np.argsort(-(embeddings @ embeddings[7]), kind="stable")
        expected = [int(k) for k in expected if k != 7][:5]
        assert controller.neighbours(7, k=5) == expected
        with pytest.raises(ConfigError, match="out of range"):
            controller.neighbours(len(pool))


def test_scene_locator_outlines_both_patches_on_the_preview_or_a_mosaic(tile_pool_dir, monkeypatch):
    from anneal_geo.annotators.render import PatchRenderer

    pool = PatchPool.open(tile_pool_dir)
    renderer = PatchRenderer(pool)
    locator = SceneLocator.for_pool(pool, renderer)
    assert locator is not None and locator.note == "scene preview"
    assert len(locator.scenes) == 1 and locator.scenes[0].from_preview
    i, j = 0, len(pool) - 1  # north-west and south-east corners of the grid
    picture = np.asarray(Image.open(io.BytesIO(locator.jpeg(i, j))).convert("RGB"))
    assert max(picture.shape[:2]) == locator_module.PICTURE_SIZE
    scale = locator.scenes[0].scale

    def colour_near(patch: int) -> np.ndarray:
        row, col, h, _ = locator.windows[patch] * scale
        edge = picture[int(row + h / 2), int(col) : int(col) + 2]  # the left edge
        return edge.astype(np.int64).mean(axis=0)

    assert np.abs(colour_near(i) - LEFT_COLOUR).max() < 60
    assert np.abs(colour_near(j) - RIGHT_COLOUR).max() < 60

    # No preview beside the scene: a mosaic of the pool's own patches stands in.
    monkeypatch.setattr(locator_module, "find_preview", lambda source: None)
    mosaic = SceneLocator.for_pool(pool, renderer)
    assert mosaic is not None and mosaic.note == "scene mosaic of the pool's patches"
    inside = np.asarray(mosaic.scenes[0].picture)
    row, col, h, w = (round(v) for v in mosaic.windows[40] * mosaic.scenes[0].scale)
    expected = np.asarray(
        Image.fromarray(renderer.composite(40)).resize((w, h), Image.Resampling.BOX)
    )
    assert np.abs(inside[row : row + h, col : col + w].astype(int) - expected).mean() < 2

    eurosat = PatchPool.load(SAMPLE / "eurosat_ms")
    assert SceneLocator.for_pool(eurosat, PatchRenderer(eurosat)) is None


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.read(), response.headers["content-type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["content-type"]


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_web_api_over_http_on_a_tile_pool(tmp_path, tile_pool_dir):
    from anneal_geo.labelling.web import start_in_thread

    session = new_session(tmp_path / "s", tile_pool_dir, initial=4, budget=2)
    running = start_in_thread(session.directory)
    try:
        url = running.url
        assert url.startswith("http://127.0.0.1:")
        status, page, kind = _get(url)
        assert status == 200 and b'src="/static/app.js"' in page and "text/html" in kind
        for name in ("app.js", "labeller.js", "app.css"):
            assert _get(url + "static/" + name)[0] == 200
        status, hello = _post(url + "api/hello", {})
        token, state = hello["token"], hello["state"]
        assert status == 200 and state["locator"] is True and state["phase"] == "answering"
        i, j = state["pair"]["i"], state["pair"]["j"]
        status, body, kind = _get(f"{url}api/locator/{i}/{j}.jpg")
        assert status == 200 and kind == "image/jpeg" and body[:2] == b"\xff\xd8"
        status, body, kind = _get(f"{url}api/patch/{i}.png?bands=false")
        assert status == 200 and kind == "image/png" and body[:4] == b"\x89PNG"
        assert _get(f"{url}api/patch/{i}.png?bands=B99,B04,B03")[0] == 400
        assert _get(f"{url}api/patch/99999.png")[0] == 404
        status, body, _ = _get(f"{url}api/neighbours/{i}?k=3")
        assert status == 200 and len(json.loads(body)["ids"]) == 3

        # Only the newest client answers; answers name their pair.
        status, reply = _post(url + "api/answer", {"token": "stale", "value": "y", "pair": [i, j]})
        assert status == 409 and reply["elsewhere"] and "another tab" in reply["error"]
        status, reply = _post(url + "api/answer", {"token": token, "value": "y", "pair": [i, j]})
        assert status == 200 and reply["seq"] == 1 and reply["state"]["undo"] == [i, j]
        status, reply = _post(url + "api/answer", {"token": token, "value": "y", "pair": [i, j]})
        assert status == 200 and reply["repeated"]
        status, reply = _post(url + "api/answer", {"token": token, "value": "n", "pair": [i, j]})
        assert status == 409 and reply["conflict"]
        status, reply = _post(url + "api/undo", {"token": token, "pair": [i, j]})
        assert status == 200 and reply["undone"] == [i, j]
        status, reply = _post(url + "api/undo", {"token": token, "pair": [i, j]})
        assert status == 409  # nothing more about that pair to undo
        assert _post(url + "api/answer", {"token": token, "value": "y"})[0] == 200
        bad = urllib.request.Request(url + "api/answer", data=b"[1]", method="POST")
        try:
            urllib.request.urlopen(bad)
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and b"JSON object" in exc.read()
        # Host headers other than this machine's names are refused (DNS rebinding).
        foreign = urllib.request.Request(url, headers={"Host": "example.org"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(foreign)
        assert refused.value.code == 400
        _, state = _post(url + "api/hello", {})
        assert [r[0:3] for r in stored(session)] == [(i, j, 1), (i, j, 1), (i, j, 1)]
        assert [r[3] is None for r in stored(session)] == [True, False, True]
    finally:
        running.stop()
    # The server's engine is closed: the session can be opened for writing again.
    with Engine(Session.open(session.directory), PatchPool.open(tile_pool_dir), progress=False):
        pass


def test_the_plot_map_is_framed_on_the_results_and_the_query():
    from anneal_geo.retrieval.plots import map_extent

    # One 640 m patch: framed with its surroundings, not the continent.
    west, south, east, north = map_extent([(4.50, 48.80, 4.509, 48.806)])
    assert west < 4.50 and east > 4.509 and south < 48.80 and north > 48.806
    assert east - west < 0.05 and north - south < 0.05
    # Results and a query far apart: both inside.
    box = map_extent([(10.0, 50.0, 10.01, 50.01), (12.0, 51.0, 12.01, 51.01)])
    assert box[0] < 10.0 and box[2] > 12.01 and box[1] < 50.0 and box[3] > 51.01
    with pytest.raises(ValueError, match="no finite bounds"):
        map_extent([(float("nan"),) * 4])
