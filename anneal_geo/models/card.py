"""The model card ``model.toml`` of an exported model: reading, writing, checking.

A model directory (format ``anneal-geo-model``, version 1) holds:

- ``model.toml``: the card. ``format``, ``version``, ``anneal_geo_version``, ``created``,
  ``weights`` (the weights file name), ``weights_format`` (``safetensors`` or ``torch``),
  ``weights_sha256``, and the tables

  - ``[input]``: ``bands`` in input order, ``band_mean``/``band_std`` (the normalisation
    the trunk applies, one value per band), ``patch_size``, ``resolution`` (pixel size in
    CRS units) and ``dtype`` of the pool it was trained on;
  - ``[backbone]``: ``name``, ``target``, ``distribution``, ``version``,
    ``contract_version``, ``seed``, ``weights`` (the weights setting the session used; the
    exported file holds every parameter, so it is not needed to load), ``options``,
    ``out_dim`` and ``buffers``: the names and shapes of the trunk's buffers (fitted pool
    statistics such as ``feature_mean``/``feature_std``, normalisation, band indices),
    whose values are in the weights file;
  - ``[head]``: ``kind`` (``projection``), ``target``, ``distribution``, ``version``,
    ``in_dim``, ``hidden``, ``out_dim``, ``normalise`` (``l2``);
  - ``[embedding]``: ``dim`` and ``metric``;
  - ``[session]``: where it came from: ``path``, ``round``, ``answers`` (similar, dissimilar
    and skipped pairs in effect), ``implied_pairs``, ``estimator``, ``selector``,
    ``annotator``, ``train_mode``, ``seed``, ``pool_fingerprint``;
  - ``[metrics]``: the last round's retrieval metrics (absent when the pool is unlabelled).

- ``weights.safetensors`` (when the ``safetensors`` package is installed) or ``weights.pt``
  (a plain state dict, read with ``torch.load(weights_only=True)``): the metric model's
  state dict, ``trunk.*`` and ``head.*`` tensors, nothing else.

TOML has no null: unset values are left out of the card.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from anneal_geo.errors import DataError

__all__ = [
    "CARD_FILE",
    "FORMAT",
    "VERSION",
    "WEIGHTS_SAFETENSORS",
    "WEIGHTS_TORCH",
    "read_card",
    "sha256_file",
    "write_card",
]

FORMAT = "anneal-geo-model"
VERSION = 1
CARD_FILE = "model.toml"
WEIGHTS_SAFETENSORS = "weights.safetensors"
WEIGHTS_TORCH = "weights.pt"

#: Keys every card must hold, per table ("" for the top level).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "": ("format", "version", "weights", "weights_format", "weights_sha256"),
    "input": ("bands", "band_mean", "band_std"),
    "backbone": ("name",),
    "head": ("in_dim", "hidden", "out_dim"),
    "embedding": ("dim",),
}


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _without_none(table: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _without_none(value) if isinstance(value, Mapping) else value
        for key, value in table.items()
        if value is not None
    }


def write_card(directory: Path, card: Mapping[str, Any]) -> Path:
    """Write ``model.toml`` atomically (temporary file, then rename) and return its path."""
    path = directory / CARD_FILE
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(tomli_w.dumps(_without_none(card)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(
            f"cannot write {path} ({exc.strerror or exc}); choose a writable --out"
        ) from exc
    return path


def read_card(directory: str | Path) -> dict[str, Any]:
    """Read and check ``model.toml`` of a model directory.

    Raises:
        DataError: no card, not TOML, another format or version, or a required key missing.
    """
    directory = Path(directory)
    path = directory / CARD_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found: {directory} is not an exported model; export one with "
            "`anneal-geo export SESSION --out MODEL_DIR`"
        )
    try:
        card = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{path} is not readable TOML ({exc}); export the model again") from exc
    found = (card.get("format"), card.get("version"))
    if found != (FORMAT, VERSION):
        raise DataError(
            f"{path} is format/version {found}, not ({FORMAT!r}, {VERSION}); export the model "
            "again with this version of anneal-geo"
        )
    for table, keys in _REQUIRED.items():
        section = card if not table else card.get(table)
        if not isinstance(section, dict):
            raise DataError(f"{path} lacks the [{table}] table; export the model again")
        missing = [k for k in keys if k not in section]
        if missing:
            where = f"[{table}] " if table else ""
            raise DataError(f"{path} lacks {where}{', '.join(missing)}; export the model again")
    bands = card["input"]["bands"]
    if len(card["input"]["band_mean"]) != len(bands) or len(card["input"]["band_std"]) != len(
        bands
    ):
        raise DataError(
            f"{path}: [input] band_mean/band_std need one value per band ({len(bands)}); "
            "export the model again"
        )
    return card
