"""End to end on the largest real pool the shipped data gives: the Major TOM cell at stride 16.

Builds the pool from the tile through TorchGeo (64 px patches every 16 px: 3,969 patches),
then runs ANNEAL rounds and reports each round's latency split. The cell has no labels, so a
scripted annotator stands in for the person: two patches are "similar" when their mean NDVI
differs by less than 0.1 (the answer a person would give for vegetation density). Prints a
table and writes ``benchmarks/results/majortom_end_to_end.json``.

    .venv/bin/python benchmarks/majortom_end_to_end.py --rounds 3 --budget 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo import plugins
from anneal_geo.annotators.base import Annotator
from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


class NdviRule(Annotator):
    """Similar when the two patches' mean NDVI differs by less than 0.1 (scripted person)."""

    interactive = True  # stands in for a person: the engine treats its answers as human

    def annotate(self, pairs: np.ndarray, pool: Any) -> Any:
        means = np.stack([pool.float_patches([i]).mean(axis=(0, 2, 3)) for i in range(len(pool))])
        red, nir = pool.bands.index("B04"), pool.bands.index("B08")
        ndvi = (means[:, nir] - means[:, red]) / (means[:, nir] + means[:, red] + 1e-6)
        for i, j in pairs:
            yield int(abs(ndvi[i] - ndvi[j]) < 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--initial", type=int, default=100)
    args = parser.parse_args()

    plugins.register(NdviRule, name="ndvi-rule", group="annotators")
    work = Path(tempfile.mkdtemp(prefix="anneal-majortom-"))
    t0 = time.perf_counter()
    pool = PatchPool.from_tiles(ROOT / "sample_tiles" / "majortom_s2l2a_tile", 64,
                                stride=args.stride)
    pool.save(work / "pool")
    build = time.perf_counter() - t0
    pool = PatchPool.open(work / "pool")
    config = SessionConfig(data=str(work / "pool"), annotator="ndvi-rule", rounds=args.rounds,
                           budget=args.budget, initial=args.initial)
    session = Session.create(work / "session", config, {"pool_dir": str(work / "pool")})
    t1 = time.perf_counter()
    with Engine(session, pool, progress=False) as engine:
        start = time.perf_counter() - t1
        records = engine.run()
    print(f"Major TOM cell, stride {args.stride}: {len(pool)} patches of 64 px, "
          f"{pool.n_bands} bands; pool built in {build:.1f} s, engine started "
          f"(trunk features + first embedding) in {start:.1f} s")
    print(f"{'round':>5} {'queried':>7} {'similar':>7} {'candidates':>10} {'select s':>8} "
          f"{'train s':>7} {'embed s':>7} {'round s':>7}")
    for r in records:
        print(f"{r['round']:>5} {r['queried_pairs']:>7} {r['similar_fraction']:>7.2f} "
              f"{r.get('candidates', '-'):>10} {r['seconds_select']:>8.2f} "
              f"{r['seconds_train']:>7.2f} {r['seconds_embed']:>7.2f} {r['seconds']:>7.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"patches": len(pool), "stride": args.stride, "build_seconds": round(build, 2),
           "engine_start_seconds": round(start, 2), "rounds": records}
    (RESULTS / "majortom_end_to_end.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
