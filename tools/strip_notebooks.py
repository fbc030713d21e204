#!/usr/bin/env python3
"""Strip outputs from Jupyter notebooks, so they are committed clean (no images, no state).

Usage:
    python tools/strip_notebooks.py            # strip notebooks/*.ipynb in place
    python tools/strip_notebooks.py --check    # exit 1 and list what is not stripped
    python tools/strip_notebooks.py a.ipynb b.ipynb

Removes cell outputs, execution counts, the per-cell ``execution`` timings nbclient and
JupyterLab record, and the saved widget state. Works on the JSON directly (standard library
only) and writes it the way nbformat does (sorted keys, one-space indent), so a stripped
notebook is byte-stable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CELL_METADATA = ("execution",)
NOTEBOOK_METADATA = ("widgets",)


def problems(notebook: dict[str, Any]) -> list[str]:
    """What is not stripped in a notebook (empty when it is clean)."""
    found = []
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            found.append(f"cell {index} has outputs")
        if cell.get("execution_count") is not None:
            found.append(f"cell {index} has an execution count")
        for key in CELL_METADATA:
            if key in cell.get("metadata", {}):
                found.append(f"cell {index} has metadata '{key}'")
    for key in NOTEBOOK_METADATA:
        if key in notebook.get("metadata", {}):
            found.append(f"notebook metadata has '{key}'")
    return found


def strip(notebook: dict[str, Any]) -> dict[str, Any]:
    """The notebook without outputs, execution counts, timings and widget state (in place)."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    for key in NOTEBOOK_METADATA:
        notebook.get("metadata", {}).pop(key, None)
    return notebook


def dumps(notebook: dict[str, Any]) -> str:
    """JSON text as nbformat writes it."""
    return json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default notebooks/*)")
    parser.add_argument("--check", action="store_true", help="report, do not write")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    dirty = 0
    for path in paths:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        found = problems(notebook)
        if args.check:
            for problem in found:
                print(f"{path}: {problem}")
            dirty += bool(found)
            continue
        text = dumps(strip(notebook))
        if text != path.read_text(encoding="utf-8"):
            path.write_text(text, encoding="utf-8")
            print(f"stripped {path}")
    if dirty:
        print(f"{dirty} notebook(s) not stripped; run: python tools/strip_notebooks.py")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
