"""Exported models: a session's metric model as a self-contained directory, and loading it.

- :func:`export_model` (``anneal-geo export SESSION --out MODEL_DIR``) writes ``model.toml``
  (the card: bands, normalisation, backbone and head with their distributions, versions and
  options, the trunk's buffers, embedding size, answers, last metrics) and the weights
  (``weights.safetensors``, or a plain state dict ``weights.pt``);
- :func:`load_model` (also ``anneal_geo.load_model``) reads it back as a :class:`Model`
  whose :meth:`Model.embed` turns a pool or an (N, C, H, W) array into (N, D) embeddings,
  without the session or the annotator plugin;
- :func:`session_model` gives the same :class:`Model` straight from a session, in memory.

The modules: :mod:`~anneal_geo.models.card` (the card's layout and checks),
:mod:`~anneal_geo.models.model` (:class:`Model`, loading) and
:mod:`~anneal_geo.models.export` (building the model from a session, writing it). None of
them imports torch at module level.
"""

from __future__ import annotations

from anneal_geo.models.card import CARD_FILE, read_card
from anneal_geo.models.export import export_model, session_model
from anneal_geo.models.model import Model, load_model

__all__ = ["CARD_FILE", "Model", "export_model", "load_model", "read_card", "session_model"]
