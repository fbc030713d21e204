"""session.toml written by anneal-geo 0.1.0 and by the current writer read back the same.

``fixtures/session_v010.toml`` is the exact output of the hand-written TOML writer of
anneal-geo 0.1.0 for ``CONFIG`` and ``META`` below (escaped unicode, inline tables for nested
options, ``None`` values left out); the current writer is ``tomli_w``.
"""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from anneal_geo.session import SETTINGS_ADDED_LATER, Session, SessionConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "session_v010.toml"

CONFIG = SessionConfig(
    data='C:\\Users\\Zoë\\EuroSAT "MS" — 13 bands',
    estimator="committee",
    selector="coreset",
    backbone="resnet18",
    annotator="oracle",
    rounds=8,
    budget=50,
    initial=40,
    initial_nn_fraction=0.25,
    seed=7,
    candidates="knn",
    knn_k=30,
    far_fraction=0.05,
    shortlist_factor=12,
    train_mode="full",
    epochs=6,
    margin=0.35,
    embedding_dim=64,
    query_fraction=0.15,
    eval_k=10,
    bands=["B02", "B03", "B04", "B08", "B8A", "B11"],
    threads=2,
    estimator_options={
        "members": 9,
        "member": "logistic",
        "l2": 1e-05,
        "max_pairs": 20000,
        "schedule": {"warmup": 2, "decay": 0.5, "enabled": True, "steps": [50, 100, 150]},
        "B08/B04 weight": 1.5,
    },
    selector_options={"weight": 0.25, "start": "uncertain", "unused": None},
    backbone_options={
        "weights": None,
        "weights_bands": ["B04", "B03", "B02"],
        "normalize": "auto",
        "allow_download": False,
    },
    annotator_options={"noise": 0.1, "jaccard": 0.5, "any_shared": False},
)
META: dict[str, Any] = {
    "pool_dir": "/data/tiles/Zürich \\ Genève/pool",
    "pool_fingerprint": "3f5a9c0e1b7d2a4c",
    "note": 'tile "T32TLT", tab\there, ünïcödé Ω → 北',
    "reference": None,
}


def _document(path: Path) -> dict[str, Any]:
    """session.toml parsed, without the version of anneal-geo that wrote it."""
    data = tomllib.loads((path / "session.toml").read_text(encoding="utf-8"))
    data.pop("anneal_geo_version")
    return data


@pytest.fixture
def old_session(tmp_path: Path) -> Path:
    directory = tmp_path / "old"
    (directory / "checkpoints").mkdir(parents=True)
    shutil.copyfile(FIXTURE, directory / "session.toml")
    return directory


def test_the_fixture_is_the_old_writers_output() -> None:
    text = FIXTURE.read_text(encoding="utf-8")
    assert 'anneal_geo_version = "0.1.0"' in text
    assert "schedule = {warmup = 2" in text  # nested options as an inline table
    assert "\\u00fc" in text  # non-ASCII escaped
    assert "unused" not in text and "weights =" not in text and "reference" not in text


def test_a_0_1_0_session_file_opens_with_its_settings(old_session: Path) -> None:
    session = Session.open(old_session)
    expected = CONFIG.to_dict() | SETTINGS_ADDED_LATER  # a 0.1.0 session keeps its behaviour
    del expected["selector_options"]["unused"]  # None: not written, so not read back
    del expected["backbone_options"]["weights"]
    assert session.config.to_dict() == expected
    assert session.config.estimator_options["schedule"]["steps"] == [50, 100, 150]
    assert session.meta == {k: v for k, v in META.items() if v is not None}


def test_settings_added_after_0_1_0_keep_an_old_session_behaving_as_before(
    old_session: Path,
) -> None:
    opened = Session.open(old_session).config
    assert opened.mix == 0.0 and opened.pair_budget == 0  # no mixing, every pair trained on
    assert opened.lr == 1e-3  # the head's learning rate before it became a setting
    assert opened.initial_design == "random"  # round 0 as it was picked then
    assert opened.ema == 0.0  # the last trained weights embed, as before averaging
    assert opened.query_expansion == 0  # queries ranked as they are, as before expansion
    fresh = SessionConfig()
    before = (opened.mix, opened.pair_budget, opened.lr, opened.ema, opened.query_expansion)
    assert (fresh.mix, fresh.pair_budget, fresh.lr, fresh.ema, fresh.query_expansion) != before


def test_the_current_writer_gives_the_same_session(old_session: Path, tmp_path: Path) -> None:
    config = replace(CONFIG, **SETTINGS_ADDED_LATER)
    new = Session.create(tmp_path / "new", config, META).directory
    assert "[estimator_options.schedule]" in (new / "session.toml").read_text(encoding="utf-8")
    old_opened, new_opened = Session.open(old_session), Session.open(new)
    assert new_opened.config == old_opened.config
    assert new_opened.meta == old_opened.meta
    old_document = _document(old_session)
    old_document["settings"] |= SETTINGS_ADDED_LATER
    assert _document(new) == old_document


def test_resaving_a_0_1_0_session_reads_back_equal(old_session: Path) -> None:
    before = _document(old_session)
    session = Session.open(old_session)
    session.save_settings()  # rewrites session.toml with the current writer
    assert (old_session / "session.toml").read_text(encoding="utf-8") != FIXTURE.read_text(
        encoding="utf-8"
    )
    before["settings"] |= SETTINGS_ADDED_LATER  # now written out, with the values it ran with
    assert _document(old_session) == before
    again = Session.open(old_session)
    assert again.config == session.config
    assert again.meta == session.meta


def test_none_values_are_left_out_at_every_depth(tmp_path: Path) -> None:
    config = SessionConfig(
        bands=None,
        backbone_options={"weights": None, "extra": {"a": None, "b": 1, "c": {"d": None}}},
    )
    session = Session.create(tmp_path / "s", config, {"pool_dir": None, "x": 1})
    text = session.toml_path.read_text(encoding="utf-8")
    assert "bands" not in text and "weights" not in text and "pool_dir" not in text
    reopened = Session.open(session.directory)
    assert reopened.config.bands is None
    assert reopened.config.backbone_options == {"extra": {"b": 1, "c": {}}}
    assert reopened.meta == {"x": 1}


def test_characters_outside_the_basic_plane_and_unicode_keys_round_trip(tmp_path: Path) -> None:
    # The 0.1.0 writer wrote these as surrogate escapes and bare non-ASCII keys, which no
    # TOML reader accepts.
    config = SessionConfig(data="/tiles/🛰️ Sentinel-2", annotator_options={"Zürich": "🌍"})
    session = Session.create(tmp_path / "s", config)
    reopened = Session.open(session.directory)
    assert reopened.config == config


def test_a_session_written_with_an_earlier_default_keeps_it(tmp_path: Path) -> None:
    # A session created when 4,096 pairs a round was the default stores that value and
    # trains on it after the default became 2,048; so does any value set by hand.
    assert SessionConfig().pair_budget == 2048
    earlier = Session.create(tmp_path / "earlier", replace(CONFIG, pair_budget=4096), META)
    text = (earlier.directory / "session.toml").read_text(encoding="utf-8")
    assert "pair_budget = 4096" in text
    assert Session.open(earlier.directory).config.pair_budget == 4096
