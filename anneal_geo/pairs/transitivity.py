"""Labels implied by transitivity (METHOD.md 3.7).

Similar answers join patches into components (union-find): every pair inside a component is
similar. A dissimilar answer between two components makes all their cross pairs dissimilar.
Two dissimilar answers imply nothing. A dissimilar answer *inside* a component is a
contradiction: it is kept as asked, reported, and the component then implies nothing (its
queried pairs stay), because one of the similar answers that built it must be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from anneal_geo.pairs.candidates import in_sorted, triu_pairs

__all__ = ["DEFAULT_MAX_IMPLIED", "IMPLIES", "Closure", "closure"]

#: What :func:`closure` may imply (its ``implies`` argument, the ``transitivity`` setting).
IMPLIES: tuple[str, ...] = ("full", "similar", "none")

#: Most implied pairs :func:`closure` returns; beyond it a seeded random subset is kept.
DEFAULT_MAX_IMPLIED = 2_000_000


@dataclass(frozen=True, eq=False)
class Closure:
    """The labelled set L: queried answers plus the pairs they imply.

    Attributes:
        pairs: (K, 2) int64, unique, ``i < j``, sorted by (i, j).
        labels: (K,) int8, 1 similar, 0 dissimilar.
        implied: (K,) bool, True for pairs derived by transitivity (not asked).
        contradictions: queried dissimilar pairs (i, j) that lie inside a similar component.
        truncated: True when more than ``max_implied`` pairs were implied and only a seeded
            random subset of them is listed.
    """

    pairs: np.ndarray
    labels: np.ndarray
    implied: np.ndarray
    contradictions: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False

    @property
    def n_implied(self) -> int:
        """Number of implied (not queried) pairs listed."""
        return int(self.implied.sum())

    @property
    def n_queried(self) -> int:
        """Number of queried (similar or dissimilar) pairs."""
        return int(self.implied.size - self.implied.sum())

    def __len__(self) -> int:
        return int(self.labels.size)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _prepare(
    pairs: np.ndarray, labels: np.ndarray, n: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated, normalised (i < j), deduplicated (last answer wins) answers without skips."""
    prs = np.asarray(pairs)
    if prs.size and prs.dtype.kind not in "iu":
        raise ValueError(f"pairs must hold integer patch ids, got dtype {prs.dtype}")
    prs = prs.astype(np.int64).reshape(-1, 2)
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != prs.shape[0]:
        raise ValueError(f"{prs.shape[0]} pairs but {lab.shape[0]} labels")
    if lab.size and not np.isin(lab, (-1, 0, 1)).all():
        raise ValueError("labels must be 1 (similar), 0 (dissimilar) or -1 (skipped)")
    lab = lab.astype(np.int8)
    answered = lab != -1  # a skip carries no information
    prs, lab = prs[answered], lab[answered]
    if prs.size and prs.min() < 0:
        raise ValueError("pairs contain a negative patch id")
    if np.any(prs[:, 0] == prs[:, 1]):
        raise ValueError("pairs contain a pair of a patch with itself (i == j)")
    top = int(prs.max()) + 1 if prs.size else 0
    if n is None:
        n = top
    elif top > n:
        raise ValueError(f"pairs contain patch id {top - 1}, beyond the pool size n = {n}")
    prs = np.sort(prs, axis=1)
    keys = prs[:, 0] * np.int64(max(n, 1)) + prs[:, 1]
    # Last answer wins: unique over the reversed keys finds each pair's latest row.
    _, first_rev = np.unique(keys[::-1], return_index=True)
    keep = np.sort(keys.size - 1 - first_rev)
    return prs[keep], lab[keep], n


def _components(local: np.ndarray, similar: np.ndarray, n_nodes: int) -> np.ndarray:
    """Component index (0..C-1) of each local node, from the similar answers."""
    parent = list(range(n_nodes))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    # O(answers) Python loop over the *answers*, not over pairs of patches.
    for a, b in local[similar].tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.fromiter((find(x) for x in range(n_nodes)), dtype=np.int64, count=n_nodes)
    return np.unique(roots, return_inverse=True)[1].reshape(-1)


def closure(
    pairs: np.ndarray,
    labels: np.ndarray,
    n: int | None = None,
    *,
    max_implied: int = DEFAULT_MAX_IMPLIED,
    seed: int | np.random.Generator = 0,
    implies: str = "full",
) -> Closure:
    """Expand answers by transitivity; never raises on contradictory answers.

    Args:
        pairs: (M, 2) integer patch ids of answered pairs (any row order). A pair given
            twice keeps its last answer.
        labels: (M,) 1 similar, 0 dissimilar, -1 skipped (ignored).
        n: pool size (ids must be below it); default: largest id + 1.
        max_implied: the most implied pairs to return; beyond it a random subset of that
            size is kept and ``truncated`` is set (a component of s patches alone implies
            s (s - 1) / 2 pairs).
        seed: seed or generator of that subset.
        implies: ``full`` (similar components and dissimilar cross blocks), ``similar``
            (the components' similar pairs only) or ``none`` (the answers alone).

    Returns:
        The :class:`Closure`: queried pairs with their answers, plus implied pairs.

    Raises:
        ValueError: malformed input (shapes, i == j, negative ids, ids >= n, bad labels).
    """
    if isinstance(max_implied, bool) or int(max_implied) < 0:
        raise ValueError(f"max_implied = {max_implied} must be >= 0")
    if implies not in IMPLIES:
        raise ValueError(f"implies = {implies!r}; use one of {', '.join(IMPLIES)}")
    prs, lab, n = _prepare(pairs, labels, n)
    base = np.int64(max(n, 1))
    empty_pairs = np.empty((0, 2), dtype=np.int64)
    if prs.shape[0] == 0:
        return Closure(
            _frozen(empty_pairs),
            _frozen(np.empty(0, dtype=np.int8)),
            _frozen(np.empty(0, dtype=bool)),
        )

    nodes, inverse = np.unique(prs, return_inverse=True)
    local = inverse.reshape(-1, 2)
    comp = _components(local, lab == 1, nodes.size)
    n_comp = int(comp.max()) + 1
    ci, cj = comp[local[:, 0]], comp[local[:, 1]]

    contra = (lab == 0) & (ci == cj)
    contradictions = [(int(a), int(b)) for a, b in prs[contra].tolist()]
    bad = np.zeros(n_comp, dtype=bool)
    bad[ci[contra]] = True

    # Members of each component, ascending patch ids (nodes are sorted, the sort is stable).
    sizes = np.bincount(comp, minlength=n_comp).astype(np.int64)
    members = np.split(nodes[np.argsort(comp, kind="stable")], np.cumsum(sizes)[:-1])

    # Blocks of candidate implied pairs: the triangle of each sound component of size >= 2,
    # and the cross product of each sound pair of components linked by a dissimilar answer.
    sim_blocks = np.flatnonzero((sizes >= 2) & ~bad)
    cross = (lab == 0) & (ci != cj) & ~bad[ci] & ~bad[cj]
    if implies == "none":
        sim_blocks = sim_blocks[:0]
    if implies != "full":
        cross = np.zeros_like(cross)
    cross_blocks = np.unique(np.sort(np.stack((ci[cross], cj[cross]), axis=1), axis=1), axis=0)
    counts = np.concatenate(
        (
            sizes[sim_blocks] * (sizes[sim_blocks] - 1) // 2,
            sizes[cross_blocks[:, 0]] * sizes[cross_blocks[:, 1]],
        )
    )
    # Queried pairs inside the blocks: each sound similar answer lies in its triangle, each
    # sound cross dissimilar answer in its cross block; the rest of the blocks is implied.
    n_queried_in_blocks = int(np.count_nonzero((lab == 1) & ~bad[ci]) + np.count_nonzero(cross))
    total = int(counts.sum())
    n_implied = total - n_queried_in_blocks
    truncated = n_implied > max_implied

    queried_keys = np.sort(prs[:, 0] * base + prs[:, 1])
    if not truncated:
        parts_i: list[np.ndarray] = []
        parts_j: list[np.ndarray] = []
        parts_lab: list[np.ndarray] = []
        # One loop step per component (at most one per answer); pairs are vectorised.
        for c in sim_blocks.tolist():
            m = members[c]
            r, s = np.triu_indices(m.size, 1)
            parts_i.append(m[r])
            parts_j.append(m[s])
            parts_lab.append(np.ones(r.size, dtype=np.int8))
        for a, b in cross_blocks.tolist():
            ga, gb = np.meshgrid(members[a], members[b], indexing="ij")
            parts_i.append(np.minimum(ga, gb).ravel())
            parts_j.append(np.maximum(ga, gb).ravel())
            parts_lab.append(np.zeros(ga.size, dtype=np.int8))
        imp_i = np.concatenate([np.empty(0, np.int64), *parts_i])
        imp_j = np.concatenate([np.empty(0, np.int64), *parts_j])
        imp_lab = np.concatenate([np.empty(0, np.int8), *parts_lab])
        new = ~in_sorted(imp_i * base + imp_j, queried_keys)
        imp_i, imp_j, imp_lab = imp_i[new], imp_j[new], imp_lab[new]
    else:
        imp_i, imp_j, imp_lab = _sample_blocks(
            members,
            sim_blocks,
            cross_blocks,
            counts,
            int(max_implied),
            n_queried_in_blocks,
            queried_keys,
            base,
            seed,
        )

    all_pairs = np.concatenate((prs, np.stack((imp_i, imp_j), axis=1)))
    all_labels = np.concatenate((lab, imp_lab))
    all_implied = np.concatenate((np.zeros(lab.size, bool), np.ones(imp_lab.size, bool)))
    order = np.argsort(all_pairs[:, 0] * base + all_pairs[:, 1], kind="stable")
    return Closure(
        pairs=_frozen(np.ascontiguousarray(all_pairs[order])),
        labels=_frozen(all_labels[order]),
        implied=_frozen(all_implied[order]),
        contradictions=contradictions,
        truncated=bool(truncated),
    )


def _sample_blocks(
    members: list[np.ndarray],
    sim_blocks: np.ndarray,
    cross_blocks: np.ndarray,
    counts: np.ndarray,
    max_implied: int,
    n_queried_in_blocks: int,
    queried_keys: np.ndarray,
    base: np.int64,
    seed: int | np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A uniform random subset of ``max_implied`` implied pairs, without enumerating all.

    Draws distinct linear indices over all blocks (enough to survive dropping the queried
    pairs among them), decodes each to its pair, drops queried ones, keeps the first
    ``max_implied`` in draw order.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    total = int(counts.sum())
    draw = rng.choice(total, size=min(total, max_implied + n_queried_in_blocks), replace=False)
    starts = np.concatenate(([0], np.cumsum(counts)))
    block = np.searchsorted(starts, draw, side="right") - 1
    offset = draw - starts[block]
    out_i = np.empty(draw.size, dtype=np.int64)
    out_j = np.empty(draw.size, dtype=np.int64)
    out_lab = np.empty(draw.size, dtype=np.int8)
    n_sim = sim_blocks.size
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(counts.size + 1))
    for b in np.flatnonzero(np.diff(bounds)).tolist():
        where = order[bounds[b] : bounds[b + 1]]
        if b < n_sim:
            m = members[int(sim_blocks[b])]
            r, s = triu_pairs(m.size, offset[where])
            out_i[where], out_j[where] = m[r], m[s]
            out_lab[where] = 1
        else:
            a, c = cross_blocks[b - n_sim].tolist()
            ma, mc = members[a], members[c]
            ga, gc = ma[offset[where] // mc.size], mc[offset[where] % mc.size]
            out_i[where], out_j[where] = np.minimum(ga, gc), np.maximum(ga, gc)
            out_lab[where] = 0
    new = ~in_sorted(out_i * base + out_j, queried_keys)
    out_i, out_j, out_lab = out_i[new], out_j[new], out_lab[new]
    return out_i[:max_implied], out_j[:max_implied], out_lab[:max_implied]
