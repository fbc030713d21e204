"""`anneal-geo export`: a session's metric model as a self-contained model directory (heavy
imports stay inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer()


@app.command("export")
def export(
    session_dir: Path = typer.Argument(..., metavar="SESSION", help="A session directory."),
    out: Path = typer.Option(..., "--out", "-o", help="The model directory to write."),
    force: bool = typer.Option(False, "--force", help="Replace a model already in --out."),
) -> None:
    """Export the session's model at its latest round: model.toml (the card) and the
    weights; load it with `anneal_geo.load_model(MODEL_DIR)` or index new pools with
    `anneal-geo index POOL --model MODEL_DIR`."""
    import time

    from anneal_geo.models import export_model, read_card

    t0 = time.perf_counter()
    directory = export_model(session_dir, out, overwrite=force)
    card = read_card(directory)
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    source = card["session"]
    typer.echo(
        f"exported round {source['round']} of {session_dir} ({card['backbone']['name']} + "
        f"head, {len(card['input']['bands'])} bands, {card['embedding']['dim']}-d, "
        f"{source['answers']} answers) in {time.perf_counter() - t0:.1f} s -> {directory} "
        f"({size / 1024:.0f} KiB, {card['weights']})"
    )
