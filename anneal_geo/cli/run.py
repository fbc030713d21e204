"""`anneal-geo run` and `anneal-geo resume`: the ANNEAL loop on a pool, a table row a round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from anneal_geo.cli._common import DEFAULT_DATA, load_pool, split_bands
from anneal_geo.errors import DataError

__all__ = ["app"]

app = typer.Typer()


_COLUMNS = (
    ("round", "round", "{:>5}"),
    ("queried_pairs", "queried", "{:>7}"),
    ("implied_pairs", "implied", "{:>8}"),
    ("similar_fraction", "similar", "{:>7.2f}"),
    ("map@20", "mAP@20", "{:>7.4f}"),
    ("map", "mAP", "{:>7.4f}"),
    ("p@10", "P@10", "{:>6.4f}"),
    ("seconds_select", "select s", "{:>8.2f}"),
    ("seconds_train", "train s", "{:>7.2f}"),
    ("seconds", "total s", "{:>7.2f}"),
)


def _row(record: dict[str, Any]) -> str:
    cells = []
    for key, label, fmt in _COLUMNS:
        value = record.get(key)
        width = max(len(label), len(fmt.format(0)))
        cells.append(("-" if value is None else fmt.format(value)).rjust(width))
    return "  ".join(cells)


def _header() -> str:
    return "  ".join(label.rjust(max(len(label), len(fmt.format(0)))) for _, label, fmt in _COLUMNS)


def _run_engine(session: Any, pool: Any, rounds: int | None = None) -> None:
    from anneal_geo.engine import Engine

    typer.echo(_header())

    def show(record: dict[str, Any]) -> None:
        typer.echo(_row(record))

    engine = Engine(session, pool, on_round=show)
    try:
        records = engine.run(rounds)
    except KeyboardInterrupt:
        counts = engine.store.count_by_answer()
        engine.close()
        typer.echo(
            f"\ninterrupted: {sum(counts.values())} answers are saved in {session.store_path}; "
            f"continue with `anneal-geo resume {session.directory}`",
            err=True,
        )
        raise typer.Exit(130) from None
    engine.close()
    done = len(session.history())
    if done < 1 + session.config.rounds:
        typer.echo(
            f"paused after {done} rounds; continue with `anneal-geo resume {session.directory}`"
        )
    elif records:
        last = records[-1]
        typer.echo(
            f"done: {last['queried_pairs']} queried pairs, {last['implied_pairs']} implied; "
            f"history in {session.history_path}"
        )


@app.command("run")
def run(
    data: Path | None = typer.Option(
        None,
        help="Class-per-folder directory, BigEarthNet folder or pool directory "
        "(default: the EuroSAT-MS sample in sample_tiles/).",
    ),
    estimator: str = typer.Option(
        "mgue", help="Uncertainty estimator plugin (mgue, bcgue, random, ...)."
    ),
    selector: str = typer.Option(
        "kmeans", help="Diversity selector plugin (kmeans, topk, random, ...)."
    ),
    backbone: str = typer.Option(
        "spectral", help="Backbone plugin (spectral, smallcnn, resnet18, ...)."
    ),
    annotator: str = typer.Option(
        "oracle", help="Annotator plugin (oracle = simulated from labels)."
    ),
    rounds: int = typer.Option(5, help="Active-learning rounds after the initial set."),
    budget: int = typer.Option(100, help="Pairs asked per round (b)."),
    initial: int = typer.Option(100, help="Pairs in the initial set (b0)."),
    seed: int = typer.Option(0, help="Seed of every random source."),
    out: Path | None = typer.Option(None, help="Session directory (default: runs/<settings>)."),
    candidates: str = typer.Option("auto", help="Candidate pairs: auto, exhaustive or knn."),
    train_mode: str = typer.Option(
        "head", help="head (cached trunk features) or full fine-tuning."
    ),
    epochs: int = typer.Option(30, help="Training epochs per round."),
    bands: str | None = typer.Option(None, help="Comma-separated band names to use, in order."),
    noise: float = typer.Option(0.0, help="Oracle answer-flip probability (simulated noise)."),
) -> None:
    """Run ANNEAL: initial pairs, then ROUNDS rounds of select -> annotate -> train -> evaluate.

    Prints a table row per round and writes OUT/history.jsonl. `--estimator random
    --selector random` is the random-pairs baseline.
    """
    from anneal_geo.session import Session, SessionConfig

    source = data if data is not None else DEFAULT_DATA
    if not source.exists():
        raise DataError(
            f"data path {source} does not exist; pass --data with a class-per-folder "
            "directory, a BigEarthNet folder or a pool directory"
        )
    config = SessionConfig(
        data=str(source.resolve()),
        estimator=estimator,
        selector=selector,
        backbone=backbone,
        annotator=annotator,
        rounds=rounds,
        budget=budget,
        initial=initial,
        seed=seed,
        candidates=candidates,
        train_mode=train_mode,
        epochs=epochs,
        bands=split_bands(bands),
        annotator_options={"noise": noise} if annotator == "oracle" and noise else {},
    ).validate()
    out_dir = (
        out if out is not None else Path("runs") / f"{estimator}-{selector}-{backbone}-seed{seed}"
    )
    pool = load_pool(source)
    is_pool_dir = (source / "pool.json").is_file()
    meta: dict[str, Any] = {"pool_dir": str(source.resolve())} if is_pool_dir else {}
    meta["pool_fingerprint"] = pool.fingerprint
    session = Session.create(out_dir, config, meta)
    if not is_pool_dir:
        pool.save(session.pool_dir)
    typer.echo(
        f"session {out_dir}: {len(pool)} patches, {pool.n_bands} bands, "
        f"{estimator} + {selector}, backbone {backbone}, seed {seed}"
    )
    _run_engine(session, pool)


@app.command("resume")
def resume(
    session_dir: Path = typer.Argument(..., help="A session directory."),
    rounds: int | None = typer.Option(None, help="Run this many more rounds (default: finish)."),
) -> None:
    """Continue an interrupted session: no answer lost, no pair asked twice."""
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    if rounds is not None:
        session.config.rounds = max(session.config.rounds, len(session.history()) - 1 + rounds)
        session.save_settings()
    pool = PatchPool.open(session.pool_dir)
    typer.echo(f"resuming {session_dir} after {len(session.history())} finished rounds")
    _run_engine(session, pool, rounds)
