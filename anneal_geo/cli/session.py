"""`anneal-geo session status`: what a session holds (reads only; never takes the lock)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(name="session", help="Inspect sessions.", no_args_is_help=True)


@app.command("status")
def session_status(session_dir: Path = typer.Argument(..., help="A session directory.")) -> None:
    """Rounds, answers (similar/dissimilar/skipped), implied pairs, last metrics.

    Reads only: it works while another process labels the session, and changes nothing.
    """
    from anneal_geo.pairs.store import PairStore
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    history = session.history()
    cfg = session.config
    typer.echo(f"session {session_dir}: {cfg.estimator} + {cfg.selector}, backbone {cfg.backbone}")
    typer.echo(session.round_progress())
    if session.store_path.is_file():
        with PairStore(session.store_path, read_only=True) as store:
            counts, log = store.count_by_answer(), store.log_counts()
        typer.echo(f"answers: {Session.answers_text(counts, log)}")
    else:
        typer.echo("answers: none yet")
    if history:
        last = history[-1]
        typer.echo(
            f"implied pairs: {last['implied_pairs']}, contradictions: {last['contradictions']}"
        )
        metrics = {k: last[k] for k in ("map@20", "map", "p@10") if k in last}
        if metrics:
            typer.echo("last metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
