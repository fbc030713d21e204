"""An exported metric model, loaded without its session: :func:`load_model` and :class:`Model`.

Loading reads ``model.toml`` (:mod:`anneal_geo.models.card`), builds the trunk through the
backbone plugin the card names (the plugin must be installed; no weights file is read or
downloaded: the exported state dict holds every parameter and buffer), puts the projection
head on it and loads the state dict strictly, so a tensor that does not fit is an error,
never silently skipped. Neither the session, its answers nor the annotator plugin is needed.

:meth:`Model.embed` takes a pool (or pool directory) or an (N, C, H, W) array in the pool's
units, selects the model's bands by name (a missing band is a one-line DataError naming it;
extra bands are ignored) and returns (N, D) float32 L2-normalised embeddings. Importing this
module does not import torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anneal_geo.errors import DataError, PluginError

if TYPE_CHECKING:
    import torch

    from anneal_geo.data.pool import PatchPool

__all__ = ["Model", "build_module", "load_model", "load_state"]

log = logging.getLogger(__name__)

#: Options of the built-in ``resnet18`` that only apply together with a weights file; the
#: exported state dict already holds the weights (and the normalisation as buffers).
_WEIGHTS_ONLY_OPTIONS = ("weights_bands", "normalize", "allow_download")
_BATCH = 256


def _backbone(card: Mapping[str, Any]) -> Any:
    """The backbone plugin instance the card names, created without any weights file."""
    from anneal_geo import plugins

    spec = card["backbone"]
    name = str(spec["name"])
    options = dict(spec.get("options", {}))
    had_weights = options.pop("weights", None) is not None or spec.get("weights") is not None
    if had_weights:
        for key in _WEIGHTS_ONLY_OPTIONS:
            options.pop(key, None)
    try:
        backbone = plugins.create("backbones", name, seed=int(spec.get("seed", 0)), **options)
    except PluginError as exc:
        origin = " ".join(str(spec[k]) for k in ("distribution", "version") if spec.get(k))
        wanted = f" (from {origin})" if origin else ""
        raise PluginError(
            f"the model needs backbone plugin '{name}'{wanted}, which does not load here: {exc}"
        ) from exc
    info = plugins.find("backbones", name)
    if info is not None and spec.get("version") and info.version != spec.get("version"):
        log.warning(
            "backbone '%s' is version %s here; the model was exported with %s",
            name,
            info.version,
            spec.get("version"),
        )
    return backbone


def build_module(card: Mapping[str, Any], state: Mapping[str, Any]) -> torch.nn.Module:
    """The metric model (trunk, head, L2 normalisation) of a card with ``state`` loaded.

    Raises:
        PluginError: the backbone plugin is missing or its trunk does not take the state.
        DataError: the state dict does not fit the head the card describes.
    """
    from anneal_geo.training.heads import MetricModel

    spec = card["input"]
    backbone = _backbone(card)
    trunk = backbone.checked_build(
        list(spec["bands"]),
        [float(v) for v in spec["band_mean"]],
        [float(v) for v in spec["band_std"]],
    )
    head = card["head"]
    module = MetricModel(trunk, out_dim=int(head["out_dim"]), hidden=int(head["hidden"]))
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), str(exc))
        raise PluginError(
            f"backbone '{card['backbone']['name']}' builds a trunk that does not take the "
            f"exported weights ({first[:200]}); export the model again with a backbone "
            "whose trunk is rebuilt from its options"
        ) from exc
    return module.eval()


def load_state(directory: Path, card: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict stored in a model directory, checked against the card's SHA-256."""
    from anneal_geo.models.card import sha256_file

    path = directory / str(card["weights"])
    if not path.is_file():
        raise DataError(f"{path} is missing; export the model again")
    if sha256_file(path) != card["weights_sha256"]:
        raise DataError(
            f"{path} is corrupt or was replaced (its SHA-256 differs from model.toml); "
            "export the model again"
        )
    try:
        if card["weights_format"] == "safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:
                raise DataError(
                    f"{path} is a safetensors file but the safetensors package is not "
                    "installed; pip install safetensors"
                ) from exc
            return dict(load_file(str(path)))
        import torch

        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{path} could not be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "export the model again"
        ) from exc
    if not isinstance(loaded, dict):
        raise DataError(f"{path} does not hold a state dict; export the model again")
    return dict(loaded)


class Model:
    """An exported metric model: patches in, (N, D) L2-normalised float32 embeddings out.

    Get one with :func:`load_model` (or ``anneal_geo.load_model``).

    Attributes:
        card: the ``model.toml`` content.
        module: the torch module (trunk, projection head, L2 normalisation), in eval mode.
        path: the model directory (None for a model built in memory from a session).
        bands: the band names the model takes, in input order.
        dim: the embedding dimension D.
        query_expansion: how many nearest patches an index built with the model averages
            each query with before ranking (the session's setting; 0 for models exported
            before it existed).
    """

    def __init__(
        self, module: torch.nn.Module, card: dict[str, Any], path: Path | None = None
    ) -> None:
        self.module = module
        self.card = card
        self.path = path
        self.bands: list[str] = [str(b) for b in card["input"]["bands"]]
        self.dim = int(card["embedding"]["dim"])
        expansion = card["embedding"].get("query_expansion", 0)
        if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 0:
            where = path / "model.toml" if path is not None else "the model card"
            raise DataError(
                f"{where}: [embedding] query_expansion = {expansion!r} is not a whole number "
                "of 0 or more; correct it or export the model again"
            )
        self.query_expansion = expansion

    def __repr__(self) -> str:
        where = f", {self.path}" if self.path is not None else ""
        return (
            f"Model({self.card['backbone']['name']} + head, {len(self.bands)} bands, "
            f"{self.dim}-d{where})"
        )

    @property
    def label(self) -> str:
        """How messages name the model: its directory, or ``the model``."""
        return f"the model {self.path}" if self.path is not None else "the model"

    # -- band matching ---------------------------------------------------------------------
    def channels(self, bands: Sequence[str], where: str) -> list[int]:
        """Positions of the model's bands among ``bands`` (by name, any order).

        Raises:
            DataError: one or more of the model's bands are missing (named in the message).
        """
        from anneal_geo.data.bands import normalise_band_name

        position: dict[str, int] = {}
        for i, name in enumerate(bands):
            position.setdefault(str(name), i)
            canonical = normalise_band_name(str(name))
            if canonical is not None:
                position.setdefault(canonical, i)
        missing = [b for b in self.bands if b not in position]
        if missing:
            raise DataError(
                f"{where} lacks band(s) {', '.join(missing)} that {self.label} needs (it has "
                f"{', '.join(map(str, bands))}); give it the bands {', '.join(self.bands)}"
            )
        return [position[b] for b in self.bands]

    def _check_resolution(self, pool: PatchPool, where: str) -> None:
        trained = self.card["input"].get("resolution")
        if (
            trained
            and pool.resolution
            and not math.isclose(float(pool.resolution), float(trained), rel_tol=0.05)
        ):
            raise DataError(
                f"{where} has {pool.resolution:g} m pixels but {self.label} was trained on "
                f"{float(trained):g} m pixels; build the pool with --res {float(trained):g}"
            )

    # -- embedding -------------------------------------------------------------------------
    def _batches(
        self, source: Any, channels: list[int], ids: np.ndarray | None, batch_size: int
    ) -> Iterator[np.ndarray]:
        n = len(source) if ids is None else len(ids)
        identity = channels == list(range(int(source.shape[1])))
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            block = source[start:stop] if ids is None else source[ids[start:stop]]
            if not identity:
                block = block[:, channels]
            yield np.asarray(block, dtype=np.float32)

    def embed(
        self,
        patches_or_pool: Any,
        *,
        bands: Sequence[str] | None = None,
        ids: Sequence[int] | np.ndarray | None = None,
        batch_size: int = _BATCH,
    ) -> np.ndarray:
        """Embed patches: (N, D) float32, L2-normalised rows, in the order given.

        Args:
            patches_or_pool: a :class:`~anneal_geo.data.pool.PatchPool`, a pool directory,
                or an (N, C, H, W) array in the pool's units (reflectance x 10000 for
                Sentinel-2 L2A).
            bands: the names of the array's C bands; without them the array must hold
                exactly the model's bands in the model's order (``model.bands``). Ignored
                for a pool, whose own band names are used.
            ids: embed only these patches (rows), in this order (default: all).
            batch_size: patches per forward pass (one batch of raw patches is in memory at
                a time; a pool's memory-mapped patches are never read whole).

        Raises:
            DataError: a band the model needs is missing, the array is not 4-D, or a
                pool's pixel size differs from the model's.
        """
        import torch

        from anneal_geo.data.pool import POOL_FILE, PatchPool

        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        source: Any = patches_or_pool
        if isinstance(source, str | Path):
            if not (Path(source) / POOL_FILE).is_file():
                raise DataError(
                    f"{source} is not a pool directory ({POOL_FILE}); build one with "
                    "`anneal-geo pool build`"
                )
            source = PatchPool.open(source)
        if isinstance(source, PatchPool):
            where = f"the pool {source.path}" if source.path is not None else "the pool"
            channels = self.channels(source.bands, where)
            self._check_resolution(source, where)
            array: Any = source.patches
        else:
            array = source if hasattr(source, "shape") else np.asarray(source)
            if len(array.shape) != 4:
                raise DataError(f"patches must have shape (N, C, H, W), got {tuple(array.shape)}")
            if bands is None:
                if int(array.shape[1]) != len(self.bands):
                    raise DataError(
                        f"the patches have {array.shape[1]} bands but {self.label} takes "
                        f"{len(self.bands)} ({', '.join(self.bands)}); pass bands=[...] "
                        "naming the array's bands"
                    )
                channels = list(range(len(self.bands)))
            else:
                if len(bands) != int(array.shape[1]):
                    raise DataError(
                        f"bands= names {len(bands)} bands but the patches have "
                        f"{array.shape[1]}; name each band of the array"
                    )
                channels = self.channels(list(bands), "the patches")
        index = None
        if ids is not None:
            index = np.asarray(ids, dtype=np.int64).reshape(-1)
            if index.size and (index.min() < 0 or index.max() >= len(array)):
                raise DataError(f"ids must lie in 0..{len(array) - 1}")
        n = len(array) if index is None else len(index)
        out = np.empty((n, self.dim), dtype=np.float32)
        row = 0
        self.module.eval()
        with torch.inference_mode():
            for block in self._batches(array, channels, index, batch_size):
                # A writable copy: a float32 pool's memory-mapped patches are read-only.
                x = np.require(block, dtype=np.float32, requirements=["C", "W"])
                y = self.module(torch.from_numpy(x))
                out[row : row + len(block)] = y.float().cpu().numpy()
                row += len(block)
        return out


def load_model(model_dir: str | Path) -> Model:
    """Load an exported model (``anneal-geo export``) from its directory.

    Needs the backbone plugin the card names (a built-in or an installed distribution),
    nothing of the session.

    Raises:
        DataError: not a model directory, a damaged card or weights file.
        PluginError: the backbone plugin is missing or does not rebuild the trunk.
    """
    from anneal_geo.models.card import read_card

    directory = Path(model_dir)
    card = read_card(directory)
    state = load_state(directory, card)
    module = build_module(card, state)
    return Model(module, card, directory)
