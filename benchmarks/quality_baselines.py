"""Baselines and shared pieces of ``annotation_efficiency.py`` (imported by it from this folder).

- :class:`SharedFeatures`: the trunk features of a training-free backbone computed once per
  pool (the ``texture`` trunk fitted on it) and copied into each benchmark session under the
  engine's cache name, so that thirty sessions do not compute them thirty times;
- :func:`class_label_active_learning`: class labels bought with the same annotation bits
  (log2(C) bits per image), chosen by margin sampling on a cosine-softmax classifier trained
  with cross-entropy on the same features and head; retrieval from the classifier's
  penultimate embedding (the head's, mixed like the pair methods');
- :func:`fully_supervised`: the same features and head trained with the contrastive loss on
  every pair of the archive's labels (the bound the pair methods are measured against);
- :func:`small_cnn_end_to_end`: the ``smallcnn`` backbone and head trained end to end on every
  archive label.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anneal_geo import plugins
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.retrieval.evaluate import evaluate
from anneal_geo.session import Session, SessionConfig
from anneal_geo.training import MetricModel, Trainer

__all__ = [
    "SharedFeatures",
    "class_label_active_learning",
    "cross_entropy_bound",
    "fully_supervised",
    "small_cnn_end_to_end",
]

#: Scale of the cosine-softmax classifier (NormSoftmax: logits = s * cos(e, w_c)).
COSINE_SCALE = 16.0


class _Identity(nn.Module):
    """A trunk that hands cached features through (the head trains on them)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SharedFeatures:
    """Trunk features of training-free backbones, computed once per pool and backbone.

    Args:
        pool: the benchmark's pool.
        directory: where the features (``.npy``) and the fitted trunk state (``.trunk.pt``)
            are kept between runs.
    """

    def __init__(self, pool: PatchPool, directory: Path) -> None:
        self.pool = pool
        self.directory = directory
        self._memory: dict[str, np.ndarray] = {}

    def _path(self, backbone: str, options: dict[str, Any]) -> Path:
        key = json.dumps([backbone, options, self.pool.fingerprint, self.pool.bands], default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self.directory / f"{backbone}_{digest}.npy"

    def get(self, backbone: str, options: dict[str, Any] | None = None) -> np.ndarray:
        """The (N, D) features, computing (and fitting the trunk) on first use."""
        options = dict(options or {})
        path = self._path(backbone, options)
        name = str(path)
        if name in self._memory:
            return self._memory[name]
        bb = plugins.create("backbones", backbone, **options)
        trunk = bb.checked_build(
            self.pool.bands, self.pool.band_mean.tolist(), self.pool.band_std.tolist()
        )
        trainer = Trainer(MetricModel(trunk), mode="head", progress=False)
        state = Trainer.trunk_state_path(path)
        if not path.exists() or (trainer.trunk_fits_statistics and not state.exists()):
            self.directory.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            trainer.cache_features(self.pool.float_patches, len(self.pool), path=path)
            print(
                f"  {backbone} features of {len(self.pool)} patches: "
                f"{time.perf_counter() - t:.0f} s",
                flush=True,
            )
        features = np.load(path)
        self._memory[name] = features
        return features

    def install(self, session: Session, config: SessionConfig) -> bool:
        """Copy the features (and fitted trunk state) into ``session`` under the name the
        engine looks for; False (nothing copied) for a trainable backbone or full mode."""
        bb = plugins.create(
            "backbones", config.backbone, seed=config.seed, **config.backbone_options
        )
        if getattr(bb, "trainable", True) or config.train_mode != "head" or config.bands:
            return False
        self.get(config.backbone, config.backbone_options)
        source = self._path(config.backbone, dict(config.backbone_options))
        # The engine's own cache name (backbone, options, seed, pool, bands).
        key = Engine._trunk_key(SimpleNamespace(config=config, pool=self.pool))  # type: ignore[arg-type]
        target = session.directory / f"trunk_features_{key}.npy"
        shutil.copyfile(source, target)
        if Trainer.trunk_state_path(source).exists():  # a trunk fitted on the pool
            shutil.copyfile(Trainer.trunk_state_path(source), Trainer.trunk_state_path(target))
        return True


def _evaluate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    archive: np.ndarray,
    query: np.ndarray,
    query_expansion: int = 0,
) -> dict[str, float]:
    """``evaluate`` rounded; each baseline retrieves as the pair methods do (the same
    ``query_expansion``)."""
    metrics = evaluate(embeddings, labels, archive, query, query_expansion=query_expansion)
    return {k: round(float(v), 5) if isinstance(v, float) else v for k, v in metrics.items()}


def _balanced_images(
    labelled: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """``k`` labelled images, each class present equally likely (then an image of it)."""
    classes = np.unique(labels[labelled])
    chosen = rng.choice(classes, size=k)
    out = np.empty(k, dtype=np.int64)
    for c in classes:
        where = np.flatnonzero(chosen == c)
        members = labelled[labels[labelled] == c]
        out[where] = rng.choice(members, size=len(where))
    return out


class _CosineClassifier:
    """The head (mixed embedding) and a cosine-softmax layer, trained with cross-entropy."""

    def __init__(self, dim: int, n_classes: int, seed: int, mix: float) -> None:
        torch.manual_seed(seed)
        self.model = MetricModel(_Identity(dim), out_dim=128, seed=seed, mix=mix)
        self.weight = nn.Parameter(torch.randn(n_classes, self.model.embedding_dim) * 0.01)
        self.optimizer = torch.optim.Adam([*self.model.head.parameters(), self.weight], lr=1e-3)
        self.generator = np.random.default_rng([seed, 29])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        e = self.model.embed_features(features)
        return COSINE_SCALE * e @ F.normalize(self.weight, dim=1).T

    def train(
        self, features: torch.Tensor, labels: np.ndarray, labelled: np.ndarray, steps: int
    ) -> None:
        self.model.train()
        y_all = torch.from_numpy(labels.astype(np.int64))
        for _ in range(steps):
            ids = _balanced_images(labelled, labels, 64, self.generator)
            index = torch.from_numpy(ids)
            loss = F.cross_entropy(self.logits(features[index]), y_all[index])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.model.eval()

    @torch.inference_mode()
    def embed(self, features: torch.Tensor) -> np.ndarray:
        return self.model.embed_features(features).numpy()

    @torch.inference_mode()
    def margins(self, features: torch.Tensor) -> np.ndarray:
        p = torch.softmax(self.logits(features), dim=1)
        top = p.topk(2, dim=1).values
        return (top[:, 0] - top[:, 1]).numpy()


def class_label_active_learning(
    features: np.ndarray,
    labels: np.ndarray,
    archive: np.ndarray,
    query: np.ndarray,
    bits: list[float],
    *,
    seed: int,
    mix: float,
    epochs: int,
    query_expansion: int = 0,
) -> list[dict[str, Any]]:
    """Class-label active learning at the pair methods' annotation bits.

    A class label costs log2(C) bits, so ``b`` bits buy ``round(b / log2(C))`` images. The
    first images are drawn at random from the archive; each later batch is the unlabelled
    archive images with the smallest margin between the classifier's two most probable
    classes. After each batch the classifier (head + cosine softmax, warm start) trains with
    cross-entropy on class-balanced batches of the labelled images, and the archive is
    ranked by the head's (mixed) embedding.

    Returns:
        one record per budget: ``queried_pairs`` (the bits), ``bits``, ``labelled_images``
        and the retrieval metrics.
    """
    n_classes = int(labels.max()) + 1
    bits_per_image = math.log2(n_classes)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    clf = _CosineClassifier(x.shape[1], n_classes, seed, mix)
    rng = np.random.default_rng([seed, 7])
    labelled = np.zeros(0, dtype=np.int64)
    records = []
    for budget in bits:
        t = time.perf_counter()
        want = min(len(archive), max(2, round(budget / bits_per_image)))
        need = want - len(labelled)
        if need > 0:
            rest = np.setdiff1d(archive, labelled)
            if len(labelled) == 0:
                new = rng.choice(rest, size=need, replace=False)
            else:
                new = rest[np.argsort(clf.margins(x[torch.from_numpy(rest)]), kind="stable")[:need]]
            labelled = np.sort(np.concatenate([labelled, new]))
        steps = int(min(1000, max(100, math.ceil(epochs * len(labelled) / 64))))
        clf.train(x, labels, labelled, steps)
        records.append(
            {
                "queried_pairs": float(budget),
                "bits": round(len(labelled) * bits_per_image, 2),
                "labelled_images": len(labelled),
                "train_steps": steps,
                "seconds": round(time.perf_counter() - t, 3),
                **_evaluate(clf.embed(x), labels, archive, query, query_expansion),
            }
        )
    return records


def cross_entropy_bound(
    features: np.ndarray,
    labels: np.ndarray,
    archive: np.ndarray,
    query: np.ndarray,
    *,
    seed: int,
    mix: float,
    steps: int = 4000,
    query_expansion: int = 0,
) -> dict[str, Any]:
    """The classifier of :func:`class_label_active_learning` trained on every archive label."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    clf = _CosineClassifier(x.shape[1], int(labels.max()) + 1, seed, mix)
    t = time.perf_counter()
    clf.train(x, labels, np.asarray(archive, dtype=np.int64), steps)
    return {
        "train_steps": steps,
        "seconds": round(time.perf_counter() - t, 2),
        **_evaluate(clf.embed(x), labels, archive, query, query_expansion),
    }


def _all_pairs(archive: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(len(archive), 1)
    pairs = np.stack([archive[i], archive[j]], axis=1).astype(np.int64)
    return pairs, (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int64)


def fully_supervised(
    features: np.ndarray,
    labels: np.ndarray,
    archive: np.ndarray,
    query: np.ndarray,
    *,
    seed: int,
    mix: float,
    margin: float,
    epochs: int,
    rounds: int,
    pair_budget: int,
    query_expansion: int = 0,
) -> dict[str, Any]:
    """The pair methods' head and loss trained on every pair of the archive's labels.

    Each of ``rounds`` rounds draws ``pair_budget`` class-balanced pairs afresh from all of
    them (the trainer's round sample) and trains like a session round (warm start).
    """
    pairs, y = _all_pairs(np.asarray(archive, dtype=np.int64), labels)
    model = MetricModel(_Identity(features.shape[1]), out_dim=128, seed=seed, mix=mix)
    trainer = Trainer(
        model,
        mode="head",
        margin=margin,
        epochs=epochs,
        seed=seed,
        pair_budget=pair_budget,
        progress=False,
    )
    trainer.set_features(features)
    implied = np.ones(len(pairs), dtype=bool)  # none is kept whole: all are sampled
    curve = []
    t = time.perf_counter()
    for _ in range(rounds):
        trainer.train_round(pairs, y, implied=implied)
        curve.append(_evaluate(trainer.embed(), labels, archive, query, query_expansion)["map@20"])
    return {
        "rounds": rounds,
        "pairs": len(pairs),
        "seconds": round(time.perf_counter() - t, 2),
        "map@20_by_round": curve,
        **_evaluate(trainer.embed(), labels, archive, query, query_expansion),
    }


def small_cnn_end_to_end(
    pool: PatchPool,
    labels: np.ndarray,
    archive: np.ndarray,
    query: np.ndarray,
    *,
    seed: int,
    margin: float,
    rounds: int,
    pair_budget: int,
    on_round: Callable[[int, float], None] | None = None,
    query_expansion: int = 0,
) -> dict[str, Any]:
    """The ``smallcnn`` trunk and head trained end to end (``full`` mode: flips, rotations,
    every labelled pair among a batch) on every pair of the archive's labels."""
    pairs, y = _all_pairs(np.asarray(archive, dtype=np.int64), labels)
    torch.manual_seed(seed)
    bb = plugins.create("backbones", "smallcnn", seed=seed)
    trunk = bb.checked_build(pool.bands, pool.band_mean.tolist(), pool.band_std.tolist())
    trainer = Trainer(
        MetricModel(trunk, out_dim=128, seed=seed),
        mode="full",
        margin=margin,
        seed=seed,
        pair_budget=pair_budget,
        progress=False,
    )
    implied = np.ones(len(pairs), dtype=bool)
    curve = []
    t = time.perf_counter()
    for r in range(rounds):
        trainer.train_round(pairs, y, pool.float_patches, len(pool), implied=implied)
        if r == rounds - 1 or (r + 1) % 5 == 0:
            emb = trainer.embed(pool.float_patches, len(pool))
            value = _evaluate(emb, labels, archive, query, query_expansion)["map@20"]
            curve.append([r + 1, value])
            if on_round is not None:
                on_round(r + 1, value)
    emb = trainer.embed(pool.float_patches, len(pool))
    return {
        "rounds": rounds,
        "steps_per_round": trainer.max_steps,
        "seconds": round(time.perf_counter() - t, 2),
        "map@20_by_round": curve,
        **_evaluate(emb, labels, archive, query, query_expansion),
    }
