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
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from anneal_geo.errors import ConfigError, SessionError

__all__ = ["SESSION_FORMAT_VERSION", "Session", "SessionConfig"]

#: Bumped when the session layout changes incompatibly.
SESSION_FORMAT_VERSION = 1


@dataclass
class SessionConfig:
    """Every setting of an ANNEAL session (defaults are the recommended settings).

    Attributes:
        data: the pool source (class-per-folder directory, BigEarthNet folder or pool dir).
        estimator / selector / backbone / annotator: plugin names.
        rounds: active-learning rounds after the initial set.
        budget: pairs asked per round (b).
        initial: pairs in the initial set (b0).
        initial_nn_fraction: share of the initial set drawn among nearest-neighbour pairs.
        seed: seed of every random source.
        candidates: ``auto``, ``exhaustive`` or ``knn``.
        knn_k: neighbours per patch for ``knn`` candidates; 0 = by pool size (50 up to
            200,000 patches, then fewer, down to 10 at 1M; see ``suggested_knn_k``).
        far_fraction: random far pairs added to ``knn`` candidates, as a share of the edges.
        shortlist_factor: the short-list holds ``shortlist_factor * budget`` pairs.
        train_mode: ``head`` (trunk features cached, head trained) or ``full``.
        epochs: training epochs per round.
        margin: contrastive margin.
        embedding_dim: D of the metric space.
        query_fraction: share of each class held out as retrieval queries.
        eval_k: k of mAP@k.
        bands: band names to use, in order (None = all of the pool's bands).
        threads: torch / faiss threads (0 = library default).
    """

    data: str = ""
    estimator: str = "mgue"
    selector: str = "kmeans"
    backbone: str = "spectral"
    annotator: str = "oracle"
    rounds: int = 5
    budget: int = 100
    initial: int = 100
    initial_nn_fraction: float = 0.5
    seed: int = 0
    candidates: str = "auto"
    knn_k: int = 0
    far_fraction: float = 0.1
    shortlist_factor: int = 10
    train_mode: str = "head"
    epochs: int = 30
    margin: float = 0.5
    embedding_dim: int = 128
    query_fraction: float = 0.2
    eval_k: int = 20
    bands: list[str] | None = None
    threads: int = 0
    estimator_options: dict[str, Any] = field(default_factory=dict)
    selector_options: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    annotator_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> SessionConfig:
        """Check ranges; raise ConfigError naming the setting at fault."""
        positive = {
            "budget": self.budget,
            "shortlist_factor": self.shortlist_factor,
            "embedding_dim": self.embedding_dim,
            "eval_k": self.eval_k,
            "epochs": self.epochs,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"setting '{name}' must be at least 1, got {value}")
        if self.knn_k < 0:
            raise ConfigError(f"setting 'knn_k' must be 0 (by pool size) or more, got {self.knn_k}")
        if self.rounds < 0:
            raise ConfigError(f"setting 'rounds' must be 0 or more, got {self.rounds}")
        if self.initial < 2:
            raise ConfigError(
                f"setting 'initial' must be at least 2 (one similar and one dissimilar "
                f"answer are needed to start), got {self.initial}"
            )
        if not 0.0 <= self.initial_nn_fraction <= 1.0:
            raise ConfigError("setting 'initial_nn_fraction' must lie in [0, 1]")
        if not 0.0 <= self.far_fraction <= 1.0:
            raise ConfigError("setting 'far_fraction' must lie in [0, 1]")
        if not 0.0 < self.query_fraction < 1.0:
            raise ConfigError("setting 'query_fraction' must lie in (0, 1)")
        if self.candidates not in ("auto", "exhaustive", "knn", "uniform"):
            raise ConfigError(
                f"setting 'candidates' is '{self.candidates}'; use auto, exhaustive, knn "
                "or uniform"
            )
        if self.train_mode not in ("head", "full"):
            raise ConfigError(f"setting 'train_mode' is '{self.train_mode}'; use head or full")
        if self.margin <= 0:
            raise ConfigError("setting 'margin' must be positive")
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


class Session:
    """A session directory. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, directory: Path, config: SessionConfig, meta: dict[str, Any]) -> None:
        self.directory = directory
        self.config = config
        self.meta = meta

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
        cls, directory: str | Path, config: SessionConfig, meta: dict[str, Any] | None = None
    ) -> Session:
        """Create a new session directory; refuse to overwrite an existing session."""
        path = Path(directory)
        if (path / "session.toml").exists():
            raise SessionError(
                f"{path} already holds a session; continue it with `anneal-geo resume {path}` "
                "or choose another --out"
            )
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
        session = cls(path, config.validate(), dict(meta or {}))
        session.save_settings()
        return session

    @classmethod
    def open(cls, directory: str | Path) -> Session:
        """Reopen a session; SessionError if it is missing or from an incompatible version."""
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
        settings = data.get("settings", {})
        meta = data.get("meta", {})
        for key in (
            "estimator_options",
            "selector_options",
            "backbone_options",
            "annotator_options",
        ):
            settings[key] = data.get(key, {})
        return cls(path, SessionConfig.from_dict(settings), meta)

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
        _atomic_write(self.toml_path, tomli_w.dumps(_without_none(document)))

    # -- history -----------------------------------------------------------------------
    def append_history(self, record: dict[str, Any]) -> None:
        """Append one round's record to history.jsonl and fsync it."""
        with open(self.history_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def history(self) -> list[dict[str, Any]]:
        """The finished rounds, in order (a half-written last line is ignored)."""
        if not self.history_path.exists():
            return []
        records = []
        for line in self.history_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    # -- the round in progress -----------------------------------------------------------
    def save_pending(self, round_index: int, pairs: list[list[int]]) -> None:
        _atomic_write(self.pending_path, json.dumps({"round": round_index, "pairs": pairs}))

    def load_pending(self) -> tuple[int, list[list[int]]] | None:
        if not self.pending_path.exists():
            return None
        data = json.loads(self.pending_path.read_text(encoding="utf-8"))
        return int(data["round"]), [list(map(int, p)) for p in data["pairs"]]

    def clear_pending(self) -> None:
        self.pending_path.unlink(missing_ok=True)

    # -- evaluation split ----------------------------------------------------------------
    def save_split(self, archive: list[int], query: list[int]) -> None:
        _atomic_write(self.split_path, json.dumps({"archive": archive, "query": query}))

    def load_split(self) -> tuple[list[int], list[int]] | None:
        if not self.split_path.exists():
            return None
        data = json.loads(self.split_path.read_text(encoding="utf-8"))
        return list(data["archive"]), list(data["query"])

    def checkpoint_path(self, round_index: int) -> Path:
        return self.checkpoint_dir / f"round_{round_index:04d}.pt"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        found = sorted(self.checkpoint_dir.glob("round_*.pt"))
        if not found:
            return None
        last = found[-1]
        return int(last.stem.split("_")[1]), last
