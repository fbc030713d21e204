"""A retrieval index over a pool's embeddings, queried by patch, place, box or image.

:func:`build_index` embeds a pool and stores a faiss index beside it:

- for a **session**, the session's current embeddings (the engine's model at its latest
  checkpoint);
- for a **bare pool**, training-free spectral features (the ``spectral`` backbone's per-band
  statistics, texture and spectral indices), each standardised to zero mean and unit
  variance over the pool, so no feature dominates the Euclidean distance by its units;
- for **any pool with an exported model** (``model=``, :mod:`anneal_geo.models`), that
  model's embeddings: a model learnt on one pool indexes new tiles.

Queries can be restricted to an area and a time window before ranking
(:class:`~anneal_geo.retrieval.filters.SearchFilter`).

Small pools get an exact ``IndexFlatL2``; from :data:`HNSW_THRESHOLD` patches an
``IndexHNSWFlat`` (see ``benchmarks/index_recall.py`` for recall and latency). The faiss row
of a patch is its pool patch id, so ids are the same from the pool to the index to the
exported GeoPackage.

On disk, beside the session or pool (format ``anneal-geo-index``, version 1):

- ``index.faiss``: the faiss index;
- ``index.json``: kind, dimension, patch ids, the pool's directory and fingerprint, how
  queries are embedded, and the SHA-256 of ``index.faiss``.

Queries return a GeoDataFrame (EPSG:4326) with ``rank``, ``distance``, ``patch_id``,
``source``, the pixel window (``row_off``, ``col_off``, ``height``, ``width``), ``label``,
``crs`` and ``geometry``; :func:`export_results` writes it as GeoPackage or GeoJSON and
:func:`plot_results` draws the query, its best matches and a map of where they are.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo._memory import npy_row_blocks, release_free_memory
from anneal_geo.errors import ConfigError, DataError
from anneal_geo.retrieval.plots import plot_results  # drawn there; importable here too

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.retrieval.filters import SearchFilter

__all__ = [
    "FORMAT",
    "HNSW_THRESHOLD",
    "INDEX_FILE",
    "META_FILE",
    "RESULT_COLUMNS",
    "VERSION",
    "GeoIndex",
    "build_index",
    "export_results",
    "plot_results",
    "spectral_embeddings",
]

FORMAT = "anneal-geo-index"
VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
#: Pools of at least this many patches get an HNSW index instead of exact search. Below it,
#: exact search answers one query in a few milliseconds on two cores and is built at once;
#: see benchmarks/index_recall.py and docs/own_tiles.md for the measurements.
HNSW_THRESHOLD = 200_000
#: HNSW graph degree, build and search breadth (recall@20 above 0.99 on the benchmark).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
RESULT_COLUMNS = (
    "rank", "distance", "patch_id", "source", "row_off", "col_off", "height", "width",
    "label", "acquired", "crs", "geometry",
)  # fmt: skip
_BATCH = 256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} is not a positive whole number of results")
    return int(k)


# ---------------------------------------------------------------------------- embedders


def _spectral_trunk(pool: PatchPool) -> Any:
    from anneal_geo import plugins

    backbone = plugins.create("backbones", "spectral")
    return backbone.checked_build(pool.bands, pool.band_mean.tolist(), pool.band_std.tolist())


def _trunk_features(trunk: Any, patches: np.ndarray) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(patches), _BATCH):
            chunk = np.asarray(patches[start : start + _BATCH], dtype=np.float32)
            out.append(trunk(torch.from_numpy(chunk)).float().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def spectral_embeddings(pool: PatchPool) -> tuple[np.ndarray, dict[str, Any]]:
    """Training-free embeddings of a bare pool: standardised spectral features.

    Returns:
        ``((N, F) float32 embeddings, embedder)``, where ``embedder`` holds the band names
        and the per-feature mean and standard deviation used, so a query image is embedded
        the same way.
    """
    trunk = _spectral_trunk(pool)
    features = np.concatenate(
        [
            _trunk_features(trunk, pool.float_patches(np.arange(s, min(s + 4096, len(pool)))))
            for s in range(0, len(pool), 4096)
        ]
    )
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    std[std < 1e-12] = 1.0  # a constant feature stays 0 rather than dividing by zero
    embedder = {
        "kind": "spectral",
        "bands": list(pool.bands),
        "feature_mean": mean.tolist(),
        "feature_std": std.tolist(),
    }
    return ((features - mean) / std).astype(np.float32), embedder


def _session_engine(session_dir: Path, pool: PatchPool, lock: Any = None) -> Any:
    """The session's engine: writing under ``lock`` (index building), else read-only (a
    query embeds images without taking the lock, so it works while someone labels)."""
    from anneal_geo.engine import Engine
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    if lock is None:
        return Engine(session, pool, progress=False, read_only=True)
    return Engine(session, pool, progress=False, lock=lock)


#: Rows added to an index at a time when it is filled from a saved embeddings file.
_ADD_BLOCK = 65_536
#: Where ``build_index`` keeps a session's embeddings while it fills the index (removed
#: after; a copy left by an interrupted build is written over by the next).
SESSION_EMBEDDINGS_FILE = "index_embeddings.partial.npy"


def _session_embeddings(
    session_dir: Path, lock: Any
) -> tuple[np.ndarray, dict[str, Any], PatchPool]:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.session import Session

    session = Session.open(session_dir)
    pool = PatchPool.open(session.pool_dir)
    with _session_engine(session_dir, pool, lock) as engine:
        embeddings = np.asarray(engine.embeddings, dtype=np.float32)
        bands = list(engine.pool.bands)
    # Only the embeddings go on: the engine's trunk features (1 GB at a million patches)
    # must be gone before faiss copies the embeddings into the index.
    del engine
    gc.collect()
    release_free_memory()
    latest = session.latest_checkpoint()
    embedder = {
        "kind": "session",
        "session": str(session_dir.resolve()),
        "round": None if latest is None else latest[0],
        "bands": bands,
        "query_expansion": int(session.config.query_expansion),
    }
    return embeddings, embedder, pool


# ---------------------------------------------------------------------------- the index


class GeoIndex:
    """A faiss index whose row ``i`` is pool patch ``i``, with geo-aware queries.

    Build with :meth:`build` or :func:`build_index`, reopen with :meth:`load`.

    Attributes:
        index: the faiss index.
        meta: the ``index.json`` content.
        pool: the pool the ids refer to.
        path: the folder holding the index files, once saved or loaded.
    """

    def __init__(
        self, index: Any, meta: dict[str, Any], pool: PatchPool, path: Path | None = None
    ) -> None:
        self.index = index
        self.meta = meta
        self.pool = pool
        self.path = path
        self._engine: Any = None
        self._trunk: Any = None
        self._model: Any = None

    # -- building ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray | str | Path,
        pool: PatchPool,
        *,
        embedder: dict[str, Any],
        kind: str = "auto",
        hnsw_threshold: int = HNSW_THRESHOLD,
    ) -> GeoIndex:
        """Index ``embeddings`` (row i = pool patch i).

        Args:
            embeddings: (N, D) float embeddings, N = ``len(pool)``; or the path of a saved
                ``.npy`` of them, which is read and added :data:`_ADD_BLOCK` rows at a time
                into an index whose storage is reserved first, so the embeddings are
                never held twice (1.5 GB each at a million 376-d rows).
            pool: the pool they embed.
            embedder: how a query image is embedded (``{"kind": "spectral", ...}`` from
                :func:`spectral_embeddings`, or ``{"kind": "session", "session": DIR}``).
            kind: ``auto`` (flat below ``hnsw_threshold``, else HNSW), ``flat`` or ``hnsw``.
            hnsw_threshold: the pool size from which ``auto`` picks HNSW.
        """
        import faiss

        from anneal_geo.retrieval.index import _as_matrix

        blocks: Iterator[np.ndarray]
        if isinstance(embeddings, (str, Path)):
            (n, dim), blocks = npy_row_blocks(Path(embeddings), _ADD_BLOCK, "embed again")
            what = str(embeddings)
        else:
            vectors = _as_matrix(embeddings, "embeddings")
            (n, dim), blocks, what = vectors.shape, iter([vectors]), "embeddings"
        if n != len(pool):
            raise DataError(
                f"{n} embeddings for a pool of {len(pool)} patches; embed every patch of the pool"
            )
        if kind not in ("auto", "flat", "hnsw"):
            raise ConfigError(f"index kind {kind!r} is unknown; use auto, flat or hnsw")
        if kind == "auto":
            kind = "hnsw" if len(pool) >= hnsw_threshold else "flat"
        hnsw: dict[str, int] | None = None
        index: Any
        if kind == "flat":
            index = faiss.IndexFlatL2(dim)
        else:
            hnsw = {
                "M": HNSW_M,
                "ef_construction": HNSW_EF_CONSTRUCTION,
                "ef_search": HNSW_EF_SEARCH,
            }
            index = faiss.IndexHNSWFlat(dim, HNSW_M)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
        if isinstance(embeddings, (str, Path)):
            # Room for every row at once: growing the storage block by block would copy it
            # each time it doubles, holding it twice at the end.
            storage: Any = index if kind == "flat" else faiss.downcast_index(index.storage)
            storage.codes.resize(n * dim * 4)
            storage.codes.resize(0)  # the capacity stays
        for block in blocks:
            index.add(_as_matrix(block, what))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "kind": kind,
            "metric": "l2",
            "dim": int(dim),
            "n": int(n),
            "ids": {"start": 0, "stop": int(n)},
            "hnsw": hnsw,
            "pool_dir": None if pool.path is None else str(Path(pool.path).resolve()),
            "pool_fingerprint": pool.fingerprint,
            "patch_size": list(pool.patch_size),
            "resolution": pool.resolution,
            "embedder": embedder,
        }
        return cls(index, meta, pool)

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``index.json`` (last, atomically) into ``directory``."""
        import faiss

        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (INDEX_FILE + ".partial")
            faiss.write_index(self.index, str(tmp))
            self.meta["faiss_sha256"] = _sha256(tmp)
            os.replace(tmp, directory / INDEX_FILE)
            tmp = directory / (META_FILE + ".partial")
            tmp.write_text(json.dumps(self.meta, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, directory / META_FILE)
        except (OSError, RuntimeError) as exc:
            raise DataError(
                f"cannot write the index to {directory} ({exc}); choose a writable folder"
            ) from exc
        self.path = directory
        return directory

    @classmethod
    def load(cls, path: str | Path, pool: PatchPool | None = None) -> GeoIndex:
        """Open a saved index and its pool, checking that they belong together.

        Args:
            path: the folder holding ``index.json`` (a session or pool folder), or the
                ``index.json`` / ``index.faiss`` file itself.
            pool: the pool to use (default: the pool directory recorded in ``index.json``).

        Raises:
            DataError: missing, corrupt or foreign files, or an index built from another
                pool (fingerprint or size differ).
        """
        import faiss

        from anneal_geo.data.pool import PatchPool

        path = Path(path)
        if not path.exists():
            raise DataError(
                f"{path} does not exist; give the folder holding {META_FILE} (the session or "
                "pool the index was built for)"
            )
        directory = path if path.is_dir() else path.parent
        meta_path, faiss_path = directory / META_FILE, directory / INDEX_FILE
        if not meta_path.is_file():
            raise DataError(
                f"{meta_path} not found: {directory} holds no index; build one with "
                "`anneal-geo index SESSION_OR_POOL`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(
                f"{meta_path} is corrupt ({str(exc).splitlines()[0]}); rebuild the index with "
                "`anneal-geo index`"
            ) from exc
        if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (
            FORMAT,
            VERSION,
        ):
            raise DataError(
                f"{meta_path} is not an anneal-geo index (format {FORMAT!r} version {VERSION}); "
                "rebuild it with `anneal-geo index`"
            )
        if not faiss_path.is_file():
            raise DataError(f"{faiss_path} is missing; rebuild the index with `anneal-geo index`")
        if meta.get("faiss_sha256") and _sha256(faiss_path) != meta["faiss_sha256"]:
            raise DataError(
                f"{faiss_path} is corrupt or was replaced (its SHA-256 differs from "
                f"{META_FILE}); rebuild the index with `anneal-geo index`"
            )
        index: Any
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError as exc:
            raise DataError(
                f"{faiss_path} is corrupt (faiss cannot read it); rebuild the index with "
                "`anneal-geo index`"
            ) from exc
        if index.ntotal != meta.get("n") or index.d != meta.get("dim"):
            raise DataError(
                f"{faiss_path} holds {index.ntotal} vectors of {index.d} dimensions but "
                f"{META_FILE} says {meta.get('n')} of {meta.get('dim')}; rebuild the index"
            )
        if pool is None:
            # The pool beside the index wins over the recorded path: an index copied next
            # to another pool is checked against that pool, not silently used for its own.
            if (directory / "pool.json").is_file():
                pool = PatchPool.open(directory)
            elif (directory / "session.toml").is_file():
                from anneal_geo.session import Session

                pool = PatchPool.open(Session.open(directory).pool_dir)
            elif meta.get("pool_dir"):
                pool = PatchPool.open(meta["pool_dir"])
            else:
                raise DataError(
                    f"{meta_path} records no pool directory; pass the pool to GeoIndex.load"
                )
        if not pool.has_fingerprint(meta.get("pool_fingerprint")) or len(pool) != index.ntotal:
            raise DataError(
                f"the index in {directory} was built from another pool (fingerprint "
                f"{meta.get('pool_fingerprint')}, {index.ntotal} patches) than "
                f"{pool.path or 'the given pool'} (fingerprint {pool.fingerprint}, "
                f"{len(pool)} patches); rebuild it with `anneal-geo index`"
            )
        if meta.get("hnsw"):
            index.hnsw.efSearch = int(meta["hnsw"]["ef_search"])
        return cls(index, meta, pool, directory)

    # -- properties ----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``flat`` (exact) or ``hnsw``."""
        return str(self.meta["kind"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return f"GeoIndex({len(self)} patches, {self.meta['dim']}-d, {self.kind})"

    def staleness(self) -> str | None:
        """For a session index: a note when the session has trained further rounds since the
        index was built (its embeddings have moved on); for a model index, when the model
        directory holds other weights now; else None."""
        embedder = self.meta.get("embedder", {})
        if embedder.get("kind") == "model":
            from anneal_geo.models.card import read_card

            try:
                current = read_card(embedder["model"]).get("weights_sha256")
            except Exception:  # a moved model: the index itself is still usable
                return None
            if current != embedder.get("weights_sha256"):
                return (
                    f"the model in {embedder['model']} was exported again since this index "
                    "was built; rebuild it with `anneal-geo index POOL --model "
                    f"{embedder['model']}`"
                )
            return None
        if embedder.get("kind") != "session":
            return None
        from anneal_geo.session import Session

        try:
            latest = Session.open(embedder["session"]).latest_checkpoint()
        except Exception:  # a moved or deleted session: the index itself is still usable
            return None
        if latest is not None and latest[0] != embedder.get("round"):
            return (
                f"the session has finished round {latest[0]} since this index was built "
                f"(round {embedder.get('round')}); rebuild it with `anneal-geo index "
                f"{embedder['session']}` to search the newest embeddings"
            )
        return None

    # -- search --------------------------------------------------------------------------
    def vectors(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """The indexed embeddings of patches ``ids`` (read back from the index)."""
        arr = self.pool._check_ids(ids).reshape(-1)
        return np.asarray(self.index.reconstruct_batch(arr), dtype=np.float32)

    @property
    def query_expansion(self) -> int:
        """How many nearest patches each query is averaged with before ranking (average
        query expansion; 0 = off): the session's or the model's ``query_expansion`` setting
        (0 for a bare pool's spectral features and for indexes saved before it existed)."""
        return int(self.meta["embedder"].get("query_expansion", 0))

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: np.ndarray | None = None,
        allowed: np.ndarray | None = None,
        query_expansion: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest patches of one query vector, leaving out ``exclude``.

        ``allowed`` (sorted patch ids, from :meth:`SearchFilter.allowed
        <anneal_geo.retrieval.filters.SearchFilter.allowed>`) restricts the search to those
        patches before ranking. With query expansion n > 0 (``query_expansion``, default
        :attr:`query_expansion`) the query is first averaged with its n nearest patches of
        the whole index other than ``exclude``
        (:func:`~anneal_geo.retrieval.index.average_expansion`), as the session's
        evaluation ranks; distances are then to that average.

        Returns:
            ``(distances, patch_ids)``, each (k',) with k' = min(k, patches left), by
            ascending Euclidean distance.
        """
        from anneal_geo.retrieval.index import average_expansion

        k = _check_k(k)
        n = self._expansion(query_expansion)
        query = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(1, -1))
        if query.shape[1] != self.index.d:
            raise DataError(
                f"the query has {query.shape[1]} dimensions but the index {self.index.d}; "
                "embed it with the index's embedder"
            )
        left_out = np.zeros(0, dtype=np.int64) if exclude is None else np.asarray(exclude).ravel()
        if n > 0:
            _, ids = self._nearest(query, min(n + left_out.size, len(self)), None)
            near = ids[(ids >= 0) & ~np.isin(ids, left_out)][:n]
            if near.size:
                query = average_expansion(query, self.vectors(near)[None])
        skip = left_out if allowed is None else left_out[np.isin(left_out, allowed)]
        want = min(k + skip.size, len(self) if allowed is None else len(allowed))
        squared, ids = self._nearest(query, want, allowed)
        mask = (ids >= 0) & ~np.isin(ids, skip)
        distances = np.sqrt(np.maximum(squared[mask], 0.0)).astype(np.float32)
        return distances[:k], ids[mask][:k]

    def _nearest(
        self, query: np.ndarray, want: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``want`` nearest (squared distances, ids) of one (1, D) query, among
        ``allowed`` when given (ids -1 where fewer exist)."""
        import faiss

        # One query is too little work to share: on a busy machine faiss's OpenMP threads
        # made a single exact search over 10k vectors 600x slower (47 ms instead of 0.08).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            if allowed is None:
                squared, ids = self.index.search(query, want)
                return squared[0], ids[0].astype(np.int64)
            from anneal_geo.retrieval.filters import restricted_search

            squared, ids = restricted_search(self.index, query, want, allowed)
            return squared, ids
        finally:
            faiss.omp_set_num_threads(threads)

    def _frame(self, distances: np.ndarray, ids: np.ndarray, query: dict[str, Any]) -> Any:
        """The results GeoDataFrame (see :data:`RESULT_COLUMNS`)."""
        import geopandas as gpd

        # Only the rows wanted (a big pool reads them alone from its footprints file).
        footprints = self.pool.footprint_rows(ids)
        n = len(ids)
        frame: dict[str, Any] = {
            "rank": np.arange(1, n + 1, dtype=np.int64),
            "distance": distances.astype(np.float64),
            "patch_id": ids,
            "source": [self.pool.sources[i] for i in ids.tolist()],
        }
        h, w = self.pool.patch_size
        if footprints is not None:
            rows = footprints
            for column in ("row_off", "col_off", "height", "width"):
                frame[column] = rows[column].to_numpy(dtype=np.int64)
            frame["label"] = [self.pool.label_text(i) for i in ids.tolist()]
            frame["crs"] = rows["crs"].to_list()
            geometry = rows.geometry.to_list()
        else:
            frame.update(
                row_off=np.zeros(n, np.int64),
                col_off=np.zeros(n, np.int64),
                height=np.full(n, h, np.int64),
                width=np.full(n, w, np.int64),
                label=[self.pool.label_text(i) for i in ids.tolist()],
                crs=[None] * n,
            )
            geometry = [None] * n
        frame["acquired"] = [self.pool.acquired[i] for i in ids.tolist()]
        if footprints is not None and query.get("patch_ids"):
            import shapely

            # The query's own outline travels with the results (the GeoPackage's query layer).
            own = self.pool.footprint_rows(query["patch_ids"])
            outline = shapely.union_all(own.geometry.to_numpy())
            query = {**query, "area_wkt": shapely.to_wkt(outline, rounding_precision=-1)}
        result = gpd.GeoDataFrame(frame, geometry=geometry, crs="EPSG:4326")
        result.attrs["query"] = query
        return result[list(RESULT_COLUMNS)]

    @staticmethod
    def _filtered(
        pool: PatchPool, filters: SearchFilter | None
    ) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The allowed patch ids of ``filters`` (None: no filter) and their description."""
        if filters is None:
            return None, {}
        return filters.allowed(pool), {"filters": filters.describe()}

    def _georeferenced_or_fail(self, what: str) -> None:
        if not self.pool.georeferenced:
            raise DataError(
                f"the pool has no georeference (no CRS in its sources), so it cannot be "
                f"queried by {what}; query by --patch or --image"
            )

    def query_patch(
        self,
        patch_id: int,
        k: int = 20,
        *,
        include_query: bool = False,
        filters: SearchFilter | None = None,
        query_expansion: int | None = None,
    ) -> Any:
        """The ``k`` patches most similar to pool patch ``patch_id`` (itself left out unless
        ``include_query``), among those passing ``filters`` (area, dates) when given.
        ``query_expansion`` overrides the index's (see :meth:`search`); so do the other
        ``query_*`` methods'."""
        pid = int(self.pool._check_ids(patch_id))
        allowed, described = self._filtered(self.pool, filters)
        expansion = self._expansion(query_expansion)
        distances, ids = self.search(
            self.vectors([pid])[0],
            k,
            None if include_query else np.array([pid]),
            allowed,
            query_expansion=expansion,
        )
        query = {"kind": "patch", "patch_ids": [pid], "query_expansion": expansion}
        return self._frame(distances, ids, {**query, **described})

    def _expansion(self, query_expansion: int | None) -> int:
        """The query expansion a search uses: the given one, else the index's."""
        from anneal_geo.retrieval.index import check_expansion

        return check_expansion(self.query_expansion if query_expansion is None else query_expansion)

    def patch_at(self, lon: float, lat: float) -> int:
        """The patch whose footprint contains (lon, lat); of several, the one whose centre is
        nearest.

        Raises:
            DataError: the point lies outside every footprint.
        """
        import shapely

        if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
            raise DataError(
                f"point ({lon}, {lat}) is not a longitude, latitude in degrees; give LON,LAT"
            )
        self._georeferenced_or_fail("point")
        point = shapely.Point(lon, lat)
        hits = self.pool.patches_intersecting(point)
        if hits.size == 0:
            w, s, e, n = self.pool.footprint_bounds()
            raise DataError(
                f"point ({lon}, {lat}) lies outside every patch footprint of the pool (its "
                f"patches span lon {w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f}); pick a point "
                "inside"
            )
        centres = shapely.centroid(self.pool.footprint_rows(hits).geometry.to_numpy())
        nearest = int(np.argmin(shapely.distance(centres, point)))
        return int(hits[nearest])

    def query_point(
        self,
        lon: float,
        lat: float,
        k: int = 20,
        *,
        include_query: bool = False,
        filters: SearchFilter | None = None,
        query_expansion: int | None = None,
    ) -> Any:
        """The ``k`` patches most similar to the patch at (lon, lat) (EPSG:4326)."""
        pid = self.patch_at(lon, lat)
        frame = self.query_patch(
            pid, k, include_query=include_query, filters=filters, query_expansion=query_expansion
        )
        frame.attrs["query"] = {**frame.attrs["query"], "kind": "point", "point": [lon, lat]}
        return frame

    def query_bbox(
        self,
        west: float,
        south: float,
        east: float,
        north: float,
        k: int = 20,
        *,
        include_query: bool = False,
        filters: SearchFilter | None = None,
        query_expansion: int | None = None,
    ) -> Any:
        """The ``k`` patches most similar to the mean embedding of the patches that
        intersect the box (EPSG:4326); those patches are left out unless ``include_query``.
        ``filters`` restrict the results (not the box's patches).
        """
        import shapely

        if not (west < east and south < north):
            raise DataError(
                f"box ({west}, {south}, {east}, {north}) is empty; give W,S,E,N with W < E "
                "and S < N in degrees"
            )
        self._georeferenced_or_fail("box")
        ids = self.pool.patches_intersecting(shapely.box(west, south, east, north))
        if ids.size == 0:
            w, s, e, n = self.pool.footprint_bounds()
            raise DataError(
                f"box ({west}, {south}, {east}, {north}) overlaps no patch footprint (the "
                f"patches span lon {w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f}); move the box"
            )
        centre = self.vectors(ids).mean(axis=0)
        allowed, described = self._filtered(self.pool, filters)
        expansion = self._expansion(query_expansion)
        distances, found = self.search(
            centre, k, None if include_query else ids, allowed, query_expansion=expansion
        )
        query = {
            "kind": "bbox",
            "bbox": [west, south, east, north],
            "patch_ids": ids.tolist(),
            "query_expansion": expansion,
        }
        return self._frame(distances, found, {**query, **described})

    def query_image(
        self,
        path: str | Path,
        k: int = 20,
        *,
        filters: SearchFilter | None = None,
        query_expansion: int | None = None,
    ) -> Any:
        """The ``k`` patches most similar to an image file (its patches' mean embedding).
        With query expansion a pool patch the image copies need not come first (the
        ranking is by the average of the image and its nearest patches); pass
        ``query_expansion=0`` to look an image up."""
        from anneal_geo.retrieval.filters import image_outline

        vector = self.embed_patches(self.image_patches(path)).mean(axis=0)
        allowed, described = self._filtered(self.pool, filters)
        expansion = self._expansion(query_expansion)
        distances, ids = self.search(vector, k, None, allowed, query_expansion=expansion)
        query = {
            "kind": "image",
            "image": str(path),
            "image_wkt": image_outline(path),
            "query_expansion": expansion,
        }
        return self._frame(distances, ids, {**query, **described})

    # -- embedding new images ---------------------------------------------------------------
    def embed_patches(self, patches: np.ndarray) -> np.ndarray:
        """Embeddings (n, D) of raw patches (n, C, H, W) in the index's band order."""
        embedder = self.meta["embedder"]
        arr = np.asarray(patches, dtype=np.float32)
        if embedder["kind"] == "spectral":
            if self._trunk is None:
                self._trunk = _spectral_trunk(self.pool)
            features = _trunk_features(self._trunk, arr)
            mean = np.asarray(embedder["feature_mean"], dtype=np.float64)
            std = np.asarray(embedder["feature_std"], dtype=np.float64)
            return ((features - mean) / std).astype(np.float32)
        if embedder["kind"] == "session":
            if self._engine is None:
                session_dir = Path(embedder["session"])
                if self.path is not None and (self.path / "session.toml").is_file():
                    session_dir = self.path  # the session the index lies in
                self._engine = _session_engine(session_dir, self.pool)
            out = self._engine.trainer.embed_patches(arr)
            return np.asarray(out, dtype=np.float32)
        if embedder["kind"] == "model":
            if self._model is None:
                from anneal_geo.models.model import load_model

                self._model = load_model(embedder["model"])
            return np.asarray(self._model.embed(arr, bands=embedder["bands"]), dtype=np.float32)
        raise DataError(f"index embedder {embedder['kind']!r} is unknown; rebuild the index")

    def image_patches(self, path: str | Path) -> np.ndarray:
        """Read an image file and cut it into whole patches of the pool's size.

        Returns:
            (n, C, P, P) patches with the index's bands, in its order (``meta["embedder"]
            ["bands"]``); an image of exactly one patch gives one.

        Raises:
            DataError: unreadable file, missing bands, smaller than a patch, or at another
                resolution than the pool.
        """
        import warnings

        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        from anneal_geo.data.bands import band_indices, infer_band_names
        from anneal_geo.data.sources import RGB_SUFFIXES
        from anneal_geo.data.tiles import patch_grid

        path = Path(path)
        if not path.is_file():
            raise DataError(f"image {path} does not exist; give a GeoTIFF, JPEG or PNG file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    data = src.read()
                    names = infer_band_names(
                        src.count,
                        list(src.descriptions),
                        rgb_image=src.dtypes[0] == "uint8" and path.suffix.lower() in RGB_SUFFIXES,
                        where=str(path),
                    )
                    res = None if src.crs is None else float(abs(src.transform.a))
        except RasterioError as exc:
            raise DataError(
                f"image {path} could not be read ({str(exc).splitlines()[0]}); give a valid "
                "GeoTIFF, JPEG or PNG"
            ) from exc
        bands = list(self.meta["embedder"]["bands"])
        try:
            channels = band_indices(names, bands)
        except DataError:
            missing = [b for b in bands if b not in names]
            raise DataError(
                f"image {path} lacks band(s) {', '.join(missing)} the index needs (it has "
                f"{', '.join(names)}); give an image with bands {', '.join(bands)}"
            ) from None
        pool_res = self.meta.get("resolution")
        if res is not None and pool_res and not math.isclose(res, pool_res, rel_tol=0.05):
            raise DataError(
                f"image {path} has {res:g} m pixels but the pool {pool_res:g} m; resample it "
                "to the pool's resolution first"
            )
        size = self.pool.patch_size[0]
        height, width = data.shape[1:]
        try:
            rows, cols, row0, col0 = patch_grid(height, width, size, size)
        except DataError:
            raise DataError(
                f"image {path} is {width}x{height} px, smaller than the pool's {size} px "
                "patches; give a larger image"
            ) from None
        selected = data[channels]
        patches = np.stack(
            [
                selected[
                    :,
                    row0 + r * size : row0 + (r + 1) * size,
                    col0 + c * size : col0 + (c + 1) * size,
                ]
                for r in range(rows)
                for c in range(cols)
            ]
        )
        return patches

    def close(self) -> None:
        """Release the session engine, if a query image needed one."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def build_index(
    source: str | Path,
    out: str | Path | None = None,
    *,
    kind: str = "auto",
    model: str | Path | None = None,
) -> GeoIndex:
    """Embed a session's or a bare pool's patches and save the index.

    Args:
        source: a session directory (``session.toml``: its current embeddings) or a pool
            directory (``pool.json``: standardised spectral features, or ``model``'s
            embeddings).
        out: where to write ``index.faiss``/``index.json`` (default: ``source`` itself).
        kind: ``auto``, ``flat`` or ``hnsw``.
        model: an exported model directory (``anneal-geo export``) that embeds the pool;
            only with a pool directory.

    Raises:
        DataError: ``source`` is neither a session nor a pool directory, or ``model`` is
            given with a session, or the pool lacks a band the model needs.
    """
    from anneal_geo.data.pool import POOL_FILE, PatchPool

    source = Path(source)
    if model is not None:
        if not (source / POOL_FILE).is_file():
            raise DataError(
                f"--model indexes a pool directory ({POOL_FILE}), and {source} is none; a "
                "session is indexed with its own model (`anneal-geo index SESSION`)"
            )
        from anneal_geo.models.model import load_model

        pool = PatchPool.open(source)
        loaded = load_model(model)
        embedder = {
            "kind": "model",
            "model": str(Path(model).resolve()),
            "weights_sha256": loaded.card["weights_sha256"],
            "bands": list(loaded.bands),
            "query_expansion": loaded.query_expansion,
        }
        index = GeoIndex.build(loaded.embed(pool), pool, embedder=embedder, kind=kind)
        index.save(source if out is None else out)
        return index
    if (source / "session.toml").is_file():
        from anneal_geo.lock import SessionLock

        # Building a session's index writes into the session: one writer at a time.
        with SessionLock(source, "anneal-geo index") as lock:
            embeddings, embedder, pool = _session_embeddings(source, lock)
            # The embeddings go to disk and are let go before the index is filled from
            # there: faiss keeps its own copy of every row.
            saved = source / SESSION_EMBEDDINGS_FILE
            try:
                try:
                    np.save(saved, embeddings)
                except OSError as exc:
                    raise DataError(
                        f"cannot write {saved} ({exc}); free some disk space in the session "
                        "folder"
                    ) from exc
                del embeddings
                release_free_memory()
                index = GeoIndex.build(saved, pool, embedder=embedder, kind=kind)
            finally:
                saved.unlink(missing_ok=True)
            index.save(source if out is None else out)
        return index
    if (source / POOL_FILE).is_file():
        pool = PatchPool.open(source)
        embeddings, embedder = spectral_embeddings(pool)
    else:
        raise DataError(
            f"{source} is neither a session (session.toml) nor a pool directory ({POOL_FILE}); "
            "build a pool with `anneal-geo pool build` or run a session first"
        )
    index = GeoIndex.build(embeddings, pool, embedder=embedder, kind=kind)
    index.save(source if out is None else out)
    return index


# ---------------------------------------------------------------------------- output


def export_results(results: Any, path: str | Path) -> Path:
    """Write query results as a GeoPackage (``.gpkg``, layer ``results``) or GeoJSON.

    A GeoPackage also gets the query as a layer of its own, ``query`` (rank 0 rows: the
    query patches' outline, the point, box or image, and the search area; see
    :func:`~anneal_geo.retrieval.filters.query_layer`); ``results`` stays the first layer.

    Raises:
        ConfigError: another file extension.
        DataError: the results have no geometry (the pool is not georeferenced).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    drivers = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}
    if suffix not in drivers:
        raise ConfigError(
            f"cannot write results as {path.name}: use a .gpkg (GeoPackage) or .geojson file"
        )
    if results.geometry.isna().all():
        raise DataError(
            "the results have no footprints (the pool is not georeferenced); they cannot be "
            f"written as {suffix}"
        )
    frame = results.copy()
    for column in ("label", "acquired"):
        if column in frame:
            frame[column] = frame[column].astype(object)  # all-None has no type GDAL can store
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        layer = {"layer": "results"} if suffix == ".gpkg" else {}
        frame.to_file(path, driver=drivers[suffix], engine="pyogrio", **layer)
        if suffix == ".gpkg":
            from anneal_geo.retrieval.filters import QUERY_LAYER, query_layer

            query = query_layer(results)
            if query is not None:
                query.to_file(path, driver="GPKG", engine="pyogrio", layer=QUERY_LAYER)
    except OSError as exc:
        raise DataError(f"cannot write {path} ({exc}); choose a writable file") from exc
    return path
