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


@app.command("export")
def session_export(
    session_dir: Path = typer.Argument(..., metavar="SESSION", help="A session directory."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="answers.gpkg (GeoPackage), answers.csv or answers.parquet."
    ),
) -> None:
    """Write every answer: both patch ids, both footprints, the answer, round, time and
    annotator; undone answers are marked (undone, undone_time, undone_by)."""
    from anneal_geo.reports.answers import export_answers

    path, count = export_answers(session_dir, out)
    layers = " (layers answers: a line between the two patches, patches: their footprints)"
    typer.echo(f"wrote {count} answers to {path}" + (layers if path.suffix == ".gpkg" else ""))


@app.command("list")
def session_list(
    directory: Path = typer.Argument(Path("runs"), metavar="[DIR]", help="Folder to search."),
) -> None:
    """The sessions under DIR (default runs/): data, plugins, rounds, answers, last mAP@k."""
    from anneal_geo.cli._common import print_table
    from anneal_geo.reports.listing import list_sessions

    found = list_sessions(directory)
    if not found:
        typer.echo(f"no sessions under {directory}")
        return

    def short(text: str) -> str:
        try:  # a data path below the current folder is shown relative to it
            return str(Path(text).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return text

    rows = []
    for s in found:
        if s.error:
            rows.append((str(s.path), "-", "-", "-", "-", f"unreadable: {s.error}"))
            continue
        score = "-" if s.last_map is None else f"{s.map_key} {s.last_map:.4f}"
        rows.append(
            (
                str(s.path),
                short(s.data),
                f"{s.estimator}+{s.selector}, {s.backbone}, {s.annotator}",
                f"{s.rounds_done}/{s.rounds_total}",
                f"{s.answers} ({s.similar} y, {s.dissimilar} n, {s.skipped} s)",
                score,
            )
        )
    print_table(("session", "data", "plugins", "rounds", "answers", "last mAP"), rows)


@app.command("report")
def session_report(
    session_dir: Path = typer.Argument(..., metavar="SESSION", help="A session directory."),
    out: Path = typer.Option(..., "--out", "-o", help="The HTML file to write."),
    gallery: int = typer.Option(24, help="Pairs of the last round shown as pictures."),
    points: int = typer.Option(5000, help="Most patches in the embedding view."),
) -> None:
    """One static HTML page (pictures embedded, no network): learning curve, answers per
    round, implied pairs and contradictions, the last round's pairs, a PCA view of the
    embedding with the answered pairs as links."""
    from anneal_geo.reports.report import write_report

    path = write_report(session_dir, out, gallery=gallery, points=points)
    typer.echo(f"wrote the report to {path} ({path.stat().st_size / 1024:.0f} KiB)")
