"""Labels implied by transitivity (METHOD.md 3.7).

Similar answers join patches into components (union-find): every pair inside a component is
similar. A dissimilar answer between two components makes all their cross pairs dissimilar.
Two dissimilar answers imply nothing. A dissimilar answer *inside* a component is a
contradiction: it is kept as asked, reported, and the component then implies nothing (its
queried pairs stay), because one of the similar answers that built it must be wrong.

With ``repair="cut"`` a contradiction is instead resolved (:func:`suspect_answers`): the
similar answer whose removal separates the contradicting pair and the most other dissimilar
answers is taken for the wrong one (ties: the patches farthest apart in ``features``); where
no single one separates them, the fewest that do (a minimum cut), unless they outnumber the
dissimilar answers they separate, and then the dissimilar answer is suspected. With
``repair="split"`` a similar answer joining two groups that lie far apart as groups is
suspected too (:func:`weak_links`): the selection never asks a pair the closure labels, so a
wrong "similar" merging two groups is rarely contradicted. Suspect answers are left out of L
(neither trained on nor implying anything, not even their opposite) and never altered in the
store. Consistent answers have no contradictions, and with ``cut`` their closure is the same.

With ``repair="confirm"`` two groups are not joined on one person's word (:func:`confirm_links`):
a "similar" answer between two groups whose cross pairs would number ``CONFIRM_PAIRS`` or more
stays a plain answer, implying nothing, until a second answer across the same two groups
agrees (the engine asks such a check pair in the next round, :attr:`Closure.checks`); the
answers across two groups are a vote, the majority joining or parting them and the
outvoted ones left out as suspects. Contradictions left after that are cut as with ``cut``.
With consistent answers, ``confirm`` only delays joins until their check is answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from anneal_geo.pairs.candidates import in_sorted, triu_pairs

__all__ = [
    "CONFIRM_PAIRS",
    "DEFAULT_MAX_IMPLIED",
    "IMPLIES",
    "REPAIRS",
    "Closure",
    "closure",
    "confirm_links",
    "suspect_answers",
    "weak_links",
]

#: What :func:`closure` may imply (its ``implies`` argument, the ``transitivity`` setting).
IMPLIES: tuple[str, ...] = ("full", "similar", "none")

#: How :func:`closure` treats answers that may be wrong (its ``repair`` argument, the
#: ``repair`` setting): ``none`` drops what a contradicted component implies, ``cut`` repairs
#: contradictions, ``split`` also cuts weak links between groups, ``confirm`` joins two groups
#: only on two agreeing answers.
REPAIRS: tuple[str, ...] = ("none", "cut", "split", "confirm")

#: With ``repair="confirm"``: a "similar" answer joining two groups of sizes a and b with
#: a * b at least this many cross pairs waits for a second answer across them.
CONFIRM_PAIRS = 2

#: Most implied pairs :func:`closure` returns; beyond it a seeded random subset is kept.
DEFAULT_MAX_IMPLIED = 2_000_000


@dataclass(frozen=True, eq=False)
class Closure:
    """The labelled set L: queried answers plus the pairs they imply.

    Attributes:
        pairs: (K, 2) int64, unique, ``i < j``, sorted by (i, j).
        labels: (K,) int8, 1 similar, 0 dissimilar.
        implied: (K,) bool, True for pairs derived by transitivity (not asked).
        contradictions: queried dissimilar pairs (i, j) that lie inside a similar component
            of all the answers (before any repair).
        truncated: True when more than ``max_implied`` pairs were implied and only a seeded
            random subset of them is listed.
        suspects: answered pairs (i, j) left out of L: those ``repair`` took for wrong and
            those given as ``exclude`` (sorted).
        checks: (U, 2) int64 pairs not yet asked, ``i < j``, one per join that waits for
            confirmation (``repair="confirm"``): a patch of each of the two groups, the joins
            with the most cross pairs first; empty otherwise.
    """

    pairs: np.ndarray
    labels: np.ndarray
    implied: np.ndarray
    contradictions: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False
    suspects: list[tuple[int, int]] = field(default_factory=list)
    checks: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))

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
    repair: str = "none",
    features: FeatureRows | None = None,
    exclude: np.ndarray | None = None,
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
        repair: ``none`` (a contradicted component implies nothing), ``cut`` (the
            answers :func:`suspect_answers` names are left out, the rest is consistent) or
            ``split`` (``cut``, then the :func:`weak_links` too; needs ``features``).
        features: (n, F) patch features (frozen trunk features are best; anything whose
            ``features[ids]`` gives rows, only the answered patches' are read): distances that
            break ties of ``cut`` (None: the latest answer) and judge groups for ``split``.
        exclude: (E, 2) answered pairs to leave out as suspects besides (either order;
            pairs without an answer are ignored).

    Returns:
        The :class:`Closure`: queried pairs with their answers, plus implied pairs.

    Raises:
        ValueError: malformed input (shapes, i == j, negative ids, ids >= n, bad labels).
    """
    if isinstance(max_implied, bool) or int(max_implied) < 0:
        raise ValueError(f"max_implied = {max_implied} must be >= 0")
    if implies not in IMPLIES:
        raise ValueError(f"implies = {implies!r}; use one of {', '.join(IMPLIES)}")
    if repair not in REPAIRS:
        raise ValueError(f"repair = {repair!r}; use one of {', '.join(REPAIRS)}")
    prs, lab, n = _prepare(pairs, labels, n)
    base = np.int64(max(n, 1))
    empty_pairs = np.empty((0, 2), dtype=np.int64)
    if prs.shape[0] == 0:
        return Closure(
            _frozen(empty_pairs),
            _frozen(np.empty(0, dtype=np.int8)),
            _frozen(np.empty(0, dtype=bool)),
        )

    contradictions = _contradictions(prs, lab)
    left_out = np.zeros(lab.size, dtype=bool)
    if exclude is not None and np.size(exclude):
        ex = np.sort(np.asarray(exclude, dtype=np.int64).reshape(-1, 2), axis=1)
        left_out |= in_sorted(prs[:, 0] * base + prs[:, 1], np.sort(ex[:, 0] * base + ex[:, 1]))
    waiting = np.zeros(lab.size, dtype=bool)
    if repair == "confirm":
        outvoted, waiting = confirm_links(prs, lab, left_out)
        left_out |= outvoted
    if repair in ("cut", "split", "confirm") and contradictions:
        # A similar answer waiting for its check joins nothing, so it closes no cycle.
        left_out |= suspect_answers(prs, lab, features, left_out | (waiting & ~left_out))
    if repair == "split" and features is not None:
        left_out |= weak_links(prs, lab, features, left_out)
    suspects = [(int(a), int(b)) for a, b in prs[left_out].tolist()]
    # A suspect pair is not implied either (not even the opposite of its answer).
    answered_keys = np.sort(prs[:, 0] * base + prs[:, 1])
    to_check = prs[waiting]
    prs, lab, waiting = prs[~left_out], lab[~left_out], waiting[~left_out]
    if prs.shape[0] == 0:
        return Closure(
            _frozen(empty_pairs),
            _frozen(np.empty(0, dtype=np.int8)),
            _frozen(np.empty(0, dtype=bool)),
            contradictions=contradictions,
            suspects=suspects,
        )

    nodes, inverse = np.unique(prs, return_inverse=True)
    local = inverse.reshape(-1, 2)
    joins = (lab == 1) & ~waiting
    comp = _components(local, joins, nodes.size)
    n_comp = int(comp.max()) + 1
    ci, cj = comp[local[:, 0]], comp[local[:, 1]]

    contra = (lab == 0) & (ci == cj)
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
    n_queried_in_blocks = int(np.count_nonzero(joins & ~bad[ci]) + np.count_nonzero(cross))
    total = int(counts.sum())
    n_implied = total - n_queried_in_blocks
    truncated = n_implied > max_implied

    queried_keys = answered_keys
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
        suspects=suspects,
        checks=_frozen(_check_pairs(to_check, nodes, comp, members, answered_keys, base, seed)),
    )


def _check_pairs(
    to_check: np.ndarray,
    nodes: np.ndarray,
    comp: np.ndarray,
    members: list[np.ndarray],
    answered_keys: np.ndarray,
    base: np.int64,
    seed: int | np.random.Generator,
) -> np.ndarray:
    """One unasked pair across the two groups of each waiting join: a random patch of
    each group, other than the answered pair's own where the group has another (a
    different pair is a more independent second opinion), the joins with the most cross
    pairs first; (U, 2) int64, ``i < j``, unique."""
    if to_check.shape[0] == 0:
        return np.empty((0, 2), dtype=np.int64)
    rng = np.random.default_rng(seed)

    def group(patch: int) -> np.ndarray:
        k = int(np.searchsorted(nodes, patch))
        if k < nodes.size and nodes[k] == patch:
            return members[int(comp[k])]
        return np.array([patch], dtype=np.int64)  # every answer of it was left out

    found: dict[int, tuple[int, int, int]] = {}  # key -> (cross pairs, i, j)
    for i, j in to_check.tolist():
        full_i, full_j = group(i), group(j)
        weight = full_i.size * full_j.size
        others = (
            full_i[full_i != i] if full_i.size > 1 else full_i,
            full_j[full_j != j] if full_j.size > 1 else full_j,
        )
        # A few tries for an unasked pair (large groups have plenty), then any patches.
        for gi, gj in [others] * 8 + [(full_i, full_j)] * 8:
            u, v = int(rng.choice(gi)), int(rng.choice(gj))
            u, v = min(u, v), max(u, v)
            k = u * int(base) + v
            if u != v and k not in found and not in_sorted(np.array([k]), answered_keys)[0]:
                found[k] = (weight, u, v)
                break
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    rows = sorted(found.values(), key=lambda t: (-t[0], t[1], t[2]))
    return np.array([(u, v) for _, u, v in rows], dtype=np.int64).reshape(-1, 2)


def _contradictions(prs: np.ndarray, lab: np.ndarray) -> list[tuple[int, int]]:
    """Dissimilar answers (i, j) inside a component of the similar answers."""
    nodes, inverse = np.unique(prs, return_inverse=True)
    local = inverse.reshape(-1, 2)
    comp = _components(local, lab == 1, nodes.size)
    contra = (lab == 0) & (comp[local[:, 0]] == comp[local[:, 1]])
    return [(int(a), int(b)) for a, b in prs[contra].tolist()]


def confirm_links(
    pairs: np.ndarray,
    labels: np.ndarray,
    left_out: np.ndarray | None = None,
    min_pairs: int = CONFIRM_PAIRS,
) -> tuple[np.ndarray, np.ndarray]:
    """Join groups only on agreeing answers: which answers to suspect and which "similar"
    answers wait for a check.

    The answers are replayed in the order given (the order they were answered). Groups
    start as single patches; the answers between two groups are their votes. Two groups
    join when their similar votes outnumber the dissimilar ones and either there are two
    of them or the groups are small (fewer than ``min_pairs`` cross pairs: a patch meeting
    a patch). When groups join, the dissimilar votes between them are outvoted (suspects)
    and their votes with every other group add up. At the end, between two groups still
    apart, outvoted similar answers and tied votes are suspects; a similar answer that
    outvotes (so, alone) waits for a check: it stays an answer but joins nothing. (A lone
    "dissimilar" answer still parts its two groups: requiring two of those too left the
    trainer too few dissimilar pairs, 0.70 mAP@20 instead of 0.85 with consistent answers.)

    Args:
        pairs: (M, 2) int64 answered pairs, ``i < j``, unique, in answer order.
        labels: (M,) 1 similar, 0 dissimilar.
        left_out: (M,) bool, answers already left out (not considered).
        min_pairs: cross pairs from which a join needs two similar answers.

    Returns:
        ``(suspect, waiting)``: (M,) bool each; ``waiting`` marks the similar answers that
        join nothing until another answer across their two groups decides (a lone one,
        kept, or one tied with as many dissimilar answers, suspected with them). Dissimilar
        answers inside a group joined by similar answers (contradictions) are left to
        :func:`suspect_answers`.
    """
    prs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    lab = np.asarray(labels).reshape(-1)
    gone = np.zeros(lab.size, dtype=bool) if left_out is None else np.asarray(left_out, bool)
    suspect = np.zeros(lab.size, dtype=bool)
    waiting = np.zeros(lab.size, dtype=bool)
    if lab.size == 0:
        return suspect, waiting
    _, inverse = np.unique(prs, return_inverse=True)
    local = inverse.reshape(-1, 2).tolist()
    n_nodes = int(inverse.max()) + 1
    parent = list(range(n_nodes))
    size = [1] * n_nodes
    # votes[(x, y)] for roots x < y: ([similar rows], [dissimilar rows]) between the groups.
    votes: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    partners: dict[int, set[int]] = {}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def key(x: int, y: int) -> tuple[int, int]:
        return (x, y) if x < y else (y, x)

    def join(x: int, y: int) -> int:
        if size[x] < size[y]:
            x, y = y, x
        parent[y] = x
        size[x] += size[y]
        partners.get(x, set()).discard(y)
        for w in partners.pop(y, set()):
            partners[w].discard(y)
            if w == x:
                continue
            moved = votes.pop(key(y, w))
            kept = votes.get(key(x, w))
            if kept is None:
                votes[key(x, w)] = moved
                partners.setdefault(x, set()).add(w)
                partners[w].add(x)
            else:
                kept[0].extend(moved[0])
                kept[1].extend(moved[1])
        return x

    def settle(x: int, y: int) -> None:
        work = [(x, y)]
        while work:
            a, b = work.pop()
            a, b = find(a), find(b)
            if a == b:
                continue
            entry = votes.get(key(a, b))
            if entry is None:
                continue
            sim, dis = len(entry[0]), len(entry[1])
            if sim > dis and (sim >= 2 or size[a] * size[b] < min_pairs):
                del votes[key(a, b)]
                for r in entry[1]:
                    suspect[r] = True
                root = join(a, b)
                work.extend((root, w) for w in partners.get(root, ()))

    for r in np.flatnonzero(~gone).tolist():
        a, b = find(local[r][0]), find(local[r][1])
        if a == b:
            continue
        entry = votes.get(key(a, b))
        if entry is None:
            entry = votes[key(a, b)] = ([], [])
            partners.setdefault(a, set()).add(b)
            partners.setdefault(b, set()).add(a)
        entry[0 if lab[r] == 1 else 1].append(r)
        if lab[r] == 1 or entry[0]:
            settle(a, b)
    for sim_rows, dis_rows in votes.values():
        if not sim_rows:
            continue
        if len(sim_rows) >= len(dis_rows):
            waiting[sim_rows] = True  # alone, or tied: a check decides
        if len(sim_rows) <= len(dis_rows):
            suspect[sim_rows] = True
            if len(sim_rows) == len(dis_rows):
                suspect[dis_rows] = True
    return suspect, waiting


class FeatureRows(Protocol):
    """Patch features read by rows: an (n, F) array, or anything whose ``features[ids]``
    gives the rows ``ids`` (such as :class:`~anneal_geo.training.SharedFeatures`)."""

    def __getitem__(self, ids: Any, /) -> Any: ...


def _answered_rows(
    features: FeatureRows, prs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patches in ``prs`` (sorted ids), their float64 feature rows, and ``prs`` as
    indices into those rows: only the answered patches' rows are read, never all n."""
    ids = np.unique(prs)
    rows = np.asarray(features[ids], dtype=np.float64).reshape(len(ids), -1)
    return ids, rows, np.searchsorted(ids, prs)


def suspect_answers(
    pairs: np.ndarray,
    labels: np.ndarray,
    features: FeatureRows | None = None,
    left_out: np.ndarray | None = None,
) -> np.ndarray:
    """The answers to suspect so that the rest has no contradiction.

    Greedy, one contradiction at a time: for a dissimilar answer (a, b) inside a component,
    every similar answer on a chain of similar answers from a to b is a candidate. Among
    those whose removal alone separates a from b, the one that separates the most
    dissimilar answers of the component is suspected (a wrong "similar" merging two groups
    is contradicted by every dissimilar answer across it); ties go to the pair farthest
    apart in ``features``, then to the latest answer. When no single similar answer
    separates a from b (two independent chains say "similar"), the dissimilar answer is
    suspected instead. Repeats until no contradiction is left.

    Args:
        pairs: (M, 2) int64 answered pairs, ``i < j``, unique (as :func:`closure` has them).
        labels: (M,) 1 similar, 0 dissimilar.
        features: (n, F) features of the patches (None: no distance tie-break).
        left_out: (M,) bool, answers already left out (not considered).

    Returns:
        (M,) bool, True for the suspected answers (not including ``left_out``).
    """
    prs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    lab = np.asarray(labels).reshape(-1)
    gone = np.zeros(lab.size, dtype=bool) if left_out is None else np.array(left_out, bool)
    suspect = np.zeros(lab.size, dtype=bool)
    if features is not None:
        _, f, local = _answered_rows(features, prs)
        dist = np.linalg.norm(f[local[:, 0]] - f[local[:, 1]], axis=1)
    else:
        dist = np.zeros(lab.size)
    while True:
        live = np.flatnonzero(~gone & ~suspect)
        p, y = prs[live], lab[live]
        nodes, inverse = np.unique(p, return_inverse=True)
        local = inverse.reshape(-1, 2)
        comp = _components(local, y == 1, nodes.size)
        ci = comp[local[:, 0]]
        contra = np.flatnonzero((y == 0) & (ci == comp[local[:, 1]]))
        if contra.size == 0:
            return suspect
        # The component of the first contradiction: its similar edges and dissimilar answers.
        c = ci[contra[0]]
        inside = ci == c
        sim_rows = np.flatnonzero(inside & (y == 1))
        dis_rows = np.flatnonzero(inside & (y == 0))
        a, b = local[contra[0]].tolist()
        bridge = _bridge_to_cut(local, sim_rows, dis_rows, a, b, dist[live])
        rows = (
            [bridge]
            if bridge is not None
            else _min_cut(local, sim_rows, dis_rows, a, b, dist[live])
        )
        suspect[live[contra[0]] if rows is None else live[rows]] = True


def _bridge_to_cut(
    local: np.ndarray,
    sim_rows: np.ndarray,
    dis_rows: np.ndarray,
    a: int,
    b: int,
    dist: np.ndarray,
) -> int | None:
    """The single similar row (of ``sim_rows``) whose removal separates a from b and the
    most dissimilar answers of the component (ties: the farthest patches, then the latest
    answer), or None when no single similar answer separates a from b."""
    adjacency: dict[int, list[tuple[int, int]]] = {}
    for r in sim_rows.tolist():
        u, v = local[r].tolist()
        adjacency.setdefault(u, []).append((v, r))
        adjacency.setdefault(v, []).append((u, r))

    def reach(start: int, without: int) -> set[int]:
        seen, stack = {start}, [start]
        while stack:
            x = stack.pop()
            for y, r in adjacency.get(x, ()):
                if r != without and y not in seen:
                    seen.add(y)
                    stack.append(y)
        return seen

    # One chain from a to b (breadth first); only its links can separate them.
    back: dict[int, tuple[int, int]] = {a: (a, -1)}
    frontier = [a]
    while frontier and b not in back:
        nxt = []
        for x in frontier:
            for y, r in adjacency.get(x, ()):
                if y not in back:
                    back[y] = (x, r)
                    nxt.append(y)
        frontier = nxt
    chain = []
    x = b
    while x != a:
        x, r = back[x]
        chain.append(r)
    best: tuple[int, float, int] | None = None
    best_row: int | None = None
    dis = local[dis_rows]
    for r in chain:
        side = reach(a, r)
        if b in side:
            continue  # another chain still joins a and b
        separated = sum((u in side) != (v in side) for u, v in dis.tolist())
        key = (separated, float(dist[r]), r)
        if best is None or key > best:
            best, best_row = key, r
    return best_row


def _min_cut(
    local: np.ndarray,
    sim_rows: np.ndarray,
    dis_rows: np.ndarray,
    a: int,
    b: int,
    dist: np.ndarray,
) -> list[int] | None:
    """The similar rows (of ``sim_rows``) to suspect for the contradiction (a, b): the
    fewest similar answers whose removal separates a from b (ties: the links of the
    farthest patches), when they are no more than the dissimilar answers they separate;
    None (suspect the dissimilar answer) otherwise (see :func:`suspect_answers`)."""
    from collections import deque

    # Capacities: every link costs ``big``, plus up to ``big / (E + 1)`` for the nearer
    # patches, so a cut of fewer links always costs less and ties cut the farthest links.
    n_edges = len(sim_rows)
    step = 1000
    big = (n_edges + 1) * step
    rank = np.argsort(np.argsort(-dist[sim_rows], kind="stable"), kind="stable")
    residual: dict[int, dict[int, int]] = {}
    for r, k in zip(sim_rows.tolist(), rank.tolist(), strict=True):
        u, v = local[r].tolist()
        cap = big + (k * (step - 1)) // max(n_edges, 1)
        residual.setdefault(u, {})[v] = residual.get(u, {}).get(v, 0) + cap
        residual.setdefault(v, {})[u] = residual.get(v, {}).get(u, 0) + cap

    def reach() -> dict[int, int]:
        parent = {a: a}
        queue = deque([a])
        while queue and b not in parent:
            x = queue.popleft()
            for y, c in residual[x].items():
                if c > 0 and y not in parent:
                    parent[y] = x
                    queue.append(y)
        return parent

    while True:
        parent = reach()
        if b not in parent:
            break
        path, x = [], b
        while x != a:
            path.append((parent[x], x))
            x = parent[x]
        push = min(residual[u][v] for u, v in path)
        for u, v in path:
            residual[u][v] -= push
            residual[v][u] += push
    side = set(parent)
    cut = [r for r in sim_rows.tolist() if (local[r, 0] in side) != (local[r, 1] in side)]
    dis = local[dis_rows]
    separated = sum((u in side) != (v in side) for u, v in dis.tolist())
    return cut if len(cut) <= separated else None


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


def weak_links(
    pairs: np.ndarray,
    labels: np.ndarray,
    features: FeatureRows,
    left_out: np.ndarray | None = None,
) -> np.ndarray:
    """Similar answers that join two groups which, as groups, look dissimilar.

    In each component of the similar answers, a similar answer whose removal splits the
    component into two parts of at least two patches each is suspected when the mean
    distance between the parts (in the L2-normalised ``features``) lies beyond tau, the cut
    that best separates the similar from the dissimilar answers' own distances (balanced
    accuracy). Greedy, the farthest first, until no such answer is left. One wrong
    "similar" merging two classes' groups implies |A| x |B| wrong pairs; a group mean is a
    far steadier witness than one pair's distance.

    Returns:
        (M,) bool, True for the suspected answers (not including ``left_out``).
    """
    from anneal_geo.estimators.mgue import balanced_threshold

    prs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    lab = np.asarray(labels).reshape(-1)
    gone = np.zeros(lab.size, dtype=bool) if left_out is None else np.array(left_out, bool)
    suspect = np.zeros(lab.size, dtype=bool)
    answered, f, at = _answered_rows(features, prs)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    dist = np.linalg.norm(f[at[:, 0]] - f[at[:, 1]], axis=1)
    live = ~gone
    if not ((lab[live] == 1).any() and (lab[live] == 0).any()):
        return suspect
    tau, _ = balanced_threshold(dist[live], lab[live] == 1)
    sim_rows = np.flatnonzero(live & (lab == 1))
    # Work component by component; a cut only ever splits a component further.
    nodes, inverse = np.unique(prs[sim_rows], return_inverse=True)
    local = inverse.reshape(-1, 2)
    comp = _components(local, np.ones(len(sim_rows), bool), nodes.size)
    todo = [
        np.flatnonzero(comp[local[:, 0]] == c)
        for c in range(int(comp.max()) + 1 if comp.size else 0)
    ]
    while todo:
        edges = todo.pop()
        if edges.size < 3:  # both parts need 2 patches: at least 3 links
            continue
        members = np.unique(local[edges])
        index = {int(v): k for k, v in enumerate(members.tolist())}
        ends = np.array([[index[int(u)], index[int(v)]] for u, v in local[edges].tolist()])
        fm = f[np.searchsorted(answered, nodes[members])]
        within = np.linalg.norm(fm[:, None, :] - fm[None, :, :], axis=2)
        best, best_k, best_side = tau, -1, np.empty(0, bool)
        for k in range(edges.size):
            side = _side(ends, k, members.size)
            if side is None:
                continue
            na = int(side.sum())
            if na < 2 or members.size - na < 2:
                continue
            cross = float(within[np.ix_(side, ~side)].mean())
            if cross > best:
                best, best_k, best_side = cross, k, side
        if best_k < 0:
            continue
        suspect[sim_rows[edges[best_k]]] = True
        rest = np.delete(np.arange(edges.size), best_k)
        in_a = best_side[ends[rest, 0]]
        todo.append(edges[rest[in_a]])
        todo.append(edges[rest[~in_a]])
    return suspect


def _side(ends: np.ndarray, without: int, size: int) -> np.ndarray | None:
    """The patches still joined to ``ends[without, 0]`` without link ``without``, or None
    when its other end is among them (the link is not a bridge)."""
    adjacency: list[list[int]] = [[] for _ in range(size)]
    for k, (u, v) in enumerate(ends.tolist()):
        if k != without:
            adjacency[u].append(v)
            adjacency[v].append(u)
    start, other = (int(x) for x in ends[without])
    seen = np.zeros(size, dtype=bool)
    seen[start] = True
    stack = [start]
    while stack:
        x = stack.pop()
        for y in adjacency[x]:
            if not seen[y]:
                seen[y] = True
                stack.append(y)
    return None if seen[other] else seen
