"""Pretrained weights: which bands they expect, and how to feed them a pool's bands.

Pure functions, each testable alone. A weight is trained on bands in one order (TorchGeo's
SSL4EO-S12 Sentinel-2 weights expect ``B01..B08, B8A, B09..B12``; EuroSAT stores B8A last),
so the pool's band names are matched against the weight's: a pool holding every expected band
is fed through a channel reordering (and the reordering is reported), a pool missing some
raises :class:`~anneal_geo.errors.DataError` naming them. Nothing is assumed silently.

Band names are compared in a canonical spelling (:func:`canonical_band`): ``B1`` / ``b01`` /
``B01`` are the same band, and ``B8a`` is ``B8A``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from anneal_geo.errors import DataError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BandMapping",
    "canonical_band",
    "checkpoint_bands",
    "checkpoint_state_dict",
    "enum_bands",
    "enum_normalization",
    "is_weights_file",
    "load_enum_state_dict",
    "load_file_state_dict",
    "match_bands",
    "resolve_enum",
    "transforms_normalization",
]

log = logging.getLogger(__name__)

_S2_NAME = re.compile(r"B(\d{1,2})(A?)")
#: Wrappers training frameworks put in front of a backbone's parameter names
#: (Lightning/TorchGeo tasks, MoCo/SimCLR encoders, DataParallel).
_KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "encoder_q.", "net.")
#: Top-level modules of a torchvision/timm ResNet trunk (everything but the classifier).
_RESNET_PARTS = frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})
#: Seconds to wait for the weights host to answer before declaring the machine offline.
_CONNECT_TIMEOUT_S = 5.0


def canonical_band(name: str) -> str:
    """The canonical spelling of a band name: ``"B1"`` -> ``"B01"``, ``"B8a"`` -> ``"B8A"``.

    Names that are not of the form ``B<number>[A]`` are only stripped and upper-cased.
    """
    text = str(name).strip().upper()
    match = _S2_NAME.fullmatch(text)
    if match is None:
        return text
    number, suffix = int(match.group(1)), match.group(2)
    return f"B{number}A" if suffix else f"B{number:02d}"


@dataclass(frozen=True)
class BandMapping:
    """How a pool's channels feed a weight's input channels.

    Attributes:
        indices: for each band the weight expects, in its order, the pool channel holding it.
        weights_bands: the bands the weight expects (canonical spelling).
        pool_bands: the pool's bands (canonical spelling).
        reordered: the weight's order differs from the pool's (channels are permuted).
        dropped: pool bands the weight does not use.
    """

    indices: tuple[int, ...]
    weights_bands: tuple[str, ...]
    pool_bands: tuple[str, ...]
    reordered: bool
    dropped: tuple[str, ...]

    @property
    def identity(self) -> bool:
        """The pool's channels are fed unchanged."""
        return self.indices == tuple(range(len(self.pool_bands)))

    def describe(self) -> str:
        """One line saying what the mapping does, for logs and session records."""
        if self.identity:
            return "pool bands match the weights' band order"
        parts = []
        if self.reordered:
            parts.append(
                "reordered pool channels [" + ", ".join(self.pool_bands) + "] to the weights' "
                "order [" + ", ".join(self.weights_bands) + "]"
            )
        if self.dropped:
            parts.append("ignored pool bands the weights do not use: " + ", ".join(self.dropped))
        return "; ".join(parts)


def match_bands(
    pool_bands: Sequence[str], weights_bands: Sequence[str], *, weights_label: str = "the weights"
) -> BandMapping:
    """Match the pool's band names to the bands a weight expects.

    Args:
        pool_bands: the pool's bands, in channel order.
        weights_bands: the bands the weight expects, in its input-channel order.
        weights_label: how to name the weight in errors (enum name or file).

    Returns:
        the :class:`BandMapping`.

    Raises:
        DataError: a band the weight expects is missing from the pool (the message names the
            missing bands and what to do), or a band name is repeated.
    """
    pool = [canonical_band(b) for b in pool_bands]
    wanted = [canonical_band(b) for b in weights_bands]
    for names, whose in ((pool, "the pool"), (wanted, weights_label)):
        repeated = sorted({b for b in names if names.count(b) > 1})
        if repeated:
            raise DataError(f"band {', '.join(repeated)} appears twice in {whose}'s band list")
    missing = [b for b in wanted if b not in pool]
    if missing:
        raise DataError(
            f"{weights_label} expect bands [{', '.join(wanted)}] but the pool lacks "
            f"{', '.join(missing)} (it has [{', '.join(pool)}]); build the pool with those "
            "bands, use weights made for your bands, or use backbone 'smallcnn' or 'spectral'"
        )
    indices = tuple(pool.index(b) for b in wanted)
    used = set(wanted)
    dropped = tuple(b for b in pool if b not in used)
    kept_in_pool_order = [b for b in pool if b in used]
    return BandMapping(
        indices=indices,
        weights_bands=tuple(wanted),
        pool_bands=tuple(pool),
        reordered=kept_in_pool_order != wanted,
        dropped=dropped,
    )


# --------------------------------------------------------------------------- TorchGeo enums


def is_weights_file(weights: str) -> bool:
    """Whether ``weights`` names a file (an existing path, or one that looks like a path)
    rather than a TorchGeo enum name such as ``"ResNet18_Weights.SENTINEL2_ALL_MOCO"``."""
    path = Path(weights).expanduser()
    if path.exists():
        return True
    return any(sep in weights for sep in ("/", "\\")) or path.suffix.lower() in {
        ".pt",
        ".pth",
        ".ckpt",
        ".bin",
        ".safetensors",
    }


def resolve_enum(name: str, enum_class: str = "ResNet18_Weights") -> Any:
    """The TorchGeo weights enum member called ``name``.

    Args:
        name: ``"ResNet18_Weights.SENTINEL2_ALL_MOCO"`` or just ``"SENTINEL2_ALL_MOCO"``.
        enum_class: the enum in ``torchgeo.models`` to look in.

    Raises:
        DataError: no such member (the message lists the Sentinel-2 ones).
    """
    import torchgeo.models

    enum = getattr(torchgeo.models, enum_class)
    prefix, _, member = name.strip().rpartition(".")
    if prefix and prefix != enum_class:
        raise DataError(f"weights {name!r}: expected a {enum_class} member, not {prefix}")
    try:
        return enum[member.upper()]
    except KeyError:
        options = ", ".join(f"{enum_class}.{m.name}" for m in enum if "SENTINEL2" in m.name)
        raise DataError(
            f"weights {name!r} is neither a file nor a {enum_class} member; Sentinel-2 options: "
            f"{options}"
        ) from None


def enum_bands(weights: Any) -> list[str]:
    """The bands a TorchGeo weights enum member expects, canonical spelling, input order.

    Raises:
        DataError: the enum member records no band list.
    """
    bands = weights.meta.get("bands") if hasattr(weights, "meta") else None
    if not bands:
        raise DataError(f"weights {weights} do not record which bands they expect")
    return [canonical_band(b) for b in bands]


def transforms_normalization(
    transforms: Any, n_channels: int
) -> tuple[list[float], list[float]] | None:
    """Fold the ``Normalize`` steps of a weight's transforms into one (mean, std) per channel.

    TorchGeo chains ``Normalize`` modules (e.g. SeCo: min/max, then x255, then ImageNet
    statistics); applying ``(x - m1) / s1`` then ``(. - m2) / s2`` equals one
    ``(x - (m1 + m2 s1)) / (s1 s2)``. Resizing and cropping steps are ignored: patches are
    fed at their own size.

    Args:
        transforms: an ``nn.Module`` (usually ``nn.Sequential``) or None.
        n_channels: the number of input channels (length-1 statistics are broadcast).

    Returns:
        (mean, std) lists of length ``n_channels``, or None when there is no Normalize step.
    """
    if transforms is None or not hasattr(transforms, "modules"):
        return None
    mean = [0.0] * n_channels
    std = [1.0] * n_channels
    found = False
    for module in transforms.modules():
        if type(module).__name__ != "Normalize":
            continue
        m = [float(v) for v in _as_list(module.mean)]
        s = [float(v) for v in _as_list(module.std)]
        if len(m) == 1:
            m = m * n_channels
        if len(s) == 1:
            s = s * n_channels
        if len(m) != n_channels or len(s) != n_channels:
            raise DataError(
                f"weights' Normalize step has {len(m)} channels, the model takes {n_channels}"
            )
        mean = [mu + mi * sd for mu, mi, sd in zip(mean, m, std, strict=True)]
        std = [sd * si for sd, si in zip(std, s, strict=True)]
        found = True
    return (mean, std) if found else None


def enum_normalization(weights: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) per input channel that a TorchGeo weights enum member expects, or None."""
    n = int(weights.meta.get("in_chans", len(enum_bands(weights))))
    return transforms_normalization(getattr(weights, "transforms", None), n)


def _as_list(value: Any) -> list[Any]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, list | tuple) else [value]


def load_enum_state_dict(weights: Any, *, allow_download: bool = True) -> dict[str, torch.Tensor]:
    """Load a TorchGeo weights enum member's state dict from the torch hub cache, or download it.

    Offline machines fail fast: the host is probed with a short timeout before the download.

    Args:
        weights: a TorchGeo weights enum member.
        allow_download: when False, only the torch hub cache is used.

    Raises:
        DataError: the file is neither cached nor downloadable; the message gives the URL and
            says to download it elsewhere and pass its local path.
    """
    import torch

    url = str(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if cached.is_file():
        log.info("loading %s from the torch hub cache %s", weights, cached)
        return load_file_state_dict(cached)
    advice = (
        f"download {url} on a machine with internet access and pass the local file as "
        f"weights='<path>' (or copy it to {cached})"
    )
    if not allow_download:
        raise DataError(f"weights {weights} are not in the torch hub cache; {advice}")
    reason = _probe_host(url, _CONNECT_TIMEOUT_S)
    if reason is not None:
        raise DataError(f"cannot download weights {weights} ({reason}); {advice}")
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as exc:
        raise DataError(
            f"cannot download weights {weights} ({type(exc).__name__}: {exc}); {advice}".replace(
                "\n", " "
            )
        ) from exc
    return checkpoint_state_dict(state, source=str(weights))


def _probe_host(url: str, timeout: float) -> str | None:
    """None if ``url``'s host accepts a TCP connection within ``timeout`` s, else why not.

    Name resolution ignores socket timeouts, so the probe runs in a daemon thread.
    """
    import socket

    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host} unreachable: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        return f"{host} did not answer within {timeout:.0f} s"
    return outcome[0]


# --------------------------------------------------------------------------- local files


def load_file_state_dict(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with a DataError naming the file on failure."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"weights file {path} not found; pass an existing checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"weights file {path} cannot be loaded with torch.load(weights_only=True) "
            f"({type(exc).__name__}); save a plain state dict with torch.save(model.state_dict())"
        ) from exc
    if not isinstance(obj, Mapping):
        raise DataError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def checkpoint_state_dict(obj: Mapping[str, Any], *, source: str = "checkpoint") -> dict[str, Any]:
    """The ResNet parameters of a checkpoint, with torchvision-style names.

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``
    (Lightning, TorchGeo tasks), and strips wrapper prefixes such as ``backbone.``,
    ``model.``, ``encoder.``, ``module.``. timm's ResNet names equal torchvision's. Only
    the trunk (``conv1``, ``bn1``, ``layer1``..``layer4``) is kept: the classifier and any
    projector are dropped, the trunk ends at global pooling.

    Raises:
        DataError: no ``conv1.weight`` is found after unwrapping.
    """
    state: Mapping[str, Any] = obj
    for wrapper in ("state_dict", "model_state_dict", "model", "net"):
        inner = state.get(wrapper)
        if isinstance(inner, Mapping) and inner:
            state = inner
            break
    tensors = {k: v for k, v in state.items() if hasattr(v, "shape")}
    changed = True
    while changed and "conv1.weight" not in tensors:
        changed = False
        for prefix in _KEY_PREFIXES:
            if any(k.startswith(prefix) for k in tensors):
                tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
                changed = True
    if "conv1.weight" not in tensors:
        sample = ", ".join(list(tensors)[:4]) or "no tensors"
        raise DataError(
            f"{source}: no ResNet 'conv1.weight' found (keys start: {sample}); save the "
            "ResNet's state dict (torchvision or timm names, optionally prefixed backbone./model.)"
        )
    # Keep the trunk only: classifier, projector and momentum-encoder entries are dropped.
    return {k: v for k, v in tensors.items() if k.split(".", 1)[0] in _RESNET_PARTS}


def checkpoint_bands(obj: Mapping[str, Any], path: str | Path) -> list[str] | None:
    """The bands a local checkpoint expects, from a ``"bands"`` entry in the checkpoint dict
    or a sidecar JSON file (``<file>.json`` or ``<stem>.json`` with ``{"bands": [...]}``).

    Returns:
        the canonical band names, or None when neither records them.

    Raises:
        DataError: the sidecar file is unreadable or its ``bands`` entry is not a list of names.
    """
    bands = obj.get("bands")
    if bands is None:
        path = Path(path)
        for sidecar in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
            if sidecar.is_file():
                try:
                    meta = json.loads(sidecar.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise DataError(f"band sidecar {sidecar} is not valid JSON ({exc})") from exc
                bands = meta.get("bands") if isinstance(meta, Mapping) else None
                source = str(sidecar)
                break
        else:
            return None
    else:
        source = str(path)
    if not isinstance(bands, list | tuple) or not all(isinstance(b, str) for b in bands):
        raise DataError(f"{source}: 'bands' must be a list of band names, got {bands!r}")
    return [canonical_band(b) for b in bands]
