"""The example plugins in the annotation benchmark: mAP@20 against queried pairs.

Compares the committee estimator (``plugins/anneal-geo-committee``) and the core-set selector
(``plugins/anneal-geo-coreset``) with the built-in ANNEAL-MGUE and random pairs, using the
functions of ``annotation_efficiency.py`` (same sessions, oracle, split and summary). Both
plugins must be installed (``pip install -e plugins/anneal-geo-committee
plugins/anneal-geo-coreset``). Writes ``benchmarks/results/plugins_<name>.json`` and ``.png``.

    .venv/bin/python benchmarks/plugins_comparison.py --data sample_tiles/eurosat_ms --seeds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

from anneal_geo import plugins
from anneal_geo.errors import PluginError


def _annotation_efficiency() -> ModuleType:
    """Import the sibling benchmark script by path (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parent / "annotation_efficiency.py"
    spec = importlib.util.spec_from_file_location("annotation_efficiency", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _annotation_efficiency()

METHODS: dict[str, dict[str, str]] = {
    "ANNEAL-MGUE": bench.METHODS["ANNEAL-MGUE"],
    "committee+kmeans": {"estimator": "committee", "selector": "kmeans"},
    "MGUE+coreset": {"estimator": "mgue", "selector": "coreset"},
    "committee+coreset": {"estimator": "committee", "selector": "coreset"},
    "random pairs": bench.METHODS["random pairs"],
}

#: Which distribution provides each plugin the comparison needs.
NEEDED = {
    ("estimators", "committee"): "plugins/anneal-geo-committee",
    ("selectors", "coreset"): "plugins/anneal-geo-coreset",
}


def check_installed(methods: list[str]) -> None:
    """Fail early, naming the plugin to install, rather than in the middle of the runs."""
    wanted = {("estimators", METHODS[m]["estimator"]) for m in methods}
    wanted |= {("selectors", METHODS[m]["selector"]) for m in methods}
    for group, name in sorted(wanted):
        if name not in plugins.names(group):
            where = NEEDED.get((group, name), "its distribution")
            raise PluginError(
                f"{group[:-1]} plugin '{name}' is not installed; run "
                f".venv/bin/pip install -e {where}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sample_tiles/eurosat_ms")
    parser.add_argument("--name", default=None, help="results file stem (default: data folder)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--initial", type=int, default=40)
    parser.add_argument("--backbone", default="spectral")
    parser.add_argument("--train-mode", default="head")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    check_installed(methods)
    name = args.name or Path(args.data).name
    pool, pool_dir = bench.open_pool(args.data, name)
    t0 = time.perf_counter()
    records = bench.run_methods(pool, pool_dir, {m: METHODS[m] for m in methods}, args)
    summary = bench.summarise(records, "map@20")
    reach = bench.pairs_to_reach(summary) if "random pairs" in summary else {}

    bench.print_summary(
        summary,
        reach,
        f"mAP@20, mean ± std over {args.seeds} seeds, {name} ({len(pool)} patches, "
        f"backbone {args.backbone}, {args.train_mode}, b0={args.initial}, b={args.budget})",
        per_round=True,
    )
    out = {
        "data": args.data,
        "patches": len(pool),
        "settings": vars(args),
        "plugins": {
            f"{i.group}/{i.name}": f"{i.distribution} {i.version}"
            for group in ("estimators", "selectors")
            for i in plugins.available(group)
        },
        "summary": summary,
        "reach": reach,
        "records": records,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    stem = f"plugins_{name}"
    (bench.RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1))
    bench.plot(
        summary,
        f"{name}: example plugins vs built-ins ({args.seeds} seeds)",
        bench.RESULTS / f"{stem}.png",
    )
    print(f"wrote {bench.RESULTS / f'{stem}.json'} and .png")


if __name__ == "__main__":
    main()
