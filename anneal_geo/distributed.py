"""Embedding in tasks, in this process or on a Dask cluster: a saved pool, or tiles read where
they lie.

**A saved pool** (:func:`embed_pool`). The pool directory is the unit of exchange. Each task
carries only the pool's path, a chunk of patch ids (a row range) and a small recipe for the
network (backbone name and options, seed, bands, optional checkpoint or exported model); the
worker opens the pool itself with :meth:`~anneal_geo.data.pool.PatchPool.open`
(``patches.npy`` is memory-mapped, so it reads just the rows of its chunk), rebuilds the
network once per process, and sends back a (rows, D) float32 block. No patch goes through the
scheduler or the client, so the pool must sit where every worker can open the same path.

**A tile archive** (:func:`embed_tiles`). No pool is written at all: the client finds the
scenes (:func:`~anneal_geo.data.tiles.find_scenes`), and each task is one scene, which the
worker cuts into patches through the same TorchGeo reader ``pool build`` uses
(:func:`~anneal_geo.data.tiles.read_tiles`, on a folder of links to that scene's files, so
that it reads this scene and no other) and embeds; it sends back the block with each patch's
georeference, pixel window, source and checksum. The client puts the blocks in scene order,
which is the patch-id order :meth:`~anneal_geo.data.pool.PatchPool.from_tiles` gives (scenes
in natural order, each scene's kept patches row by row, north-west first), and writes the
embeddings and the footprints. A backbone standardises with the pool's per-band mean and
standard deviation; without an exported model (which carries them) a first pass over the
scenes computes them (each worker reads its scene and returns per-band sums; the client
merges them with Chan's formula), and the second pass embeds.

**Pool-wide feature statistics.** A trunk that fits statistics on the whole pool before its
features mean anything (``raw_features``/``fit_statistics``/``normalise``, like the
``texture`` backbone's) is fitted as the trainer fits it
(:meth:`~anneal_geo.training.Trainer.cache_features`): the workers send back raw features,
the client fits the statistics on all of them and normalises; the fitted trunk's state is
written next to the output (``NAME.trunk.pt``). A trunk from a checkpoint or an exported
model is already fitted and is applied as it is.

The same task functions (:func:`embed_chunk`, :func:`scene_statistics`,
:func:`embed_scene`) run in every path, so a cluster, a :class:`~distributed.LocalCluster`
and the in-process loop give the same numbers as the single-process trainer on the pool
``PatchPool.from_tiles`` builds from the same folder (to float tolerance: sums may be taken
in another order for another split).

Importing this module imports neither torch nor dask; they are imported when used.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from anneal_geo.data.pool import PatchPool
    from anneal_geo.data.sources import GeoRef
    from anneal_geo.data.tiles import IngestReport
    from anneal_geo.models.model import Model

__all__ = [
    "DEFAULT_CHUNK",
    "EmbedRecipe",
    "SceneBlock",
    "ScenePart",
    "TileEmbedding",
    "TileRecipe",
    "chunk_ranges",
    "embed_chunk",
    "embed_pool",
    "embed_scene",
    "embed_tiles",
    "output_files",
    "scene_statistics",
]

#: Patches per task. Large enough that a task's fixed cost (scheduling, a result message)
#: is small beside its compute (4,096 EuroSAT patches take seconds on the spectral trunk),
#: small enough that a worker's chunk of raw patches stays ~200 MB for 13 x 64 x 64 float32.
DEFAULT_CHUNK = 4096

#: Tasks kept in flight per worker thread: enough to hide the round trip, few enough that
#: finished blocks never pile up in worker memory while the client writes earlier ones.
_IN_FLIGHT_PER_WORKER = 2

#: Rows per block when the client copies or normalises the result.
_COPY_ROWS = 65536

#: Format of the ``NAME.json`` written beside the embeddings of a tile archive.
TILE_EMBEDDING_FORMAT = "anneal-geo-tile-embeddings"


@dataclass(frozen=True)
class EmbedRecipe:
    """How to rebuild the network on a worker: plain, hashable values only.

    Attributes:
        pool_dir: the pool directory, as every worker can open it.
        backbone: the backbone plugin name, e.g. ``"spectral"``.
        backbone_options: the plugin's options as a JSON object text (hashable).
        seed: seed of the backbone (the engine seeds torch with it before building).
        bands: the bands to feed the network, in order, or None for all of the pool's.
        checkpoint: a trainer checkpoint (``torch.save(trainer.state_dict())``, as a session
            writes them) whose model (trunk and head) to apply, or None for trunk features.
        batch_size: patches per forward pass inside a task.
        torch_threads: torch threads per task, or None to leave torch's setting alone.
        model: an exported model directory (``anneal-geo export``) to apply instead of a
            backbone (it selects its own bands by name), or None.
        raw: return the trunk's raw features (a trunk that fits pool statistics; the client
            fits and normalises them).
    """

    pool_dir: str
    backbone: str = "spectral"
    backbone_options: str = "{}"
    seed: int = 0
    bands: tuple[str, ...] | None = None
    checkpoint: str | None = None
    batch_size: int = 256
    torch_threads: int | None = None
    model: str | None = None
    raw: bool = False


@dataclass(frozen=True)
class TileRecipe:
    """How a worker reads one scene and embeds it: plain, hashable values only.

    Attributes:
        bands: the bands to read, in order (resolved by the client, so that every scene is
            read with the bands the first scene gives when none are named).
        patch_size, stride, res, max_nodata: as for :func:`~anneal_geo.data.tiles.read_tiles`.
        backbone, backbone_options, seed: the backbone (when ``model`` is None).
        band_mean, band_std: the per-band statistics the backbone standardises with (those
            of all the archive's kept patches); empty for the first pass and with a model.
        model: an exported model directory, or None.
        batch_size: patches per forward pass.
        raw: return raw features (see :class:`EmbedRecipe`).
        torch_threads: torch threads per task, or None to leave torch's setting alone.
    """

    bands: tuple[str, ...]
    patch_size: int = 64
    stride: int | None = None
    res: float | None = None
    max_nodata: float = 0.5
    backbone: str = "spectral"
    backbone_options: str = "{}"
    seed: int = 0
    band_mean: tuple[float, ...] = ()
    band_std: tuple[float, ...] = ()
    model: str | None = None
    batch_size: int = 256
    raw: bool = False
    torch_threads: int | None = None


@dataclass(frozen=True)
class ScenePart:
    """One scene of a tile archive as a task carries it (absolute paths).

    Attributes:
        name: the scene's name in the archive (as :func:`find_scenes` gives it).
        band_files: ``(band, file)`` pairs, for the one-file-per-band layout (else empty).
        file: the multi-band file, for the one-file-per-scene layout (else None).
        cloud_mask: the scene's cloud mask file, or None.
    """

    name: str
    band_files: tuple[tuple[str, str], ...] = ()
    file: str | None = None
    cloud_mask: str | None = None


@dataclass
class SceneBlock:
    """What a worker sends back for one scene: its patches' features and where they lie.

    Attributes:
        features: (n, D) float32 (raw features when the recipe asks for them).
        bands: the bands read.
        sources: per patch, its scene's reference file (absolute path).
        crs: per patch, its CRS.
        checksums: per patch, the SHA-256 of its source.
        georefs: per patch, its exact grid.
        windows: (n, 2) int64 ``(row_off, col_off)`` in the source's grid.
        resolution: the scene's pixel size in CRS units.
        report: the reader's counts for this scene.
    """

    features: np.ndarray
    bands: list[str]
    sources: list[str]
    crs: list[str]
    checksums: list[str]
    georefs: list[GeoRef]
    windows: np.ndarray
    resolution: float | None
    report: IngestReport


@dataclass
class TileEmbedding:
    """The embeddings of a tile archive, in the patch-id order of ``PatchPool.from_tiles``.

    Attributes:
        embeddings: (N, D) float32 (a memory map of the ``.npy`` when written to a file).
        footprints: the footprints GeoDataFrame (row i = patch i; the columns of a pool's
            ``footprints.gpkg``, plus ``acquired``).
        bands: the bands read, in order.
        band_mean, band_std: the per-band statistics of all kept patches (float64), as a pool
            built from the same folder holds them; None with a model (which carries its own).
        report: the reader's counts, summed over the scenes (``seconds``: reading time summed
            over the tasks).
        resolution: the median pixel size of the scenes.
        files: what was written (``embeddings``, ``footprints``, ``meta``, ``trunk_state``).
    """

    embeddings: np.ndarray
    footprints: Any
    bands: list[str]
    band_mean: np.ndarray | None
    band_std: np.ndarray | None
    report: IngestReport
    resolution: float | None
    files: dict[str, Path] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` row ranges of at most ``chunk`` rows covering ``0..n``."""
    if isinstance(chunk, bool) or int(chunk) < 1:
        raise ConfigError(f"embedding chunk = {chunk!r} must be a positive number of patches")
    return [(lo, min(lo + int(chunk), n)) for lo in range(0, n, int(chunk))]


def output_files(out: str | Path) -> dict[str, Path]:
    """The files written beside an embeddings file ``NAME.npy``: ``NAME.footprints.gpkg``
    and ``NAME.json`` (tile archives), ``NAME.trunk.pt`` (a trunk fitted on the patches,
    the name :meth:`~anneal_geo.training.Trainer.trunk_state_path` gives)."""
    path = Path(out)
    return {
        "embeddings": path,
        "footprints": path.with_name(path.stem + ".footprints.gpkg"),
        "meta": path.with_name(path.stem + ".json"),
        "trunk_state": path.with_name(path.stem + ".trunk.pt"),
    }


# -- worker side: networks -----------------------------------------------------------------


@lru_cache(maxsize=4)
def _open_pool(pool_dir: str, stamp: float) -> PatchPool:
    """The pool, opened once per process (``stamp``, pool.json's mtime, keys a rebuilt pool)."""
    from anneal_geo.data.pool import PatchPool

    return PatchPool.open(pool_dir)


def _pool(pool_dir: str) -> PatchPool:
    from anneal_geo.data.pool import POOL_FILE

    meta = Path(pool_dir) / POOL_FILE
    stamp = meta.stat().st_mtime if meta.is_file() else 0.0
    return _open_pool(pool_dir, stamp)


@lru_cache(maxsize=4)
def _open_model(model_dir: str, stamp: float) -> Model:
    """An exported model, loaded once per process (``stamp`` keys a re-exported one)."""
    from anneal_geo.models.model import load_model

    return load_model(model_dir)


def _model(model_dir: str) -> Model:
    from anneal_geo.models.card import CARD_FILE

    card = Path(model_dir) / CARD_FILE
    stamp = card.stat().st_mtime if card.is_file() else 0.0
    return _open_model(model_dir, stamp)


def _check_model_resolution(model: Model, resolution: float | None, where: str) -> None:
    """A model trained on other pixel sizes is refused (as ``Model.embed`` refuses a pool)."""
    trained = model.card["input"].get("resolution")
    if trained and resolution and not math.isclose(resolution, float(trained), rel_tol=0.05):
        raise DataError(
            f"{where} has {resolution:g} m pixels but {model.label} was trained on "
            f"{float(trained):g} m pixels; read the tiles with --res {float(trained):g}"
        )


def _model_state(checkpoint: str) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(
            f"cannot read the checkpoint {checkpoint} ({str(exc).splitlines()[0]}); pass a "
            "file a session wrote (checkpoints/round_*.pt)"
        ) from exc
    # A trainer checkpoint holds the model under "model"; a bare model state dict works too.
    model = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(model, dict) or "head.0.weight" not in model:
        raise DataError(
            f"{checkpoint} holds no metric model (no head.0.weight); pass a trainer "
            "checkpoint a session wrote"
        )
    return model


def _build_trunk(
    backbone: str,
    options_json: str,
    seed: int,
    bands: list[str],
    mean: list[float],
    std: list[float],
) -> torch.nn.Module:
    """The backbone's trunk for these bands and statistics, built as the engine builds it."""
    import torch

    from anneal_geo import plugins

    options = json.loads(options_json)
    plugin = plugins.create("backbones", backbone, seed=seed, **options)
    # Like the engine: the trunk's random initialisation (if any) comes from torch's global
    # generator seeded with the session seed; forked so the caller's generator is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module: torch.nn.Module = plugin.checked_build(bands, mean, std)
    return module


def _fits_statistics(module: Any) -> bool:
    """Whether a bare trunk fits pool statistics and is not fitted yet (the trainer's rule)."""
    return (
        callable(getattr(module, "raw_features", None))
        and callable(getattr(module, "fit_statistics", None))
        and not bool(getattr(module, "fitted", False))
    )


@lru_cache(maxsize=4)
def _network(recipe: EmbedRecipe) -> tuple[torch.nn.Module, list[int] | None]:
    """The network of a recipe, built once per process, and the pool channels it reads."""
    from anneal_geo.data.bands import band_indices

    pool = _pool(recipe.pool_dir)
    if recipe.model is not None:
        model = _model(recipe.model)
        where = f"the pool {recipe.pool_dir}"
        channels: list[int] | None = model.channels(pool.bands, where)
        _check_model_resolution(model, pool.resolution, where)
        module = model.module
    else:
        channels = None if recipe.bands is None else band_indices(pool.bands, list(recipe.bands))
        index = channels if channels is not None else list(range(pool.n_bands))
        module = _build_trunk(
            recipe.backbone,
            recipe.backbone_options,
            recipe.seed,
            [pool.bands[i] for i in index],
            pool.band_mean[index].tolist(),
            pool.band_std[index].tolist(),
        )
        if recipe.checkpoint is not None:
            from anneal_geo.training.heads import MetricModel

            state = _model_state(recipe.checkpoint)
            hidden, out_dim = state["head.0.weight"].shape[0], state["head.2.weight"].shape[0]
            model_ = MetricModel(module, out_dim=int(out_dim), hidden=int(hidden), seed=recipe.seed)
            try:
                model_.load_state_dict(state)
            except RuntimeError as exc:
                raise DataError(
                    f"checkpoint {recipe.checkpoint} does not fit backbone "
                    f"'{recipe.backbone}' on these bands ({str(exc).splitlines()[0]}); use the "
                    "backbone and bands of the session that wrote it"
                ) from exc
            module = model_
    if channels == list(range(pool.n_bands)):
        channels = None  # all bands in order: no per-chunk copy
    module.eval()
    return module, channels


@lru_cache(maxsize=4)
def _tile_network(recipe: TileRecipe) -> tuple[torch.nn.Module, list[int] | None]:
    """The network of a tile recipe, built once per process, and the channels it reads."""
    bands = list(recipe.bands)
    channels: list[int] | None = None
    if recipe.model is not None:
        model = _model(recipe.model)
        channels = model.channels(bands, "the tiles")
        module = model.module
    else:
        n = len(bands)
        mean = list(recipe.band_mean) or [0.0] * n
        std = list(recipe.band_std) or [1.0] * n
        module = _build_trunk(
            recipe.backbone, recipe.backbone_options, recipe.seed, bands, mean, std
        )
    if channels == list(range(len(bands))):
        channels = None
    module.eval()
    return module, channels


def _out_dim(module: torch.nn.Module) -> int:
    # A metric model's embedding_dim counts the frozen features it mixes in.
    dim = getattr(module, "embedding_dim", None)
    return int(module.out_dim if dim is None else dim)  # type: ignore[arg-type]


def _run(
    module: Any,
    source: Any,
    n: int,
    channels: list[int] | None,
    batch_size: int,
    raw: bool,
    torch_threads: int | None,
) -> np.ndarray:
    """The module (or its ``raw_features``) on rows ``0..n-1`` of ``source``, in batches."""
    import torch

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    call = module.raw_features if raw else module
    out = np.empty((n, _out_dim(module)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            batch = np.asarray(source[start:stop], dtype=np.float32)  # reads these rows only
            if channels is not None:
                batch = np.ascontiguousarray(batch[:, channels])
            elif not batch.flags.writeable:
                batch = batch.copy()  # a float32 memory map is read-only
            out[start:stop] = call(torch.from_numpy(batch)).float().numpy()
    return out


def embed_chunk(recipe: EmbedRecipe, lo: int, hi: int) -> np.ndarray:
    """Embed pool rows ``lo..hi-1`` (a Dask task; also the in-process path).

    Opens the pool (memory-mapped, cached per process), builds the network once per
    process, and runs it in batches of ``recipe.batch_size`` on the rows as float32 in the
    pool's units, which is what ``pool.float_patches`` gives the engine.

    Returns:
        (hi - lo, D) float32: trunk features (raw ones with ``recipe.raw``), or
        L2-normalised embeddings with a checkpoint or a model.
    """
    module, channels = _network(recipe)
    patches = _pool(recipe.pool_dir).patches
    if not 0 <= lo <= hi <= len(patches):
        raise DataError(f"rows {lo}..{hi} are outside the pool of {len(patches)} patches")
    out = _run(
        module,
        patches[lo:hi],
        hi - lo,
        channels,
        recipe.batch_size,
        recipe.raw,
        recipe.torch_threads,
    )
    if not np.isfinite(out).all():
        raise DataError(
            f"backbone '{recipe.backbone}' produced NaN or infinite values for rows {lo}..{hi}; "
            "check those patches"
        )
    return out


# -- worker side: tiles ----------------------------------------------------------------------


def _read_scene_once(part: ScenePart, recipe: TileRecipe, max_nodata: float, cloud: bool) -> Any:
    """``read_tiles`` on this scene alone; sources named by the scene's own files."""
    from anneal_geo.data.tiles import read_tiles

    options: dict[str, Any] = {
        "stride": recipe.stride,
        "bands": list(recipe.bands),
        "res": recipe.res,
        "cloud_mask": part.cloud_mask if cloud else None,
        "max_nodata": max_nodata,
        "progress": False,
    }
    if part.file is not None:
        names = {Path(part.file).name: part.file}
        read = read_tiles(part.file, recipe.patch_size, **options)
    else:
        names = {Path(path).name: path for _, path in part.band_files}
        # A folder of links to this scene's band files: the reader sees this scene and no
        # other (a folder may hold several scenes, or other scenes below it).
        with tempfile.TemporaryDirectory(prefix="anneal-scene-") as tmp:
            for name, path in names.items():
                os.symlink(path, os.path.join(tmp, name))
            read = read_tiles(tmp, recipe.patch_size, **options)
    read.sources = [names.get(Path(s).name, str(s)) for s in read.sources]
    return read


def _read_scene(part: ScenePart, recipe: TileRecipe) -> tuple[Any, IngestReport]:
    """The scene's kept patches (a ``TileRead``, or None when every window was skipped) and
    its report.

    ``read_tiles`` refuses a read whose every window is skipped; in an archive that is just
    a scene without a usable patch. Whether that was the reason is told by reading again
    keeping every window (a failure then is a real error, raised as it was); a second read
    without the cloud mask splits the skipped windows into nodata and cloud, as the reader
    counts them.
    """
    from anneal_geo.data.tiles import IngestReport

    try:
        read = _read_scene_once(part, recipe, recipe.max_nodata, cloud=True)
        return read, read.report
    except DataError as first:
        if recipe.max_nodata >= 1.0:
            raise _in_scene(first, part) from first
        try:
            every = _read_scene_once(part, recipe, 1.0, cloud=True)
        except DataError:
            raise _in_scene(first, part) from first
    windows = every.report.windows
    unmasked = 0
    if part.cloud_mask is not None:
        try:
            unmasked = _read_scene_once(part, recipe, recipe.max_nodata, cloud=False).report.kept
        except DataError:
            unmasked = 0
    report = IngestReport(
        scenes=1,
        windows=windows,
        kept=0,
        skipped_nodata=windows - unmasked,
        skipped_cloud=unmasked,
        max_nodata=recipe.max_nodata,
    )
    return None, report


def _in_scene(exc: DataError, part: ScenePart) -> DataError:
    text = str(exc)
    return exc if part.name in text else DataError(f"{text} (scene {part.name})")


def scene_statistics(
    recipe: TileRecipe, part: ScenePart
) -> tuple[int, np.ndarray, np.ndarray, IngestReport]:
    """The first pass over a scene (a Dask task): read it, and return the pixel count, the
    per-band mean and sum of squared deviations (float64) of its kept patches, and the
    reader's report (a scene without a kept patch is not read again)."""
    from anneal_geo.data.pool import band_statistics

    read, report = _read_scene(part, recipe)
    n_bands = len(recipe.bands)
    if read is None:
        return 0, np.zeros(n_bands), np.zeros(n_bands), report
    _check_finite(read.patches, part)
    mean, std = band_statistics(read.patches)
    count = int(read.patches.shape[0] * read.patches.shape[2] * read.patches.shape[3])
    return count, mean, std**2 * count, report


def _check_finite(patches: np.ndarray, part: ScenePart) -> None:
    if patches.dtype.kind == "f" and np.isnan(patches).any():
        raise DataError(
            f"scene {part.name} holds NaN pixels in patches it keeps; build a pool with "
            "`anneal-geo pool build --nan-as-nodata` and embed that, or fix the rasters"
        )


def _empty_block(recipe: TileRecipe, dim: int, report: IngestReport) -> SceneBlock:
    """The block of a scene without a kept patch."""
    empty = np.empty((0, 2), dtype=np.int64)
    features = np.empty((0, dim), dtype=np.float32)
    return SceneBlock(features, list(recipe.bands), [], [], [], [], empty, None, report)


def embed_scene(recipe: TileRecipe, part: ScenePart) -> SceneBlock:
    """Read one scene through TorchGeo and embed its kept patches (a Dask task; also the
    in-process path).

    Returns:
        the scene's features (rows in the reader's order) with their georeferences, pixel
        windows, sources, checksums and the reader's report.
    """
    module, channels = _tile_network(recipe)
    read, report = _read_scene(part, recipe)
    if read is None:
        return _empty_block(recipe, _out_dim(module), report)
    _check_finite(read.patches, part)
    if recipe.model is not None:
        _check_model_resolution(_model(recipe.model), read.resolution, f"scene {part.name}")
    features = _run(
        module,
        read.patches,
        len(read.patches),
        channels,
        recipe.batch_size,
        recipe.raw,
        recipe.torch_threads,
    )
    if not np.isfinite(features).all():
        raise DataError(
            f"the network produced NaN or infinite values for scene {part.name}; check its files"
        )
    return SceneBlock(
        features=features,
        bands=list(read.bands),
        sources=list(read.sources),
        crs=list(read.crs),
        checksums=list(read.checksums),
        georefs=list(read.georefs),
        windows=np.asarray(read.windows, dtype=np.int64),
        resolution=read.resolution,
        report=report,
    )


# -- client side -----------------------------------------------------------------------------


def _connect(
    scheduler: Any, n_workers: int, processes: bool, timeout: float = 30.0
) -> tuple[Any, list[Any]]:
    """A Dask client for ``scheduler``, and what this call started (to close afterwards)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ConfigError(
            "embedding on a cluster needs dask.distributed; install anneal-geo[dask] "
            "(pip install 'dask[distributed]')"
        ) from exc
    if scheduler is None:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=None,
        )
        client = Client(cluster)
        return client, [client, cluster]
    if isinstance(scheduler, Client):
        return scheduler, []
    if isinstance(scheduler, str):
        try:
            client = Client(scheduler, timeout=f"{float(timeout):g}s")
        except (OSError, ValueError, TypeError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"cannot reach the Dask scheduler at {scheduler} ({reason}); give the address "
                "`dask scheduler` prints (tcp://HOST:8786) and start workers with `dask "
                "worker <address>`, or use --local-workers"
            ) from exc
        return client, [client]
    if hasattr(scheduler, "scheduler_address"):  # a LocalCluster or another cluster object
        client = Client(scheduler)
        return client, [client]
    raise ConfigError(
        f"scheduler must be None, an address like tcp://host:8786, a Client or a cluster, "
        f"got {type(scheduler).__name__}"
    )


@contextmanager
def _dask(scheduler: Any, n_workers: int, processes: bool, timeout: float) -> Iterator[Any | None]:
    """A Dask client for the whole command (None: run the tasks in this process)."""
    if scheduler is None and n_workers == 0:
        yield None
        return
    client, started = _connect(scheduler, n_workers, processes, timeout)
    try:
        yield client
    finally:
        for thing in started:
            thing.close()


def _map(
    client: Any,
    function: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    handle: Callable[[int, Any], None],
    waiting: Callable[[], int] = lambda: 0,
) -> int:
    """Run ``function(*task)`` for each task; ``handle(k, result)`` as each finishes (in any
    order). On Dask a bounded number of tasks is in flight, fewer while ``waiting()``
    results wait for an earlier one. Returns the number of workers (0 in this process)."""
    if client is None:
        for k, args in enumerate(tasks):
            handle(k, function(*args))
        return 0
    from distributed import as_completed

    threads = client.nthreads()  # {worker address: threads}
    window = max(2, _IN_FLIGHT_PER_WORKER * sum(threads.values()))
    index: dict[str, int] = {}
    todo = iter(enumerate(tasks))

    def submit(k: int, args: tuple[Any, ...]) -> Any:
        # pure=False: a task reads files, so Dask must not reuse a result by its key.
        future = client.submit(function, *args, pure=False)
        index[future.key] = k
        return future

    running = as_completed(
        [submit(k, args) for k, args in itertools.islice(todo, window)], with_results=True
    )
    in_flight = min(window, len(tasks))
    for future, result in running:
        in_flight -= 1
        handle(index.pop(future.key), result)
        future.release()
        # Nothing in flight: submit regardless, so the results waited for always come.
        while in_flight == 0 or in_flight + waiting() < window:
            nxt = next(todo, None)
            if nxt is None:
                break
            running.add(submit(*nxt))
            in_flight += 1
    return len(threads)


def _output(out: str | Path | None, shape: tuple[int, int]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    path = _npy_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"cannot write {path} ({reason}); choose another file") from exc


def _npy_path(out: str | Path) -> Path:
    path = Path(out)
    if path.suffix != ".npy":
        raise ConfigError(f"--out {path} must end in .npy")
    return path


def _fit_and_normalise(trunk: Any, result: np.ndarray, out: str | Path | None) -> Path | None:
    """Fit a copy of ``trunk`` on the raw features in ``result`` and normalise them in
    place; write the fitted trunk's state beside ``out``. Returns that file, if written."""
    import torch

    fitted = copy.deepcopy(trunk)  # the cached network of this process stays as built
    try:
        fitted.fit_statistics(np.asarray(result))
    except ValueError as exc:
        raise DataError(f"cannot fit the trunk's pool statistics: {exc}") from exc
    with torch.inference_mode():
        for lo in range(0, len(result), _COPY_ROWS):
            block = torch.from_numpy(np.array(result[lo : lo + _COPY_ROWS]))
            result[lo : lo + _COPY_ROWS] = fitted.normalise(block).float().numpy()
    if out is None:
        return None
    target = output_files(out)["trunk_state"]
    state = {k: v.detach().cpu() for k, v in fitted.state_dict().items()}
    _atomic(target, lambda path: torch.save(state, path))
    return target


def _atomic(target: Path, write: Callable[[Path], object]) -> None:
    # The suffix stays (GDAL picks the GeoPackage driver by it); the prefix marks it partial.
    tmp = target.with_name("partial-" + target.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise DataError(
            f"cannot write {target} ({exc.strerror or exc}); choose another file"
        ) from exc


def _check_counts(n_workers: int, batch_size: int) -> None:
    if isinstance(n_workers, bool) or int(n_workers) < 0:
        raise ConfigError(f"n_workers = {n_workers!r} must be 0 (no Dask) or more")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ConfigError(f"batch_size = {batch_size!r} must be a positive number of patches")


def _exclusive(model: Any, checkpoint: Any, backbone: str, options: Any) -> None:
    if model is not None and checkpoint is not None:
        raise ConfigError("give --model or --checkpoint, not both")
    if model is not None and (backbone != "spectral" or options):
        raise ConfigError(
            "--model applies the exported model's own backbone; drop --backbone and --options"
        )


def embed_pool(
    pool_dir: str | Path,
    backbone: str = "spectral",
    *,
    scheduler: Any = None,
    n_workers: int = 2,
    chunk: int = DEFAULT_CHUNK,
    backbone_options: dict[str, Any] | None = None,
    seed: int = 0,
    bands: list[str] | None = None,
    checkpoint: str | Path | None = None,
    model: str | Path | None = None,
    batch_size: int = 256,
    out: str | Path | None = None,
    processes: bool = True,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
    connect_timeout: float = 30.0,
) -> np.ndarray:
    """Embed every patch of a saved pool, chunk by chunk, in id order.

    Args:
        pool_dir: a pool directory (``PatchPool.save``); on a cluster, a path every worker
            can open.
        backbone: backbone plugin name.
        scheduler: None for a new :class:`~distributed.LocalCluster` of ``n_workers``
            workers (or, with ``n_workers=0``, no Dask at all: chunks run in this process);
            a scheduler address (``"tcp://host:8786"``); a ``Client``; or a cluster object.
        n_workers: workers of the local cluster started when ``scheduler`` is None.
        chunk: patches per task.
        backbone_options: the backbone's options (as in a session's settings).
        seed: the backbone's seed.
        bands: bands to feed the network, in order (default: all of the pool's).
        checkpoint: a session checkpoint whose trunk and head to apply: then the result is
            the session's L2-normalised embedding; without it, trunk features (what a
            head-mode session caches; a trunk that fits pool statistics, like ``texture``'s,
            is fitted on this pool as the session fits it).
        model: an exported model directory (``anneal-geo export``): its L2-normalised
            embeddings, as ``load_model(model).embed(pool)`` gives them.
        batch_size: patches per forward pass.
        out: write the result to this ``.npy`` file (memory-mapped, so the client never
            holds the whole array) and return the memory map.
        processes: local cluster workers are processes (True) or threads of this process.
        progress: show a progress bar (None: only on a terminal).
        stats: a dict to fill with ``n``, ``dim``, ``chunks``, ``workers``, ``seconds``.
        connect_timeout: seconds to wait for the scheduler at an address.

    Returns:
        (N, D) float32 in patch-id order.

    Raises:
        DataError: the pool, a band, the checkpoint or the model is unusable.
        ConfigError: a setting is out of range, or the scheduler cannot be reached.
        PluginError: the backbone cannot be loaded or built.
    """
    from tqdm.auto import tqdm

    from anneal_geo.data.pool import PatchPool

    started = time.perf_counter()
    pool_path = Path(pool_dir)
    pool = PatchPool.open(pool_path)  # checks the directory here, before any worker does
    _check_counts(n_workers, batch_size)
    _exclusive(model, checkpoint, backbone, backbone_options)
    if model is not None and bands is not None:
        raise ConfigError("--model selects its own bands by name; drop --bands")
    recipe = EmbedRecipe(
        pool_dir=str(pool_path.resolve()),
        backbone=backbone,
        backbone_options=json.dumps(backbone_options or {}, sort_keys=True),
        seed=int(seed),
        bands=None if bands is None else tuple(bands),
        checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
        batch_size=int(batch_size),
        model=None if model is None else str(Path(model).resolve()),
    )
    ranges = chunk_ranges(len(pool), chunk)
    # Built here too: a wrong backbone, band, checkpoint or model fails before a cluster
    # starts, and the output's width is known.
    module, _ = _network(recipe)
    fit = recipe.model is None and recipe.checkpoint is None and _fits_statistics(module)
    if fit:
        recipe = replace(recipe, raw=True)
    result = _output(out, (len(pool), _out_dim(module)))
    disable = None if progress is None else not progress
    bar = tqdm(total=len(pool), desc="embedding", unit="patch", disable=disable, leave=False)

    def handle(k: int, block: np.ndarray) -> None:
        lo, hi = ranges[k]
        result[lo:hi] = block
        bar.update(hi - lo)

    try:
        with _dask(scheduler, int(n_workers), processes, connect_timeout) as client:
            workers = _map(client, embed_chunk, [(recipe, lo, hi) for lo, hi in ranges], handle)
    finally:
        bar.close()
    if fit and len(pool):
        _fit_and_normalise(module, result, out)
    if isinstance(result, np.memmap):
        result.flush()
    if stats is not None:
        stats.update(
            n=len(pool),
            dim=int(result.shape[1]),
            chunks=len(ranges),
            workers=workers,
            seconds=round(time.perf_counter() - started, 3),
        )
    return result


# -- client side: tiles ----------------------------------------------------------------------


def _default_bands(scene: Any) -> list[str]:
    """The bands ``read_tiles`` reads from a scene when none are named: a band-file scene's
    in ESA order, a multi-band file's in file order (named as the reader names them)."""
    from anneal_geo.data.bands import S2_ALL_BANDS, infer_band_names

    if scene.file is None:
        return [b for b in S2_ALL_BANDS if b in scene.band_files]
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(scene.file) as src:
            count, descriptions = src.count, list(src.descriptions)
    except RasterioError as exc:
        raise DataError(
            f"{scene.file} of scene {scene.name} could not be read ({exc}); re-download or "
            "remove it"
        ) from exc
    return infer_band_names(count, descriptions, rgb_image=False, where=str(scene.file))


def _check_bands(scenes: Sequence[Any], wanted: list[str]) -> list[str]:
    """The requested bands by canonical name; a band a band-file scene lacks is named here,
    before any worker starts (a multi-band file's bands are checked by its task)."""
    from anneal_geo.data.bands import normalise_band_name

    chosen = [normalise_band_name(b) or b for b in wanted]
    if len(set(chosen)) != len(chosen):
        raise DataError(f"bands {wanted} name the same band twice; give each band once")
    for scene in scenes:
        if scene.file is not None:
            continue
        missing = [b for b in chosen if b not in scene.band_files]
        if missing:
            raise DataError(
                f"band {missing[0]!r} is not in scene {scene.name} (it has "
                f"{', '.join(scene.band_files)}); drop it from --bands or add its file"
            )
    return chosen


def _merge_statistics(
    parts: Sequence[tuple[int, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and population std of all parts (Chan's parallel formula, float64)."""
    count = 0
    mean = np.zeros_like(parts[0][1], dtype=np.float64)
    m2 = np.zeros_like(mean)
    for n, part_mean, part_m2 in parts:
        if n == 0:
            continue
        total = count + n
        delta = part_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + part_m2 + delta**2 * (count * n / total)
        count = total
    return mean, np.sqrt(m2 / count) if count else np.zeros_like(mean)


class _InOrder:
    """Scene blocks arriving in any order, passed on in scene order."""

    def __init__(self, emit: Callable[[Any], None]) -> None:
        self.emit = emit
        self.next = 0
        self.held: dict[int, Any] = {}

    def put(self, k: int, block: Any) -> None:
        self.held[k] = block
        while self.next in self.held:
            self.emit(self.held.pop(self.next))
            self.next += 1

    def waiting(self) -> int:
        """Blocks with rows held for an earlier one (those of empty scenes cost nothing)."""
        return sum(1 for block in self.held.values() if len(block.features))


class _Rows:
    """Feature rows appended in order: in memory, or to ``NAME.npy.partial`` on disk (the
    final row count is known only at the end)."""

    def __init__(self, out: Path | None, dim: int) -> None:
        self.out, self.dim, self.n = out, dim, 0
        self.blocks: list[np.ndarray] = []
        self.partial = None if out is None else out.with_name(out.name + ".partial")
        self.handle: Any = None
        if self.partial is not None:
            try:
                self.partial.parent.mkdir(parents=True, exist_ok=True)
                self.handle = open(self.partial, "wb")  # noqa: SIM115 (closed in finish)
            except OSError as exc:
                raise DataError(
                    f"cannot write {self.partial} ({exc.strerror or exc}); choose another file"
                ) from exc

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.handle is None:
            self.blocks.append(rows)
        else:
            self.handle.write(rows.tobytes())
        self.n += len(rows)

    def finish(self) -> np.ndarray:
        """The (n, dim) result: an array, or the ``.npy`` memory map once written."""
        if self.handle is None:
            if not self.blocks:
                return np.empty((0, self.dim), dtype=np.float32)
            return np.concatenate(self.blocks)
        assert self.out is not None and self.partial is not None
        self.handle.close()
        result = _output(self.out, (self.n, self.dim))
        if self.n:
            rows = np.memmap(self.partial, dtype=np.float32, mode="r", shape=(self.n, self.dim))
            for lo in range(0, self.n, _COPY_ROWS):
                result[lo : lo + _COPY_ROWS] = rows[lo : lo + _COPY_ROWS]
            del rows
        self.partial.unlink(missing_ok=True)
        return result

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
            assert self.partial is not None
            self.partial.unlink(missing_ok=True)


def _sum_reports(reports: Sequence[IngestReport], max_nodata: float) -> IngestReport:
    from anneal_geo.data.tiles import IngestReport

    crs: Counter[str] = Counter()
    for report in reports:
        crs.update(report.crs_patches)
    return IngestReport(
        scenes=sum(r.scenes for r in reports),
        windows=sum(r.windows for r in reports),
        kept=sum(r.kept for r in reports),
        skipped_nodata=sum(r.skipped_nodata for r in reports),
        skipped_cloud=sum(r.skipped_cloud for r in reports),
        max_nodata=float(max_nodata),
        crs_patches=dict(crs),
        seconds=sum(r.seconds for r in reports),
    )


def _check_tile_options(patch_size: Any, stride: Any, res: Any, max_nodata: Any) -> None:
    for name, value in (("patch_size", patch_size), ("stride", stride)):
        if value is None and name == "stride":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive whole number of pixels")
    if not 0.0 <= float(max_nodata) <= 1.0:
        raise ConfigError(f"max_nodata={max_nodata!r} must lie in [0, 1] (a share of pixels)")
    if res is not None and not (math.isfinite(res) and res > 0):
        raise ConfigError(f"res={res!r} must be a positive pixel size in CRS units (e.g. 10)")


def embed_tiles(
    root: str | Path,
    backbone: str = "spectral",
    *,
    model: str | Path | None = None,
    scheduler: Any = None,
    n_workers: int = 2,
    patch_size: int = 64,
    stride: int | None = None,
    bands: Sequence[str] | None = None,
    res: float | None = None,
    cloud_mask: str | Path | None = "auto",
    max_nodata: float = 0.5,
    backbone_options: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    out: str | Path | None = None,
    processes: bool = True,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
    connect_timeout: float = 30.0,
) -> TileEmbedding:
    """Embed every patch of a tile archive without building a pool: each task reads one
    scene where it lies, through TorchGeo, and embeds it.

    The patches, their order and their values are those of ``PatchPool.from_tiles(root,
    patch_size, stride=..., bands=..., res=..., cloud_mask=..., max_nodata=...)``, and the
    embeddings those of that pool embedded in one process (:func:`embed_pool`, or the
    trainer's :meth:`~anneal_geo.training.Trainer.cache_features`).

    Args:
        root: the tile archive (see :func:`~anneal_geo.data.tiles.find_scenes`); on a
            cluster, a path every worker can read.
        backbone: backbone plugin name (trunk features), when ``model`` is None. Without a
            model the scenes are read twice: the first pass computes the per-band mean and
            standard deviation the backbone standardises with.
        model: an exported model directory (``anneal-geo export``): its L2-normalised
            embeddings, in one pass (the model carries the statistics it was trained with,
            a ``texture`` trunk's fitted feature statistics included).
        scheduler, n_workers, processes, connect_timeout: as for :func:`embed_pool`.
        patch_size, stride, bands, res, cloud_mask, max_nodata: the tile options of
            ``pool build`` (:func:`~anneal_geo.data.tiles.read_tiles`); ``bands`` defaults
            to the model's bands with a model, else to those of the first scene.
        backbone_options, seed: the backbone's options and seed.
        batch_size: patches per forward pass.
        out: the ``.npy`` to write (memory-mapped); beside it ``NAME.footprints.gpkg`` (row
            i = patch i), ``NAME.json`` (bands, statistics, options, counts) and, for a
            trunk fitted here, ``NAME.trunk.pt`` (see :func:`output_files`).
        progress: show a progress bar (None: only on a terminal).
        stats: a dict to fill with ``n``, ``dim``, ``scenes``, ``passes``, ``workers``,
            ``seconds``.

    Returns:
        the :class:`TileEmbedding`.

    Raises:
        DataError: ``root`` is not a tile archive, a band is missing from a scene, a file is
            unreadable, or every patch was skipped.
        ConfigError: a setting is out of range, or the scheduler cannot be reached.
        PluginError: the backbone or the model's backbone cannot be loaded or built.
    """
    from tqdm.auto import tqdm

    from anneal_geo.data.tiles import TileRead, find_scenes, is_tile_archive

    started = time.perf_counter()
    source = Path(root)
    if not source.exists():
        raise DataError(f"{source} does not exist; give the folder that holds your tiles")
    if not is_tile_archive(source):
        raise DataError(
            f"{source} is not a tile archive (no folder with band files like B04.tif, and no "
            "georeferenced scene of 512 px or more); give a folder of Sentinel-2 tiles, or a "
            "saved pool directory"
        )
    _check_counts(n_workers, batch_size)
    _check_tile_options(patch_size, stride, res, max_nodata)
    _exclusive(model, None, backbone, backbone_options)
    target = None if out is None else _npy_path(out)
    mask = None if cloud_mask is None or str(cloud_mask).lower() == "none" else cloud_mask
    scenes = find_scenes(source, mask)
    loaded = None if model is None else _model(str(Path(model).resolve()))
    if bands:
        wanted = list(bands)
    elif loaded is not None:
        wanted = list(loaded.bands)
    else:
        wanted = _default_bands(scenes[0])
    chosen = _check_bands(scenes, wanted)
    if loaded is not None:
        loaded.channels(chosen, "the tiles")  # a band the model needs is named here
    parts = [
        ScenePart(
            name=scene.name,
            band_files=tuple((b, os.path.abspath(p)) for b, p in scene.band_files.items()),
            file=None if scene.file is None else os.path.abspath(scene.file),
            cloud_mask=None if scene.cloud_mask is None else os.path.abspath(scene.cloud_mask),
        )
        for scene in scenes
    ]
    # Client-side spelling of each file (as find_scenes gives it, like a pool's sources).
    spelling = {
        os.path.abspath(p): str(p)
        for scene in scenes
        for p in [*scene.band_files.values(), *([scene.file] if scene.file else [])]
    }
    recipe = TileRecipe(
        bands=tuple(chosen),
        patch_size=int(patch_size),
        stride=None if stride is None else int(stride),
        res=None if res is None else float(res),
        max_nodata=float(max_nodata),
        backbone=backbone,
        backbone_options=json.dumps(backbone_options or {}, sort_keys=True),
        seed=int(seed),
        model=None if model is None else str(Path(model).resolve()),
        batch_size=int(batch_size),
    )
    # Built here too (with unit statistics): a wrong backbone fails before a cluster starts,
    # and the width of the output is known.
    module, _ = _tile_network(recipe)
    fit = recipe.model is None and _fits_statistics(module)
    dim = _out_dim(module)
    disable = None if progress is None else not progress
    passes = 1 if recipe.model is not None else 2
    band_mean = band_std = None
    rows = _Rows(target, dim)
    meta: dict[str, list[Any]] = {k: [] for k in ("sources", "crs", "checksums", "georefs")}
    windows: list[np.ndarray] = []
    reports: list[IngestReport] = []
    resolutions: list[float] = []
    try:
        with _dask(scheduler, int(n_workers), processes, connect_timeout) as client:
            workers = 0
            if recipe.model is None:
                first: dict[int, tuple[int, np.ndarray, np.ndarray, IngestReport]] = {}
                with tqdm(
                    total=len(parts),
                    desc="band statistics",
                    unit="scene",
                    disable=disable,
                    leave=False,
                ) as bar:

                    def gathered(
                        k: int, part_stats: tuple[int, np.ndarray, np.ndarray, IngestReport]
                    ) -> None:
                        first[k] = part_stats
                        bar.update(1)

                    _map(client, scene_statistics, [(recipe, p) for p in parts], gathered)
                if sum(first[k][0] for k in first) == 0:
                    _all_skipped(source, max_nodata)
                band_mean, band_std = _merge_statistics([first[k][:3] for k in range(len(parts))])
                # Scenes without a kept patch are not read again: their report is known.
                empty = {k: first[k][3] for k in first if first[k][0] == 0}
                recipe = replace(
                    recipe,
                    band_mean=tuple(float(v) for v in band_mean),
                    band_std=tuple(float(v) for v in band_std),
                    raw=fit,
                )
                module, _ = _tile_network(recipe)
            else:
                empty = {}
            with tqdm(
                total=len(parts), desc="embedding", unit="scene", disable=disable, leave=False
            ) as bar:

                def emit(block: SceneBlock) -> None:
                    if block.bands != list(recipe.bands):
                        raise DataError(
                            f"the tile reader gave bands {block.bands} instead of "
                            f"{list(recipe.bands)}; this version of it is not supported"
                        )
                    rows.append(block.features)
                    meta["sources"] += [spelling.get(s, s) for s in block.sources]
                    meta["crs"] += block.crs
                    meta["checksums"] += block.checksums
                    meta["georefs"] += block.georefs
                    windows.append(block.windows)
                    reports.append(block.report)
                    if block.resolution is not None:
                        resolutions.append(block.resolution)

                order = _InOrder(emit)
                for k, skipped in empty.items():
                    order.put(k, _empty_block(recipe, dim, skipped))
                    bar.update(1)
                read_again = [k for k in range(len(parts)) if k not in empty]

                def embedded(task: int, block: SceneBlock) -> None:
                    order.put(read_again[task], block)
                    bar.update(1)

                workers = _map(
                    client,
                    embed_scene,
                    [(recipe, parts[k]) for k in read_again],
                    embedded,
                    order.waiting,
                )
    except BaseException:
        rows.discard()
        raise
    report = _sum_reports(reports, max_nodata)
    if rows.n == 0:
        rows.discard()
        _all_skipped(source, max_nodata)
    result = rows.finish()
    files: dict[str, Path] = {} if target is None else {"embeddings": target}
    if fit:
        state = _fit_and_normalise(module, result, target)
        if state is not None:
            files["trunk_state"] = state
    if isinstance(result, np.memmap):
        result.flush()
    resolution = float(np.median(resolutions)) if resolutions else None
    read = TileRead(
        patches=np.empty((rows.n, 0, 0, 0), dtype=np.uint8),  # the footprints need no pixel
        bands=list(recipe.bands),
        sources=meta["sources"],
        crs=meta["crs"],
        checksums=meta["checksums"],
        georefs=meta["georefs"],
        windows=np.concatenate(windows) if windows else np.empty((0, 2), dtype=np.int64),
        resolution=resolution or 0.0,
        report=report,
    )
    footprints = read.footprints()
    if footprints is not None:
        from anneal_geo.data.dates import acquisition_dates

        footprints["acquired"] = acquisition_dates(read.sources)
    embedding = TileEmbedding(
        embeddings=result,
        footprints=footprints,
        bands=list(recipe.bands),
        band_mean=band_mean,
        band_std=band_std,
        report=report,
        resolution=resolution,
        files=files,
    )
    if target is not None:
        _write_tile_outputs(embedding, target, source, recipe, read.checksums)
    if stats is not None:
        stats.update(
            n=len(embedding),
            dim=int(result.shape[1]),
            scenes=len(parts),
            passes=passes,
            workers=workers,
            seconds=round(time.perf_counter() - started, 3),
        )
    return embedding


def _all_skipped(source: Path, max_nodata: float) -> None:
    raise DataError(
        f"all patches of {source} were skipped: more than {max_nodata:.0%} of each is nodata "
        "or cloud; raise --max-nodata or pass --cloud-mask none"
    )


def _write_tile_outputs(
    embedding: TileEmbedding,
    target: Path,
    source: Path,
    recipe: TileRecipe,
    checksums: list[str],
) -> None:
    """``NAME.footprints.gpkg`` and ``NAME.json`` beside the embeddings."""
    files = output_files(target)
    if embedding.footprints is not None:
        from anneal_geo.data.footprints import write_footprints

        frame = embedding.footprints
        _atomic(files["footprints"], lambda path: write_footprints(frame, path))
        embedding.files["footprints"] = files["footprints"]
    embedder: dict[str, Any] = (
        {"kind": "model", "model": recipe.model}
        if recipe.model is not None
        else {
            "kind": "backbone",
            "backbone": recipe.backbone,
            "options": json.loads(recipe.backbone_options),
            "seed": recipe.seed,
            "fitted_trunk": files["trunk_state"].name if recipe.raw else None,
        }
    )
    report = embedding.report
    meta = {
        "format": TILE_EMBEDDING_FORMAT,
        "version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(source.resolve()),
        "n": len(embedding),
        "dim": int(embedding.embeddings.shape[1]),
        "embeddings": target.name,
        "footprints": files["footprints"].name if embedding.footprints is not None else None,
        "embedder": embedder,
        "bands": embedding.bands,
        "band_mean": None if embedding.band_mean is None else embedding.band_mean.tolist(),
        "band_std": None if embedding.band_std is None else embedding.band_std.tolist(),
        "resolution": embedding.resolution,
        "tiles": {
            "patch_size": recipe.patch_size,
            "stride": recipe.stride,
            "res": recipe.res,
            "max_nodata": recipe.max_nodata,
        },
        "report": {
            "scenes": report.scenes,
            "windows": report.windows,
            "kept": report.kept,
            "skipped_nodata": report.skipped_nodata,
            "skipped_cloud": report.skipped_cloud,
            "crs_patches": report.crs_patches,
        },
        "sources_sha256": dict(zip(embedding.footprints["source"], checksums, strict=True))
        if embedding.footprints is not None
        else {},
    }
    text = json.dumps(meta, indent=1) + "\n"
    _atomic(files["meta"], lambda path: path.write_text(text, encoding="utf-8"))
    embedding.files["meta"] = files["meta"]
