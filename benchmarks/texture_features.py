"""Texture features: speed and frozen-feature retrieval quality of ``texture`` against ``spectral``.

(a) Speed: patches per second of the ``spectral`` and ``texture`` trunks on the same inputs
in the same run (64 px EuroSAT-RGB patches, and 13-band EuroSAT-MS patches repeated to the
same count), ``torch.set_num_threads(--threads)``, batches of ``--batch``, the best of
``--repeat`` timed passes after a warm-up, alternating the two trunks so a busy machine
slows both alike; the load average is recorded with the figures.

(b) Quality: frozen-feature retrieval mAP@20 (``anneal_geo.retrieval.evaluate``, Euclidean
ranking). Each data set is split by class 80/20 into archive and queries with the project's
``stratified_split`` (seed 0); validation carve-outs are drawn from the archive with the
same function (80/20, seeds 100, 101, ...; ``--val-splits-rgb`` / ``--val-splits-ms`` of
them, averaged: the EuroSAT-MS archive is small). The ``texture`` statistics are fitted on
the archive's raw features (no labels); queries are embedded with them. Every variant is
scored on the validation splits only, and the variant (the backbone's defaults) is chosen
there by the one-standard-error rule: among the texture variants within one standard error
of the best mean validation mAP@20 over the two data sets, the one with the fewest
features. Only then is the chosen variant's query figure (queries against the full archive)
computed, once, next to the ``spectral`` baseline's.

Writes ``benchmarks/results/texture_features.json``.

    .venv/bin/python benchmarks/texture_features.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anneal_geo import plugins
from anneal_geo.backbones._texture_net import TextureTrunk
from anneal_geo.data.pool import PatchPool
from anneal_geo.retrieval.evaluate import evaluate
from anneal_geo.retrieval.split import stratified_split

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

#: label -> (backbone, options, unweighted): the variants scored on validation.
#: ``unweighted`` drops the family weights (plain z-scores) to show what they do.
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "spectral": ("spectral", {}, False),
    "texture": ("texture", {}, False),
    "texture lbp=false": ("texture", {"lbp": False}, False),
    "texture fft=true": ("texture", {"fft": True}, False),
    "texture scales=1": ("texture", {"scales": 1}, False),
    "texture scales=2": ("texture", {"scales": 2}, False),
    "texture scales=4": ("texture", {"scales": 4}, False),
    "texture histogram_bins=3": ("texture", {"histogram_bins": 3}, False),
    "texture histogram_bins=5": ("texture", {"histogram_bins": 5}, False),
    "texture unweighted z-scores": ("texture", {}, True),
}
MAP = "map@20"


def build(pool: PatchPool, backbone: str, options: dict[str, Any]) -> Any:
    bb = plugins.create("backbones", backbone, **options)
    return bb.checked_build(pool.bands, pool.band_mean.tolist(), pool.band_std.tolist())


def features(
    pool: PatchPool,
    variant: tuple[str, dict[str, Any], bool],
    archive: np.ndarray,
    batch: int,
    raw_cache: dict[str, np.ndarray],
) -> tuple[np.ndarray, int]:
    """(N, D) frozen features of every patch; texture statistics fitted on the archive.

    Raw features are kept in ``raw_cache`` by backbone and options, so a variant that only
    changes the weighting reuses them."""
    backbone, options, unweighted = variant
    trunk = build(pool, backbone, options)
    texture = isinstance(trunk, TextureTrunk)
    key = json.dumps([backbone, options], sort_keys=True)
    if key not in raw_cache:
        out = np.empty((len(pool), trunk.out_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(pool), batch):
                ids = np.arange(start, min(start + batch, len(pool)))
                x = torch.from_numpy(pool.float_patches(ids))
                out[ids] = (trunk.raw_features(x) if texture else trunk(x)).numpy()
        raw_cache[key] = out
    out = raw_cache[key]
    if texture:
        if unweighted:
            trunk.feature_weight.fill_(1.0)
        # What fit_texture_trunk does on a whole pool, here on the archive only.
        trunk.fit_statistics(out[archive])
        with torch.inference_mode():
            out = trunk.normalise(torch.from_numpy(out)).numpy()
    return out, int(trunk.out_dim)


def splits(
    labels: np.ndarray, n_val: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The archive/query split (seed 0) and ``n_val`` validation carve-outs of the archive."""
    archive, queries = stratified_split(labels, query_fraction=0.2, seed=0)
    val = []
    for k in range(n_val):
        a, q = stratified_split(labels[archive], query_fraction=0.2, seed=100 + k)
        val.append((archive[a], archive[q]))
    return archive, queries, val


def time_trunks(
    trunks: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    batch: int,
    repeat: int,
) -> dict[str, float]:
    """Best-of-``repeat`` patches per second of each trunk on ``x``, interleaved."""
    best = dict.fromkeys(trunks, float("inf"))
    with torch.inference_mode():
        for f in trunks.values():  # warm-up
            f(x[:batch])
        for _ in range(repeat):
            for name, f in trunks.items():
                t = time.perf_counter()
                for start in range(0, len(x), batch):
                    f(x[start : start + batch])
                best[name] = min(best[name], time.perf_counter() - t)
    return {name: len(x) / s for name, s in best.items()}


def speed(pools: dict[str, PatchPool], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pool in pools.items():
        ids = np.arange(args.speed_patches) % len(pool)
        x = torch.from_numpy(pool.float_patches(np.sort(ids)))
        trunks = {v: build(pool, v, {}) for v in ("spectral", "texture")}
        load = os.getloadavg()[0]
        rate = time_trunks(trunks, x, args.batch, args.repeat)
        out[name] = {
            "input": f"{len(x)} patches {tuple(x.shape[1:])}",
            "spectral_patches_per_s": round(rate["spectral"], 1),
            "texture_patches_per_s": round(rate["texture"], 1),
            "texture_over_spectral": round(rate["texture"] / rate["spectral"], 3),
            "load_average_1min": round(load, 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rgb", default=str(ROOT.parent / "shared" / "data" / "eurosat_rgb"))
    parser.add_argument("--ms", default=str(ROOT / "sample_tiles" / "eurosat_ms"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--speed-patches", type=int, default=1024)
    parser.add_argument("--val-splits-rgb", type=int, default=3)
    parser.add_argument("--val-splits-ms", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    pools = {"eurosat_rgb": PatchPool.load(args.rgb), "eurosat_ms": PatchPool.load(args.ms)}
    n_val = {"eurosat_rgb": args.val_splits_rgb, "eurosat_ms": args.val_splits_ms}
    for name, pool in pools.items():
        print(f"{name}: {len(pool)} patches, bands {','.join(pool.bands)}", flush=True)

    speeds = speed(pools, args)
    print(
        f"\nspeed, patches/s ({args.threads} threads, batches of {args.batch}, "
        f"best of {args.repeat})"
    )
    print(f"{'data':14s}{'input':28s}{'spectral':>10s}{'texture':>10s}{'ratio':>8s}{'load':>7s}")
    for name, s in speeds.items():
        print(
            f"{name:14s}{s['input']:28s}{s['spectral_patches_per_s']:10.0f}"
            f"{s['texture_patches_per_s']:10.0f}{s['texture_over_spectral']:8.2f}"
            f"{s['load_average_1min']:7.2f}"
        )

    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    validation: dict[str, dict[str, Any]] = {v: {} for v in variants}
    cached: dict[tuple[str, str], np.ndarray] = {}
    layout: dict[str, Any] = {}
    for name, pool in pools.items():
        labels = pool.single_labels()
        archive, queries, val = splits(labels, n_val[name])
        layout[name] = {
            "patches": len(pool),
            "archive": len(archive),
            "queries": len(queries),
            "validation": f"{len(val)} carve-outs of {len(val[0][0])} archive / "
            f"{len(val[0][1])} queries",
        }
        raw_cache: dict[str, np.ndarray] = {}
        for v, variant in variants.items():
            t = time.perf_counter()
            feats, dim = features(pool, variant, archive, args.batch, raw_cache)
            cached[(name, v)] = feats
            scores = [evaluate(feats, labels, a, q)[MAP] for a, q in val]
            validation[v][name] = {
                "dim": dim,
                "val_map@20": round(float(np.mean(scores)), 4),
                "val_std": round(float(np.std(scores)), 4),
                "seconds": round(time.perf_counter() - t, 1),
            }
            print(f"{name} {v}: val mAP@20 {np.mean(scores):.4f}", flush=True)

    # Choose on validation only, by the one-standard-error rule: among the texture variants
    # whose mean (over the data sets) is within one standard error of the best mean, the one
    # with the fewest features. The standard error is that of the best variant's mean, from
    # the spread over carve-outs (which overlap, so it is if anything too small).
    def mean_val(v: str) -> float:
        return float(np.mean([validation[v][n]["val_map@20"] for n in pools]))

    def mean_dim(v: str) -> float:
        return float(np.mean([validation[v][n]["dim"] for n in pools]))

    candidates = [v for v in variants if variants[v][0] == "texture"]
    best = max(candidates, key=mean_val)
    se = float(
        np.sqrt(sum((validation[best][n]["val_std"] ** 2) / n_val[n] for n in pools)) / len(pools)
    )
    close = [v for v in candidates if mean_val(v) >= mean_val(best) - se]
    chosen = min(close, key=lambda v: (mean_dim(v), -mean_val(v)))
    test: dict[str, dict[str, float]] = {}
    for name, pool in pools.items():
        labels = pool.single_labels()
        archive, queries, _ = splits(labels, 1)
        test[name] = {}
        for v in dict.fromkeys(("spectral", chosen)):
            if (name, v) in cached:
                result = evaluate(cached[(name, v)], labels, archive, queries)
                test[name][v] = round(result[MAP], 4)

    names = list(pools)
    width = max(len(v) for v in variants) + 2
    print("\nvalidation mAP@20 (mean ± std over carve-outs of the archive)")
    print("variant".ljust(width) + "".join(f"{n:>22s}" for n in names) + f"{'mean':>8s}")
    for v in variants:
        cells = "".join(
            f"{validation[v][n]['val_map@20']:>9.4f} ± {validation[v][n]['val_std']:.3f}"
            f" ({validation[v][n]['dim']:3d})"
            for n in names
        )
        mark = "  <- chosen" if v == chosen else ("  (best mean)" if v == best else "")
        print(v.ljust(width) + cells + f"{mean_val(v):8.4f}{mark}")
    print(
        f"chosen by the one-standard-error rule: within {se:.4f} of the best mean "
        f"({best}), the fewest features"
    )
    print("\nquery set, mAP@20 (queries against the full archive; computed once)")
    for name in names:
        print(f"{name:14s}" + "  ".join(f"{v}: {m:.4f}" for v, m in test[name].items()))

    out = {
        "settings": vars(args),
        "torch_threads": torch.get_num_threads(),
        "layout": layout,
        "speed": speeds,
        "validation": validation,
        "best_validation_mean": best,
        "selection_standard_error": round(se, 4),
        "chosen": chosen,
        "chosen_options": variants[chosen][1],
        "query_map@20": test,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "texture_features.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
