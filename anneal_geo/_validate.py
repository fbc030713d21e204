"""Checks the contract base classes apply to what plugins return."""

from __future__ import annotations

from typing import Any

import numpy as np

from anneal_geo.errors import PluginError

__all__ = ["check_array", "plugin_label"]


def plugin_label(obj: Any) -> str:
    """How a plugin instance is named in errors: its registry origin, else its class (a
    subclass of a registered plugin is named as itself, not as its parent)."""
    cls = type(obj)
    own = cls.__dict__.get("plugin_origin", "")
    return own or f"plugin {cls.__module__}:{cls.__qualname__}"


def check_array(
    obj: Any,
    what: str,
    value: Any,
    *,
    shape: tuple[int | None, ...],
    kind: str,
    finite: bool = True,
) -> np.ndarray:
    """Validate a plugin's returned array and return it as a numpy array.

    Args:
        obj: the plugin instance (named in the error).
        what: what the value is, e.g. ``"score() output"``.
        value: the returned value.
        shape: the expected shape; ``None`` matches any length on that axis.
        kind: numpy dtype kinds accepted, e.g. ``"f"`` or ``"iu"``.
        finite: reject NaN and infinity.
    """
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise PluginError(f"{plugin_label(obj)}: {what} is not array-like ({exc})") from exc
    if arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)
    ):
        want_text = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise PluginError(
            f"{plugin_label(obj)}: {what} has shape {arr.shape}, expected {want_text}"
        )
    if arr.dtype.kind not in kind and not (arr.size == 0 and arr.dtype.kind in "fiub"):
        raise PluginError(
            f"{plugin_label(obj)}: {what} has dtype {arr.dtype}, expected kind '{kind}'"
        )
    if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise PluginError(f"{plugin_label(obj)}: {what} has {bad} NaN or infinite values")
    return arr
