"""The exceptions anneal-geo raises: one line each, naming the thing at fault and what to do."""

from __future__ import annotations

__all__ = ["AnnealError", "ConfigError", "DataError", "PluginError", "SessionError"]


class AnnealError(Exception):
    """Base class of every error anneal-geo raises on purpose.

    The CLI prints ``str(error)`` as one line and exits with status 2; a traceback is
    only shown for errors that are not ``AnnealError`` (bugs).
    """


class DataError(AnnealError, ValueError):
    """A file, band, raster or pool is unusable; the message names it."""


class ConfigError(AnnealError, ValueError):
    """A setting is out of range or inconsistent; the message names the setting."""


class PluginError(AnnealError, RuntimeError):
    """A plugin failed to load or broke its contract; the message names it and its package."""


class SessionError(AnnealError, RuntimeError):
    """A session directory is missing, incompatible or inconsistent."""
