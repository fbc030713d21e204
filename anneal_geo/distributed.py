"""Embedding a pool in chunks: in this process, or on a Dask cluster.

The pool directory is the unit of exchange. Each task carries only the pool's path, a chunk
of patch ids (a row range) and a small recipe for the network (backbone name and options,
seed, bands, optional checkpoint path); the worker opens the pool itself with
:meth:`~anneal_geo.data.pool.PatchPool.open` (``patches.npy`` is memory-mapped, so it reads
just the rows of its chunk), rebuilds the network once per process, and sends back a
(rows, D) float32 block. No patch goes through the scheduler or the client, so the pool must
sit where every worker can open the same path: a shared file system (NFS, Lustre, a cloud
file share) or an object store mounted as files.

The client gathers blocks in id order into one (N, D) array, or into a ``.npy`` file on disk
(``out=``) so that its own memory stays bounded however large N is, and keeps only a few
tasks per worker in flight. The same :func:`embed_chunk` runs in every path, so the cluster,
a :class:`~distributed.LocalCluster` and the in-process loop give the same numbers as
:meth:`~anneal_geo.training.Trainer.embed_patches` on ``pool.float_patches`` (to float
tolerance: matrix products may sum in another order for another batch split).

Importing this module imports neither torch nor dask; they are imported when used.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from anneal_geo.data.pool import PatchPool

__all__ = ["DEFAULT_CHUNK", "EmbedRecipe", "chunk_ranges", "embed_chunk", "embed_pool"]

#: Patches per task. Large enough that a task's fixed cost (scheduling, a result message)
#: is small beside its compute (4,096 EuroSAT patches take seconds on the spectral trunk),
#: small enough that a worker's chunk of raw patches stays ~200 MB for 13 x 64 x 64 float32.
DEFAULT_CHUNK = 4096

#: Tasks kept in flight per worker thread: enough to hide the round trip, few enough that
#: finished blocks never pile up in worker memory while the client writes earlier ones.
_IN_FLIGHT_PER_WORKER = 2


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
    """

    pool_dir: str
    backbone: str = "spectral"
    backbone_options: str = "{}"
    seed: int = 0
    bands: tuple[str, ...] | None = None
    checkpoint: str | None = None
    batch_size: int = 256
    torch_threads: int | None = None


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` row ranges of at most ``chunk`` rows covering ``0..n``."""
    if isinstance(chunk, bool) or int(chunk) < 1:
        raise ConfigError(f"embedding chunk = {chunk!r} must be a positive number of patches")
    return [(lo, min(lo + int(chunk), n)) for lo in range(0, n, int(chunk))]


# -- worker side ---------------------------------------------------------------------------


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


@lru_cache(maxsize=4)
def _network(recipe: EmbedRecipe) -> tuple[torch.nn.Module, list[int] | None]:
    """The network of a recipe, built once per process, and the pool channels it reads."""
    import torch

    from anneal_geo import plugins
    from anneal_geo.data.bands import band_indices

    pool = _pool(recipe.pool_dir)
    channels = None if recipe.bands is None else band_indices(pool.bands, list(recipe.bands))
    if channels == list(range(pool.n_bands)):
        channels = None  # all bands in order: no per-chunk copy
    index = channels if channels is not None else list(range(pool.n_bands))
    options = json.loads(recipe.backbone_options)
    backbone = plugins.create("backbones", recipe.backbone, seed=recipe.seed, **options)
    # Like the engine: the trunk's random initialisation (if any) comes from torch's global
    # generator seeded with the session seed; forked so the caller's generator is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        module: torch.nn.Module = backbone.checked_build(
            [pool.bands[i] for i in index],
            pool.band_mean[index].tolist(),
            pool.band_std[index].tolist(),
        )
        if recipe.checkpoint is not None:
            from anneal_geo.training.heads import MetricModel

            state = _model_state(recipe.checkpoint)
            hidden, out_dim = state["head.0.weight"].shape[0], state["head.2.weight"].shape[0]
            model = MetricModel(module, out_dim=int(out_dim), hidden=int(hidden), seed=recipe.seed)
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise DataError(
                    f"checkpoint {recipe.checkpoint} does not fit backbone "
                    f"'{recipe.backbone}' on these bands ({str(exc).splitlines()[0]}); use the "
                    "backbone and bands of the session that wrote it"
                ) from exc
            module = model
    module.eval()
    return module, channels


def _out_dim(module: torch.nn.Module) -> int:
    # A metric model's embedding_dim counts the frozen features it mixes in.
    dim = getattr(module, "embedding_dim", None)
    return int(module.out_dim if dim is None else dim)  # type: ignore[arg-type]


def embed_chunk(recipe: EmbedRecipe, lo: int, hi: int) -> np.ndarray:
    """Embed pool rows ``lo..hi-1`` (a Dask task; also the in-process path).

    Opens the pool (memory-mapped, cached per process), builds the network once per
    process, and runs it in batches of ``recipe.batch_size`` on the rows as float32 in the
    pool's units, which is what ``pool.float_patches`` gives the engine.

    Returns:
        (hi - lo, D) float32: trunk features, or L2-normalised embeddings with a checkpoint.
    """
    import torch

    if recipe.torch_threads is not None:
        torch.set_num_threads(recipe.torch_threads)
    module, channels = _network(recipe)
    patches = _pool(recipe.pool_dir).patches
    if not 0 <= lo <= hi <= len(patches):
        raise DataError(f"rows {lo}..{hi} are outside the pool of {len(patches)} patches")
    out = np.empty((hi - lo, _out_dim(module)), dtype=np.float32)
    with torch.inference_mode():
        for start in range(lo, hi, recipe.batch_size):
            stop = min(hi, start + recipe.batch_size)
            batch = np.asarray(patches[start:stop], dtype=np.float32)  # reads these rows only
            if channels is not None:
                batch = np.ascontiguousarray(batch[:, channels])
            out[start - lo : stop - lo] = module(torch.from_numpy(batch)).float().numpy()
    if not np.isfinite(out).all():
        raise DataError(
            f"backbone '{recipe.backbone}' produced NaN or infinite values for rows {lo}..{hi}; "
            "check those patches"
        )
    return out


# -- client side ---------------------------------------------------------------------------


def _connect(scheduler: Any, n_workers: int, processes: bool) -> tuple[Any, list[Any]]:
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
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one with "
                "`dask scheduler` and workers with `dask worker <address>`, or give "
                "--local-workers"
            ) from exc
        return client, [client]
    if hasattr(scheduler, "scheduler_address"):  # a LocalCluster or another cluster object
        client = Client(scheduler)
        return client, [client]
    raise ConfigError(
        f"scheduler must be None, an address like tcp://host:8786, a Client or a cluster, "
        f"got {type(scheduler).__name__}"
    )


def _output(out: str | Path | None, shape: tuple[int, int]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    path = Path(out)
    if path.suffix != ".npy":
        raise ConfigError(f"--out {path} must end in .npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    except OSError as exc:
        reason = exc.strerror or exc
        raise DataError(f"cannot write {path} ({reason}); choose another file") from exc


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
    batch_size: int = 256,
    out: str | Path | None = None,
    processes: bool = True,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
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
            head-mode session caches).
        batch_size: patches per forward pass.
        out: write the result to this ``.npy`` file (memory-mapped, so the client never
            holds the whole array) and return the memory map.
        processes: local cluster workers are processes (True) or threads of this process.
        progress: show a progress bar (None: only on a terminal).
        stats: a dict to fill with ``n``, ``dim``, ``chunks``, ``workers``, ``seconds``.

    Returns:
        (N, D) float32 in patch-id order.

    Raises:
        DataError: the pool, a band or the checkpoint is unusable.
        ConfigError: a setting is out of range, or the scheduler cannot be reached.
        PluginError: the backbone cannot be loaded or built.
    """
    from tqdm.auto import tqdm

    from anneal_geo.data.pool import PatchPool

    started = time.perf_counter()
    pool_path = Path(pool_dir)
    pool = PatchPool.open(pool_path)  # checks the directory here, before any worker does
    if isinstance(n_workers, bool) or int(n_workers) < 0:
        raise ConfigError(f"n_workers = {n_workers!r} must be 0 (no Dask) or more")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ConfigError(f"batch_size = {batch_size!r} must be a positive number of patches")
    recipe = EmbedRecipe(
        pool_dir=str(pool_path.resolve()),
        backbone=backbone,
        backbone_options=json.dumps(backbone_options or {}, sort_keys=True),
        seed=int(seed),
        bands=None if bands is None else tuple(bands),
        checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
        batch_size=int(batch_size),
    )
    ranges = chunk_ranges(len(pool), chunk)
    # Built here too: a wrong backbone, band or checkpoint fails before a cluster starts,
    # and the output's width is known.
    module, _ = _network(recipe)
    result = _output(out, (len(pool), _out_dim(module)))
    disable = None if progress is None else not progress
    bar = tqdm(total=len(pool), desc="embedding", unit="patch", disable=disable, leave=False)
    workers = 0
    try:
        if scheduler is None and int(n_workers) == 0:
            for lo, hi in ranges:
                result[lo:hi] = embed_chunk(recipe, lo, hi)
                bar.update(hi - lo)
        else:
            workers = _run_on_cluster(
                recipe, ranges, result, bar, scheduler, int(n_workers), processes
            )
    finally:
        bar.close()
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


def _run_on_cluster(
    recipe: EmbedRecipe,
    ranges: list[tuple[int, int]],
    result: np.ndarray,
    bar: Any,
    scheduler: Any,
    n_workers: int,
    processes: bool,
) -> int:
    """Run the chunks on Dask with a bounded number in flight; return the worker count."""
    from distributed import as_completed

    client, started = _connect(scheduler, n_workers, processes)
    try:
        threads = client.nthreads()  # {worker address: threads}
        workers = len(threads)
        window = max(2, _IN_FLIGHT_PER_WORKER * sum(threads.values()))
        span: dict[str, tuple[int, int]] = {}

        def submit(lo: int, hi: int) -> Any:
            # pure=False: a task reads files, so Dask must not reuse a result by its key.
            future = client.submit(embed_chunk, recipe, lo, hi, pure=False)
            span[future.key] = (lo, hi)
            return future

        todo = iter(ranges)
        running = as_completed(
            [submit(lo, hi) for lo, hi in itertools.islice(todo, window)], with_results=True
        )
        for future, block in running:
            lo, hi = span.pop(future.key)
            result[lo:hi] = block
            bar.update(hi - lo)
            future.release()
            for lo_next, hi_next in itertools.islice(todo, 1):
                running.add(submit(lo_next, hi_next))
        return workers
    finally:
        for thing in started:
            thing.close()
