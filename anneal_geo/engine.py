"""One ANNEAL round and the loop (METHOD.md section 3). The engine knows only the contracts.

Round 0 asks the initial set (random pairs, half of them among nearest neighbours of the
starting embedding); every later round fits the estimator on the labelled pairs, scores
the candidate pairs block-wise keeping a running short-list of the ``h`` most uncertain,
lets the selector pick ``b`` diverse pairs from it, has the annotator answer them (each
answer committed before the next question), expands the answers by transitivity, trains
the metric model and evaluates retrieval.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo import plugins
from anneal_geo.errors import ConfigError, DataError, SessionError

if TYPE_CHECKING:
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.pairs.store import PairStore
    from anneal_geo.session import Session

__all__ = ["Engine", "RoundResult", "select_pairs"]


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
    if n_candidates < budget:
        raise ConfigError(
            f"budget of {budget} pairs per round is larger than the {n_candidates} candidate "
            f"pairs left ({mode} candidates); lower --budget or use --candidates exhaustive"
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

    n_archive = len(archive_ids)
    total = n_archive * (n_archive - 1) // 2
    if count > total:
        raise ConfigError(
            f"setting 'initial' asks {count} pairs but the archive of {n_archive} patches has "
            f"only {total}; lower --initial"
        )
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


class Engine:
    """Runs ANNEAL rounds on a session.

    Args:
        session: the session directory (settings, answers, history).
        pool: the patch pool the session's ids refer to.
        progress: show tqdm progress bars for long work.
        on_round: called with each finished round's record (the CLI prints a table row).
    """

    def __init__(
        self,
        session: Session,
        pool: PatchPool,
        *,
        progress: bool = True,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        from anneal_geo.pairs.store import PairStore

        self.session = session
        cfg = session.config
        self.config = cfg
        self.progress = progress
        self.on_round = on_round
        if cfg.bands:
            pool = pool.select_bands(cfg.bands)
        self.pool = pool
        self._set_threads(cfg.threads)

        self.estimator = plugins.create(
            "estimators", cfg.estimator, seed=cfg.seed, **cfg.estimator_options
        )
        self.selector = plugins.create(
            "selectors", cfg.selector, seed=cfg.seed, **cfg.selector_options
        )
        self.backbone = plugins.create(
            "backbones", cfg.backbone, seed=cfg.seed, **cfg.backbone_options
        )
        self.annotator = plugins.create(
            "annotators", cfg.annotator, seed=cfg.seed, **cfg.annotator_options
        )
        self.annotator.prepare(pool)

        self.archive_ids, self.query_ids = self._split()
        self.store: PairStore = PairStore(session.store_path)
        self._check_store()
        self.trainer = self._build_trainer()
        self.embeddings = self._initial_embeddings()
        self._round_stats: dict[str, Any] = {}

    # -- set-up ----------------------------------------------------------------------------
    @staticmethod
    def _set_threads(threads: int) -> None:
        if threads > 0:
            import torch

            torch.set_num_threads(threads)

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        saved = self.session.load_split()
        if saved is not None:
            archive, query = saved
            return np.asarray(archive, dtype=np.int64), np.asarray(query, dtype=np.int64)
        if self.pool.labels is not None:
            from anneal_geo.retrieval.split import stratified_split

            labels = self.pool.labels if self.pool.multilabel else self.pool.single_labels()
            archive_ids, query_ids = stratified_split(
                labels, query_fraction=self.config.query_fraction, seed=self.config.seed
            )
        else:  # unlabelled: every patch is in the archive, nothing to evaluate against
            archive_ids = np.arange(len(self.pool), dtype=np.int64)
            query_ids = np.zeros(0, dtype=np.int64)
        if len(archive_ids) < 2:
            raise DataError(f"the pool has {len(archive_ids)} patch(es) to pair; need at least 2")
        self.session.save_split(archive_ids.tolist(), query_ids.tolist())
        return archive_ids, query_ids

    def _check_store(self) -> None:
        fingerprint = self.pool.fingerprint
        stored = self.store.get_meta("pool_fingerprint")
        if stored is None:
            self.store.set_meta("pool_fingerprint", fingerprint)
        elif stored != fingerprint:
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
        model = MetricModel(trunk, out_dim=cfg.embedding_dim, seed=cfg.seed)
        trainer = Trainer(
            model,
            mode=cfg.train_mode,  # type: ignore[arg-type]  # validated by SessionConfig
            margin=cfg.margin,
            epochs=cfg.epochs,
            seed=cfg.seed,
            progress=self.progress,
        )
        if cfg.train_mode == "head":
            # Trunk features are computed once per session and reused by every round and
            # by resume (the trunk is frozen in head mode).
            cache = self.session.directory / f"trunk_features_{self._trunk_key()}.npy"
            features = None
            if cache.exists():
                features = np.load(cache)
                if features.shape != (len(self.pool), model.trunk_dim):
                    features = None
            if features is None:
                trainer.cache_features(self._patch_source, len(self.pool), path=cache)
            else:
                trainer.set_features(features)
        latest = self.session.latest_checkpoint()
        if latest is not None:
            trainer.load_state_dict(torch.load(latest[1], weights_only=True))
        return trainer

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

    def _embed(self) -> np.ndarray:
        out = self.trainer.embed(self._patch_source, len(self.pool))
        return np.asarray(out, dtype=np.float32)

    def _initial_embeddings(self) -> np.ndarray:
        return self._embed()

    # -- state -----------------------------------------------------------------------------
    @property
    def rounds_done(self) -> int:
        return len(self.session.history())

    @property
    def total_rounds(self) -> int:
        return 1 + self.config.rounds

    def labelled(self) -> Any:
        """The transitive closure of every effective answer so far."""
        from anneal_geo.pairs.transitivity import closure

        pairs, labels, _ = self.store.answers()
        return closure(pairs, labels, n=len(self.pool))

    # -- one round -------------------------------------------------------------------------
    def _choose(self, round_index: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        cfg = self.config
        queried = self.store.queried()
        if round_index == 0:
            pairs, is_nn = initial_pairs(
                self.embeddings,
                self.archive_ids,
                cfg.initial,
                cfg.initial_nn_fraction,
                rng,
                exclude=queried,
            )
            return pairs, {"candidates": "initial", "initial_nn_pairs": int(is_nn.sum())}
        labelled = self.labelled()
        self.estimator.checked_fit(self.embeddings, labelled.pairs, labelled.labels)
        exclude = np.concatenate([labelled.pairs, queried]) if len(queried) else labelled.pairs
        return select_pairs(
            self.embeddings,
            self.archive_ids,
            exclude,
            self.estimator,
            self.selector,
            cfg.budget,
            rng,
            candidates=cfg.candidates,
            knn_k=cfg.knn_k,
            far_fraction=cfg.far_fraction,
            shortlist_factor=cfg.shortlist_factor,
        )

    # -- the round as three steps (used by step() and by interactive front ends) ----------
    def round_pairs(self) -> np.ndarray:
        """The pairs of the current round, choosing (and saving) them on first call.

        The choice is written to ``pending.json`` before any question is asked, so a
        restarted process asks the same pairs.
        """
        round_index = self.rounds_done
        pending = self.session.load_pending()
        if pending is not None and pending[0] == round_index:
            self._round_stats.setdefault("resumed", True)
            return np.asarray(pending[1], dtype=np.int64).reshape(-1, 2)
        t0 = time.perf_counter()
        rng = np.random.default_rng([self.config.seed, round_index])
        pairs, stats = self._choose(round_index, rng)
        stats["seconds_select"] = round(time.perf_counter() - t0, 3)
        self._round_stats = stats
        self.session.save_pending(round_index, pairs.tolist())
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
        return self.store.add(
            i, j, value, round=self.rounds_done, annotator=annotator or self.config.annotator
        )

    def finish_round(self) -> dict[str, Any]:
        """Train, re-embed and evaluate once every pair of the round has an answer."""
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
        metrics_before = self.evaluate() if round_index == 0 else {}
        t0 = time.perf_counter()
        with _torch_threads(1 if self.config.train_mode == "head" else None):
            train_stats = self.trainer.train_round(
                labelled.pairs, labelled.labels, self._patch_source, len(self.pool)
            )
        t_trained = time.perf_counter()
        self.embeddings = self._embed()
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
        threshold = getattr(self.estimator, "threshold_", None)
        if threshold is not None and round_index > 0:
            record["threshold"] = round(float(threshold), 5)
        if metrics_before:
            record["start"] = metrics_before
        # Machine time of the round: selection, training, embedding, evaluation (the time a
        # person spends answering is reported apart, as seconds_annotate).
        record["seconds"] = round(
            float(record["seconds_select"]) + (time.perf_counter() - t_start), 3
        )
        for key in ("fallback_reason", "balanced_accuracy_"):
            value = getattr(self.estimator, key, None)
            if value and round_index > 0:
                record[key.rstrip("_")] = value if isinstance(value, str) else round(value, 4)
        self.session.append_history(record)
        self.session.clear_pending()
        self._round_stats = {}
        if self.on_round is not None:
            self.on_round(record)
        return record

    def _save_checkpoint(self, round_index: int) -> None:
        import torch

        path = self.session.checkpoint_path(round_index)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.trainer.state_dict(), tmp)
        tmp.replace(path)

    def evaluate(self) -> dict[str, float]:
        """Retrieval metrics of the current embeddings on the held-out queries ({} if none)."""
        if len(self.query_ids) == 0 or self.pool.labels is None:
            return {}
        from anneal_geo.retrieval.evaluate import evaluate

        labels = self.pool.labels if self.pool.multilabel else self.pool.single_labels()
        metrics = evaluate(
            self.embeddings, labels, self.archive_ids, self.query_ids, map_k=self.config.eval_k
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
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
