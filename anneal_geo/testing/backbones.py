"""The backbone contract's checks (they import torch when they run)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from anneal_geo.errors import AnnealError, PluginError
from anneal_geo.testing.core import _check, global_seeds, global_state
from anneal_geo.testing.report import ConformanceReport, _Checks, _expect, _same
from anneal_geo.testing.sample import _PER_CLASS, Sample

if TYPE_CHECKING:
    import torch

__all__ = ["check_backbone"]

#: The backbone checks, in the order they run.
_CHECKS = (
    "build",
    "forward",
    "band subsets",
    "batch of one",
    "batch independence",
    "input unchanged",
    "deterministic",
    "only its own seed",
    "trainable",
)


def check_backbone(
    backbone: Any, *, options: dict[str, Any] | None = None, sample: Sample | None = None
) -> ConformanceReport:
    """Check a backbone class (or instance) against the backbone contract (imports torch).

    Checks, on real 13-band EuroSAT-MS patches in native units: the contract checks;
    ``checked_build`` for all 13 bands and for band subsets (RGB ``B04,B03,B02``, the bands
    reordered, the single band ``B08``): each either builds or is refused with an anneal-geo
    error naming the problem (noted in the report), at least one builds, and any other
    exception fails; every built module maps a batch to finite float32 (B, out_dim)
    features in eval mode; a batch of one; a patch's features do not depend on the rest of
    its batch; the input tensor is left unchanged; two builds with the same seed give the
    same features whatever torch's global seed, and whatever numpy's and Python's; a
    ``trainable`` backbone has parameters that receive finite gradients. A failure names the
    band set it happened on; the report notes how long a forward pass took.

    Args and raises: as :func:`check_estimator`.
    """
    return _check("backbones", backbone, _backbone_checks, options, sample, _CHECKS)


def _band_sets(bands: Sequence[str]) -> list[tuple[str, list[str]]]:
    sets = [("all bands", list(bands))]
    if {"B04", "B03", "B02"} <= set(bands):
        sets.append(("RGB B04,B03,B02", ["B04", "B03", "B02"]))
    if len(bands) > 1:
        sets.append(("bands reordered", list(bands)[::-1]))
    if "B08" in bands:
        sets.append(("one band B08", ["B08"]))
    return sets


def _backbone_checks(c: _Checks, make: Callable[[], Any], cls: type, sample: Sample) -> None:
    import torch

    pool = sample.pool
    position = {b: i for i, b in enumerate(pool.bands)}
    patches = torch.from_numpy(pool.float_patches())
    # Four patches of four classes (the pool holds its crops class by class).
    rows = [r for r in (0, _PER_CLASS, 2 * _PER_CLASS, 3 * _PER_CLASS) if r < len(pool)]

    def inputs(bands: Sequence[str]) -> tuple[list[float], list[float], torch.Tensor]:
        idx = [position[b] for b in bands]
        mean = [float(pool.band_mean[i]) for i in idx]
        std = [float(pool.band_std[i]) for i in idx]
        return mean, std, patches[rows][:, idx].contiguous()

    def features(bb: Any, module: Any, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = module(x.clone())
        out = bb.check_features(out, x.shape[0], module.out_dim)
        _expect(out.dtype == torch.float32, f"forward() returned {out.dtype}, expected float32")
        return out

    built: dict[str, tuple[Any, Any, list[str]]] = {}
    with c.check("build", critical=True):
        refused: dict[str, str] = {}
        for what, bands in _band_sets(pool.bands):
            mean, std, _ = inputs(bands)
            bb = make()
            try:
                module = bb.checked_build(bands, mean, std)
            except PluginError:
                raise
            except AnnealError as exc:  # a clear refusal, e.g. weights that need other bands
                refused[what] = str(exc).splitlines()[0]
                continue
            built[what] = (bb, module.eval(), bands)
        if refused:
            c.report.notes["build"] = "; ".join(f"{k} refused: {v}" for k, v in refused.items())
        _expect(bool(built), f"every band set was refused ({c.report.notes.get('build')})")

    def on(what: str, bands: Sequence[str], run: Callable[[], torch.Tensor]) -> torch.Tensor:
        # A failure says which band set it happened on.
        try:
            return run()
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if c.label and detail.startswith(c.label + ": "):
                detail = detail[len(c.label) + 2 :]
            raise AssertionError(f"on {what} ({','.join(bands)}): {detail}") from exc

    first, (bb, module, bands) = next(iter(built.items()))
    mean, std, batch = inputs(bands)
    with c.check("forward", critical=True):
        reference = on(first, bands, lambda: features(bb, module, batch))
        with c.timed(f"forward of {batch.shape[0]} patches ({first})"):
            features(bb, module, batch)

    with c.check("band subsets"):
        for what, (other_bb, other_module, other_bands) in built.items():
            if what != first:
                x = inputs(other_bands)[2]
                on(what, other_bands, partial(features, other_bb, other_module, x))

    with c.check("batch of one"):
        single = features(bb, module, batch[:1])
    with c.check("batch independence"):
        _same(single.numpy(), reference[:1].numpy(), "a patch alone against in a batch (eval)")
    with c.check("input unchanged"):
        given = batch.clone()
        with torch.no_grad():
            module(given)
        _expect(torch.equal(given, batch), "forward() modified its input tensor")

    with c.check("deterministic"):
        outs = []
        with torch.random.fork_rng(devices=[]):
            for global_seed in (1, 2):
                torch.manual_seed(global_seed)  # must not matter: the backbone has a seed
                twin = make()
                outs.append(features(twin, twin.checked_build(bands, mean, std).eval(), batch))
        _same(outs[0].numpy(), outs[1].numpy(), "two builds with the same seed")
        _same(outs[0].numpy(), reference.numpy(), "a build against the first build")

    with c.check("only its own seed"):
        outs = []
        for global_seed in (1, 2):
            with global_seeds(global_seed):
                before = global_state()
                twin = make()
                outs.append(features(twin, twin.checked_build(bands, mean, std).eval(), batch))
                _expect(
                    global_state() == before,
                    "build() or forward() changed numpy's or Python's global random state; "
                    "draw from a generator of your own (torch's may be seeded with the seed)",
                )
        _same(
            outs[0].numpy(),
            outs[1].numpy(),
            "different global numpy/random seeds (initialise from the backbone's seed)",
        )

    if not getattr(cls, "trainable", True):
        c.skip("trainable", "the backbone declares trainable = False")
    else:
        with c.check("trainable"):
            fresh = make()
            net = fresh.checked_build(bands, mean, std).train()
            params = [p for p in net.parameters() if p.requires_grad]
            _expect(bool(params), "trainable = True but the module has no trainable parameters")
            loss = net(batch.clone()).pow(2).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            got = [g for g in grads if g is not None]
            _expect(bool(got), "no parameter receives a gradient from the features")
            _expect(all(bool(torch.isfinite(g).all()) for g in got), "non-finite gradients")
