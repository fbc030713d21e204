"""`anneal-geo session status`: what a session holds (reads only; never takes the lock)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(name="session", help="Inspect sessions.", no_args_is_help=True)


@app.command("status")
def session_status(session_dir: Path = typer.Argument(..., help="A session directory.")) -> None:
    """Rounds, answers (similar/dissimilar/skipped), implied pairs, last metrics."""
    from anneal_geo.pairs.store import PairStore
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    history = session.history()
    cfg = session.config
    typer.echo(f"session {session_dir}: {cfg.estimator} + {cfg.selector}, backbone {cfg.backbone}")
    typer.echo(f"rounds finished: {len(history)} of {1 + cfg.rounds}")
    with PairStore(session.store_path) as store:
        counts = store.count_by_answer()
    typer.echo(
        f"answers: {counts['similar']} similar, {counts['dissimilar']} dissimilar, "
        f"{counts['skipped']} skipped"
    )
    if history:
        last = history[-1]
        typer.echo(
            f"implied pairs: {last['implied_pairs']}, contradictions: {last['contradictions']}"
        )
        metrics = {k: last[k] for k in ("map@20", "map", "p@10") if k in last}
        if metrics:
            typer.echo("last metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
