"""``python -m anneal_geo.testing FOLDER``: regenerate the shipped sample from FOLDER."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from anneal_geo.testing.sample import write_sample_file

__all__: list[str] = []


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m anneal_geo.testing FOLDER``: regenerate the shipped sample from FOLDER."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m anneal_geo.testing sample_tiles/eurosat_ms")
    path = write_sample_file(args[0])
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    _main()
