"""The ``anneal-geo`` command.

Heavy libraries are imported inside the commands, so ``anneal-geo --help`` stays fast.
Errors anneal-geo raises on purpose (:class:`~anneal_geo.errors.AnnealError`) are printed
as one line and exit with status 2; Ctrl-C exits with 130 after saying what was kept.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

import anneal_geo
from anneal_geo.errors import AnnealError, DataError

app = typer.Typer(
    help="ANNEAL: annotation cost-efficient active learning for Sentinel-2 image retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pool_app = typer.Typer(help="Build and describe patch pools.", no_args_is_help=True)
plugins_app = typer.Typer(help="List and check plugins.", no_args_is_help=True)
session_app = typer.Typer(help="Inspect sessions.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
app.add_typer(plugins_app, name="plugins")
app.add_typer(session_app, name="session")

#: The shipped sample the main job runs on when --data is not given.
SAMPLE_TILES = Path(__file__).resolve().parent.parent / "sample_tiles"
DEFAULT_DATA = SAMPLE_TILES / "eurosat_ms"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"anneal-geo {anneal_geo.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """ANNEAL for Sentinel-2: ask an expert about a few well-chosen pairs, learn a metric
    space from the answers, and serve it as a retrieval index."""


# -- pools -----------------------------------------------------------------------------------


def _load_pool(source: Path, bands: list[str] | None = None) -> Any:
    from anneal_geo.data.pool import PatchPool

    pool = PatchPool.load(source)
    return pool.select_bands(bands) if bands else pool


def _split_bands(bands: str | None) -> list[str] | None:
    return [b.strip() for b in bands.split(",") if b.strip()] if bands else None


@pool_app.command("build")
def pool_build(
    source: Path = typer.Argument(
        ..., help="Class-per-folder directory, BigEarthNet folder or folder of Sentinel-2 tiles."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the pool to."),
    bands: str | None = typer.Option(None, help="Comma-separated band names to keep, in order."),
    patch_size: int | None = typer.Option(
        None, "--patch-size", help="Tiles: patch side in pixels (default 64)."
    ),
    stride: int | None = typer.Option(
        None, "--stride", help="Tiles: pixels between patches (default: the patch size)."
    ),
    res: float | None = typer.Option(
        None, "--res", help="Tiles: pixel size in CRS units (default: the finest band, 10 m)."
    ),
    cloud_mask: str = typer.Option(
        "auto",
        "--cloud-mask",
        help="Tiles: auto (cloud_mask.tif beside the bands), none, or "
        "a mask file name or path (non-zero = cloud).",
    ),
    max_nodata: float = typer.Option(
        0.5,
        "--max-nodata",
        help="Tiles: skip patches with more than this share of nodata or cloud pixels.",
    ),
) -> None:
    """Read the rasters once into a pool directory (pool.json, patches.npy, footprints.gpkg).

    A folder of Sentinel-2 tiles (one file per band, e.g. Major TOM's B04.tif, or multi-band
    scenes) is cut into patches through TorchGeo; so is any source given --patch-size,
    --stride or --res.
    """
    import time

    from anneal_geo.data.tiles import is_tile_archive

    t0 = time.perf_counter()
    if any(v is not None for v in (patch_size, stride, res)) or is_tile_archive(source):
        from anneal_geo.data.pool import PatchPool

        pool = PatchPool.from_tiles(
            source,
            64 if patch_size is None else patch_size,
            stride=stride,
            bands=_split_bands(bands),
            res=res,
            cloud_mask=None if cloud_mask.lower() == "none" else cloud_mask,
            max_nodata=max_nodata,
            on_report=lambda report: typer.echo(report.summary()),
        )
    else:
        pool = _load_pool(source, _split_bands(bands))
    pool.save(out)
    typer.echo(f"built {len(pool)} patches in {time.perf_counter() - t0:.1f} s -> {out}")
    typer.echo(pool.describe())


@pool_app.command("info")
def pool_info(directory: Path = typer.Argument(..., help="A pool directory.")) -> None:
    """Describe a saved pool: size, bands, classes, CRSs."""
    from anneal_geo.data.pool import PatchPool

    typer.echo(PatchPool.open(directory).describe())


# -- plugins ---------------------------------------------------------------------------------


@plugins_app.command("list")
def plugins_list(
    group: str | None = typer.Option(
        None, "--group", "-g", help="estimators, selectors, backbones or annotators."
    ),
) -> None:
    """List plugins with their origin, status and description (loads each one to check it)."""
    from anneal_geo import plugins

    report = plugins.inspect_all(group)
    header = ("name", "group", "target", "distribution", "status", "description")
    rows = [
        (
            p.name,
            p.group,
            p.target,
            f"{p.distribution} {p.version}".strip(),
            p.status,
            p.description,
        )
        for p in report
    ]
    _print_table(header, rows)
    for p in report:
        if p.status != "ok":
            typer.echo(f"broken {p.group}/{p.name}: {p.reason}")


@plugins_app.command("check")
def plugins_check(
    name: str = typer.Argument(..., help="Plugin name."),
    group: str | None = typer.Option(None, "--group", "-g", help="Restrict to one group."),
) -> None:
    """Load one plugin and report whether it fulfils its contract (exit 1 if broken)."""
    from anneal_geo import plugins

    found = [p for p in plugins.inspect_all(group) if p.name == name]
    if not found:
        raise DataError(f"no plugin named '{name}'; see `anneal-geo plugins list`")
    broken = False
    for p in found:
        status = "ok" if p.status == "ok" else f"BROKEN: {p.reason}"
        typer.echo(f"{p.group}/{p.name}: {p.target} from {p.distribution} {p.version}: {status}")
        broken |= p.status != "ok"
    if broken:
        raise typer.Exit(1)


def _print_table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    text = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    for k, row in enumerate(text):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            typer.echo("  ".join("-" * w for w in widths))


# -- running ANNEAL --------------------------------------------------------------------------

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
        bands=_split_bands(bands),
        annotator_options={"noise": noise} if annotator == "oracle" and noise else {},
    ).validate()
    out_dir = (
        out if out is not None else Path("runs") / f"{estimator}-{selector}-{backbone}-seed{seed}"
    )
    pool = _load_pool(source)
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


@session_app.command("status")
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


def main() -> None:
    """Entry point: run the app, turning anneal-geo errors into one-line messages."""
    try:
        app()
    except AnnealError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


# Commands defined in other modules attach themselves to `app` when imported; they keep
# their heavy imports inside the commands, like this module.
from anneal_geo import cli_geo, cli_label, cli_scale  # noqa: E402, F401
