"""A real ANNEAL session on the sample, to show a plugin works in the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anneal_geo.testing.sample import load_sample

__all__ = ["run_sample_session"]


def run_sample_session(
    directory: str | Path,
    *,
    data: str | Path | None = None,
    rounds: int = 1,
    budget: int = 10,
    initial: int = 20,
    epochs: int = 5,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Run a real ANNEAL session (Engine, simulated oracle) and return its history records.

    Use it to show that a plugin works in the loop, e.g.
    ``run_sample_session(tmp_path, estimator="mine")``.

    Args:
        directory: the new session directory.
        data: a class-per-folder archive or pool directory; None for the sample's small
            pool of real patches (30 crops of 16 x 16 px, 10 classes).
        rounds: rounds after the initial set.
        budget: pairs per round.
        initial: pairs of the initial set.
        epochs: training epochs per round.
        **settings: any other :class:`~anneal_geo.session.SessionConfig` setting
            (``estimator``, ``selector``, ``backbone``, ``estimator_options``, ...).
    """
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine
    from anneal_geo.session import Session, SessionConfig

    if data is None:
        pool = load_sample().pool
        source = "anneal_geo.testing sample"
    else:
        pool = PatchPool.load(Path(data))
        source = str(data)
    config = SessionConfig(
        data=source, rounds=rounds, budget=budget, initial=initial, epochs=epochs, **settings
    )
    session = Session.create(Path(directory), config)
    with Engine(session, pool, progress=False) as engine:
        return engine.run()
