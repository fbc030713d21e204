"""The real sample the conformance checks run on (shipped EuroSAT-MS statistics and crops)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from anneal_geo.errors import DataError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool

__all__ = [
    "SAMPLE_FILE",
    "Sample",
    "load_sample",
    "sample_arrays",
    "spectral_embeddings",
    "write_sample_file",
]

#: The shipped sample (see ``anneal_geo/testing_data/README.md``).
SAMPLE_FILE = Path(__file__).resolve().parent.parent / "testing_data" / "eurosat_ms_sample.npz"

# Sample layout: crops per class and crop size of the small pool.
_PER_CLASS = 3
_CROP = 16
# Pairs the estimator checks use: labelled (similar / dissimilar) and to score.
_LABELLED_SIMILAR = 120
_LABELLED_DISSIMILAR = 280
_CANDIDATES = 3000
# Rows of the selector's short-list and pairs asked of an annotator.
_SHORTLIST = 200
_ANNOTATE_PAIRS = 40

#: Seed of the pairs the checks use (fixed: every run checks the same pairs).
_DATA_SEED = 20240601


@dataclass(frozen=True)
class Sample:
    """The real data the checks run on.

    Attributes:
        embeddings: (N, D) float32, L2-normalised, read-only: standardised log per-band mean
            and standard deviation of each patch (N = 283, D = 26 for the shipped sample).
        labels: (N,) int64 class index of each patch.
        class_names: the class of each label index.
        sources: per patch, its file relative to the archive folder.
        pool: a small labelled pool of real patches (centre crops, native units).
        origin: where the sample came from, for messages.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    sources: tuple[str, ...]
    pool: PatchPool
    origin: str

    def labelled_pairs(
        self, similar: int = 120, dissimilar: int = 280, *, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labelled pairs as an annotator would give them, in random order.

        Args:
            similar: pairs of the same class (fewer if the sample has fewer).
            dissimilar: pairs of different classes.
            seed: seed of the draw.

        Returns:
            ((M, 2) int64 pairs with i < j, (M,) int8 labels: 1 similar, 0 dissimilar).
        """
        rng = np.random.default_rng(seed)
        everything = _all_pairs(self.embeddings.shape[0])
        same = self.labels[everything[:, 0]] == self.labels[everything[:, 1]]
        pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
        picked = rng.permutation(
            np.concatenate(
                [
                    rng.choice(pos, min(similar, pos.size), replace=False),
                    rng.choice(neg, min(dissimilar, neg.size), replace=False),
                ]
            )
        )
        return everything[picked], same[picked].astype(np.int8)

    def candidate_pairs(
        self, count: int = 3000, *, exclude: np.ndarray | None = None, seed: int = 0
    ) -> np.ndarray:
        """Distinct random pairs (sorted, i < j) to score, none of them in ``exclude``."""
        n = self.embeddings.shape[0]
        everything = _all_pairs(n)
        keys = everything[:, 0] * n + everything[:, 1]
        if exclude is not None and len(exclude):
            ex = np.sort(np.asarray(exclude, dtype=np.int64).reshape(-1, 2), axis=1)
            keys = np.setdiff1d(keys, ex[:, 0] * n + ex[:, 1])
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(keys, min(count, keys.size), replace=False))
        return np.stack([chosen // n, chosen % n], axis=1)

    def shortlist(
        self, size: int = 200, *, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A short-list as the engine hands it to a selector.

        The ``size`` candidate pairs nearest a distance threshold fitted on labelled pairs
        (the midpoint of the two classes' mean distances), like MGUE's.

        Returns:
            ((size, 2) pairs, (size, 2D) float32 descriptors ``[f_i + f_j, |f_i - f_j|]``,
            (size,) float64 uncertainty ``-|d - tau|``).
        """
        from anneal_geo.selectors.descriptors import pair_descriptors

        emb = self.embeddings
        pairs, labels = self.labelled_pairs(seed=seed)
        distance = np.linalg.norm(emb[pairs[:, 0]] - emb[pairs[:, 1]], axis=1)
        tau = 0.5 * (distance[labels == 1].mean() + distance[labels == 0].mean())
        cand = self.candidate_pairs(exclude=pairs, seed=seed)
        u = -np.abs(np.linalg.norm(emb[cand[:, 0]] - emb[cand[:, 1]], axis=1) - tau)
        keep = np.sort(np.argsort(-u, kind="stable")[:size])
        return cand[keep], pair_descriptors(emb, cand[keep]), u[keep].astype(np.float64)


def sample_arrays(
    pool: PatchPool, *, per_class: int = _PER_CLASS, crop: int = _CROP
) -> dict[str, np.ndarray]:
    """The arrays of a sample, computed from a single-label pool of real patches.

    Args:
        pool: a labelled single-label pool, e.g. ``PatchPool.load("sample_tiles/eurosat_ms")``.
        per_class: crops kept per class for the small pool (the first patches of each class).
        crop: side of the centre crops, in pixels.

    Returns:
        ``stats`` (N, C, 2) float32 per-patch per-band mean and standard deviation;
        ``labels`` (N,) int8; ``class_names``, ``bands``, ``sources`` (str arrays);
        ``pool_ids`` (P,) int16 patch ids of the crops; ``pool_patches`` (P, C, crop, crop) in
        the pool's dtype; ``band_mean`` / ``band_std`` (C,) float64 of the whole pool.

    Raises:
        DataError: the pool is unlabelled or multi-label, or its patches are smaller than
            ``crop``.
    """
    labels = pool.single_labels()
    height, width = pool.patch_size
    if height < crop or width < crop:
        raise DataError(f"patches of {height} x {width} px are smaller than the {crop} px crops")
    n, channels = len(pool), pool.n_bands
    stats = np.empty((n, channels, 2), dtype=np.float32)
    step = 64  # patches at a time: bounded float64 temporaries for any archive size
    for start in range(0, n, step):
        block = np.asarray(pool.patches[start : start + step], dtype=np.float64)
        stats[start : start + step, :, 0] = block.mean(axis=(2, 3))
        stats[start : start + step, :, 1] = block.std(axis=(2, 3))
    class_count = len(pool.class_names or [])
    ids = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(class_count)])
    top, left = (height - crop) // 2, (width - crop) // 2
    crops = np.ascontiguousarray(
        np.asarray(pool.patches[np.sort(ids)])[:, :, top : top + crop, left : left + crop]
    )
    paths = [os.path.abspath(s) for s in pool.sources]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    # Class folders: keep "<Class>/<file>" (the common folder is the archive's root).
    root = os.path.dirname(root) if len({os.path.dirname(p) for p in paths}) == 1 else root
    return {
        "stats": stats,
        "labels": labels.astype(np.int8),
        "class_names": np.array(pool.class_names or [], dtype=str),
        "bands": np.array(pool.bands, dtype=str),
        "sources": np.array([os.path.relpath(p, root).replace(os.sep, "/") for p in paths]),
        "pool_ids": np.sort(ids).astype(np.int16),
        "pool_patches": crops,
        "band_mean": np.asarray(pool.band_mean, dtype=np.float64),
        "band_std": np.asarray(pool.band_std, dtype=np.float64),
    }


def write_sample_file(folder: str | Path, out: str | Path = SAMPLE_FILE) -> Path:
    """Regenerate the shipped sample from a class-per-folder archive of real tiles.

    Args:
        folder: e.g. ``sample_tiles/eurosat_ms``.
        out: the ``.npz`` to write.

    Returns:
        the path written.
    """
    from anneal_geo.data.pool import PatchPool

    arrays = sample_arrays(PatchPool.load(Path(folder)))
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, **arrays)  # type: ignore[arg-type]
    return target


def spectral_embeddings(stats: np.ndarray) -> np.ndarray:
    """Embeddings from per-band statistics: log, standardised per column, L2-normalised.

    Args:
        stats: (N, C, 2) per-band mean and standard deviation of each patch.

    Returns:
        (N, 2C) float32 unit vectors.
    """
    features = np.log1p(np.maximum(stats.reshape(stats.shape[0], -1).astype(np.float64), 0.0))
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return (features / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _sample_from_arrays(arrays: dict[str, np.ndarray], origin: str) -> Sample:
    from anneal_geo.data.pool import PatchPool

    labels = arrays["labels"].astype(np.int64)
    class_names = tuple(str(c) for c in arrays["class_names"])
    sources = tuple(str(s) for s in arrays["sources"])
    ids = arrays["pool_ids"].astype(np.int64)
    pool = PatchPool(
        _read_only(np.ascontiguousarray(arrays["pool_patches"])),
        [str(b) for b in arrays["bands"]],
        class_names=class_names,
        labels=labels[ids],
        sources=[sources[i] for i in ids],
        band_mean=arrays["band_mean"],
        band_std=arrays["band_std"],
    )
    return Sample(
        embeddings=_read_only(spectral_embeddings(arrays["stats"])),
        labels=_read_only(labels),
        class_names=class_names,
        sources=sources,
        pool=pool,
        origin=origin,
    )


@cache
def _load_sample(key: str) -> Sample:
    if key:
        from anneal_geo.data.pool import PatchPool

        return _sample_from_arrays(sample_arrays(PatchPool.load(Path(key))), key)
    if not SAMPLE_FILE.is_file():
        raise DataError(
            f"the conformance sample {SAMPLE_FILE} is missing; reinstall anneal-geo, or pass "
            "sample=load_sample('<class-per-folder archive>')"
        )
    with np.load(SAMPLE_FILE, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    return _sample_from_arrays(arrays, f"{SAMPLE_FILE.name} (EuroSAT-MS, shipped)")


def load_sample(source: str | Path | None = None) -> Sample:
    """The sample the checks run on, loaded once per process.

    Args:
        source: None for the shipped EuroSAT-MS sample; or a class-per-folder archive of real
            tiles (at least ``3`` patches of 16 x 16 px or more per class) to build one from.
    """
    return _load_sample(str(Path(source).resolve()) if source is not None else "")


def _all_pairs(n: int) -> np.ndarray:
    upper = np.triu_indices(n, 1)
    return np.stack(upper, axis=1).astype(np.int64)
