"""`anneal-geo label SESSION [--web]`: answer a session's pairs by hand.

In the terminal (one pair at a time, a PNG of it in the session directory) or, with
``--web``, on a local web page (:mod:`anneal_geo.labelling.web`). Heavy imports stay inside
the command.
"""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer()


@app.command("label")
def label(
    session_dir: Path = typer.Argument(..., help="A session directory (from `anneal-geo run`)."),
    web: bool = typer.Option(
        False, "--web", help="Label on a local web page (keys y/n/s/u) instead of the terminal."
    ),
    port: int | None = typer.Option(
        None, help="Port of the web page (default: the first free one from 8765; 0 = any)."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address the web page listens on (default: this machine only)."
    ),
    no_browser: bool = typer.Option(
        False, "--no-browser", help="Print the web page's URL without opening a browser."
    ),
    bands: str = typer.Option(
        "true",
        help="Picture bands: 'true' (B04,B03,B02), 'false' (B08,B04,B03) or three "
        "comma-separated band names.",
    ),
    rounds: int | None = typer.Option(
        None, help="Label this many more rounds than are finished (default: finish the session)."
    ),
    png: Path | None = typer.Option(
        None, help="Where to write the current pair's picture (default SESSION/current_pair.png)."
    ),
) -> None:
    """Ask the session's pairs one by one: y (similar), n (dissimilar), s (skip), u (undo), q.

    Each answer is saved to SESSION/annotations.sqlite before `saved answer N` is printed
    (or, with --web, before the page shows the next pair). When a round's pairs are all
    answered the model is trained and the next round's pairs are chosen. Answers can be
    piped in (one per line; end of input quits), and a killed labeller loses no
    acknowledged answer: rerun the command to continue.
    """
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    if rounds is not None:
        session.config.rounds = max(session.config.rounds, len(session.history()) - 1 + rounds)
        session.save_settings()
    if web:
        from anneal_geo.labelling.web import serve

        typer.echo(f"opening {session_dir}; loading the model ...")
        serve(
            session_dir,
            host=host,
            port=port,
            open_browser=not no_browser,
            bands=bands,
            say=typer.echo,
        )
        return

    from anneal_geo.annotators.terminal import TerminalLabeller
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.engine import Engine

    pool = PatchPool.open(session.pool_dir)
    typer.echo(f"opening {session_dir} ({len(pool)} patches); loading the model ...")
    engine = Engine(session, pool, progress=False, command="anneal-geo label")
    try:
        labeller = TerminalLabeller(engine, bands=bands, png_path=png)
        labeller.run()
    except KeyboardInterrupt:
        typer.echo(
            f"\ninterrupted: {len(engine.store)} answers are saved in {session.store_path}; "
            f"continue with `anneal-geo label {session_dir}`",
            err=True,
        )
        raise typer.Exit(130) from None
    finally:
        engine.close()
