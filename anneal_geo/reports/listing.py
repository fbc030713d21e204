"""The sessions under a folder, one summary each (``anneal-geo session list``).

Reads only: ``session.toml``, ``history.jsonl`` and the answer counts; a session that
cannot be read is listed with the reason instead of stopping the listing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anneal_geo.errors import AnnealError, DataError

__all__ = ["SessionSummary", "find_sessions", "list_sessions", "summarise_session"]


@dataclass(frozen=True)
class SessionSummary:
    """What ``session list`` shows about one session.

    Attributes:
        path: the session directory.
        data: the pool or archive it labels (the pool directory when it has one).
        estimator / selector / backbone / annotator: plugin names.
        rounds_done: finished rounds.
        rounds_total: rounds it is set to run (the initial set counts as one).
        similar / dissimilar / skipped: answers in effect.
        last_map: the last round's mAP@k (k = the session's ``eval_k``), None when unknown.
        map_key: the name of that metric, e.g. ``map@20``.
        error: why the session could not be read ("" when it could).
    """

    path: Path
    data: str = ""
    estimator: str = ""
    selector: str = ""
    backbone: str = ""
    annotator: str = ""
    rounds_done: int = 0
    rounds_total: int = 0
    similar: int = 0
    dissimilar: int = 0
    skipped: int = 0
    last_map: float | None = None
    map_key: str = "map@20"
    error: str = ""

    @property
    def answers(self) -> int:
        """Answers in effect (similar, dissimilar and skipped)."""
        return self.similar + self.dissimilar + self.skipped


def find_sessions(root: str | Path) -> list[Path]:
    """Session directories (holding ``session.toml``) at or below ``root``, sorted.

    Raises:
        DataError: ``root`` is not a folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{base} is not a folder; give the folder that holds the sessions")
    return sorted({p.parent for p in base.rglob("session.toml") if p.is_file()})


def summarise_session(directory: Path) -> SessionSummary:
    """The :class:`SessionSummary` of one session (``error`` set when it is unreadable)."""
    from anneal_geo.pairs.store import PairStore
    from anneal_geo.session import Session

    try:
        session = Session.open(directory)
        cfg = session.config
        history = session.history()
        counts = {"similar": 0, "dissimilar": 0, "skipped": 0}
        if session.store_path.is_file():
            with PairStore(session.store_path) as store:
                counts = store.count_by_answer()
    except AnnealError as exc:
        return SessionSummary(path=directory, error=str(exc))
    key = f"map@{cfg.eval_k}"
    last = next((r[key] for r in reversed(history) if isinstance(r.get(key), int | float)), None)
    external = session.meta.get("pool_dir")
    return SessionSummary(
        path=directory,
        data=str(external or cfg.data),
        estimator=cfg.estimator,
        selector=cfg.selector,
        backbone=cfg.backbone,
        annotator=cfg.annotator,
        rounds_done=len(history),
        rounds_total=1 + cfg.rounds,
        similar=int(counts["similar"]),
        dissimilar=int(counts["dissimilar"]),
        skipped=int(counts["skipped"]),
        last_map=None if last is None else float(last),
        map_key=key,
    )


def list_sessions(root: str | Path) -> list[SessionSummary]:
    """:func:`summarise_session` of every session under ``root``."""
    return [summarise_session(d) for d in find_sessions(root)]
