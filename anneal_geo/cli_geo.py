"""`anneal-geo` commands contributed by this module (registered on import by cli.py)."""

from __future__ import annotations

from anneal_geo.cli import app  # noqa: F401  (commands attach to it)
