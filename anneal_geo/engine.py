"""One ANNEAL round and the loop (METHOD.md section 3). The engine knows only the contracts.

Round 0 asks the initial set (``initial_design``: by default, per k-means group of the
starting embedding, its medoid with a random member and with the nearest group's medoid;
or random pairs, half of them among nearest neighbours); every later round fits the
estimator on the labelled pairs, scores the candidate pairs block-wise keeping a running
short-list of the ``h`` most uncertain, lets the selector pick ``b`` diverse pairs from it,
has the annotator answer them (each answer committed before the next question), expands
the answers by transitivity, trains the metric model and evaluates retrieval.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo import plugins
from anneal_geo._memory import npy_row_blocks, release_free_memory
from anneal_geo.errors import AnnealError, ConfigError, DataError, PluginError, SessionError
from anneal_geo.lock import SessionLock

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.pairs.store import PairStore
    from anneal_geo.session import Session, SessionConfig

__all__ = ["Engine", "RoundResult", "check_budget", "check_settings", "select_pairs"]



def _default_command() -> str:
    """What holds a session's lock when the caller does not say: ``anneal-geo label`` when
    run by the command, else the script (``python ipykernel_launcher.py``)."""
    import sys
    from pathlib import Path

    argv = [str(a) for a in sys.argv] or ["python"]
    program = Path(argv[0]).name or "python"
    if program.startswith("anneal-geo"):
        return " ".join(["anneal-geo", *argv[1:2]])
    return f"python {program}"


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch threads. Head-only training is many tiny matrix products,
    where a second thread costs more in synchronisation than it gains (measured: 156 steps
    took 0.6 s on one thread and 13 s on two while the other core was busy)."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _budget_hint(mode: str) -> str:
    """What to do when a round's budget exceeds its candidates, for the mode in use."""
    if mode == "knn":
        return (
            "lower --budget, raise knn_k (--config FILE with knn_k = ...) or use "
            "--candidates exhaustive"
        )
    if mode == "uniform":
        return "lower --budget (uniform candidates are a sample of every pair left)"
    return "lower --budget or --rounds (every pair left is a candidate already)"


def _auto_mode(candidates: str, n_archive: int, estimator: Any) -> str:
    from anneal_geo.pairs.candidates import default_mode

    if candidates != "auto":
        return candidates
    # An estimator that ignores the embedding (the random baseline) gets a uniform sample
    # of all pairs (see select_pairs).
    uses_embeddings = getattr(estimator, "uses_embeddings", True)
    return default_mode(n_archive) if uses_embeddings else "uniform"


def check_budget(
    config: SessionConfig, n_archive: int, estimator: Any, rounds_done: int = 0
) -> None:
    """Refuse, before a round is asked, budgets the archive cannot provide.

    Checks that the initial set and every round's budget fit among the archive's pairs and
    that one round's budget fits among its candidates (an upper bound for ``knn`` and
    ``uniform`` candidates), so a session never asks its initial set only to fail at round 1.

    Raises:
        ConfigError: with a hint fitting the candidate mode in use.
    """
    from anneal_geo.pairs.candidates import UNIFORM_SAMPLE, suggested_knn_k

    n = int(n_archive)
    total = n * (n - 1) // 2
    if rounds_done == 0:
        _check_initial(config.initial, n)
    later = config.rounds - max(0, rounds_done - 1)
    if later <= 0:
        return
    mode = _auto_mode(config.candidates, n, estimator)
    left = total - config.initial
    if mode == "knn":
        k = config.knn_k if config.knn_k > 0 else suggested_knn_k(n)
        edges = n * min(k, max(n - 1, 0))
        bound = min(left, edges + math.ceil(config.far_fraction * edges))
        what = f"at most {bound} knn candidate pairs ({k} neighbours per patch of {n})"
    elif mode == "uniform":
        bound = min(left, UNIFORM_SAMPLE)
        what = f"at most {bound} uniform candidate pairs"
    else:
        bound = left
        what = f"{bound} pairs the archive of {n} patches has besides the initial set"
    if config.budget > bound:
        raise ConfigError(
            f"budget of {config.budget} pairs per round is larger than the {what} "
            f"({mode} candidates); {_budget_hint(mode)}"
        )
    asked = config.initial + config.rounds * config.budget
    if asked > total:
        raise ConfigError(
            f"the session would ask {asked} pairs (initial {config.initial} + {config.rounds} "
            f"rounds of {config.budget}) but the archive of {n} patches has only {total}; "
            "lower --budget or --rounds"
        )


def _create_plugins(
    config: SessionConfig, recorded: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The session's four plugins, by setting name; a missing one names its distribution."""
    from anneal_geo.session import PLUGIN_SETTINGS

    made: dict[str, Any] = {}
    for setting, group in PLUGIN_SETTINGS:
        name = getattr(config, setting)
        options = getattr(config, f"{setting}_options")
        try:
            made[setting] = plugins.create(group, name, seed=config.seed, **options)
        except PluginError as exc:
            was = (recorded or {}).get(setting) or {}
            dist, version = was.get("distribution"), was.get("version")
            if plugins.find(group, name) is None and was.get("name") == name and dist:
                pin = f"=={version}" if version else ""
                raise PluginError(
                    f"{setting} '{name}' is not installed; this session ran it from "
                    f"{dist} {version or ''}".rstrip()
                    + f": install that distribution (pip install '{dist}{pin}') and run the "
                    "command again"
                ) from exc
            raise
    return made


def _provenance(config: SessionConfig) -> dict[str, dict[str, Any]]:
    from anneal_geo.session import PLUGIN_SETTINGS

    return {
        setting: {
            **plugins.provenance(group, getattr(config, setting)),
            "options": dict(getattr(config, f"{setting}_options")),
        }
        for setting, group in PLUGIN_SETTINGS
    }


def _probe_annotator(annotator: Any, pool: PatchPool) -> None:
    """Ask the annotator zero pairs: one that cannot answer when pulled by the engine (the
    Jupyter widget) says so now, before a session exists."""
    for _ in annotator.checked_annotate(np.zeros((0, 2), dtype=np.int64), pool):
        break


def _split_ids(config: SessionConfig, pool: PatchPool) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation split a new session gets: stratified by class, or all in the archive."""
    if pool.labels is not None:
        from anneal_geo.retrieval.split import stratified_split

        labels = pool.labels if pool.multilabel else pool.single_labels()
        return stratified_split(labels, query_fraction=config.query_fraction, seed=config.seed)
    return np.arange(len(pool), dtype=np.int64), np.zeros(0, dtype=np.int64)


def check_settings(config: SessionConfig, pool: PatchPool) -> dict[str, dict[str, Any]]:
    """Check everything a new session needs before anything is written.

    Validates the settings, selects the bands, creates the four plugins with their options,
    prepares the annotator on the pool and asks it zero pairs, builds the backbone's trunk
    and runs it on two patches, checks the training mode and the budgets against the
    archive. The CLI calls this before creating the session directory, so a bad setting
    leaves nothing behind.

    Returns:
        the plugins' provenance, to record in ``session.toml``.

    Raises:
        ConfigError, DataError, PluginError: the first problem found, naming it.
    """
    import torch

    cfg = config.validate()
    if cfg.bands:
        pool = pool.select_bands(cfg.bands)
    made = _create_plugins(cfg)
    made["annotator"].prepare(pool)
    _probe_annotator(made["annotator"], pool)
    if cfg.train_mode == "full" and not getattr(made["backbone"], "trainable", True):
        raise ConfigError(
            f"backbone '{cfg.backbone}' has no trainable trunk; use --train-mode head"
        )
    archive, _ = _split_ids(cfg, pool)
    if len(archive) < 2:
        raise DataError(f"the pool has {len(archive)} patch(es) to pair; need at least 2")
    check_budget(cfg, len(archive), made["estimator"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        trunk = made["backbone"].checked_build(
            pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
        )
        batch = torch.from_numpy(pool.float_patches(np.arange(min(2, len(pool)))))
        with torch.no_grad():
            trunk.eval()(batch)
    return _provenance(cfg)


@dataclass
class RoundResult:
    """What one round did: its history record and whether the annotator finished it."""

    record: dict[str, Any]
    complete: bool


def _top_h(
    best_pairs: np.ndarray, best_u: np.ndarray, pairs: np.ndarray, u: np.ndarray, h: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a scored block into the running short-list of the ``h`` most uncertain pairs."""
    all_pairs = np.concatenate([best_pairs, pairs])
    all_u = np.concatenate([best_u, u])
    if all_u.shape[0] <= h:
        return all_pairs, all_u
    keep = np.argpartition(-all_u, h - 1)[:h]
    return all_pairs[keep], all_u[keep]


def select_pairs(
    embeddings: np.ndarray,
    archive_ids: np.ndarray,
    exclude: np.ndarray,
    estimator: Any,
    selector: Any,
    budget: int,
    rng: np.random.Generator,
    *,
    candidates: str = "auto",
    knn_k: int = 0,
    far_fraction: float = 0.1,
    shortlist_factor: int = 10,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Select ``budget`` pairs to ask: candidates -> uncertainty -> short-list -> diversity.

    Args:
        embeddings: (N, D) L2-normalised embeddings of the whole pool.
        archive_ids: sorted patch ids the pairs may use.
        exclude: (E, 2) pairs already queried or implied.
        estimator: a fitted Estimator.
        selector: a Selector.
        budget: b, pairs to return.
        rng: the round's random generator.

    Returns:
        ((b, 2) int64 pairs, stats) where stats records the candidate mode and counts.
    """
    from anneal_geo.pairs.candidates import candidate_blocks, default_mode, suggested_knn_k
    from anneal_geo.selectors.descriptors import pair_descriptors

    if candidates == "auto":
        # An estimator that ignores the embedding (the random baseline) gets a uniform
        # sample of all pairs: restricting it to neighbour pairs would make "random pairs"
        # about half similar on a large pool, a far stronger baseline than random.
        uses_embeddings = getattr(estimator, "uses_embeddings", True)
        mode = default_mode(len(archive_ids)) if uses_embeddings else "uniform"
    else:
        mode = candidates
    h = max(budget, shortlist_factor * budget)
    best_pairs = np.zeros((0, 2), dtype=np.int64)
    best_u = np.zeros(0, dtype=np.float64)
    n_candidates = 0
    t0 = time.perf_counter()
    if knn_k <= 0:
        knn_k = suggested_knn_k(len(archive_ids))
    for block in candidate_blocks(
        mode, embeddings, archive_ids, exclude, rng, k=knn_k, far_fraction=far_fraction
    ):
        if block.shape[0] == 0:
            continue
        n_candidates += int(block.shape[0])
        u = estimator.checked_score(embeddings, block)
        best_pairs, best_u = _top_h(best_pairs, best_u, block, u, h)
    t_score = time.perf_counter() - t0
    # The candidate graph and its scoring freed hundreds of MB in blocks: hand them back.
    release_free_memory()
    if n_candidates < budget:
        raise ConfigError(
            f"budget of {budget} pairs per round is larger than the {n_candidates} candidate "
            f"pairs left ({mode} candidates); {_budget_hint(mode)}"
        )
    # Deterministic order of the short-list (argpartition's order is arbitrary).
    order = np.lexsort((best_pairs[:, 1], best_pairs[:, 0], -best_u))
    best_pairs, best_u = best_pairs[order], best_u[order]
    t1 = time.perf_counter()
    descriptors = pair_descriptors(embeddings, best_pairs)
    picked = selector.checked_select(descriptors, best_u, budget, rng)
    t_select = time.perf_counter() - t1
    stats = {
        "candidates": mode,
        "n_candidates": n_candidates,
        "knn_k": knn_k if mode == "knn" else None,
        "shortlist": int(best_pairs.shape[0]),
        "seconds_scoring": round(t_score, 4),
        "seconds_diversity": round(t_select, 4),
        "mean_uncertainty_selected": float(best_u[picked].mean()),
    }
    return best_pairs[picked], stats


def _check_initial(count: int, n_archive: int) -> None:
    """Refuse an initial set larger than the archive's pairs, naming the setting."""
    total = n_archive * (n_archive - 1) // 2
    if count > total:
        raise ConfigError(
            f"setting 'initial' asks {count} pairs but the archive of {n_archive} patches has "
            f"only {total}; lower --initial"
        )


def initial_pairs(
    embeddings: np.ndarray,
    archive_ids: np.ndarray,
    count: int,
    nn_fraction: float,
    rng: np.random.Generator,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The initial set: random pairs, ``nn_fraction`` of them among nearest neighbours.

    Random pairs are mostly dissimilar (about 1/C similar), so half the initial set is drawn
    among pairs of nearest neighbours in the starting embedding, which are far more often
    similar (METHOD.md section 3, initial set).

    Returns:
        ((count, 2) pairs, (count,) bool mask: True where the pair came from the
        nearest-neighbour part).
    """
    from anneal_geo.pairs.candidates import knn_candidates, pair_keys

    _check_initial(count, len(archive_ids))
    n = int(embeddings.shape[0])
    taken: set[int] = set()
    if exclude is not None and len(exclude):
        taken.update(pair_keys(np.asarray(exclude, dtype=np.int64), n).tolist())
    n_nn = round(count * nn_fraction)
    chosen: list[np.ndarray] = []
    if n_nn:
        edges = knn_candidates(
            embeddings, archive_ids, k=3, far_fraction=0.0, exclude=exclude, rng=rng
        )
        keys = pair_keys(edges, n)
        fresh = ~np.isin(keys, np.fromiter(taken, dtype=np.int64, count=len(taken)))
        edges = edges[fresh]
        take = rng.permutation(edges.shape[0])[:n_nn]
        chosen.append(edges[take])
        taken.update(pair_keys(edges[take], n).tolist())
    nn_count = int(sum(c.shape[0] for c in chosen))
    need = count - nn_count
    random_pairs: list[np.ndarray] = []
    while need > 0:
        draw = rng.choice(archive_ids, size=(max(2 * need, 16), 2))
        draw = np.sort(draw, axis=1)
        draw = draw[draw[:, 0] != draw[:, 1]]
        keys = pair_keys(draw, n)
        _, first = np.unique(keys, return_index=True)
        first.sort()
        draw, keys = draw[first], keys[first]
        fresh = ~np.isin(keys, np.fromiter(taken, dtype=np.int64, count=len(taken)))
        draw, keys = draw[fresh][:need], keys[fresh][:need]
        random_pairs.append(draw)
        taken.update(keys.tolist())
        need -= draw.shape[0]
    pairs = (
        np.concatenate([*chosen, *random_pairs])
        if chosen or random_pairs
        else np.zeros((0, 2), dtype=np.int64)
    )
    is_nn = np.zeros(pairs.shape[0], dtype=bool)
    is_nn[:nn_count] = True
    return pairs.astype(np.int64), is_nn


#: Rows of the embedding assigned to the initial set's groups at a time.
_INITIAL_CHUNK = 65_536


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Indices where each run of equal values of a sorted (non-empty) array starts."""
    return np.flatnonzero(np.r_[True, values[1:] != values[:-1]])


def cluster_initial_pairs(
    embeddings: np.ndarray,
    archive_ids: np.ndarray,
    count: int,
    rng: np.random.Generator,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The initial set spread over the archive (``initial_design = "clusters"``).

    The archive's starting embedding is cut into ``count // 2`` groups by k-means (faiss,
    trained on a seeded sample of at most 256 rows a group, then every row assigned in
    chunks, so memory does not grow with the archive). Per group, its medoid (the member
    nearest its centroid) is paired with a random other member, mostly similar but not the
    nearest neighbour the frozen features already rank first, and with the medoid of the
    nearest other group, the boundary between the two. Pairs already asked (``exclude``) or
    repeated are replaced by random pairs.

    Returns:
        ((count, 2) pairs with i < j, (count,) bool mask: True for the within-group pairs).
    """
    import faiss

    from anneal_geo.pairs.candidates import _kmeans_centroids, pair_keys

    ids = np.asarray(archive_ids, dtype=np.int64)
    _check_initial(count, len(ids))
    n = int(embeddings.shape[0])
    k = max(1, min(count // 2, len(ids) // 2))
    per_cell = 256
    sample = ids if len(ids) <= k * per_cell else np.sort(rng.choice(ids, k * per_cell, False))
    seed = int(rng.integers(0, 2**31 - 1))
    rows = np.ascontiguousarray(embeddings[sample], dtype=np.float32)
    centroids = _kmeans_centroids(rows, k, seed, per_cell)
    k = len(centroids)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    best = np.full(k, np.inf)
    medoid = np.full(k, -1, dtype=np.int64)
    # Two random members of each group: the two highest random priorities seen.
    top_u = np.full((k, 2), -1.0)
    top_id = np.full((k, 2), -1, dtype=np.int64)
    for lo in range(0, len(ids), _INITIAL_CHUNK):
        chunk = ids[lo : lo + _INITIAL_CHUNK]
        dist, group = index.search(np.ascontiguousarray(embeddings[chunk], dtype=np.float32), 1)
        dist, group = dist[:, 0].astype(np.float64), group[:, 0].astype(np.int64)
        by_dist = np.lexsort((dist, group))  # by group, then distance
        first = by_dist[_run_starts(group[by_dist])]
        closer = dist[first] < best[group[first]]
        best[group[first][closer]] = dist[first][closer]
        medoid[group[first][closer]] = chunk[first][closer]
        u = rng.random(len(chunk))
        by_u = np.lexsort((-u, group))  # by group, highest priority first
        starts = _run_starts(group[by_u])
        ends = np.r_[starts[1:], len(by_u)]
        cand_u = np.full((k, 2), -1.0)
        cand_id = np.full((k, 2), -1, dtype=np.int64)
        for slot in (0, 1):
            has = starts + slot < ends
            at = by_u[starts[has] + slot]
            cand_u[group[at], slot] = u[at]
            cand_id[group[at], slot] = chunk[at]
        both_u = np.concatenate([top_u, cand_u], axis=1)
        both_id = np.concatenate([top_id, cand_id], axis=1)
        keep = np.argsort(-both_u, axis=1)[:, :2]
        top_u = np.take_along_axis(both_u, keep, axis=1)
        top_id = np.take_along_axis(both_id, keep, axis=1)
    taken: set[int] = set()
    if exclude is not None and len(exclude):
        taken.update(pair_keys(np.sort(np.asarray(exclude, dtype=np.int64), axis=1), n).tolist())
    chosen: list[tuple[int, int]] = []
    within: list[bool] = []

    def add(a: int, b: int, inside: bool) -> bool:
        if a == b or a < 0 or b < 0 or len(chosen) >= count:
            return False
        i, j = (a, b) if a < b else (b, a)
        if i * n + j in taken:
            return False
        taken.add(i * n + j)
        chosen.append((i, j))
        within.append(inside)
        return True

    live = np.flatnonzero(medoid >= 0)
    # Squared distances between the groups' centroids, (k, k) without a (k, k, D) array.
    cents = centroids[live].astype(np.float64)
    sq = (cents**2).sum(axis=1)
    apart = sq[:, None] + sq[None, :] - 2.0 * cents @ cents.T
    np.fill_diagonal(apart, np.inf)
    for row, c in enumerate(live):
        m = int(medoid[c])
        member = int(top_id[c, 0]) if top_id[c, 0] != m else int(top_id[c, 1])
        add(m, member, True)
        for other in np.argsort(apart[row])[: len(live) - 1]:
            if add(m, int(medoid[live[other]]), False):
                break
    while len(chosen) < count:
        a, b = rng.choice(ids, size=2, replace=False)
        add(int(a), int(b), False)
    return np.asarray(chosen, dtype=np.int64).reshape(-1, 2), np.asarray(within, dtype=bool)


class Engine:
    """Runs ANNEAL rounds on a session.

    An engine writes to its session, so it holds the session's lock
    (:class:`~anneal_geo.lock.SessionLock`) from construction to :meth:`close`: a second
    writer (another ``anneal-geo label``, ``resume``, a notebook) is refused at once with
    a one-line SessionError naming this one. Use it as a context manager, or call
    :meth:`close`.

    Args:
        session: the session directory (settings, answers, history).
        pool: the patch pool the session's ids refer to.
        command: what holds the lock, shown to a second writer, e.g.
            ``"anneal-geo label"``.
        lock: a lock on this session the caller already holds (it stays the caller's to
            release); default: the engine takes one.
        read_only: open the session without the lock and without writing anything (to
            embed or inspect it while another process labels it); answering, choosing or
            finishing a round is then refused.
        progress: show tqdm progress bars for long work.
        on_round: called with each finished round's record (the CLI prints a table row).

    ``embeddings`` (N, D) is the pool's current embedding. In head mode each finished round
    writes the new one over it, in place (a million patches' take 1.5 GB): copy it to keep
    a round's, and read it under ``embeddings_lock`` from another thread.

    Raises:
        SessionError: another process holds the session, or one of its files is damaged.
        ConfigError, DataError, PluginError: a setting, the pool or a plugin is unusable.
    """

    def __init__(
        self,
        session: Session,
        pool: PatchPool,
        *,
        command: str | None = None,
        lock: SessionLock | None = None,
        read_only: bool = False,
        progress: bool = True,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.session = session
        self.read_only = bool(read_only)
        self._lock: SessionLock | None = None
        self._owns_lock = False
        if not self.read_only:
            if lock is not None and lock.held:
                if lock.directory.resolve() != session.directory.resolve():
                    raise SessionError(
                        f"the lock given is on {lock.directory}, not on {session.directory}"
                    )
                self._lock = lock
            else:
                self._lock = SessionLock(session.directory, command or _default_command()).acquire()
                self._owns_lock = True
        try:
            self._setup(pool, progress, on_round)
        except BaseException:
            self.close()
            raise

    def _setup(
        self,
        pool: PatchPool,
        progress: bool,
        on_round: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        from anneal_geo.pairs.store import PairStore

        session = self.session
        if not self.read_only:
            session.repair_history()
        cfg = session.config
        self.config = cfg
        self._progress = progress
        self.on_round = on_round
        if cfg.bands:
            pool = pool.select_bands(cfg.bands)
        self.pool = pool
        self._set_threads(cfg.threads)

        made = _create_plugins(cfg, session.provenance)
        self.estimator = made["estimator"]
        self.selector = made["selector"]
        self.backbone = made["backbone"]
        self.annotator = made["annotator"]
        if not self.read_only:
            self._record_provenance()
        self.annotator.prepare(pool)

        self.archive_ids, self.query_ids = self._split()
        check_budget(cfg, len(self.archive_ids), self.estimator, self.rounds_done)
        session.check_store_file()
        self.store: PairStore = PairStore(session.store_path, read_only=self.read_only)
        self._check_store()
        session.check_store_counts(self.store.count_by_answer())
        #: The saved trunk features the first embedding reads (see _build_trainer).
        self._features_file: Path | None = None
        self.trainer = self._build_trainer()
        #: Held while the embeddings are rewritten in place (see _finish_round).
        self.embeddings_lock = threading.RLock()
        self.embeddings = self._initial_embeddings()
        # The untrained embedding's quality, kept with round 0 as its start: measured now,
        # at set-up, so that the wait after the first round does not pay for it.
        self._start_metrics: dict[str, float] = (
            self.evaluate() if self.rounds_done == 0 and not self.read_only else {}
        )
        self._round_stats: dict[str, Any] = {}

    # -- set-up ----------------------------------------------------------------------------
    @staticmethod
    def _set_threads(threads: int) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)

    @property
    def progress(self) -> bool:
        """Whether long work (feature caching, embedding) shows progress bars."""
        return self._progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self._progress = bool(value)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            trainer.progress = self._progress

    def _record_provenance(self) -> None:
        """Record where each plugin comes from; say so when a version changed since."""
        session = self.session
        recorded = session.provenance
        changed = False
        for setting, now in _provenance(self.config).items():
            before = recorded.get(setting)
            if before is None or before.get("name") != now["name"]:
                recorded[setting] = now
                changed = True
                continue
            was = (before.get("distribution"), before.get("version"))
            if was != (now["distribution"], now["version"]):
                session.notify(
                    f"{setting} '{now['name']}' is now {now['distribution']} {now['version']}; "
                    f"this session last ran it as {was[0]} {was[1]}: its rounds from now on may "
                    "differ from the earlier ones"
                )
                used = list(before.get("versions_used") or [was[1]])
                recorded[setting] = {**now, "versions_used": [*used, now["version"]]}
                changed = True
            elif {k: v for k, v in before.items() if k != "versions_used"} != now:
                recorded[setting] = {
                    **now,
                    **(
                        {"versions_used": before["versions_used"]}
                        if "versions_used" in before
                        else {}
                    ),
                }
                changed = True
        if changed:
            session.save_settings()

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        saved = self.session.load_split(len(self.pool))
        if saved is not None:
            archive, query = saved
            return np.asarray(archive, dtype=np.int64), np.asarray(query, dtype=np.int64)
        archive_ids, query_ids = _split_ids(self.config, self.pool)
        if len(archive_ids) < 2:
            raise DataError(f"the pool has {len(archive_ids)} patch(es) to pair; need at least 2")
        if not self.read_only:
            self.session.save_split(archive_ids.tolist(), query_ids.tolist())
        return archive_ids, query_ids

    def _check_store(self) -> None:
        fingerprint = self.pool.fingerprint
        stored = self.store.get_meta("pool_fingerprint")
        if stored is None:
            if not self.read_only:
                self.store.set_meta("pool_fingerprint", fingerprint)
        elif not self.pool.has_fingerprint(stored):
            raise SessionError(
                f"{self.session.store_path} holds answers about another pool "
                f"(fingerprint {stored}, this pool {fingerprint}); use the pool the session "
                "was created with"
            )

    def _build_trainer(self) -> Any:
        import torch

        from anneal_geo.training import MetricModel, Trainer

        cfg = self.config
        if cfg.train_mode == "full" and not getattr(self.backbone, "trainable", True):
            raise ConfigError(
                f"backbone '{cfg.backbone}' has no trainable trunk; use --train-mode head"
            )
        torch.manual_seed(cfg.seed)
        trunk = self.backbone.checked_build(
            self.pool.bands, self.pool.band_mean.tolist(), self.pool.band_std.tolist()
        )
        model = MetricModel(trunk, out_dim=cfg.embedding_dim, seed=cfg.seed, mix=cfg.mix)
        trainer = Trainer(
            model,
            mode=cfg.train_mode,  # type: ignore[arg-type]  # validated by SessionConfig
            margin=cfg.margin,
            epochs=cfg.epochs,
            lr_head=cfg.lr,
            seed=cfg.seed,
            progress=self.progress,
            pair_budget=cfg.pair_budget,
            trim=cfg.trim_loss,
            ema=cfg.ema,
        )
        latest = self.session.latest_checkpoint()
        if latest is not None:
            path = latest[1]
            state = self.session.load_checkpoint(path)
            try:
                trainer.load_state_dict(state)
            except AnnealError as exc:
                raise type(exc)(f"{path}: {exc}") from exc
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise self.session._damaged_checkpoint(
                    path, f"{type(exc).__name__}: {exc}".splitlines()[0]
                ) from exc
        if cfg.train_mode == "head":
            # Trunk features are computed once per session and reused by every round and
            # by resume (the trunk is frozen in head mode). A trunk that fits pool
            # statistics is fitted when they are first computed (its statistics then live in
            # every checkpoint and next to the cache), and never again.
            cache = self.session.directory / f"trunk_features_{self._trunk_key()}.npy"
            cached = self._cached_features(cache, int(model.trunk_dim))
            if (
                cached
                and not trainer.trunk_fitted
                and not trainer.load_trunk_state(trainer.trunk_state_path(cache))
            ):
                cached = False  # cached features without the statistics they came from
            if not cached:
                saved = None if self.read_only else cache
                trainer.cache_features(self._patch_source, len(self.pool), path=saved)
                if saved is not None and trainer.can_share_features:
                    # The first embedding reads them back from the file a block at a time:
                    # holding them (1 GB at a million patches) beside it was the peak.
                    trainer.release_features()
                    self._features_file = saved
            elif trainer.can_share_features:
                self._features_file = cache  # read into the embedding a block at a time
            else:
                trainer.set_features(np.load(cache))
        return trainer

    def _cached_features(self, cache: Any, dim: int) -> bool:
        """Whether the cached trunk features are whole and fit (read a block at a time, not
        kept); False (with a notice when the file was damaged) when they must be computed."""
        if not cache.exists():
            return False
        want = (len(self.pool), dim)
        again = "computing the trunk features again"
        try:
            shape, blocks = npy_row_blocks(cache, 65_536, again)
            if shape != want:
                raise DataError(f"{cache} holds {shape} float32, expected {want} float32; {again}")
            if not all(np.isfinite(block).all() for block in blocks):
                raise DataError(f"{cache} holds NaN or infinite values; {again}")
        except DataError as exc:
            self.session.notify(str(exc).splitlines()[0])
            return False
        return True

    def _trunk_key(self) -> str:
        """Identifies cached trunk features: backbone, its options and weights, the pool."""
        import hashlib
        import json

        cfg = self.config
        key = json.dumps(
            [cfg.backbone, cfg.backbone_options, cfg.seed, self.pool.fingerprint, self.pool.bands],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def _patch_source(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.pool.float_patches(ids), dtype=np.float32)

    def _embed(self, reuse: np.ndarray | None = None) -> np.ndarray:
        out = self.trainer.embed(self._patch_source, len(self.pool), out=reuse)
        release_free_memory()
        return np.asarray(out, dtype=np.float32)

    def _initial_embeddings(self) -> np.ndarray:
        if self.config.train_mode != "head":
            return self._embed()
        # With mix > 0 the embedding holds the normalised features: the trainer writes it,
        # then reads the features from there and drops its own copy (1 GB at a million
        # patches); otherwise (mix = 0) the head embeds the features it keeps.
        model = self.trainer.model
        embeddings = np.empty((len(self.pool), model.embedding_dim), dtype=np.float32)
        saved, self._features_file = self._features_file, None
        if not self.trainer.share_features(embeddings, saved):
            embeddings = self._embed(reuse=embeddings)
        # The features are cached: the tiles are not read again until someone looks at a
        # patch, so let go of their open files and the blocks GDAL keeps for them.
        self.pool.close_files()
        release_free_memory()
        return embeddings

    # -- state -----------------------------------------------------------------------------
    @property
    def rounds_done(self) -> int:
        return len(self.session.history())

    @property
    def total_rounds(self) -> int:
        return 1 + self.config.rounds

    @property
    def finished(self) -> bool:
        """Whether every round of the session is done."""
        return self.rounds_done >= self.total_rounds

    def labelled(self) -> Any:
        """The transitive closure of every effective answer so far, without the answers
        the ``repair`` setting suspects (the stored answers stay as given)."""
        from anneal_geo.pairs.transitivity import closure

        # Suspects are judged on the frozen trunk features where they are cached (head
        # mode), not on the embedding trained on those very answers.
        features = getattr(getattr(self, "trainer", None), "features", None)
        return closure(
            *self.store.answers()[:2],
            n=len(self.pool),
            implies=self.config.transitivity,
            repair=self.config.repair,
            features=self.embeddings if features is None else features,
        )

    def _writable(self, what: str) -> PairStore:
        if self.read_only:
            raise SessionError(
                f"session {self.session.directory} is open read-only: cannot {what}; open it "
                "with a writing command (`anneal-geo resume` or `anneal-geo label`)"
            )
        return self.store

    # -- one round -------------------------------------------------------------------------
    def _round_target(self, round_index: int) -> int:
        return self.config.initial if round_index == 0 else self.config.budget

    def _choose(
        self, round_index: int, rng: np.random.Generator, count: int
    ) -> tuple[np.ndarray, dict]:
        cfg = self.config
        queried = self.store.queried()
        if round_index == 0 and cfg.initial_design == "clusters":
            pairs, is_nn = cluster_initial_pairs(
                self.embeddings, self.archive_ids, count, rng, exclude=queried
            )
            return pairs, {"candidates": "initial", "initial_nn_pairs": int(is_nn.sum())}
        if round_index == 0:
            pairs, is_nn = initial_pairs(
                self.embeddings,
                self.archive_ids,
                count,
                cfg.initial_nn_fraction,
                rng,
                exclude=queried,
            )
            return pairs, {"candidates": "initial", "initial_nn_pairs": int(is_nn.sum())}
        labelled = self.labelled()
        self.estimator.checked_fit(self.embeddings, labelled.pairs, labelled.labels)
        exclude = np.concatenate([labelled.pairs, queried]) if len(queried) else labelled.pairs
        # repair = confirm: a join of two groups waits for a second answer across them; ask
        # those checks first (the largest joins first), in at most half of the round.
        checks = labelled.checks[: count // 2]
        if len(checks):
            exclude = np.concatenate([exclude, checks])
        pairs, stats = select_pairs(
            self.embeddings,
            self.archive_ids,
            exclude,
            self.estimator,
            self.selector,
            count - len(checks),
            rng,
            candidates=cfg.candidates,
            knn_k=cfg.knn_k,
            far_fraction=cfg.far_fraction,
            shortlist_factor=cfg.shortlist_factor,
        )
        # What the fit found, kept with the round's pairs so a resumed round records it too.
        if len(checks):
            pairs = np.concatenate([checks, pairs])
            stats["check_pairs"] = len(checks)
        threshold = getattr(self.estimator, "threshold_", None)
        if threshold is not None:
            stats["threshold"] = round(float(threshold), 5)
        for key in ("fallback_reason", "balanced_accuracy_"):
            value = getattr(self.estimator, key, None)
            if value:
                stats[key.rstrip("_")] = value if isinstance(value, str) else round(value, 4)
        return pairs, stats

    def _answered_in_round(self, round_index: int) -> np.ndarray:
        """The pairs with an effective answer (skips included) given in ``round_index``."""
        pairs, _, rounds = self.store.answers(include_skipped=True)
        return pairs[rounds == round_index]

    # -- the round as three steps (used by step() and by interactive front ends) ----------
    def round_pairs(self) -> np.ndarray:
        """The pairs of the current round, choosing (and saving) them on first call.

        The choice is written to ``pending.json`` before any question is asked, so a
        restarted process asks the same pairs. When ``pending.json`` is gone but the round
        already has answers, the round is completed around them: only the pairs its budget
        has left are chosen, so no round ever asks more than its budget.
        """
        round_index = self.rounds_done
        pending = self.session.load_pending(len(self.pool))
        if pending is not None and pending[0] == round_index:
            if not self._round_stats:
                self._round_stats = {**self.session.pending_stats(), "resumed": True}
            return np.asarray(pending[1], dtype=np.int64).reshape(-1, 2)
        self._writable(f"choose the pairs of round {round_index}")
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.config.seed, round_index])
        target = self._round_target(round_index)
        answered = self._answered_in_round(round_index)
        stats: dict[str, Any]
        if len(answered) >= target:
            pairs, stats = answered, {"candidates": "recovered"}
        else:
            # The choice is a round's memory peak (a million patches' neighbour search):
            # the tiles' open files and the blocks GDAL cached for them while the patches
            # were looked at (up to 128 MB) are let go of first; they reopen when needed.
            self.pool.close_files()
            release_free_memory()
            chosen, stats = self._choose(round_index, rng, target - len(answered))
            pairs = np.concatenate([answered, chosen]) if len(answered) else chosen
        if len(answered):
            self.session.notify(
                f"{self.session.pending_path} was missing: round {round_index} already had "
                f"{len(answered)} answers; kept them and chose {len(pairs) - len(answered)} more "
                f"to complete its {target} pairs"
            )
            stats["recovered_answers"] = len(answered)
        stats["seconds_select"] = round(time.perf_counter() - t0, 3)
        self._round_stats = stats
        self.session.save_pending(round_index, pairs.tolist(), stats)
        return pairs

    def unanswered(self) -> np.ndarray:
        """The current round's pairs that have no answer yet (skips count as answers)."""
        from anneal_geo.pairs.candidates import in_sorted, pair_keys, sorted_keys

        pairs = self.round_pairs()
        queried = self.store.queried()
        if not len(queried):
            return pairs
        n = len(self.pool)
        return pairs[~in_sorted(pair_keys(pairs, n), sorted_keys(queried, n))]

    def answer(self, i: int, j: int, value: int, annotator: str | None = None) -> int:
        """Commit one answer (1 similar, 0 dissimilar, -1 skip) before returning its seq."""
        store = self._writable("answer")
        return store.add(
            i, j, value, round=self.rounds_done, annotator=annotator or self.config.annotator
        )

    def finish_round(self) -> dict[str, Any]:
        """Train, re-embed and evaluate once every pair of the round has an answer."""
        self._writable("finish a round")
        left = len(self.unanswered())
        if left:
            raise SessionError(
                f"round {self.rounds_done} still has {left} unanswered pairs; answer or skip "
                "them first"
            )
        return self._finish_round(self.rounds_done, self.round_pairs(), self._round_stats)

    def step(self) -> RoundResult:
        """Run the next round (or finish the interrupted one) with the session's annotator."""
        round_index = self.rounds_done
        t0 = time.perf_counter()
        to_ask = self.unanswered()
        asked = 0
        for (i, j), value in zip(
            to_ask.tolist(), self.annotator.checked_annotate(to_ask, self.pool), strict=False
        ):
            self.answer(i, j, value)
            asked += 1
        self._round_stats["seconds_annotate"] = round(time.perf_counter() - t0, 3)
        if asked < len(to_ask):  # a person stopped early: keep what was answered, resume later
            return RoundResult({"round": round_index, "answered": asked}, complete=False)
        return RoundResult(self.finish_round(), complete=True)

    def _finish_round(
        self, round_index: int, pairs: np.ndarray, stats: dict[str, Any]
    ) -> dict[str, Any]:
        t_start = time.perf_counter()
        cfg = self.config
        labelled = self.labelled()
        metrics_before = self._start_metrics if round_index == 0 else {}
        t0 = time.perf_counter()
        with _torch_threads(1 if self.config.train_mode == "head" else None):
            train_stats = self.trainer.train_round(
                labelled.pairs,
                labelled.labels,
                self._patch_source,
                len(self.pool),
                implied=labelled.implied,
            )
        t_trained = time.perf_counter()
        # Head mode writes the new embeddings over the previous ones (a million patches'
        # take 1.5 GB: holding both was the round's peak); readers from other threads (the
        # labeller's neighbours) wait on the lock rather than see half of each.
        with self.embeddings_lock:
            self.embeddings = self._embed(reuse=self.embeddings)
        t_embedded = time.perf_counter()
        metrics = self.evaluate()
        t_evaluated = time.perf_counter()
        self._save_checkpoint(round_index)

        counts = self.store.count_by_answer()
        _, answered, answer_rounds = self.store.answers()
        round_answers = answered[answer_rounds == round_index]
        record: dict[str, Any] = {
            "round": round_index,
            "queried_pairs": int(counts["similar"] + counts["dissimilar"]),
            "skipped_pairs": int(counts["skipped"]),
            "implied_pairs": int(labelled.n_implied),
            "labelled_pairs": len(labelled.labels),
            "similar_fraction": round(float(np.mean(answered == 1)) if len(answered) else 0.0, 4),
            "round_pairs": len(pairs),
            "round_similar": int(np.sum(round_answers == 1)),
            "contradictions": len(labelled.contradictions),
            "suspect_answers": len(labelled.suspects),
            **metrics,
            "seconds_select": stats.get("seconds_select", 0.0),
            "seconds_annotate": stats.get("seconds_annotate", 0.0),
            "seconds_train": round(t_trained - t0, 3),
            "seconds_embed": round(t_embedded - t_trained, 3),
            "seconds_evaluate": round(t_evaluated - t_embedded, 3),
            "estimator": cfg.estimator,
            "selector": cfg.selector,
            "backbone": cfg.backbone,
            "seed": cfg.seed,
            **{k: v for k, v in stats.items() if not k.startswith("seconds_")},
            "train_loss": round(float(train_stats.loss), 5),
            "train_steps": int(train_stats.steps),
        }
        if round_index == 0:  # the initial set is not selected by the estimator
            for key in ("threshold", "balanced_accuracy", "fallback_reason"):
                record.pop(key, None)
        if metrics_before:
            record["start"] = metrics_before
        # Machine time of the round: selection, training, embedding, evaluation (the time a
        # person spends answering is reported apart, as seconds_annotate).
        record["seconds"] = round(
            float(record["seconds_select"]) + (time.perf_counter() - t_start), 3
        )
        self.session.append_history(record)
        self.session.clear_pending()
        self._round_stats = {}
        if self.on_round is not None:
            self.on_round(record)
        return record

    def _save_checkpoint(self, round_index: int) -> None:
        import os

        import torch

        path = self.session.checkpoint_path(round_index)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(self.trainer.state_dict(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    def evaluate(self) -> dict[str, float]:
        """Retrieval metrics of the current embeddings on the held-out queries ({} if none)."""
        if len(self.query_ids) == 0 or self.pool.labels is None:
            return {}
        from anneal_geo.retrieval.evaluate import evaluate

        labels = self.pool.labels if self.pool.multilabel else self.pool.single_labels()
        metrics = evaluate(
            self.embeddings,
            labels,
            self.archive_ids,
            self.query_ids,
            map_k=self.config.eval_k,
            query_expansion=self.config.query_expansion,
        )
        return {
            k: (round(float(v), 5) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in metrics.items()
        }

    def run(self, rounds: int | None = None) -> list[dict[str, Any]]:
        """Run rounds until the session's total (or ``rounds`` more); return their records.

        Stops early, without error, when an interactive annotator stops answering.
        """
        target = self.total_rounds if rounds is None else self.rounds_done + rounds
        records = []
        while self.rounds_done < target:
            result = self.step()
            if not result.complete:
                break
            records.append(result.record)
        return records

    def close(self) -> None:
        """Close the answers store and give the session's lock back (idempotent)."""
        store = getattr(self, "store", None)
        try:
            if store is not None:
                store.close()
        finally:
            lock, self._lock = self._lock, None
            if lock is not None and self._owns_lock:
                lock.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
