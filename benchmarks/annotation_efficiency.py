"""Annotation efficiency: retrieval mAP@20 against queried pairs and annotation bits, ANNEAL
against its ablations and honest baselines, all on the same features and head.

Methods (each for ``--seeds`` seeds, with the simulated oracle):

- pair methods, run as real sessions (:class:`anneal_geo.engine.Engine`): ``random pairs``;
  ``MGUE top-k`` and ``BCGUE top-k`` (uncertainty, no diversity); ``clustering only``
  (random uncertainty, k-means diversity); ``ANNEAL-MGUE``; ``ANNEAL-BCGUE``;
  ``ANNEAL-MGUE 5% flipped`` and ``10% flipped`` (the oracle flips that share of answers;
  ``--repair`` and ``--trim-loss`` set how the session treats suspect answers, and are part
  of these cells' settings, and of the others' only where they change consistent answers);
- ``class-label AL``: class labels at equal bits (log2(C) bits per image), chosen by margin
  sampling on a cosine-softmax classifier trained with cross-entropy on the same features and
  head, retrieval from the head's embedding (``quality_baselines.py``); it and the
  ``fully supervised`` bound train ``--baseline-epochs`` (30) epochs a round, the pair
  methods ``--epochs`` (the session default); the ``fully supervised`` and ``small CNN``
  bounds draw ``--baseline-pair-budget`` (4,096) pairs a round, the pair methods
  ``--pair-budget`` (the session default);
- bounds: ``fully supervised`` (the same features, head and contrastive loss on every pair of
  the archive's labels), ``fully supervised (cross-entropy)`` (the classifier on every
  archive label) and ``small CNN end to end`` (the ``smallcnn`` backbone trained end to end
  on every archive label).

Two modes:

- default (the query split): the pool is split once by class into archive and queries
  (80/20, ``stratified_split`` seed ``--split-seed``), the same split for every method and
  seed; sessions never pair a query patch.
- ``--validation``: for choosing settings. The pool is cut down to that archive only
  (``--archive-subset N`` keeps a class-stratified N of it), so the queries are not even in
  the pool; every session then carves its validation queries out of it with the engine's
  own split (``query_fraction`` 0.2, seeded by the session seed). ``--variant "margin=1.0
  mix=0.5"`` (repeatable) runs the methods once per variant of the settings; the table
  scores each variant by its mean mAP@20 at a quarter, half and all of the answers.

Results go to ``benchmarks/results/annotation_<name>[_validation].json`` after every
finished (variant, method, seed) cell, with its settings; a rerun skips the cells already
there with the same settings (``--fresh`` starts over). The table is printed and a plot
written to the matching ``.png`` at the end (also from the finished cells alone with
``--report``).

    .venv/bin/python benchmarks/annotation_efficiency.py --data sample_tiles/eurosat_ms \\
        --answers 500 --budget 50 --initial 50
    .venv/bin/python benchmarks/annotation_efficiency.py --data ../shared/data/eurosat_rgb \\
        --name eurosat_rgb --answers 2000 --budget 100 --initial 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from anneal_geo.data.pool import PatchPool
from anneal_geo.engine import Engine
from anneal_geo.retrieval.split import stratified_split
from anneal_geo.session import Session, SessionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_baselines as baselines

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = SessionConfig()

METHODS: dict[str, dict[str, Any]] = {
    "ANNEAL-MGUE": {"estimator": "mgue", "selector": "kmeans"},
    "ANNEAL-BCGUE": {"estimator": "bcgue", "selector": "kmeans"},
    "MGUE top-k": {"estimator": "mgue", "selector": "topk"},
    "BCGUE top-k": {"estimator": "bcgue", "selector": "topk"},
    "clustering only": {"estimator": "random", "selector": "kmeans"},
    "random pairs": {"estimator": "random", "selector": "random"},
    "ANNEAL-MGUE 5% flipped": {"estimator": "mgue", "selector": "kmeans", "noise": 0.05},
    "ANNEAL-MGUE 10% flipped": {"estimator": "mgue", "selector": "kmeans", "noise": 0.10},
}
CLASS_LABELS = "class-label AL"
SUPERVISED = "fully supervised"
SUPERVISED_CE = "fully supervised (cross-entropy)"
CNN = "small CNN end to end"
BASELINES = (CLASS_LABELS, SUPERVISED, SUPERVISED_CE, CNN)
#: Settings a variant may change (``--variant "key=value ..."``).
VARIANT_KEYS = {
    "backbone": str,
    "transitivity": str,
    "margin": float,
    "mix": float,
    "epochs": int,
    "lr": float,
    "ema": float,
    "budget": int,
    "initial": int,
    "pair_budget": int,
    "repair": str,
    "trim_loss": float,
    "initial_nn_fraction": float,
    "initial_design": str,
    "embedding_dim": int,
    "shortlist_factor": int,
    "query_expansion": int,
}


# ----------------------------------------------------------------------------- sessions


def _setting(args: argparse.Namespace, name: str) -> Any:
    """A setting of ``args``, or the SessionConfig default (older callers' args lack some)."""
    value = getattr(args, name, None)
    return getattr(DEFAULTS, name) if value is None else value


def run_method(
    pool: PatchPool,
    pool_dir: Path,
    method: dict[str, Any],
    seed: int,
    args: argparse.Namespace,
    *,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    features: baselines.SharedFeatures | None = None,
) -> list[dict[str, Any]]:
    """One session of a pair method; its history records.

    Args:
        split: (archive, queries) to give the session; None: the engine's own split.
        features: shared trunk features copied into the session (None: it computes them).
    """
    method = dict(method)
    noise = float(method.pop("noise", 0.0))
    config = SessionConfig(
        data=str(pool_dir),
        seed=seed,
        rounds=args.rounds,
        budget=args.budget,
        initial=args.initial,
        backbone=_setting(args, "backbone"),
        train_mode=_setting(args, "train_mode"),
        epochs=_setting(args, "epochs"),
        lr=_setting(args, "lr"),
        ema=_setting(args, "ema"),
        margin=_setting(args, "margin"),
        mix=_setting(args, "mix"),
        pair_budget=_setting(args, "pair_budget"),
        transitivity=_setting(args, "transitivity"),
        repair=_setting(args, "repair"),
        trim_loss=_setting(args, "trim_loss"),
        initial_nn_fraction=_setting(args, "initial_nn_fraction"),
        initial_design=_setting(args, "initial_design"),
        embedding_dim=_setting(args, "embedding_dim"),
        shortlist_factor=_setting(args, "shortlist_factor"),
        query_expansion=_setting(args, "query_expansion"),
        threads=int(getattr(args, "threads", 0) or 0),
        annotator_options={"noise": noise} if noise else {},
        **method,
    )
    workdir = Path(tempfile.mkdtemp(prefix="anneal-bench-"))
    try:
        session = Session.create(workdir / "session", config, {"pool_dir": str(pool_dir)})
        if split is not None:
            session.save_split(split[0].tolist(), split[1].tolist())
        if features is not None:
            features.install(session, config)
        with Engine(session, pool, progress=False) as engine:
            return engine.run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_methods(
    pool: PatchPool,
    pool_dir: Path,
    methods: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, list[list[dict[str, Any]]]]:
    """Every method for seeds 0..args.seeds-1 with the engine's own split, printing one line
    per run (used by ``plugins_comparison.py``)."""
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


# ----------------------------------------------------------------------------- summaries


def summarise(records: dict[str, list[list[dict[str, Any]]]], metric: str) -> dict[str, Any]:
    """Mean and standard deviation of ``metric`` per number of queried pairs, over the runs
    of each method that share the first run's budgets."""
    summary: dict[str, Any] = {}
    for name, runs in records.items():
        if not runs:
            continue
        queried = [r["queried_pairs"] for r in runs[0]]
        same = [run for run in runs if [r["queried_pairs"] for r in run] == queried]
        values = np.array([[r[metric] for r in run] for run in same])
        bits = [r.get("bits", r["queried_pairs"]) for r in runs[0]]
        summary[name] = {
            "queried_pairs": queried,
            "bits": bits,
            "mean": values.mean(axis=0).round(4).tolist(),
            "std": values.std(axis=0).round(4).tolist(),
            "seeds": len(same),
            "seconds_per_round": float(np.mean([[r["seconds"] for r in run] for run in same])),
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


def needed_to_reach(summary: dict[str, Any], bound: float, shares: tuple[float, ...]) -> dict:
    """Per method, the fewest queried pairs (bits for class labels) whose mean mAP@20 reaches
    each share of ``bound``; None when never reached."""
    out: dict[str, Any] = {}
    for share in shares:
        target = share * bound
        row = {}
        for name, s in summary.items():
            xs = s["bits"] if name == CLASS_LABELS else s["queried_pairs"]
            hit = [x for x, m in zip(xs, s["mean"], strict=True) if m >= target]
            row[name] = hit[0] if hit else None
        out[f"{round(share * 100)}%"] = {"target_map@20": round(target, 4), "needed": row}
    return out


def interpolate(summary_row: dict[str, Any], x: float) -> float:
    """Mean mAP@20 at ``x`` queried pairs, linearly interpolated along the curve."""
    return float(np.interp(x, summary_row["queried_pairs"], summary_row["mean"]))


def plot(summary: dict[str, Any], title: str, path: Path, bounds: dict | None = None) -> None:
    """mAP@20 against queried pairs (pair methods) and against annotation bits (all),
    with the bounds as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15.0, 4.8), dpi=110, sharey=True)
    for ax, key, label in (
        (axes[0], "queried_pairs", "queried pairs"),
        (axes[1], "bits", "annotation bits (1 per pair, log2(C) per class label)"),
    ):
        # tab20 (light and dark of 10 hues) keeps up to 20 curves apart, the same colour
        # for a method in both panels.
        for i, (name, s) in enumerate(summary.items()):
            if key == "queried_pairs" and name == CLASS_LABELS:
                continue
            x = np.array(s[key], dtype=float)
            m, sd = np.array(s["mean"]), np.array(s["std"])
            style = "--" if "flipped" in name else "-"
            colour = plt.cm.tab20((2 * i + i // 10) % 20)
            ax.plot(x, m, style, marker="o", markersize=3, label=name, color=colour)
            ax.fill_between(x, m - sd, m + sd, alpha=0.12, color=colour)
        for i, (name, value) in enumerate((bounds or {}).items()):
            ax.axhline(value, color=("black", "dimgray", "darkgray")[i % 3], linestyle=":",
                       label=f"{name}")  # fmt: skip
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAP@20 on held-out queries")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the curves
    fig.suptitle(title)
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


# ----------------------------------------------------------------------------- pools, splits


def archive_pool(
    pool: PatchPool, archive: np.ndarray, subset: int | None, name: str, seed: int
) -> tuple[PatchPool, Path]:
    """The pool cut down to ``archive`` (a class-stratified ``subset`` of it), saved once."""
    ids = np.asarray(archive, dtype=np.int64)
    if subset is not None and subset < len(ids):
        labels = pool.single_labels()[ids]
        keep, _ = stratified_split(labels, query_fraction=1.0 - subset / len(ids), seed=seed)
        ids = ids[keep]
    tag = f"pool_{name}_validation" + (f"_{subset}" if subset is not None else "")
    pool_dir = RESULTS / "tmp" / tag
    if not (pool_dir / "pool.json").exists():
        assert pool.labels is not None
        PatchPool(
            np.ascontiguousarray(pool.patches[ids]),
            pool.bands,
            class_names=pool.class_names,
            labels=pool.labels[ids],
            multilabel=pool.multilabel,
            sources=[pool.sources[i] for i in ids],
            source_crs=[pool.source_crs[i] for i in ids],
            resolution=pool.resolution,
        ).save(pool_dir)
    return PatchPool.open(pool_dir), pool_dir


# ----------------------------------------------------------------------------- the runs


def parse_variant(text: str) -> dict[str, Any]:
    """``"margin=1.0 mix=0.5"`` -> {"margin": 1.0, "mix": 0.5}."""
    out: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise SystemExit(f"--variant {text!r}: use KEY=VALUE with keys {sorted(VARIANT_KEYS)}")
        out[key] = VARIANT_KEYS[key](value)
    return out


def variant_label(variant: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"


def cell_settings(args: argparse.Namespace, variant: dict[str, Any]) -> dict[str, Any]:
    """Every setting a cell depends on (a finished cell is reused only when they match)."""
    settings = {
        "backbone": args.backbone,
        "margin": args.margin,
        "mix": args.mix,
        "epochs": args.epochs,
        "lr": args.lr,
        "ema": args.ema,
        "budget": args.budget,
        "initial": args.initial,
        "answers": args.answers,
        "pair_budget": args.pair_budget,
        "train_mode": args.train_mode,
        "transitivity": args.transitivity,
        "initial_design": args.initial_design,
        "query_expansion": args.query_expansion,
        **variant,
    }
    settings["rounds"] = math.ceil((settings["answers"] - settings["initial"]) / settings["budget"])
    return settings


def noise_settings(method: str, settings: dict[str, Any], args: argparse.Namespace) -> dict:
    """``settings`` with ``repair`` and ``trim_loss`` for the pair methods they affect: the
    flipped ones always; the others only when the values change what consistent answers
    give (``repair=split`` or ``confirm``, or ``trim_loss`` > 0), so that their cached cells
    stay valid."""
    if method not in METHODS:
        return settings
    repair = settings.get("repair", args.repair)
    trim_loss = settings.get("trim_loss", args.trim_loss)
    if METHODS[method].get("noise") or repair in ("split", "confirm") or trim_loss:
        return {"repair": repair, "trim_loss": trim_loss, **settings}
    return settings


def baseline_settings(
    method: str, settings: dict[str, Any], variant: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """``settings`` with the epochs of class-label AL and of the fully supervised bound
    (``--baseline-epochs`` unless the variant sets epochs itself) and the pair budget of the
    bounds trained on pairs (``--baseline-pair-budget`` unless the variant sets it). A bound
    is trained to convergence, and class-label AL scored 0.002 higher on RGB validation with
    30 epochs than with 4, so the baselines keep 30 epochs and 4,096 pairs a round while the
    pair methods' defaults are 4 and 2,048."""
    out = dict(settings)
    if method in (CLASS_LABELS, SUPERVISED) and "epochs" not in variant:
        out["epochs"] = args.baseline_epochs
    if method in (SUPERVISED, CNN) and "pair_budget" not in variant:
        out["pair_budget"] = args.baseline_pair_budget
    return out


#: Settings only the pair methods read: a bound's or class-label AL's cell stays valid when
#: they change.
PAIR_ONLY = ("transitivity", "lr", "initial_nn_fraction", "initial_design")
#: Settings a baseline does not read besides those (a change of them does not rerun it).
UNREAD = {
    SUPERVISED_CE: ("epochs", "margin", "pair_budget"),
    CLASS_LABELS: ("margin", "pair_budget"),
}


def same_settings(method: str, done: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a finished cell of ``method`` ran under ``settings`` (as far as it reads them)."""
    unread = () if method in METHODS else PAIR_ONLY + UNREAD.get(method, ())
    return {k: v for k, v in done.items() if k not in unread} == {
        k: v for k, v in settings.items() if k not in unread
    }


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_cell(
    method: str,
    seed: int,
    settings: dict[str, Any],
    pool: PatchPool,
    pool_dir: Path,
    split: tuple[np.ndarray, np.ndarray] | None,
    features: baselines.SharedFeatures,
    args: argparse.Namespace,
) -> Any:
    """One (method, seed) under ``settings``: a list of records, or one record (bounds)."""
    labels = pool.single_labels()
    if split is None:  # the engine's own split, as the sessions of this seed get it
        archive, query = stratified_split(labels, query_fraction=0.2, seed=seed)
    else:
        archive, query = split
    schedule = [settings["initial"] + k * settings["budget"] for k in range(settings["rounds"] + 1)]
    if method in METHODS:
        ns = argparse.Namespace(**settings, threads=args.threads)
        return run_method(pool, pool_dir, METHODS[method], seed, ns, split=split, features=features)
    feats = features.get(settings["backbone"]) if method != CNN else None
    if method == CLASS_LABELS:
        assert feats is not None
        return baselines.class_label_active_learning(
            feats, labels, archive, query, [float(b) for b in schedule],
            seed=seed, mix=settings["mix"], epochs=settings["epochs"],
            query_expansion=settings["query_expansion"],
        )  # fmt: skip
    if method == SUPERVISED:
        assert feats is not None
        return baselines.fully_supervised(
            feats, labels, archive, query, seed=seed, mix=settings["mix"],
            margin=settings["margin"], epochs=settings["epochs"], rounds=len(schedule),
            pair_budget=settings["pair_budget"], query_expansion=settings["query_expansion"],
        )  # fmt: skip
    if method == SUPERVISED_CE:
        assert feats is not None
        return baselines.cross_entropy_bound(
            feats, labels, archive, query, seed=seed, mix=settings["mix"],
            query_expansion=settings["query_expansion"],
        )  # fmt: skip
    if method == CNN:
        return baselines.small_cnn_end_to_end(
            pool, labels, archive, query, seed=seed, margin=settings["margin"],
            rounds=args.cnn_rounds, pair_budget=settings["pair_budget"],
            query_expansion=settings["query_expansion"],
            on_round=lambda r, v: print(f"    small CNN round {r}: mAP@20 {v:.3f}", flush=True),
        )  # fmt: skip
    raise SystemExit(f"unknown method {method!r}; known: {', '.join([*METHODS, *BASELINES])}")


def collect(runs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Finished cells grouped as {variant: {method: [result per seed]}}, seeds in order."""
    grouped: dict[str, dict[str, list[tuple[int, Any]]]] = {}
    for cell in runs.values():
        grouped.setdefault(cell["variant"], {}).setdefault(cell["method"], []).append(
            (cell["seed"], cell["result"])
        )
    return {
        v: {m: [r for _, r in sorted(cells, key=lambda c: c[0])] for m, cells in methods.items()}
        for v, methods in grouped.items()
    }


def report(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Print the tables of the finished cells, add the summaries to ``data``, plot."""
    grouped = collect(data["runs"])
    out: dict[str, Any] = {}
    for variant, methods in grouped.items():
        curves = {m: runs for m, runs in methods.items() if isinstance(runs[0], list)}
        single = {m: runs for m, runs in methods.items() if isinstance(runs[0], dict)}
        summary = summarise(curves, "map@20") if curves else {}
        bounds = {
            m: {
                "mean": round(float(np.mean([r["map@20"] for r in runs])), 4),
                "std": round(float(np.std([r["map@20"] for r in runs])), 4),
                "seeds": len(runs),
            }
            for m, runs in single.items()
        }
        block: dict[str, Any] = {"summary": summary, "bounds": bounds}
        title = f"{data['name']} ({data['mode']}), {variant}: mAP@20, mean ± std over seeds"
        if summary:
            print_summary(summary, {}, title, per_round=True)
        for m, b in bounds.items():
            print(f"{m:32s} {b['mean']:.3f}±{b['std']:.3f} ({b['seeds']} seeds)")
        if SUPERVISED in bounds and summary:
            block["reach"] = needed_to_reach(summary, bounds[SUPERVISED]["mean"], (0.9, 0.95))
            for share, row in block["reach"].items():
                print(
                    f"pairs (bits for class labels) to reach {share} of fully supervised "
                    f"({row['target_map@20']:.3f}): {row['needed']}"
                )
        answers = data["settings"]["answers"]
        if summary:
            checkpoints = [answers / 4, answers / 2, answers]
            block["score_points"] = checkpoints
            block["score"] = {
                m: round(float(np.mean([interpolate(s, x) for x in checkpoints])), 4)
                for m, s in summary.items()
            }
        out[variant] = block
    data["summaries"] = out
    if len(out) > 1:
        print("\nvalidation score (mean mAP@20 at 1/4, 1/2 and all answers):")
        for variant, block in sorted(
            out.items(), key=lambda kv: -max(kv[1].get("score", {"": 0}).values())
        ):
            scores = ", ".join(f"{m} {v:.4f}" for m, v in block.get("score", {}).items())
            print(f"  {variant:48s} {scores}")
    if len(out) == 1:
        block = next(iter(out.values()))
        if block["summary"]:
            plot(
                block["summary"],
                f"{data['name']} ({data['mode']}): mAP@20, mean ± std over seeds",
                path.with_suffix(".png"),
                {m: b["mean"] for m, b in block["bounds"].items()},
            )
    elif out:  # variants: one curve per variant (and method) in one plot
        curves = {
            f"{variant} {method}" if len(block["summary"]) > 1 else variant: s
            for variant, block in out.items()
            for method, s in block["summary"].items()
        }
        plot(curves, f"{data['name']} ({data['mode']}): variants", path.with_suffix(".png"))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sample_tiles/eurosat_ms")
    parser.add_argument("--name", default=None, help="results file stem (default: data folder)")
    parser.add_argument("--methods", default=",".join([*METHODS, *BASELINES]))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--answers", type=int, default=500, help="queried pairs in all")
    parser.add_argument("--budget", type=int, default=DEFAULTS.budget, help="pairs per round")
    parser.add_argument("--initial", type=int, default=DEFAULTS.initial)
    parser.add_argument("--backbone", default=DEFAULTS.backbone)
    parser.add_argument("--margin", type=float, default=DEFAULTS.margin)
    parser.add_argument("--mix", type=float, default=DEFAULTS.mix)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="the head's learning rate")
    parser.add_argument(
        "--ema", type=float, default=DEFAULTS.ema, help="decay of the head's weight average"
    )
    parser.add_argument(
        "--query-expansion",
        type=int,
        default=DEFAULTS.query_expansion,
        help="nearest archive items each query is averaged with before ranking (0 = off); "
        "every method and baseline retrieves so",
    )
    parser.add_argument(
        "--baseline-epochs",
        type=int,
        default=30,
        help="epochs of class-label AL and of the fully supervised bound",
    )
    parser.add_argument("--pair-budget", type=int, default=DEFAULTS.pair_budget)
    parser.add_argument(
        "--baseline-pair-budget",
        type=int,
        default=4096,
        help="pairs a round of the fully supervised and small CNN bounds",
    )
    parser.add_argument("--train-mode", default="head")
    parser.add_argument("--transitivity", default=DEFAULTS.transitivity)
    parser.add_argument(
        "--initial-design", default=DEFAULTS.initial_design, help="clusters or random (round 0)"
    )
    parser.add_argument("--repair", default=DEFAULTS.repair, help="none, cut, split or confirm")
    parser.add_argument("--trim-loss", type=float, default=DEFAULTS.trim_loss)
    parser.add_argument("--cnn-rounds", type=int, default=20, help="rounds of the small CNN")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--validation", action="store_true", help="archive only (see above)")
    parser.add_argument("--archive-subset", type=int, default=None)
    parser.add_argument("--variant", action="append", default=None, help='e.g. "mix=0.5"')
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore finished cells")
    parser.add_argument("--report", action="store_true", help="only print and plot")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    name = args.name or Path(args.data).name
    pool, pool_dir = open_pool(args.data, name)
    labels = pool.single_labels()
    archive, query = stratified_split(labels, query_fraction=0.2, seed=args.split_seed)
    split: tuple[np.ndarray, np.ndarray] | None = (archive, query)
    mode = "query"
    if args.validation:
        full = pool
        pool, pool_dir = archive_pool(full, archive, args.archive_subset, name, args.split_seed)
        split, mode = None, "validation"
        # The queries are not in the validation pool at all.
        assert not set(pool.sources) & {full.sources[i] for i in query}
    stem = f"annotation_{name}" + ("_validation" if args.validation else "")
    path = RESULTS / f"{stem}.json"
    data: dict[str, Any] = {"runs": {}}
    if path.exists() and not args.fresh:
        data = json.loads(path.read_text())
    base = cell_settings(args, {})
    data.update(
        {
            "data": args.data,
            "name": name,
            "mode": mode,
            "patches": len(pool),
            "split": "engine's own split of the archive-only pool, seeded by the session seed"
            if args.validation
            else f"stratified_split 80/20 seed {args.split_seed}, the same for every run",
            "settings": base,
        }
    )
    if args.report:
        report(data, path)
        _write(path, data)
        return

    features = baselines.SharedFeatures(pool, RESULTS / "tmp" / f"features_{pool_dir.name}")
    variants = [parse_variant(v) for v in (args.variant or [""])]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS) - set(BASELINES))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join([*METHODS, *BASELINES])}")
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for variant in variants:
            variant_settings = cell_settings(args, variant)
            label = variant_label(variant)
            for method in methods:
                if method == CNN and (variant or args.validation):
                    continue  # the CNN bound does not depend on the settings varied here
                settings = noise_settings(method, variant_settings, args)
                settings = baseline_settings(method, settings, variant, args)
                key = f"{label}|{method}|{seed}"
                done = data["runs"].get(key)
                cnn_rounds = args.cnn_rounds if method == CNN else None
                if (
                    done is not None
                    and same_settings(method, done["settings"], settings)
                    and done.get("cnn_rounds") == cnn_rounds
                ):
                    continue
                t = time.perf_counter()
                result = run_cell(method, seed, settings, pool, pool_dir, split, features, args)
                seconds = round(time.perf_counter() - t, 1)
                data["runs"][key] = {
                    "variant": label,
                    "method": method,
                    "seed": seed,
                    "settings": settings,
                    "cnn_rounds": cnn_rounds,
                    "seconds": seconds,
                    "result": result,
                }
                _write(path, data)
                if isinstance(result, list):
                    shown = " ".join(f"{r['map@20']:.3f}" for r in result)
                    train = max(float(r.get("seconds_train", 0.0)) for r in result)
                    extra = f", longest training {train:.1f} s" if train else ""
                else:
                    shown, extra = f"{result['map@20']:.3f}", ""
                print(
                    f"[{label}] {method} seed {seed}: mAP@20 {shown}  ({seconds:.0f} s{extra})",
                    flush=True,
                )
    data["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    report(data, path)
    _write(path, data)
    print(f"wrote {path} and the plot(s)")


if __name__ == "__main__":
    main()
