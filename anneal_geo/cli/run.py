"""`anneal-geo run` and `anneal-geo resume`: the ANNEAL loop on a pool, a table row a round.

``run`` checks every setting, plugin, option and band against the pool before it creates
the session directory (:func:`anneal_geo.engine.check_settings`), so a bad setting leaves
nothing behind. Settings come from the defaults, then ``--config FILE.toml``, then the
options given on the command line; plugin options from ``--estimator-option KEY=VALUE``
(and ``--selector-option``, ``--backbone-option``, ``--annotator-option``), values read as
TOML scalars.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer

from anneal_geo.cli._common import DEFAULT_DATA, load_pool
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.session import SessionConfig

__all__ = ["app", "default_out", "read_config_file"]

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

#: Plugin settings and their option tables.
_PLUGINS = ("estimator", "selector", "backbone", "annotator")
#: A new session's settings; the options below default to them.
_DEFAULTS = SessionConfig()


def _row(record: dict[str, Any]) -> str:
    cells = []
    for key, label, fmt in _COLUMNS:
        value = record.get(key)
        width = max(len(label), len(fmt.format(0)))
        cells.append(("-" if value is None else fmt.format(value)).rjust(width))
    return "  ".join(cells)


def _header() -> str:
    return "  ".join(label.rjust(max(len(label), len(fmt.format(0)))) for _, label, fmt in _COLUMNS)


def _run_engine(
    session: Any, pool: Any, command: str, lock: Any, rounds: int | None = None
) -> None:
    from anneal_geo.engine import Engine

    def show(record: dict[str, Any]) -> None:
        typer.echo(_row(record))

    # Progress bars while the engine sets up (trunk features of a large pool take a while),
    # none once the table starts, so a bar never shares a line with a row.
    engine = Engine(session, pool, on_round=show, command=command, lock=lock)
    engine.progress = False
    typer.echo("", err=True)  # ends the line of the last progress bar (cleared or logged)
    typer.echo(_header())
    try:
        # A person at the terminal gets `anneal-geo label`'s labeller (undo across the
        # round, the picture in the session directory) instead of a plain prompt.
        label_session = getattr(engine.annotator, "label_session", None)
        records = label_session(engine, rounds) if callable(label_session) else engine.run(rounds)
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
            f"paused after {done} rounds; {session.next_round_text()}; continue with "
            f"`anneal-geo resume {session.directory}`"
        )
    elif records:
        last = records[-1]
        typer.echo(
            f"done: {last['queried_pairs']} queried pairs, {last['implied_pairs']} implied; "
            f"history in {session.history_path}"
        )


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a ``--config`` TOML file, as :class:`SessionConfig` keyword arguments.

    The file holds settings at its top level (``budget = 50``) or under ``[settings]`` (so
    a session's own ``session.toml`` works too), and plugin options as tables
    (``[estimator_options]``, ...).

    Raises:
        ConfigError: unreadable TOML or an unknown setting (the message names the file).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist; give a TOML file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path} is not readable TOML ({exc})") from exc
    settings = dict(data.pop("settings", {}) if isinstance(data.get("settings"), dict) else {})
    for key in ("session_format", "anneal_geo_version", "meta", "plugins"):
        data.pop(key, None)  # the rest of a session.toml
    settings.update(data)
    known = {f.name for f in fields(SessionConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    return settings


def default_out(source: Path, estimator: str, selector: str, backbone: str, seed: int) -> Path:
    """``runs/<data>-<estimator>-<selector>-<backbone>-seed<seed>``: two runs on different
    data get different sessions."""
    name = source.resolve().name or "data"
    return Path("runs") / f"{name}-{estimator}-{selector}-{backbone}-seed{seed}"


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


@app.command("run")
def run(
    ctx: typer.Context,
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
        _DEFAULTS.backbone, help="Backbone plugin (texture, spectral, smallcnn, resnet18, ...)."
    ),
    annotator: str = typer.Option(
        "oracle", help="Annotator plugin (oracle = simulated from labels)."
    ),
    rounds: int = typer.Option(5, help="Active-learning rounds after the initial set."),
    budget: int = typer.Option(100, help="Pairs asked per round (b)."),
    initial: int = typer.Option(100, help="Pairs in the initial set (b0)."),
    initial_design: str = typer.Option(
        _DEFAULTS.initial_design, help="How the initial set is picked: clusters (groups of the "
        "starting embedding: each group's medoid with a random member and with the nearest "
        "group's medoid) or random (random pairs, half among nearest neighbours)."
    ),
    seed: int = typer.Option(0, help="Seed of every random source."),
    out: Path | None = typer.Option(
        None, help="Session directory (default: runs/<data>-<estimator>-<selector>-<backbone>-"
        "seed<seed>)."
    ),
    candidates: str = typer.Option(
        "auto", help="Candidate pairs: auto, exhaustive, knn or uniform."
    ),
    train_mode: str = typer.Option(
        "head", help="head (cached trunk features) or full fine-tuning."
    ),
    epochs: int = typer.Option(_DEFAULTS.epochs, help="Training epochs per round."),
    lr: float = typer.Option(_DEFAULTS.lr, help="Learning rate of the head (Adam)."),
    ema: float = typer.Option(
        _DEFAULTS.ema, help="Decay per training step of the moving average of the head's "
        "weights that embeds (0 = the last trained weights)."
    ),
    margin: float = typer.Option(
        _DEFAULTS.margin, help="Contrastive loss margin (embedding distances lie in [0, 2])."
    ),
    mix: float = typer.Option(
        _DEFAULTS.mix, help="Weight of the normalised frozen trunk features kept in the embedding "
        "(0 = the head's output alone)."
    ),
    query_expansion: int = typer.Option(
        _DEFAULTS.query_expansion, help="Average each query with its N nearest archive "
        "patches before ranking, in the evaluation and the session's index (0 = off)."
    ),
    transitivity: str = typer.Option(
        _DEFAULTS.transitivity, help="What the answers imply: full (similar groups and "
        "dissimilar cross pairs), similar (groups only) or none (the answers alone)."
    ),
    repair: str = typer.Option(
        _DEFAULTS.repair, help="Answers that may be wrong: none (a contradicted group implies "
        "nothing), cut (leave out the answers a contradiction points at), split (cut, and "
        "also a similar answer joining two groups far apart) or confirm (two groups join "
        "only when a second answer across them agrees: the next round asks a check pair "
        "first)."
    ),
    bands: str | None = typer.Option(None, help="Comma-separated band names to use, in order."),
    noise: float = typer.Option(0.0, help="Oracle answer-flip probability (simulated noise)."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="A TOML file of settings (any setting of session.toml, e.g. knn_k = 20, and "
        "[estimator_options] tables); options given here win over it.",
    ),
    estimator_option: list[str] | None = typer.Option(
        None, "--estimator-option", metavar="KEY=VALUE",
        help="An estimator option, value as TOML (repeatable), e.g. threshold=midpoint.",
    ),
    selector_option: list[str] | None = typer.Option(
        None, "--selector-option", metavar="KEY=VALUE",
        help="A selector option (repeatable), e.g. pick=centroid.",
    ),
    backbone_option: list[str] | None = typer.Option(
        None, "--backbone-option", metavar="KEY=VALUE",
        help="A backbone option (repeatable), e.g. 'widths=[16,32]'.",
    ),
    annotator_option: list[str] | None = typer.Option(
        None, "--annotator-option", metavar="KEY=VALUE",
        help="An annotator option (repeatable), e.g. noise=0.1.",
    ),
) -> None:  # fmt: skip
    """Run ANNEAL: initial pairs, then ROUNDS rounds of select -> annotate -> train -> evaluate.

    Prints a table row per round and writes OUT/history.jsonl. `--estimator random
    --selector random` is the random-pairs baseline. Every setting, plugin and band is
    checked before OUT is created.
    """
    from anneal_geo._options import parse_assignments
    from anneal_geo.cli._common import split_bands
    from anneal_geo.engine import check_settings
    from anneal_geo.lock import SessionLock
    from anneal_geo.session import Session

    settings: dict[str, Any] = read_config_file(config) if config is not None else {}
    from_config = set(settings)
    given = {
        "data": data,
        "estimator": estimator,
        "selector": selector,
        "backbone": backbone,
        "annotator": annotator,
        "rounds": rounds,
        "budget": budget,
        "initial": initial,
        "initial_design": initial_design,
        "seed": seed,
        "candidates": candidates,
        "train_mode": train_mode,
        "epochs": epochs,
        "lr": lr,
        "ema": ema,
        "margin": margin,
        "mix": mix,
        "query_expansion": query_expansion,
        "transitivity": transitivity,
        "repair": repair,
        "bands": split_bands(bands),
    }
    for name, value in given.items():
        if _given(ctx, name) or name not in settings:
            settings[name] = value
    items = {
        "estimator": estimator_option,
        "selector": selector_option,
        "backbone": backbone_option,
        "annotator": annotator_option,
    }
    for plugin, assignments in items.items():
        table = f"{plugin}_options"
        options = dict(settings.get(table) or {})
        options.update(parse_assignments(assignments or [], f"--{plugin}-option"))
        if plugin == "annotator" and _given(ctx, "noise"):
            options["noise"] = noise
        settings[table] = options

    source = Path(settings.pop("data") or DEFAULT_DATA)
    if not source.exists():
        raise DataError(
            f"data path {source} does not exist; pass --data with a class-per-folder "
            "directory, a BigEarthNet folder or a pool directory"
        )
    try:
        cfg = SessionConfig(data=str(source.resolve()), **settings).validate()
    except ConfigError as exc:
        from_file = [k for k in from_config if f"'{k}'" in str(exc)]
        if config is None or not from_file:
            raise
        raise ConfigError(f"--config {config}: {exc}") from exc
    out_dir = (
        out
        if out is not None
        else default_out(source, cfg.estimator, cfg.selector, cfg.backbone, cfg.seed)
    )
    if (out_dir / "session.toml").exists():
        raise ConfigError(
            f"{out_dir} already holds a session; continue it with `anneal-geo resume {out_dir}` "
            "or choose another --out"
        )
    pool = load_pool(source)
    # Everything is checked before the session directory exists.
    provenance = check_settings(cfg, pool)
    is_pool_dir = (source / "pool.json").is_file()
    meta: dict[str, Any] = {"pool_dir": str(source.resolve())} if is_pool_dir else {}
    meta["pool_fingerprint"] = pool.fingerprint
    session = Session.create(out_dir, cfg, meta, provenance=provenance)
    with SessionLock(session.directory, "anneal-geo run") as lock:
        if not is_pool_dir:
            pool.save(session.pool_dir)
        typer.echo(
            f"session {out_dir}: {len(pool)} patches, {pool.n_bands} bands, "
            f"{cfg.estimator} + {cfg.selector}, backbone {cfg.backbone}, seed {cfg.seed}"
        )
        _run_engine(session, pool, "anneal-geo run", lock)


@app.command("resume")
def resume(
    session_dir: Path = typer.Argument(..., help="A session directory."),
    rounds: int | None = typer.Option(None, help="Run this many more rounds (default: finish)."),
) -> None:
    """Continue an interrupted session: no answer lost, no pair asked twice."""
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.lock import SessionLock
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    if rounds is None and session.finished:
        typer.echo(
            f"session {session_dir} is finished ({session.round_progress()}): nothing left to "
            f"do; run more rounds with `anneal-geo resume {session_dir} --rounds N`"
        )
        return
    with SessionLock(session.directory, "anneal-geo resume") as lock:
        if rounds is not None:
            if rounds < 1:
                raise ConfigError(f"--rounds {rounds}: give 1 or more rounds to run")
            session = Session.open(session_dir)  # as it is now that no one else writes
            session.config.rounds = max(
                session.config.rounds, len(session.history()) - 1 + rounds
            )
            session.save_settings()
        pool = PatchPool.open(session.pool_dir)
        typer.echo(f"resuming {session_dir}: {session.round_progress()}")
        _run_engine(session, pool, "anneal-geo resume", lock, rounds)
