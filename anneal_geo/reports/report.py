"""One static HTML page about a session (``anneal-geo session report``).

The page is a single file with every picture embedded as a base64 PNG and its style
inline: it opens offline and can be mailed to a colleague. It shows

- the settings, the pool and the answers in effect;
- the learning curve: mAP@k, mAP and P@10 on the held-out queries after each round,
  against the number of queried pairs (when the pool has labels to evaluate with);
- the answers per round (similar / dissimilar / skipped, and undone answers);
- the implied pairs and contradictions after each round, and the contradictions in
  effect now (a dissimilar answer inside a group of patches answered similar);
- a gallery of the last round's pairs with their answers (drawn by
  :class:`~anneal_geo.annotators.render.PatchRenderer`, pool-wide stretch);
- a 2-D view of the embedding (PCA of the session's model at its latest round) of up to
  ``points`` patches (every answered patch among them), coloured by class when the pool
  has labels, with the answered pairs drawn as links (green similar, red dissimilar).

A section that cannot be drawn (no labels, no finished round, no footprints) says why
instead of failing the page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import AnnealError, DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from anneal_geo.data.pool import PatchPool
    from anneal_geo.session import Session

__all__ = ["build_report", "embedding_view", "write_report"]

_COLOURS = {"similar": "#2ca02c", "dissimilar": "#d62728", "skipped": "#9e9e9e"}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
.note { color: #666; font-style: italic; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.gallery figure { margin: 0; font-size: 0.8em; width: min-content; }
.gallery figcaption { overflow-wrap: anywhere; }
.similar { color: #2ca02c; } .dissimilar { color: #d62728; } .skipped { color: #777; }
"""


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(header: list[str], rows: list[list[Any]], text_columns: int = 0) -> str:
    def cell(tag: str, value: Any, k: int) -> str:
        cls = ' class="text"' if k < text_columns else ""
        shown = "" if value is None else value
        if isinstance(value, float):
            shown = f"{value:.4f}"
        return f"<{tag}{cls}>{html.escape(str(shown))}</{tag}>"

    head = "".join(cell("th", h, k) for k, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", v, k) for k, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# ---------------------------------------------------------------------------- sections


def _summary(session: Session, pool: PatchPool | None, table: Any) -> str:
    from anneal_geo import __version__

    cfg = session.config
    history = session.history()
    effective = table[table["in_effect"]]
    counts = {name: int((effective["answer_name"] == name).sum()) for name in _COLOURS}
    if pool is None:
        pool_text = "could not be opened"
    else:
        kind = "labelled" if pool.labels is not None else "unlabelled"
        pool_text = (
            f"{len(pool)} patches, {pool.n_bands} bands ({', '.join(pool.bands)}), "
            f"{pool.patch_size[0]} x {pool.patch_size[1]} px, {kind}"
        )
    plugins = (
        f"{cfg.estimator} + {cfg.selector}, backbone {cfg.backbone}, annotator {cfg.annotator}"
    )
    settings = (
        f"budget {cfg.budget}, initial {cfg.initial}, train mode {cfg.train_mode}, "
        f"{cfg.embedding_dim}-d, seed {cfg.seed}"
    )
    answers = (
        f"{counts['similar']} similar, {counts['dissimilar']} dissimilar, "
        f"{counts['skipped']} skipped ({int(table['undone'].sum())} undone answers)"
    )
    rows: list[list[Any]] = [
        ["session", str(session.directory)],
        ["data", str(session.meta.get("pool_dir") or cfg.data)],
        ["pool", pool_text],
        ["plugins", plugins],
        ["settings", settings],
        ["rounds finished", f"{len(history)} of {1 + cfg.rounds}"],
        ["answers in effect", answers],
    ]
    last = history[-1] if history else {}
    metrics = [(k, v) for k, v in last.items() if k.startswith(("map", "p@"))]
    if metrics:
        rows.append(["last metrics", ", ".join(f"{k} {float(v):.4f}" for k, v in metrics)])
    written = datetime.now(UTC).isoformat(timespec="seconds")
    rows.append(["written", f"{written} by anneal-geo {__version__}"])
    return _table(["", ""], rows, text_columns=2)


def _learning_curve(session: Session) -> str:
    history = session.history()
    key = f"map@{session.config.eval_k}"
    evaluated = [r for r in history if isinstance(r.get(key), int | float)]
    if not evaluated:
        return _note(
            "No learning curve: the pool has no labels to evaluate with (or no round has "
            "finished), so retrieval quality is what the queries show."
        )
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    for metric, style in ((key, "o-"), ("map", "s--"), ("p@10", "^:")):
        xs, ys = [], []
        start = evaluated[0].get("start", {}) if evaluated[0].get("round") == 0 else {}
        if isinstance(start.get(metric), int | float):
            xs.append(0)
            ys.append(float(start[metric]))
        for r in evaluated:
            if isinstance(r.get(metric), int | float):
                xs.append(int(r.get("queried_pairs", 0)))
                ys.append(float(r[metric]))
        if ys:
            ax.plot(xs, ys, style, label=metric, markersize=4)
    ax.set_xlabel("queried pairs (similar + dissimilar answers)")
    ax.set_ylabel("on held-out queries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    rows = [
        [
            r["round"],
            r.get("queried_pairs"),
            r.get("implied_pairs"),
            r.get(key),
            r.get("map"),
            r.get("p@10"),
        ]
        for r in evaluated
    ]
    return _img(_png(fig), "learning curve") + _table(
        ["round", "queried", "implied", key, "mAP", "P@10"], rows
    )


def _answers_per_round(table: Any) -> str:
    if not len(table):
        return _note("No answers yet.")
    effective = table[table["in_effect"]]
    rounds = sorted(set(table["round"].tolist()))
    counts = {
        name: [
            int(((effective["round"] == r) & (effective["answer_name"] == name)).sum())
            for r in rounds
        ]
        for name in _COLOURS
    }
    undone = [int(((table["round"] == r) & table["undone"]).sum()) for r in rounds]
    fig = _figure(7.0, 3.0)
    ax = fig.add_subplot()
    bottom = np.zeros(len(rounds))
    for name, colour in _COLOURS.items():
        ax.bar(rounds, counts[name], bottom=bottom, color=colour, label=name)
        bottom += np.asarray(counts[name])
    ax.set_xlabel("round")
    ax.set_ylabel("answers in effect")
    ax.set_xticks(rounds)
    ax.legend(fontsize=8)
    rows = [
        [r, counts["similar"][k], counts["dissimilar"][k], counts["skipped"][k], undone[k]]
        for k, r in enumerate(rounds)
    ]
    return _img(_png(fig), "answers per round") + _table(
        ["round", "similar", "dissimilar", "skipped", "undone"], rows
    )


def _implied(session: Session, pool: PatchPool | None, table: Any) -> str:
    from matplotlib.ticker import MaxNLocator

    from anneal_geo.pairs.transitivity import closure

    parts: list[str] = []
    history = session.history()
    if history:
        fig = _figure(7.0, 3.0)
        ax = fig.add_subplot()
        rounds = [int(r["round"]) for r in history]
        ax.plot(
            rounds,
            [int(r.get("queried_pairs", 0)) for r in history],
            "o-",
            label="queried (similar + dissimilar)",
        )
        ax.plot(
            rounds,
            [int(r.get("implied_pairs", 0)) for r in history],
            "s-",
            label="implied by transitivity",
        )
        ax.set_xlabel("round")
        ax.set_ylabel("labelled pairs")
        ax.set_xticks(rounds)
        ax2 = ax.twinx()
        ax2.bar(
            rounds,
            [int(r.get("contradictions", 0)) for r in history],
            alpha=0.3,
            color="#d62728",
            label="contradictions",
        )
        ax2.set_ylabel("contradictions")
        most = max(int(r.get("contradictions", 0)) for r in history)
        ax2.set_ylim(0, max(1, most) * 1.25)
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
        handles = ax.get_legend_handles_labels()
        more = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
        parts.append(_img(_png(fig), "implied pairs and contradictions"))
    effective = table[table["in_effect"] & (table["answer"] != -1)]
    if len(effective):
        pairs = effective[["patch_i", "patch_j"]].to_numpy(dtype=np.int64)
        labels = effective["answer"].to_numpy(dtype=np.int8)
        n = len(pool) if pool is not None else int(pairs.max()) + 1
        found = closure(pairs, labels, n=n)
        parts.append(
            f"<p>Now: {found.n_queried} queried pairs imply {found.n_implied} more"
            + (" (truncated)" if found.truncated else "")
            + f"; {len(found.contradictions)} contradiction(s).</p>"
        )
        repair = session.config.repair
        if found.contradictions:
            rows = [[i, j] for i, j in found.contradictions[:50]]
            what = (
                "the group implies nothing until it is fixed"
                if repair == "none"
                else f"with repair = {repair}, training leaves out the answers taken for wrong"
            )
            parts.append(
                "<p>Dissimilar answers inside a group answered similar (one of the answers "
                f"is wrong; {what}):</p>" + _table(["patch i", "patch j"], rows)
            )
        if repair != "none" and history:
            suspects = int(history[-1].get("suspect_answers", 0))
            parts.append(
                f"<p>repair = {repair}: {suspects} answer(s) left out of the last round's "
                "training as suspect (stored as given; the counts above are before repair).</p>"
            )
    return "".join(parts) or _note("No answers yet.")


def _gallery(pool: PatchPool | None, table: Any, limit: int) -> str:
    effective = table[table["in_effect"]]
    if not len(effective):
        return _note("No answers yet.")
    if pool is None:
        return _note("The pool could not be opened, so its patches cannot be shown.")
    from anneal_geo.annotators.render import PatchRenderer

    last = int(effective["round"].max())
    shown = effective[effective["round"] == last]
    renderer = PatchRenderer(pool, size=128)
    figures = []
    for row in shown.head(limit).itertuples(index=False):
        picture = renderer.png(renderer.pair(int(row.patch_i), int(row.patch_j)))
        name = str(row.answer_name)
        caption = (
            f'<span class="{name}">{name}</span> · patches {row.patch_i} and {row.patch_j}'
            f"<br>{html.escape(str(row.annotator))}, {html.escape(str(row.time))}"
        )
        if row.label_i is not None:
            caption += f"<br>{html.escape(str(row.label_i))} / {html.escape(str(row.label_j))}"
        figures.append(
            f"<figure>{_img(picture, f'pair {row.patch_i} {row.patch_j}')}"
            f"<figcaption>{caption}</figcaption></figure>"
        )
    more = len(shown) - len(figures)
    head = f"<p>Round {last}: {len(shown)} answered pair(s)" + (
        f", the first {len(figures)} shown.</p>" if more > 0 else ".</p>"
    )
    return head + '<div class="gallery">' + "".join(figures) + "</div>"


def embedding_view(
    session_dir: str | Path, pool: PatchPool, table: Any, points: int = 5000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patches shown in the 2-D view and their PCA coordinates.

    Args:
        session_dir: the session (its model at the latest checkpoint embeds the patches).
        pool: the session's pool.
        table: :func:`~anneal_geo.reports.answers.answers_table` of the session.
        points: the most patches shown; every answered patch is among them, the rest is a
            seeded random sample.
        seed: seed of that sample.

    Returns:
        ``(ids, xy, explained)``: patch ids (sorted), their (n, 2) coordinates on the first
        two principal axes, and the share of variance each axis explains.
    """
    from anneal_geo.models.export import session_model

    model = session_model(session_dir)
    answered = np.unique(table[["patch_i", "patch_j"]].to_numpy(dtype=np.int64).reshape(-1))
    rest = np.setdiff1d(np.arange(len(pool), dtype=np.int64), answered)
    room = max(0, int(points) - len(answered))
    if len(rest) > room:
        rest = np.random.default_rng(seed).choice(rest, size=room, replace=False)
    ids = np.sort(np.concatenate([answered, rest]))
    embeddings = model.embed(pool, ids=ids).astype(np.float64)
    centred = embeddings - embeddings.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.zeros((len(ids), 2))
    variance = singular**2
    explained = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    return ids, xy, explained


def _embedding(session: Session, pool: PatchPool | None, table: Any, points: int) -> str:
    if pool is None:
        return _note("The pool could not be opened, so nothing can be embedded.")
    try:
        ids, xy, explained = embedding_view(session.directory, pool, table, points)
    except AnnealError as exc:
        return _note(f"No embedding view: {exc}")
    from matplotlib.collections import LineCollection

    fig = _figure(7.5, 6.0)
    ax = fig.add_subplot()
    where = {int(p): k for k, p in enumerate(ids.tolist())}
    effective = table[table["in_effect"] & (table["answer"] != -1)]
    # Dissimilar links are long and many: faint, under the similar ones; points on top.
    links = ((0, _COLOURS["dissimilar"], 0.5, 0.12), (1, _COLOURS["similar"], 0.9, 0.8))
    for value, colour, width, alpha in links:
        chosen = effective[effective["answer"] == value].head(3000)
        segments = [
            [xy[where[int(i)]], xy[where[int(j)]]]
            for i, j in zip(chosen["patch_i"], chosen["patch_j"], strict=True)
        ]
        if segments:
            ax.add_collection(
                LineCollection(
                    segments, colors=colour, linewidths=width, alpha=alpha, zorder=1 + value
                )
            )
    if pool.labels is not None and pool.class_names is not None:
        first = np.argmax(pool.labels[ids], axis=1)
        from matplotlib import colormaps

        cmap = colormaps["tab20" if len(pool.class_names) > 10 else "tab10"]
        for c, name in enumerate(pool.class_names):
            mask = first == c
            if mask.any():
                ax.scatter(
                    xy[mask, 0], xy[mask, 1], s=9, color=cmap(c % cmap.N), label=name, zorder=3
                )
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=9, color="#4c72b0", zorder=3)
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%})" if len(explained) > 1 else "PC 2")
    ax.set_title("links: answered pairs (green similar, red dissimilar)", fontsize=9)
    ax.autoscale_view()
    shown = f"{len(ids)} of {len(pool)} patches" if len(ids) < len(pool) else f"{len(ids)} patches"
    return _img(_png(fig), "embedding") + (
        f"<p>{shown}, embedded by the session's model at its latest round; "
        f"{len(effective)} answered pairs drawn.</p>"
    )


def _section(title: str, body: Callable[[], str]) -> str:
    try:
        content = body()
    except AnnealError as exc:
        content = _note(f"This section could not be drawn: {exc}")
    return f"<h2>{html.escape(title)}</h2>\n{content}\n"


def build_report(session_dir: str | Path, *, gallery: int = 24, points: int = 5000) -> str:
    """The HTML page of a session, as text (see the module docstring for its contents).

    Args:
        session_dir: the session.
        gallery: the most pairs of the last round shown as pictures.
        points: the most patches in the embedding view.
    """
    import matplotlib

    matplotlib.use("Agg")
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.reports.answers import answers_table
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    pool: PatchPool | None
    try:
        pool = PatchPool.open(session.pool_dir)
    except DataError:
        pool = None
    table = answers_table(session, pool)
    title = f"anneal-geo session {session.directory.name}"
    eval_k = session.config.eval_k
    sections = [
        _section("Summary", lambda: _summary(session, pool, table)),
        _section(f"Learning curve (mAP@{eval_k})", lambda: _learning_curve(session)),
        _section("Answers per round", lambda: _answers_per_round(table)),
        _section("Implied pairs and contradictions", lambda: _implied(session, pool, table)),
        _section("Last round's pairs", lambda: _gallery(pool, table, gallery)),
        _section("Embedding (PCA)", lambda: _embedding(session, pool, table, points)),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "".join(sections) + "</body>\n</html>\n"
    )


def write_report(
    session_dir: str | Path, out: str | Path, *, gallery: int = 24, points: int = 5000
) -> Path:
    """Write :func:`build_report` to ``out`` (an ``.html`` file) and return its path.

    Raises:
        DataError: ``out`` cannot be written.
    """
    path = Path(out)
    text = build_report(session_dir, gallery=gallery, points=points)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise DataError(
            f"cannot write {path} ({exc.strerror or exc}); choose a writable file"
        ) from exc
    return path
