"""A session's answers as a table, and exported as GeoPackage, CSV or Parquet.

Every answer row of ``annotations.sqlite`` (undo events are not rows of their own: they
mark the answer they undid) becomes one row with both patch ids, the answer, its round,
time and annotator, whether and when it was undone, and whether it is the pair's answer in
effect (its latest answer not undone; a skip in effect counts as no label).

Geometry. A GeoPackage table has one geometry column (GDAL, QGIS and geopandas read only
one), so the ``answers`` layer draws each pair as a **line between the two patches'
centroids** (EPSG:4326): on a map every answer is one feature, a link that can be styled
by ``answer``; both footprints travel in the same row as WKT text (``footprint_i``,
``footprint_j``, EPSG:4326), and a second layer ``patches`` holds the footprint polygons
of every answered patch (join on ``patch_id``). CSV and Parquet carry the same columns
with the line as WKT (``link``) or, in Parquet, as the GeoParquet geometry.
"""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.session import Session

__all__ = [
    "ANSWER_COLUMNS",
    "ANSWER_LAYER",
    "PATCH_LAYER",
    "answers_table",
    "export_answers",
]

#: Columns of :func:`answers_table`, in order.
ANSWER_COLUMNS = (
    "seq", "round", "patch_i", "patch_j", "answer", "answer_name", "annotator", "time",
    "undone", "undone_time", "undone_by", "in_effect", "label_i", "label_j",
)  # fmt: skip
ANSWER_LAYER = "answers"
PATCH_LAYER = "patches"
_NAMES = {1: "similar", 0: "dissimilar", -1: "skipped"}
_FORMATS = (".gpkg", ".csv", ".parquet")


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(float(timestamp), UTC).isoformat(timespec="seconds")


def _raw_rows(session: Session) -> list[tuple[Any, ...]]:
    """Every row of the session's answer log, in order (nothing when it has none yet)."""
    from anneal_geo.pairs.store import PairStore

    if not session.store_path.is_file():
        return []
    with PairStore(session.store_path) as store:
        return list(
            store.conn.execute(
                "SELECT seq, round, i, j, answer, annotator, created, undoes FROM answers "
                "ORDER BY seq"
            )
        )


def answers_table(session: Session, pool: PatchPool | None = None) -> Any:
    """Every answer of the session as a ``pandas.DataFrame`` with :data:`ANSWER_COLUMNS`.

    Args:
        session: the session.
        pool: its pool, for the patches' labels (``label_i``/``label_j``; None without).
    """
    import pandas as pd

    rows = _raw_rows(session)
    undo_of: dict[int, tuple[float, str]] = {
        int(r[7]): (float(r[6]), str(r[5])) for r in rows if r[7] is not None
    }
    answers = [r for r in rows if r[7] is None]
    latest: dict[tuple[int, int], int] = {}
    for seq, _, i, j, *_ in answers:
        if int(seq) not in undo_of:
            latest[(int(i), int(j))] = int(seq)
    effective = set(latest.values())
    labels = (
        (lambda k: pool.label_text(k))
        if pool is not None and pool.labels is not None
        else (lambda k: None)
    )
    records = []
    for seq, rnd, i, j, answer, annotator, created, _ in answers:
        undo = undo_of.get(int(seq))
        records.append(
            {
                "seq": int(seq),
                "round": int(rnd),
                "patch_i": int(i),
                "patch_j": int(j),
                "answer": int(answer),
                "answer_name": _NAMES[int(answer)],
                "annotator": str(annotator),
                "time": _iso(created),
                "undone": undo is not None,
                "undone_time": None if undo is None else _iso(undo[0]),
                "undone_by": None if undo is None else undo[1],
                "in_effect": int(seq) in effective,
                "label_i": labels(int(i)),
                "label_j": labels(int(j)),
            }
        )
    frame = pd.DataFrame.from_records(records, columns=list(ANSWER_COLUMNS))
    for column in ("seq", "round", "patch_i", "patch_j", "answer"):
        frame[column] = frame[column].astype(np.int64)
    for column in ("undone", "in_effect"):
        frame[column] = frame[column].astype(bool)
    return frame


def _geometries(pool: PatchPool, table: Any) -> tuple[Any, Any, Any, Any]:
    """(footprints GeoDataFrame, links, footprint_i WKT, footprint_j WKT) of the answers."""
    import shapely

    footprints = pool.footprints
    if footprints is None:
        raise DataError(
            "the session's pool has no footprints (its sources carry no CRS), so the answers "
            "cannot be drawn on a map; export them as .csv instead"
        )
    outlines = np.empty(len(pool), dtype=object)
    outlines[footprints["patch_id"].to_numpy(dtype=np.int64)] = footprints.geometry.to_numpy()
    centres = shapely.centroid(outlines)
    i = table["patch_i"].to_numpy(dtype=np.int64)
    j = table["patch_j"].to_numpy(dtype=np.int64)
    coords = np.stack(
        [
            np.stack([shapely.get_x(centres[i]), shapely.get_y(centres[i])], axis=1),
            np.stack([shapely.get_x(centres[j]), shapely.get_y(centres[j])], axis=1),
        ],
        axis=1,
    )  # (M, 2 points, 2)
    links = shapely.linestrings(coords) if len(table) else np.empty(0, dtype=object)
    wkt_i = shapely.to_wkt(outlines[i], rounding_precision=-1)
    wkt_j = shapely.to_wkt(outlines[j], rounding_precision=-1)
    return footprints, links, wkt_i, wkt_j


def _patches_layer(footprints: Any, table: Any) -> Any:
    ids = np.unique(np.concatenate([table["patch_i"], table["patch_j"]])).astype(np.int64)
    counts = np.bincount(
        np.concatenate([table["patch_i"], table["patch_j"]]).astype(np.int64),
        minlength=int(ids.max()) + 1 if ids.size else 0,
    )
    by_id = footprints.set_index("patch_id", drop=False)
    layer = by_id.loc[ids, ["patch_id", "source", "crs", "row_off", "col_off", "label"]].copy()
    layer["answers"] = counts[ids] if ids.size else np.zeros(0, dtype=np.int64)
    layer["label"] = layer["label"].astype(object)
    import geopandas as gpd

    return gpd.GeoDataFrame(
        layer.reset_index(drop=True), geometry=by_id.geometry.loc[ids].to_list(), crs="EPSG:4326"
    )


def export_answers(session_dir: str | Path, out: str | Path) -> tuple[Path, int]:
    """Write every answer of a session to ``out`` (``.gpkg``, ``.csv`` or ``.parquet``).

    Returns:
        ``(path, number of answer rows)``.

    Raises:
        ConfigError: another file type, or ``.parquet`` without the ``pyarrow`` package.
        DataError: ``.gpkg``/``.parquet`` for a pool without footprints, or an unwritable file.
    """
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.session import Session

    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ConfigError(
            f"cannot write answers as {path.name}: use a .gpkg (GeoPackage), .csv or .parquet file"
        )
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError(
            f"writing {path.name} needs the pyarrow package, which is not installed; "
            "pip install pyarrow, or write a .gpkg or .csv file"
        )
    session = Session.open(session_dir)
    pool = PatchPool.open(session.pool_dir)
    table = answers_table(session, pool)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            frame = table.copy()
            if pool.footprints is not None:
                _, links, wkt_i, wkt_j = _geometries(pool, table)
                import shapely

                frame["footprint_i"], frame["footprint_j"] = wkt_i, wkt_j
                frame["link"] = shapely.to_wkt(links, rounding_precision=-1)
            frame.to_csv(path, index=False)
            return path, len(table)
        import geopandas as gpd

        footprints, links, wkt_i, wkt_j = _geometries(pool, table)
        frame = table.copy()
        frame["footprint_i"], frame["footprint_j"] = wkt_i, wkt_j
        for column in ("label_i", "label_j", "undone_time", "undone_by"):
            frame[column] = frame[column].astype(object)  # all-None has no GDAL type
        answers = gpd.GeoDataFrame(frame, geometry=list(links), crs="EPSG:4326")
        path.unlink(missing_ok=True)
        if suffix == ".parquet":
            answers.to_parquet(path, index=False)
            return path, len(table)
        answers.to_file(path, layer=ANSWER_LAYER, driver="GPKG", engine="pyogrio")
        if len(table):
            _patches_layer(footprints, table).to_file(
                path, layer=PATCH_LAYER, driver="GPKG", engine="pyogrio"
            )
    except OSError as exc:
        raise DataError(f"cannot write {path} ({exc}); choose a writable file") from exc
    return path, len(table)
