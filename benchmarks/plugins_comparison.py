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
from typing import Any

from anneal_geo import plugins
from anneal_geo.data.pool import PatchPool
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
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    pool_dir = bench.RESULTS / "tmp" / f"pool_{name}"
    if not (pool_dir / "pool.json").exists():
        PatchPool.load(Path(args.data)).save(pool_dir)
    pool = PatchPool.open(pool_dir)

    records: dict[str, list[list[dict[str, Any]]]] = {}
    t0 = time.perf_counter()
    for method_name in methods:
        records[method_name] = []
        for seed in range(args.seeds):
            t = time.perf_counter()
            run = bench.run_method(pool, pool_dir, METHODS[method_name], seed, args)
            records[method_name].append(run)
            print(
                f"{method_name:18s} seed {seed}: mAP@20 "
                + " ".join(f"{r['map@20']:.3f}" for r in run)
                + f"  ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    summary = bench.summarise(records, "map@20")
    reach = bench.pairs_to_reach(summary) if "random pairs" in summary else {}

    print(
        f"\nmAP@20, mean ± std over {args.seeds} seeds, {name} ({len(pool)} patches, "
        f"backbone {args.backbone}, {args.train_mode}, b0={args.initial}, b={args.budget})"
    )
    first = next(iter(summary.values()))
    print("queried pairs".ljust(20) + "".join(f"{q:>14}" for q in first["queried_pairs"]))
    for method_name, s in summary.items():
        cells = "".join(f"{m:>8.3f}±{sd:.3f}" for m, sd in zip(s["mean"], s["std"], strict=True))
        print(method_name.ljust(20) + cells + f"   {s['seconds_per_round']:.2f} s/round")
    if reach:
        print(
            f"\npairs needed to reach random pairs' final mAP@20 ({reach['target_map@20']:.3f}"
            f" at {reach['reference_pairs']} pairs): {reach['pairs_needed']}"
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
