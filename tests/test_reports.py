"""What a session leaves for people, on real sessions over the EuroSAT-MS sample: the answers
exported as GeoPackage (read back with geopandas) and CSV, the listing of sessions, and the
HTML report (parsed, every picture decoded)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from PIL import Image
from typer.testing import CliRunner

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.cli import app
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.pairs.store import PairStore
from anneal_geo.reports import answers_table, build_report, export_answers, list_sessions
from anneal_geo.reports.answers import ANSWER_COLUMNS
from anneal_geo.session import Session, SessionConfig


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def run_session(directory: Path, pool_dir: Path, **settings) -> Path:
    config = SessionConfig(
        data=str(pool_dir), rounds=1, budget=10, initial=20, epochs=5, embedding_dim=16,
        **settings,
    )  # fmt: skip
    session = Session.create(directory, config, {"pool_dir": str(pool_dir)})
    with Engine(session, PatchPool.open(pool_dir), progress=False) as engine:
        engine.run()
    return directory


@pytest.fixture(scope="module")
def session_dir(pool_dir, tmp_path_factory) -> Path:
    """Two finished rounds on EuroSAT-MS (30 answers); then a person undoes the last two
    answers, answers the last pair again, undoes that and answers it once more."""
    directory = run_session(tmp_path_factory.mktemp("runs") / "eurosat", pool_dir)
    with PairStore(directory / "annotations.sqlite") as store:
        pair = store.undo(annotator="me")
        store.undo(annotator="me")  # the answer before it: undone for good
        assert pair is not None
        store.add(*pair, 0, round=1, annotator="me")
        store.undo(annotator="me")
        store.add(*pair, 1, round=1, annotator="me")
    return directory


class ColourAnnotator(Annotator):
    """Answers from the patches' mean red reflectance (a scripted person)."""

    def annotate(self, pairs, pool):
        red = pool.float_patches(np.unique(pairs))[:, pool.bands.index("B04")].mean(axis=(1, 2))
        value = dict(zip(np.unique(pairs).tolist(), red.tolist(), strict=True))
        for i, j in pairs.tolist():
            yield int(abs(value[i] - value[j]) < 150)


@pytest.fixture(scope="module")
def unlabelled_session(pool, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    bare = PatchPool(np.asarray(pool.patches), pool.bands, sources=pool.sources,
                     source_crs=pool.source_crs)  # fmt: skip
    bare._footprint_source = lambda: pool.footprints
    bare.save(base / "pool")
    plugins.register(ColourAnnotator, name="colour-script")
    try:
        return run_session(base / "unlabelled", base / "pool", annotator="colour-script")
    finally:
        plugins.unregister("colour-script", "annotators")


def test_the_answers_table_marks_undone_answers(session_dir, pool) -> None:
    table = answers_table(Session.open(session_dir), pool)
    assert list(table.columns) == list(ANSWER_COLUMNS)
    assert len(table) == 32  # 30 asked, 2 answered again by a person
    assert table["undone"].sum() == 3 and table["in_effect"].sum() == 29
    mine = table[table["annotator"] == "me"]
    assert mine["undone"].tolist() == [True, False] and mine["undone_by"].iloc[0] == "me"
    assert mine["in_effect"].tolist() == [False, True]
    assert table["undone"].iloc[28:30].tolist() == [True, True]  # the last two asked
    with PairStore(session_dir / "annotations.sqlite") as store:
        pairs, labels, _ = store.answers(include_skipped=True)
    effective = table[table["in_effect"]]  # the store's effective answers, in seq order
    np.testing.assert_array_equal(effective[["patch_i", "patch_j"]].to_numpy(), pairs)
    np.testing.assert_array_equal(effective["answer"].to_numpy(), labels)
    assert (effective["label_i"] == [pool.label_text(i) for i in effective["patch_i"]]).all()
    assert table["time"].str.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00").all()


def test_export_as_geopackage_reads_back_as_lines_and_footprints(session_dir, pool, tmp_path):
    path, count = export_answers(session_dir, tmp_path / "answers.gpkg")
    assert count == 32
    assert [name for name, _ in pyogrio.list_layers(path)] == ["answers", "patches"]
    answers = gpd.read_file(path, layer="answers")
    assert len(answers) == 32 and answers.crs.to_epsg() == 4326
    assert set(answers.geom_type) == {"LineString"}
    footprints = pool.footprints
    for row in answers.head(5).itertuples():
        start, end = shapely.get_coordinates(row.geometry)
        np.testing.assert_allclose(start, footprints.geometry.iloc[row.patch_i].centroid.coords[0])
        np.testing.assert_allclose(end, footprints.geometry.iloc[row.patch_j].centroid.coords[0])
        outline = shapely.from_wkt(row.footprint_i)
        assert outline.equals_exact(footprints.geometry.iloc[row.patch_i], 1e-9)
    assert answers["undone"].sum() == 3 and answers["in_effect"].sum() == 29
    assert set(answers["answer_name"]) <= {"similar", "dissimilar"}
    patches = gpd.read_file(path, layer="patches")
    ids = set(answers["patch_i"]) | set(answers["patch_j"])
    assert set(patches["patch_id"]) == ids and set(patches.geom_type) == {"Polygon"}
    assert patches["answers"].sum() == 2 * 32


def test_export_as_csv_and_parquet(session_dir, tmp_path) -> None:
    path, count = export_answers(session_dir, tmp_path / "answers.csv")
    frame = pd.read_csv(path)
    assert len(frame) == count == 32
    assert {"footprint_i", "footprint_j", "link"} <= set(frame.columns)
    assert shapely.from_wkt(frame["link"].iloc[0]).geom_type == "LineString"
    # GeoParquet (pyarrow comes with the `parquet` extra): the same rows and lines as the
    # GeoPackage, CRS included.
    parquet, _ = export_answers(session_dir, tmp_path / "answers.parquet")
    gpkg, _ = export_answers(session_dir, tmp_path / "answers.gpkg")
    from_parquet = gpd.read_parquet(parquet)
    from_gpkg = gpd.read_file(gpkg, layer="answers")
    assert len(from_parquet) == 32 and from_parquet.crs == from_gpkg.crs
    assert list(from_parquet["answer"]) == list(from_gpkg["answer"])
    assert all(from_parquet.geometry.geom_equals_exact(from_gpkg.geometry, 1e-9))
    assert set(from_parquet.geom_type) == {"LineString"}
    with pytest.raises(ConfigError):
        export_answers(session_dir, tmp_path / "answers.xlsx")


def test_sessions_are_listed_with_their_state(session_dir, unlabelled_session, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(session_dir, root / "a")
    shutil.copytree(unlabelled_session, root / "nested" / "b")
    (root / "broken").mkdir()
    (root / "broken" / "session.toml").write_text("not toml [")
    found = {s.path.name: s for s in list_sessions(root)}
    assert set(found) == {"a", "b", "broken"}
    a = found["a"]
    assert (a.rounds_done, a.rounds_total, a.answers) == (2, 2, 29)
    last = json.loads((session_dir / "history.jsonl").read_text().splitlines()[-1])
    assert a.last_map == pytest.approx(last["map@20"]) and a.backbone == "texture"
    assert found["b"].last_map is None and found["b"].annotator == "colour-script"
    assert "not valid TOML" in found["broken"].error
    listed = CliRunner().invoke(app, ["session", "list", str(root)])
    assert listed.exit_code == 0, listed.output
    assert "map@20" in listed.output and "unreadable" in listed.output
    assert "29 (" in listed.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(app, ["session", "list", str(tmp_path / "empty")])
    assert empty.exit_code == 0 and "no sessions under" in empty.output
    missing = CliRunner().invoke(app, ["session", "list", str(tmp_path / "nowhere")])
    assert isinstance(missing.exception, DataError) and "is not a folder" in str(missing.exception)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"])
        for key in ("href", "src"):
            if key in values and tag != "img":
                self.links.append(values[key])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def decoded(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")  # embedded: no file, no network
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    assert image.format == "PNG" and min(image.size) > 50
    return image


def test_the_report_is_one_page_with_every_picture_inside(session_dir, tmp_path) -> None:
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["session", "report", str(session_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    page = parse(text)
    assert page.headings == [
        "Summary",
        "Learning curve (mAP@20)",
        "Answers per round",
        "Implied pairs and contradictions",
        "Last round's pairs",
        "Embedding (PCA)",
    ]
    assert page.links == [] and "http://" not in text and "https://" not in text
    images = [decoded(src) for src in page.images]
    # learning curve, answers per round, implied pairs, the embedding, and the last round's
    # pairs in effect (10 asked, one undone for good leaves 9)
    assert len(images) == 4 + 9
    assert "could not be drawn" not in text and "No embedding view" not in text
    assert "Round 1: 9 answered pair(s)." in text
    assert "(3 undone answers)" in text


def test_an_unlabelled_session_reports_without_a_learning_curve(unlabelled_session) -> None:
    text = build_report(unlabelled_session, gallery=3)
    page = parse(text)
    assert "No learning curve" in text
    images = [decoded(src) for src in page.images]
    assert len(images) == 3 + 3  # answers, implied, embedding, and 3 gallery pairs
    assert "the first 3 shown" in text


def test_a_repairing_session_says_what_training_left_out(pool_dir, tmp_path) -> None:
    # A person who errs (the oracle flips 30 % of its answers), with repair = split.
    config = SessionConfig(
        data=str(pool_dir), rounds=2, budget=40, initial=40, epochs=5, embedding_dim=16,
        repair="split", annotator_options={"noise": 0.3},
    )  # fmt: skip
    session = Session.create(tmp_path / "noisy", config, {"pool_dir": str(pool_dir)})
    with Engine(session, PatchPool.open(pool_dir), progress=False) as engine:
        engine.run()
    suspects = int(session.history()[-1]["suspect_answers"])
    assert suspects > 0
    text = build_report(session.directory, gallery=0)
    assert f"repair = split: {suspects} answer(s) left out of the last round" in text
    # Without repair the report says nothing of suspects.
    plain = build_report(run_session(tmp_path / "plain", pool_dir), gallery=0)
    assert "left out of the last round" not in plain
