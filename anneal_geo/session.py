"""A session directory: every setting, every answer, the history and the checkpoints.

Layout::

    DIR/session.toml          every setting, seeds, plugin names and versions
    DIR/annotations.sqlite    every answer, append-only (PairStore)
    DIR/history.jsonl         one JSON object per finished round
    DIR/pending.json          the pairs of the round being annotated (resume asks the rest)
    DIR/split.json            archive / query patch ids of the evaluation split
    DIR/pool/                 the pool, unless the session points at an existing pool dir
    DIR/checkpoints/          state dicts only (loaded with weights_only=True)

Every file is readable data (TOML, JSON lines, SQLite, .npy), never a pickle.

One process writes to a session at a time: the writer holds ``DIR/session.lock``
(:mod:`anneal_geo.lock`; the :class:`~anneal_geo.engine.Engine` takes it). Every file is
written atomically (temporary file, then rename) except the two append-only ones
(``history.jsonl``, ``annotations.sqlite``), and every file is checked when read: a damaged
or missing one is a one-line :class:`~anneal_geo.errors.SessionError` naming it and saying
what to do, or a safe repair that is reported through :meth:`Session.notify` (a half-written
last line of ``history.jsonl`` is cut off before the next record is appended).

``session.toml`` also records each plugin's provenance (``[plugins.estimator]`` ...: name,
entry point, distribution, version, contract version), so a resumed session can say which
distribution to install or that a version changed.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import tomli_w

from anneal_geo.errors import ConfigError, SessionError

__all__ = ["SESSION_FORMAT_VERSION", "Session", "SessionConfig"]

#: Bumped when the session layout changes incompatibly.
SESSION_FORMAT_VERSION = 1

#: The plugin groups a session records, as (setting, plugin group).
PLUGIN_SETTINGS: tuple[tuple[str, str], ...] = (
    ("estimator", "estimators"),
    ("selector", "selectors"),
    ("backbone", "backbones"),
    ("annotator", "annotators"),
)


@dataclass
class SessionConfig:
    """Every setting of an ANNEAL session (defaults are the recommended settings).

    Every setting is checked by :meth:`validate` (when a session is created and each time
    ``session.toml`` is read): its type from the annotation below, whatever the setting, and
    its range for the settings that have one (``_RANGES``, or ``range``/``choices`` in the
    field's metadata). A setting added here is therefore type-checked without further code.

    Attributes:
        data: the pool source (class-per-folder directory, BigEarthNet folder or pool dir).
        estimator / selector / backbone / annotator: plugin names.
        rounds: active-learning rounds after the initial set.
        budget: pairs asked per round (b).
        initial: pairs in the initial set (b0).
        initial_nn_fraction: share of the initial set drawn among nearest-neighbour pairs
            (``initial_design = "random"``).
        initial_design: how round 0 picks its pairs: ``clusters`` (default: k-means of the
            starting embedding into ``initial // 2`` groups, each group's medoid paired with
            a random member and with the nearest other group's medoid; chosen on validation
            of both EuroSAT sets: a higher score with correct answers on both, level or
            higher with 10 % flipped, above class-label AL at every budget) or ``random``
            (random pairs, ``initial_nn_fraction`` of them among nearest neighbours; the
            earlier behaviour).
        seed: seed of every random source.
        candidates: ``auto``, ``exhaustive`` or ``knn``.
        knn_k: neighbours per patch for ``knn`` candidates; 0 = by pool size (50 up to
            200,000 patches, then fewer, down to 10 at 1M; see ``suggested_knn_k``).
        far_fraction: random far pairs added to ``knn`` candidates, as a share of the edges.
        shortlist_factor: the short-list holds ``shortlist_factor * budget`` pairs.
        train_mode: ``head`` (trunk features cached, head trained) or ``full``.
        epochs: training epochs per round (passes over the round's pairs, at least 50
            steps; the head continues from the previous round). 4 scored level with 30 on
            validation splits of both EuroSAT sets with correct answers and higher with
            10 % of the answers flipped: fewer steps memorise fewer wrong answers.
        lr: the head's learning rate (Adam). 2e-4 was chosen on the same validation splits
            from 1e-4, 2e-4, 3e-4 and 1e-3 (the earlier value): the best mean score of both
            sets with correct answers, and far better than 1e-3 with 10 % of them flipped.
        ema: decay per training step of the moving average of the head's weights that
            embeds, selects, is saved and exported (0 = the last trained weights); training
            continues from the trained weights. 0.9 was chosen on the validation splits of
            both EuroSAT sets from 0, 0.8, 0.9 and 0.95: the best score with correct answers
            and with 10 % of them flipped on both (a tired expert's wrong answers are
            averaged out rather than followed step by step).
        margin: contrastive margin (cosine distances lie in [0, 2]; 1.4 was best of 0.5,
            1.0, 1.4 and 2.0 on validation splits of both EuroSAT sets).
        mix: weight of the L2-normalised frozen trunk features concatenated to the head's
            output in the embedding (0 = the head's output alone; 0.25 was best of 0, 0.25,
            0.5 and 1 on the same validation splits).
        pair_budget: most labelled pairs a round trains on (every queried pair, the rest
            sampled from the implied ones, class-balanced; 0 = every pair). 2,048 was chosen
            on validation from 512, 1,024, 2,048, 3,072 and 4,096 (the earlier value): level
            with 4,096 with correct answers on both EuroSAT sets, and higher on EuroSAT-RGB
            with 10 % of the answers flipped (level on MS), as late in a session fewer of the
            implied pairs, which a wrong "similar" answer multiplies, are trained on, in fewer
            steps.
        transitivity: what the answers imply (METHOD.md 3.7): ``full`` (similar components
            and dissimilar cross blocks), ``similar`` (default: the components' similar pairs
            only; on the validation splits of both EuroSAT sets it matched ``full`` with
            consistent answers and lost less to wrong ones) or ``none`` (train on the answers
            alone).
        repair: how the closure treats answers that may be wrong (METHOD.md 3.7): ``none``
            (default: a contradicted component implies nothing), ``cut`` (the answers most
            likely wrong in a contradiction are left out of training as suspects and the rest
            keeps implying), ``split`` (``cut``, and also a "similar" joining two groups
            whose trunk features lie, as groups, beyond the distance that separates the
            answers) or ``confirm`` (two groups join only when a second answer across them
            agrees, a check pair the next round asks first, the answers across two groups
            being a vote; then ``cut``); for a person who errs, see the README. Stored
            answers never change.
        trim_loss: from the second round on, each training batch leaves out this share of its
            similar and of its dissimilar pairs with the largest loss (small-loss selection);
            0 (default) trains on every pair.
        embedding_dim: D of the metric space.
        query_expansion: retrieval averages each query's embedding with those of its
            ``query_expansion`` nearest archive patches before ranking (average query
            expansion; 0 = off). It changes what is retrieved, not what is trained or asked:
            the held-out evaluation and the index of the session (and of its exported model)
            search this way. 5 was chosen on the validation splits of both EuroSAT sets from
            0, 1, 2, 3, 5 and 10: the best mean score of both sets with correct answers and
            with 10 % of them flipped (RGB +0.011 and +0.018 mAP@20 at 2,000 answers, MS
            +0.002 and +0.015 at 500).
        query_fraction: share of each class held out as retrieval queries.
        eval_k: k of mAP@k.
        bands: band names to use, in order (None = all of the pool's bands).
        threads: torch / faiss threads (0 = library default).
    """

    data: str = ""
    estimator: str = "mgue"
    selector: str = "kmeans"
    backbone: str = "texture"
    annotator: str = "oracle"
    rounds: int = 5
    budget: int = 100
    initial: int = 100
    initial_nn_fraction: float = 0.5
    initial_design: str = "clusters"
    seed: int = 0
    candidates: str = "auto"
    knn_k: int = 0
    far_fraction: float = 0.1
    shortlist_factor: int = 10
    train_mode: str = "head"
    epochs: int = 4
    lr: float = 2e-4
    ema: float = 0.9
    margin: float = 1.4
    mix: float = 0.25
    pair_budget: int = 2048
    transitivity: str = "similar"
    repair: str = "none"
    trim_loss: float = 0.0
    embedding_dim: int = 128
    query_expansion: int = 5
    query_fraction: float = 0.2
    eval_k: int = 20
    bands: list[str] | None = None
    threads: int = 0
    estimator_options: dict[str, Any] = field(default_factory=dict)
    selector_options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    annotator_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> SessionConfig:
        """Check every setting's type and range; raise ConfigError naming the setting at
        fault. Integers given for float settings become floats."""
        hints = _setting_types()
        for item in fields(self):
            value = getattr(self, item.name)
            checked = _check_type(item.name, value, hints.get(item.name, Any))
            if checked is not value:
                setattr(self, item.name, checked)
            _check_range(item.name, checked, item.metadata)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SessionError(
                f"unknown settings {unknown} in session.toml; it was written by another "
                "anneal-geo version"
            )
        return cls(**data).validate()


#: Settings that session.toml files written before they existed lack, with the value that
#: keeps such a session behaving as it did when it was written (its default for a new
#: session may differ): retrieval without the mixed-in features, and training on every pair.
SETTINGS_ADDED_LATER: dict[str, Any] = {
    "mix": 0.0,
    "pair_budget": 0,
    "transitivity": "full",
    "repair": "none",
    "trim_loss": 0.0,
    "lr": 1e-3,
    "initial_design": "random",
    "ema": 0.0,
    "query_expansion": 0,
}


# -- checking settings: types from the annotations, ranges from a table ---------------------

#: Numeric settings with a range: name -> (what the message says, the test).
_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rounds": ("0 or more", lambda v: v >= 0),
    "budget": ("at least 1", lambda v: v >= 1),
    "initial": (
        "at least 2 (one similar and one dissimilar answer are needed to start)",
        lambda v: v >= 2,
    ),
    "initial_nn_fraction": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "knn_k": ("0 (by pool size) or more", lambda v: v >= 0),
    "far_fraction": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "shortlist_factor": ("at least 1", lambda v: v >= 1),
    "epochs": ("at least 1", lambda v: v >= 1),
    "margin": ("positive", lambda v: v > 0.0),
    "mix": ("a finite number, 0 or more", lambda v: 0.0 <= v < float("inf")),
    "pair_budget": ("0 (every pair) or at least 2", lambda v: v == 0 or v >= 2),
    "trim_loss": ("in [0, 0.5)", lambda v: 0.0 <= v < 0.5),
    "lr": ("above 0 and at most 1", lambda v: 0.0 < v <= 1.0),
    "ema": ("in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "embedding_dim": ("at least 1", lambda v: v >= 1),
    "query_expansion": ("0 (off) or more", lambda v: v >= 0),
    "query_fraction": ("in (0, 1)", lambda v: 0.0 < v < 1.0),
    "eval_k": ("at least 1", lambda v: v >= 1),
    "threads": ("0 (library default) or more", lambda v: v >= 0),
}

#: Settings with a fixed set of values.
_CHOICES: dict[str, tuple[str, ...]] = {
    "candidates": ("auto", "exhaustive", "knn", "uniform"),
    "train_mode": ("head", "full"),
    "transitivity": ("full", "similar", "none"),
    "initial_design": ("clusters", "random"),
    "repair": ("cut", "split", "confirm", "none"),
}


@cache
def _setting_types() -> dict[str, Any]:
    return typing.get_type_hints(SessionConfig)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_expected(a) for a in members) + " (or left out)"
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_expected(item).removeprefix('a ').removeprefix('an ')}"
    if origin is dict or tp is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_NOT_GIVEN = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (an int for a float becomes a float), or _NOT_GIVEN."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            out = _coerce(value, member)
            if out is not _NOT_GIVEN:
                return out
        return _NOT_GIVEN
    if tp is type(None):
        return None if value is None else _NOT_GIVEN
    if origin is list or tp is list:
        if not isinstance(value, list | tuple):
            return _NOT_GIVEN
        (item,) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item) for v in value]
        return _NOT_GIVEN if any(v is _NOT_GIVEN for v in items) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return _NOT_GIVEN
        return value if isinstance(value, dict) else dict(value)
    if tp is bool:
        return value if isinstance(value, bool) else _NOT_GIVEN
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT_GIVEN
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _NOT_GIVEN
        return value if isinstance(value, float) else float(value)
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _NOT_GIVEN
    return value


def _check_type(name: str, value: Any, tp: Any) -> Any:
    out = _coerce(value, tp)
    if out is _NOT_GIVEN:
        raise ConfigError(
            f"setting '{name}' must be {_expected(tp)}, got {value!r} ({_kind(value)})"
        )
    return out


def _check_range(name: str, value: Any, metadata: Mapping[str, Any]) -> None:
    choices = metadata.get("choices") or _CHOICES.get(name)
    if choices is not None and value not in choices:
        raise ConfigError(f"setting '{name}' is {value!r}; use {', '.join(map(str, choices))}")
    if "range" in metadata:
        low, high = metadata["range"]
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"setting '{name}' must lie in [{low}, {high}], got {value}")
    rule = _RANGES.get(name)
    if rule is not None and isinstance(value, int | float) and not rule[1](value):
        raise ConfigError(f"setting '{name}' must be {rule[0]}, got {value}")


# -- files --------------------------------------------------------------------------------


def _without_none(table: Mapping[str, Any]) -> dict[str, Any]:
    """The table without its None values, at every depth of nested tables (TOML has no null:
    an unset setting is left out and reads back as its default)."""
    return {
        key: _without_none(value) if isinstance(value, Mapping) else value
        for key, value in table.items()
        if value is not None
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    """numpy scalars (``np.int64``, ``np.float32``) in records, as Python numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _print_notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


class Session:
    """A session directory. Create with :meth:`create`, reopen with :meth:`open`.

    Attributes:
        directory: the session directory.
        config: its settings.
        meta: where the pool lives, its fingerprint.
        provenance: per plugin setting (``estimator`` ...), where the plugin came from:
            name, target, distribution, version, contract version (empty for sessions
            written before provenance was recorded, until a writer opens them).
        notices: every repair or warning said about this session, in order.
        on_notice: where notices go (default: ``note: ...`` on stderr).
    """

    def __init__(
        self,
        directory: Path,
        config: SessionConfig,
        meta: dict[str, Any],
        provenance: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.meta = meta
        self.provenance: dict[str, dict[str, Any]] = dict(provenance or {})
        self.notices: list[str] = []
        self.on_notice: Callable[[str], None] = _print_notice

    def notify(self, message: str) -> None:
        """Report a repair or a warning about this session (kept in :attr:`notices`)."""
        self.notices.append(message)
        self.on_notice(message)

    # -- paths -------------------------------------------------------------------------
    @property
    def toml_path(self) -> Path:
        return self.directory / "session.toml"

    @property
    def store_path(self) -> Path:
        return self.directory / "annotations.sqlite"

    @property
    def history_path(self) -> Path:
        return self.directory / "history.jsonl"

    @property
    def pending_path(self) -> Path:
        return self.directory / "pending.json"

    @property
    def split_path(self) -> Path:
        return self.directory / "split.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def pool_dir(self) -> Path:
        """Where the session's pool lives: its own copy or the pool dir it was given."""
        external = self.meta.get("pool_dir")
        return Path(external) if external else self.directory / "pool"

    # -- creation ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: str | Path,
        config: SessionConfig,
        meta: dict[str, Any] | None = None,
        *,
        provenance: dict[str, dict[str, Any]] | None = None,
    ) -> Session:
        """Create a new session directory; refuse to overwrite an existing session.

        Check everything that can be checked (settings, plugins, pool) before calling
        this: it is the step that writes (see :func:`anneal_geo.engine.check_settings`).
        """
        path = Path(directory)
        if (path / "session.toml").exists():
            raise SessionError(
                f"{path} already holds a session; continue it with `anneal-geo resume {path}` "
                "or choose another --out"
            )
        config = config.validate()
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "checkpoints").mkdir(exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise SessionError(
                f"cannot write the session directory {path}: {exc.strerror}; "
                "choose a writable --out"
            ) from exc
        session = cls(path, config, dict(meta or {}), provenance)
        session.save_settings()
        return session

    @classmethod
    def open(cls, directory: str | Path) -> Session:
        """Reopen a session; SessionError if it is missing or from an incompatible version,
        ConfigError naming the setting when ``session.toml`` holds a wrong value."""
        path = Path(directory)
        toml_path = path / "session.toml"
        if not toml_path.is_file():
            raise SessionError(f"{path} is not an anneal-geo session (no session.toml)")
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SessionError(f"{toml_path} is not valid TOML: {exc}") from exc
        version = data.get("session_format")
        if version != SESSION_FORMAT_VERSION:
            raise SessionError(
                f"{toml_path} has session_format {version!r}, this anneal-geo reads "
                f"{SESSION_FORMAT_VERSION}; open it with the anneal-geo version that wrote it "
                "or start a new session"
            )
        tables = {}
        for key in ("settings", "meta", "plugins"):
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{toml_path}: [{key}] must be a table, got {value!r}; fix the file"
                )
            tables[key] = value
        settings = dict(tables["settings"])
        for key, value in SETTINGS_ADDED_LATER.items():
            settings.setdefault(key, value)
        for key in (
            "estimator_options",
            "selector_options",
            "backbone_options",
            "annotator_options",
        ):
            settings[key] = data.get(key, {})
        try:
            config = SessionConfig.from_dict(settings)
        except ConfigError as exc:
            raise ConfigError(f"{toml_path}: {exc}; correct it in the file") from exc
        provenance = {k: v for k, v in tables["plugins"].items() if isinstance(v, dict)}
        return cls(path, config, tables["meta"], provenance)

    def save_settings(self) -> None:
        """Write session.toml (atomically)."""
        from anneal_geo import __version__

        settings = self.config.to_dict()
        options = {k: settings.pop(k) for k in list(settings) if k.endswith("_options")}
        document: dict[str, Any] = {
            "session_format": SESSION_FORMAT_VERSION,
            "anneal_geo_version": __version__,
            "settings": settings,
            "meta": self.meta,
            **options,
        }
        if self.provenance:
            document["plugins"] = self.provenance
        _atomic_write(self.toml_path, tomli_w.dumps(_without_none(document)))

    # -- history -----------------------------------------------------------------------
    def _read_history(self) -> tuple[list[dict[str, Any]], int | None, bool]:
        """The intact records, where a broken tail starts (None: intact) and whether the
        file lacks its final newline after a complete record."""
        try:
            raw = self.history_path.read_bytes()
        except FileNotFoundError:
            return [], None, False
        except OSError as exc:
            raise SessionError(
                f"cannot read {self.history_path} ({exc.strerror}); check its permissions"
            ) from exc
        records: list[dict[str, Any]] = []
        lines = raw.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict):
                records.append(record)
                continue
            if any(rest.strip() for rest in lines[number:]):
                raise SessionError(
                    f"{self.history_path} line {number} is damaged (not a round record) and "
                    "more records follow it; restore the file from a backup (the answers in "
                    f"{self.store_path.name} are not affected)"
                )
            return records, start, False
        return records, None, bool(raw) and not raw.endswith(b"\n")

    def history(self) -> list[dict[str, Any]]:
        """The finished rounds, in order (a half-written last line is not a round: it is
        left out here and cut off by :meth:`repair_history` before the next append)."""
        return self._read_history()[0]

    def repair_history(self) -> None:
        """Cut a half-written last line off ``history.jsonl`` (saying so), so the next record
        starts on a line of its own. Only a writer (holding the session lock) calls this."""
        records, broken, unterminated = self._read_history()
        if broken is None and not unterminated:
            return
        with open(self.history_path, "r+b") as handle:
            if broken is not None:
                size = handle.seek(0, os.SEEK_END)
                handle.truncate(broken)
                self.notify(
                    f"{self.history_path} ended in a half-written record ({size - broken} "
                    f"bytes); removed it, {len(records)} finished rounds remain (round "
                    f"{len(records)} is finished again from its saved answers)"
                )
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append_history(self, record: dict[str, Any]) -> None:
        """Append one round's record to history.jsonl and fsync it (after cutting off a
        half-written last line, if any)."""
        self.repair_history()
        line = json.dumps(record, sort_keys=False, default=_json_default) + "\n"
        with open(self.history_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    # -- progress, in the words every command uses ------------------------------------------
    @property
    def finished(self) -> bool:
        """Whether every round (the initial round 0 and ``rounds`` more) is finished."""
        return len(self.history()) >= 1 + self.config.rounds

    def next_round_text(self) -> str:
        """``"next: round 2 of 5"`` (rounds are numbered 0, the initial set, to ``rounds``,
        as ``anneal-geo label`` numbers them), or ``"no round left"``."""
        done, last = len(self.history()), self.config.rounds
        if done > last:
            return "no round left"
        return f"next: round {done} of {last}" + (" (the initial set)" if done == 0 else "")

    def round_progress(self) -> str:
        """``"rounds finished: 2 of 6; next: round 2 of 5"``, in the words every command
        uses (``session status``, ``resume``, ``run``)."""
        done, last = len(self.history()), self.config.rounds
        text = f"rounds finished: {done} of {last + 1}"
        if done > last:
            return f"{text} (round 0, the initial set, to round {last})"
        return f"{text}; {self.next_round_text()}"

    @staticmethod
    def answers_text(counts: Mapping[str, int], log: Mapping[str, int] | None = None) -> str:
        """``"6 answers stand (3 similar, 2 dissimilar, 1 skipped); 10 saved in all (8
        answers, 2 undos)"``: ``anneal-geo label`` numbers what it saves (``saved answer
        10``) over the whole log, undos included; the answers that stand are those not
        undone, one per pair."""
        stand = int(sum(counts.values()))
        text = (
            f"{stand} answers stand ({counts.get('similar', 0)} similar, "
            f"{counts.get('dissimilar', 0)} dissimilar, {counts.get('skipped', 0)} skipped)"
        )
        if log is not None:
            answers, undos = int(log.get("answers", stand)), int(log.get("undos", 0))
            if answers != stand or undos:
                undone = f"{undos} undo" + ("" if undos == 1 else "s")
                text += f"; {answers + undos} saved in all ({answers} answers, {undone})"
        return text

    # -- answers the session knows it had -------------------------------------------------
    def expected_answers(self) -> int:
        """How many answers (similar, dissimilar, skipped) the last finished round counted."""
        history = self.history()
        if not history:
            return 0
        last = history[-1]
        return int(last.get("queried_pairs", 0)) + int(last.get("skipped_pairs", 0))

    def check_store_file(self) -> None:
        """Refuse a missing or emptied ``annotations.sqlite`` when the session had begun.

        Raises:
            SessionError: the store is gone or 0 bytes while ``history.jsonl`` records
                finished rounds or ``pending.json`` a round in progress.
        """
        path = self.store_path
        state = "missing" if not path.exists() else "empty (0 bytes)"
        if path.exists() and path.stat().st_size > 0:
            return
        rounds = len(self.history())
        if rounds:
            had = (
                f"the session had {self.expected_answers()} answers after {rounds} finished "
                f"rounds ({self.history_path.name})"
            )
        elif self.pending_path.exists():
            had = f"the session had begun round 0 ({self.pending_path.name})"
        else:
            return  # a new session: the store is created now
        raise SessionError(
            f"{path} is {state} but {had}; restore annotations.sqlite from a backup (nothing "
            "was written), or start a new session"
        )

    def check_store_counts(self, counts: Mapping[str, int]) -> None:
        """Refuse a store holding fewer answers than the last finished round counted."""
        have = int(sum(counts.values()))
        expected = self.expected_answers()
        if have < expected:
            raise SessionError(
                f"{self.store_path} holds {have} answers but the session had {expected} "
                f"after round {len(self.history()) - 1} ({self.history_path.name}); the file "
                "was replaced or cut short: restore it from a backup (nothing was written)"
            )

    # -- the round in progress -----------------------------------------------------------
    def save_pending(
        self, round_index: int, pairs: list[list[int]], stats: dict[str, Any] | None = None
    ) -> None:
        """Write the round's pairs (and how they were selected) before any is asked."""
        document: dict[str, Any] = {"round": round_index, "pairs": pairs}
        if stats:
            document["stats"] = stats
        _atomic_write(self.pending_path, json.dumps(document, default=_json_default))

    def _pending_document(self) -> dict[str, Any] | None:
        path = self.pending_path
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._damaged_pending(f"not readable JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
            raise self._damaged_pending("no 'round' and 'pairs'")
        round_index = data.get("round")
        if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 0:
            raise self._damaged_pending(f"round {round_index!r} is not a round number")
        return data

    def _damaged_pending(self, why: str) -> SessionError:
        return SessionError(
            f"{self.pending_path} is damaged ({why}); delete it and run the command again: "
            "the round is then completed around the answers already given, within its budget"
        )

    def load_pending(self, n_patches: int | None = None) -> tuple[int, list[list[int]]] | None:
        """The round in progress and its pairs, or None.

        Args:
            n_patches: the pool size, to check the patch ids against.

        Raises:
            SessionError: ``pending.json`` is damaged (the message names it).
        """
        data = self._pending_document()
        if data is None:
            return None
        pairs: list[list[int]] = []
        for number, pair in enumerate(data["pairs"]):
            ok = (
                isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            )
            if not ok:
                raise self._damaged_pending(f"pair {number} is {pair!r}, not two patch ids")
            i, j = int(pair[0]), int(pair[1])
            if i < 0 or j < 0 or i == j or (n_patches is not None and max(i, j) >= n_patches):
                limit = "" if n_patches is None else f" of a {n_patches}-patch pool"
                raise self._damaged_pending(f"pair {number} ({i}, {j}) is not a pair{limit}")
            pairs.append([i, j])
        return int(data["round"]), pairs

    def pending_stats(self) -> dict[str, Any]:
        """How the pending round's pairs were selected (empty for files without it)."""
        data = self._pending_document()
        stats = data.get("stats") if data is not None else None
        return dict(stats) if isinstance(stats, dict) else {}

    def clear_pending(self) -> None:
        self.pending_path.unlink(missing_ok=True)

    # -- evaluation split ----------------------------------------------------------------
    def save_split(self, archive: list[int], query: list[int]) -> None:
        _atomic_write(self.split_path, json.dumps({"archive": archive, "query": query}))

    def load_split(self, n_patches: int | None = None) -> tuple[list[int], list[int]] | None:
        """The archive and query patch ids, or None; SessionError naming a damaged file."""
        if not self.split_path.exists():
            return None
        try:
            data = json.loads(self.split_path.read_text(encoding="utf-8"))
            archive, query = list(data["archive"]), list(data["query"])
            ids = archive + query
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError("ids must be patch numbers")
            if n_patches is not None and ids and max(ids) >= n_patches:
                raise ValueError(f"patch id {max(ids)} is outside the {n_patches}-patch pool")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise SessionError(
                f"{self.split_path} is damaged ({exc}); restore it from a backup (it fixes "
                "which patches are held out for evaluation)"
            ) from exc
        return archive, query

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_path(self, round_index: int) -> Path:
        return self.checkpoint_dir / f"round_{round_index:04d}.pt"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        found = sorted(self.checkpoint_dir.glob("round_*.pt"))
        if not found:
            return None
        last = found[-1]
        return int(last.stem.split("_")[1]), last

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """A checkpoint's state dict (``weights_only``); SessionError naming a damaged file."""
        import pickle

        import torch

        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self._damaged_checkpoint(path, reason) from exc
        if not isinstance(state, dict) or "model" not in state:
            raise self._damaged_checkpoint(path, "no model state in it")
        return state

    def _damaged_checkpoint(self, path: Path, reason: str) -> SessionError:
        return SessionError(
            f"{path} is damaged ({reason[:160]}); delete it to resume from the checkpoint "
            "before it, or restore it from a backup"
        )
