"""Query expansion on validation: how many nearest archive items each query is averaged with.

Runs ``annotation_efficiency.py`` in ``--validation`` mode with ``--query-expansion 0`` (its
own mAP@20 is then the plain ranking) and scores every round's embedding a second time for
each ``--expansions`` value with ``evaluate(..., query_expansion=n)``, the function the
sessions and the index use: the sessions train and ask exactly as without expansion (it
changes only what is retrieved), so one session per seed scores every value.

Prints, per method and value, mAP@20 at the last answer and the validation score (the mean
at a quarter, half and all of the answers, as ``annotation_efficiency.py`` scores a
variant), and the paired gain over no expansion; writes
``benchmarks/results/query_expansion_<name>_validation.json``.

    .venv/bin/python benchmarks/query_expansion_validation.py --data sample_tiles/eurosat_ms \\
        --answers 500 --budget 50 --initial 50 --seeds 12 --name eurosat_ms \\
        --methods "ANNEAL-MGUE,ANNEAL-MGUE 10% flipped"

Any other option is passed on to ``annotation_efficiency.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import annotation_efficiency

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--expansions", default="1,2,3,5,10")
    parser.add_argument("--name", required=True)
    args, rest = parser.parse_known_args()
    expansions = [int(v) for v in args.expansions.split(",")]
    module = importlib.import_module("anneal_geo.retrieval.evaluate")
    plain = module.evaluate

    def evaluate(*a: Any, **kw: Any) -> dict[str, float]:
        out = plain(*a, **kw)
        if kw.get("query_expansion", 0) == 0:
            for n in expansions:
                out[f"map@20_qe{n}"] = plain(*a, **{**kw, "query_expansion": n})["map@20"]
        return out

    module.evaluate = evaluate  # type: ignore[assignment]
    name = f"{args.name}_query_expansion"
    sys.argv = [sys.argv[0], *rest, "--validation", "--query-expansion", "0", "--name", name]
    annotation_efficiency.main()

    done = json.loads((RESULTS / f"annotation_{name}_validation.json").read_text())
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for cell in done["runs"].values():
        runs.setdefault(cell["method"], []).append(cell["result"])
    table: dict[str, Any] = {}
    print(f"\n{name} (validation): mAP@20 at the last answer / score, gain over no expansion")
    for method, results in runs.items():
        answers = np.array([r["queried_pairs"] for r in results[0]], dtype=np.float64)
        points = [answers[-1] / 4, answers[-1] / 2, answers[-1]]
        base = np.array([[r["map@20"] for r in run] for run in results])
        table[method] = {"seeds": len(results)}
        for n in [0, *expansions]:
            key = "map@20" if n == 0 else f"map@20_qe{n}"
            values = np.array([[r[key] for r in run] for run in results])
            row = {
                "last": round(float(values[:, -1].mean()), 4),
                # annotation_efficiency's score: the mean curve read at the three points
                "score": round(
                    float(np.mean([np.interp(x, answers, values.mean(0)) for x in points])), 4
                ),
                "gain_last": round(float((values[:, -1] - base[:, -1]).mean()), 4),
                "seeds_better_last": int(np.sum(values[:, -1] > base[:, -1])),
            }
            table[method][str(n)] = row
            print(
                f"  {method:26s} n={n:<3d} last {row['last']:.4f}  score {row['score']:.4f}  "
                f"gain {row['gain_last']:+.4f} ({row['seeds_better_last']}/{len(results)} seeds)"
            )
    out = RESULTS / f"query_expansion_{args.name}_validation.json"
    out.write_text(json.dumps({"name": name, "expansions": expansions, "table": table}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
