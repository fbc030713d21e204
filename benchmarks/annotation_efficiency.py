"""Annotation efficiency: retrieval mAP@20 against queried pairs, ANNEAL versus random pairs.

Runs each method for several seeds on one data set with the simulated oracle, prints a table
(mean and standard deviation of mAP@20 per number of queried pairs), writes the raw records
and the summary to ``benchmarks/results/annotation_<name>.json`` and a plot to
``benchmarks/results/annotation_<name>.png``.

    .venv/bin/python benchmarks/annotation_efficiency.py --data sample_tiles/eurosat_ms
    .venv/bin/python benchmarks/annotation_efficiency.py --data ../shared/data/eurosat_rgb \
        --name eurosat_rgb --rounds 8 --budget 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.session import Session, SessionConfig

RESULTS = Path(__file__).resolve().parent / "results"

METHODS: dict[str, dict[str, str]] = {
    "ANNEAL-MGUE": {"estimator": "mgue", "selector": "kmeans"},
    "ANNEAL-BCGUE": {"estimator": "bcgue", "selector": "kmeans"},
    "MGUE-topk": {"estimator": "mgue", "selector": "topk"},
    "random pairs": {"estimator": "random", "selector": "random"},
}


def run_method(
    pool: PatchPool, pool_dir: Path, method: dict[str, str], seed: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    config = SessionConfig(
        data=str(pool_dir),
        seed=seed,
        rounds=args.rounds,
        budget=args.budget,
        initial=args.initial,
        backbone=args.backbone,
        train_mode=args.train_mode,
        epochs=args.epochs,
        **method,
    )
    workdir = Path(tempfile.mkdtemp(prefix="anneal-bench-"))
    try:
        session = Session.create(workdir / "session", config, {"pool_dir": str(pool_dir)})
        with Engine(session, pool, progress=False) as engine:
            return engine.run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


CLASS_LABELS = "class labels (equal bits)"


def run_class_labels(
    pool: PatchPool, pool_dir: Path, seed: int, args: argparse.Namespace, budgets: list[int]
) -> list[dict[str, Any]]:
    """Class labels at equal annotation bits: log2(C) bits per image, so B bits buy
    B / log2(C) labelled images (drawn at random from the archive); the head is trained on
    every pair among them (similar iff same class) and evaluated like the pair methods."""
    import torch

    from anneal_geo import plugins
    from anneal_geo.retrieval.evaluate import evaluate
    from anneal_geo.retrieval.split import stratified_split
    from anneal_geo.training import MetricModel, Trainer

    labels = pool.single_labels()
    archive, query = stratified_split(labels, query_fraction=0.2, seed=seed)
    bits_per_image = float(np.log2(len(pool.class_names or [])))
    order = np.random.default_rng([seed, 7]).permutation(archive)
    backbone = plugins.create("backbones", args.backbone, seed=seed)
    trunk = backbone.checked_build(pool.bands, pool.band_mean.tolist(), pool.band_std.tolist())
    trainer = Trainer(
        MetricModel(trunk, out_dim=128, seed=seed),
        mode="head",
        seed=seed,
        epochs=args.epochs,
        progress=False,
    )
    trainer.cache_features(pool.float_patches, len(pool))
    records = []
    torch.set_num_threads(1)
    for bits in budgets:
        chosen = np.sort(order[: max(2, int(bits / bits_per_image))])
        i, j = np.triu_indices(len(chosen), k=1)
        pairs = np.stack([chosen[i], chosen[j]], axis=1)
        y = (labels[pairs[:, 0]] == labels[pairs[:, 1]]).astype(np.int8)
        t = time.perf_counter()
        trainer.train_round(pairs, y)
        metrics = evaluate(trainer.embed(), labels, archive, query)
        records.append(
            {
                "queried_pairs": bits,
                "labelled_images": len(chosen),
                "seconds": time.perf_counter() - t,
                **metrics,
            }
        )
    return records


def summarise(records: dict[str, list[list[dict[str, Any]]]], metric: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, runs in records.items():
        queried = [r["queried_pairs"] for r in runs[0]]
        values = np.array([[r[metric] for r in run] for run in runs])
        summary[name] = {
            "queried_pairs": queried,
            "mean": values.mean(axis=0).round(4).tolist(),
            "std": values.std(axis=0).round(4).tolist(),
            "seconds_per_round": float(np.mean([[r["seconds"] for r in run] for run in runs])),
        }
    return summary


def pairs_to_reach(summary: dict[str, Any], reference: str = "random pairs") -> dict[str, Any]:
    """Queried pairs each method needs to reach the reference's final mean mAP@20."""
    target = summary[reference]["mean"][-1]
    out = {}
    for name, s in summary.items():
        reached = [q for q, m in zip(s["queried_pairs"], s["mean"], strict=True) if m >= target]
        out[name] = reached[0] if reached else None
    return {
        "target_map@20": target,
        "pairs_needed": out,
        "reference_pairs": summary[reference]["queried_pairs"][-1],
    }


def plot(summary: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, s in summary.items():
        x = np.array(s["queried_pairs"])
        m, sd = np.array(s["mean"]), np.array(s["std"])
        ax.plot(x, m, marker="o", label=name)
        ax.fill_between(x, m - sd, m + sd, alpha=0.15)
    ax.set_xlabel("queried pairs (annotation bits)")
    ax.set_ylabel("mAP@20 on held-out queries")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def open_pool(data: str, name: str) -> tuple[PatchPool, Path]:
    """The benchmark's pool, built once into ``results/tmp`` and reopened after that."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    pool_dir = RESULTS / "tmp" / f"pool_{name}"
    if not (pool_dir / "pool.json").exists():
        PatchPool.load(Path(data)).save(pool_dir)
    return PatchPool.open(pool_dir), pool_dir


def run_methods(
    pool: PatchPool,
    pool_dir: Path,
    methods: dict[str, dict[str, str]],
    args: argparse.Namespace,
) -> dict[str, list[list[dict[str, Any]]]]:
    """Every method for seeds 0..args.seeds-1, printing one line per run."""
    records: dict[str, list[list[dict[str, Any]]]] = {}
    width = max(len(n) for n in methods)
    for method_name, method in methods.items():
        records[method_name] = []
        for seed in range(args.seeds):
            t = time.perf_counter()
            run = run_method(pool, pool_dir, method, seed, args)
            records[method_name].append(run)
            print(
                f"{method_name:{width}s} seed {seed}: mAP@20 "
                + " ".join(f"{r['map@20']:.3f}" for r in run)
                + f"  ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    return records


def print_summary(
    summary: dict[str, Any], reach: dict[str, Any], title: str, per_round: bool = False
) -> None:
    """The mAP@20 table (mean ± std per number of queried pairs) and the pairs-to-reach line."""
    width = max(16, *(len(n) + 2 for n in summary))
    print(f"\n{title}")
    first = next(iter(summary.values()))
    print("queried pairs".ljust(width) + "".join(f"{q:>14}" for q in first["queried_pairs"]))
    for method_name, s in summary.items():
        cells = "".join(f"{m:>8.3f}±{sd:.3f}" for m, sd in zip(s["mean"], s["std"], strict=True))
        extra = f"   {s['seconds_per_round']:.2f} s/round" if per_round else ""
        print(method_name.ljust(width) + cells + extra)
    if reach:
        print(
            f"\npairs needed to reach random pairs' final mAP@20 ({reach['target_map@20']:.3f}"
            f" at {reach['reference_pairs']} pairs): {reach['pairs_needed']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sample_tiles/eurosat_ms")
    parser.add_argument("--name", default=None, help="results file stem (default: data folder)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--initial", type=int, default=50)
    parser.add_argument("--backbone", default="spectral")
    parser.add_argument("--train-mode", default="head")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--no-class-labels",
        dest="class_labels",
        action="store_false",
        help="skip the class-labels-at-equal-bits baseline",
    )
    args = parser.parse_args()

    name = args.name or Path(args.data).name
    pool, pool_dir = open_pool(args.data, name)
    t0 = time.perf_counter()
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    records = run_methods(pool, pool_dir, methods, args)
    if args.class_labels:
        budgets = [r["queried_pairs"] for r in next(iter(records.values()))[0]]
        records[CLASS_LABELS] = [
            run_class_labels(pool, pool_dir, seed, args, budgets) for seed in range(args.seeds)
        ]
    summary = summarise(records, "map@20")
    reach = pairs_to_reach(summary) if "random pairs" in summary else {}

    print_summary(
        summary,
        reach,
        f"mAP@20, mean ± std over {args.seeds} seeds, {name} ({len(pool)} patches, "
        f"backbone {args.backbone}, {args.train_mode})",
    )
    out = {
        "data": args.data,
        "patches": len(pool),
        "settings": vars(args),
        "summary": summary,
        "reach": reach,
        "records": records,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (RESULTS / f"annotation_{name}.json").write_text(json.dumps(out, indent=1))
    plot(
        summary,
        f"{name}: mAP@20 vs queried pairs ({args.seeds} seeds)",
        RESULTS / f"annotation_{name}.png",
    )
    print(f"wrote {RESULTS / f'annotation_{name}.json'} and .png")


if __name__ == "__main__":
    main()
