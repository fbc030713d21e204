"""Export a session's metric model: :func:`session_model` and :func:`export_model`.

The model is rebuilt from the session's settings and its latest checkpoint without the
engine, so neither the annotator plugin nor the session lock is needed: the backbone plugin
builds the trunk for the session's bands and pool statistics, the projection head goes on
top and the checkpoint's ``model`` state dict is loaded into both.

Before anything is written, the exported state dict is loaded into a model rebuilt exactly
as :func:`~anneal_geo.models.model.load_model` will rebuild it, and both models embed the
same patches: a backbone whose trunk depends on anything outside its options and state
dict is refused instead of producing a model that embeds differently.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import DataError, PluginError, SessionError

if TYPE_CHECKING:
    import torch

    from anneal_geo.models.model import Model

__all__ = ["export_model", "session_model"]

#: Patches embedded by both the session's model and the rebuilt one before exporting.
_CHECK_PATCHES = 16
#: Largest difference allowed between the two embeddings of a check patch.
_CHECK_TOLERANCE = 1e-4


def _metrics(record: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.items()
        if (key.startswith(("map", "p@")) or key == "n_queries")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def _plugin(group: str, name: str) -> dict[str, Any]:
    from anneal_geo import plugins

    try:
        return plugins.provenance(group, name)
    except PluginError:
        return {"name": name}


def _buffers(trunk: torch.nn.Module) -> dict[str, list[int]]:
    return {f"trunk.{name}": list(buf.shape) for name, buf in trunk.named_buffers()}


def session_model(session_dir: str | Path) -> Model:
    """The session's metric model at its latest checkpoint, as a :class:`Model` in memory
    (its ``card`` is the one :func:`export_model` writes, less the weights file fields).

    Raises:
        SessionError: not a session, or no round finished yet (no checkpoint).
        DataError: the checkpoint does not fit the session's backbone and bands.
        PluginError: the backbone plugin is missing or does not rebuild from its state.
    """
    return _session_model(session_dir)[0]


def _session_model(session_dir: str | Path) -> tuple[Model, dict[str, torch.Tensor]]:
    """:func:`session_model` and the state dict to write."""
    import torch

    from anneal_geo import __version__, plugins
    from anneal_geo.data.pool import PatchPool
    from anneal_geo.models.model import Model, build_module
    from anneal_geo.pairs.store import PairStore
    from anneal_geo.session import Session
    from anneal_geo.training.heads import MetricModel

    session = Session.open(session_dir)
    cfg = session.config
    latest = session.latest_checkpoint()
    if latest is None:
        raise SessionError(
            f"{session.directory} has no finished round yet (no checkpoint in "
            f"{session.checkpoint_dir}); run or label a round before exporting"
        )
    round_index, checkpoint = latest
    pool = PatchPool.open(session.pool_dir)
    if cfg.bands:
        pool = pool.select_bands(cfg.bands)
    backbone = plugins.create("backbones", cfg.backbone, seed=cfg.seed, **cfg.backbone_options)
    trunk = backbone.checked_build(pool.bands, pool.band_mean.tolist(), pool.band_std.tolist())
    model = MetricModel(trunk, out_dim=cfg.embedding_dim, seed=cfg.seed)
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise DataError(
            f"{checkpoint} does not fit the session's {cfg.backbone} model "
            f"({str(exc).splitlines()[0][:200]}); export from the session that wrote it"
        ) from exc
    model.eval()

    bands = list(pool.bands)
    mean, std = pool.band_mean.tolist(), pool.band_std.tolist()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    mapping = getattr(trunk, "band_mapping", None)
    if mapping is not None:
        # A trunk that picks and reorders the pool's bands for its weights takes exactly
        # those bands once exported (the reordering is no longer needed).
        indices = [int(i) for i in mapping.indices]
        bands = [str(b) for b in trunk.bands]
        mean = [mean[i] for i in indices]
        std = [std[i] for i in indices]
        if "trunk.channels" in state:
            state["trunk.channels"] = torch.zeros(0, dtype=torch.long)

    with PairStore(session.store_path) as store:
        counts = store.count_by_answer()
    history = session.history()
    last = history[-1] if history else {}
    hidden, in_dim = (int(d) for d in state["head.0.weight"].shape)
    backbone_info = _plugin("backbones", cfg.backbone)
    card: dict[str, Any] = {
        "format": "anneal-geo-model",
        "version": 1,
        "anneal_geo_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "input": {
            "bands": bands,
            "band_mean": [float(v) for v in mean],
            "band_std": [float(v) for v in std],
            "patch_size": list(pool.patch_size),
            "resolution": pool.resolution,
            "dtype": str(pool.patches.dtype),
        },
        "backbone": {
            **backbone_info,
            "seed": int(cfg.seed),
            "weights": cfg.backbone_options.get("weights"),
            "options": {k: v for k, v in cfg.backbone_options.items() if k != "weights"},
            "out_dim": int(model.trunk_dim),
            "trainable": bool(getattr(backbone, "trainable", True)),
            "buffers": _buffers(trunk),
        },
        "head": {
            "kind": "projection",
            "target": "anneal_geo.training.heads:ProjectionHead",
            "distribution": "anneal-geo",
            "version": __version__,
            "in_dim": in_dim,
            "hidden": hidden,
            "out_dim": int(model.out_dim),
            "mix": float(model.mix),
            "normalise": "l2",
        },
        "embedding": {
            "dim": int(model.embedding_dim),
            "metric": "euclidean on unit vectors",
            "query_expansion": int(cfg.query_expansion),
        },
        "session": {
            "path": str(session.directory.resolve()),
            "round": int(round_index),
            "rounds_finished": len(history),
            "answers": int(counts["similar"] + counts["dissimilar"] + counts["skipped"]),
            "similar": int(counts["similar"]),
            "dissimilar": int(counts["dissimilar"]),
            "skipped": int(counts["skipped"]),
            "implied_pairs": last.get("implied_pairs"),
            "estimator": cfg.estimator,
            "selector": cfg.selector,
            "annotator": cfg.annotator,
            "train_mode": cfg.train_mode,
            "seed": int(cfg.seed),
            "pool_fingerprint": pool.fingerprint,
        },
        "metrics": _metrics(last),
    }

    # The model as load_model will rebuild it must embed as the session's model does.
    rebuilt = build_module(card, state)
    ids = np.linspace(0, len(pool) - 1, num=min(_CHECK_PATCHES, len(pool))).astype(np.int64)
    x = torch.from_numpy(pool.float_patches(np.unique(ids)))
    with torch.inference_mode():
        expected = model(x).numpy()
        if mapping is not None:
            x = x[:, [int(i) for i in mapping.indices]]
        got = rebuilt(x).numpy()
    gap = float(np.max(np.abs(expected - got))) if len(x) else 0.0
    if not gap <= _CHECK_TOLERANCE:
        raise PluginError(
            f"backbone '{cfg.backbone}' does not rebuild from its options and exported state "
            f"(embeddings differ by {gap:.3g}); it cannot be exported"
        )
    return Model(rebuilt, card, None), state


def _save_state(state: dict[str, torch.Tensor], directory: Path) -> tuple[str, str]:
    """Write the state dict; returns (file name, format)."""
    try:
        from safetensors.torch import save
    except ImportError:
        import torch

        name = "weights.pt"
        tmp = directory / (name + ".partial")
        torch.save(state, tmp)
        os.replace(tmp, directory / name)
        return name, "torch"
    name = "weights.safetensors"
    tmp = directory / (name + ".partial")
    # Written as ordinary bytes, so the file gets the usual permissions (the library's own
    # file writer makes it private to its owner, which hinders sharing the model).
    with open(tmp, "wb") as handle:
        handle.write(save(state, metadata={"format": "anneal-geo-model"}))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / name)
    return name, "safetensors"


def export_model(session_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a session's model as a self-contained model directory and return its path.

    Args:
        session_dir: the session (its latest checkpoint is exported).
        out_dir: the model directory to write (created when missing).
        overwrite: replace a model already exported there.

    Returns:
        ``out_dir``, holding ``model.toml`` and ``weights.safetensors`` (or ``weights.pt``
        without the ``safetensors`` package); see :mod:`anneal_geo.models.card`.

    Raises:
        SessionError: not a session, or no finished round.
        DataError: ``out_dir`` holds another model (without ``overwrite``) or cannot be
            written.
    """
    from anneal_geo.models.card import CARD_FILE, sha256_file, write_card

    out = Path(out_dir)
    if (out / CARD_FILE).exists() and not overwrite:
        raise DataError(
            f"{out} already holds an exported model; choose another --out or pass --force"
        )
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give a folder for the model")
    model, state = _session_model(session_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CARD_FILE).unlink(missing_ok=True)  # no stale card beside new weights
        name, kind = _save_state(state, out)
        for other in ("weights.pt", "weights.safetensors"):
            if other != name:
                (out / other).unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot write the model to {out} ({exc.strerror or exc}); choose a writable --out"
        ) from exc
    card = dict(model.card)
    card["weights"] = name
    card["weights_format"] = kind
    card["weights_sha256"] = sha256_file(out / name)
    write_card(out, card)
    return out
