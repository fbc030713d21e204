"""The IVF k-NN graph of wide embeddings is searched on their leading principal components:
distances within the kept components survive the projection, narrow embeddings are left
as they are, and the graph still finds the neighbours in the full embedding."""

from __future__ import annotations

import numpy as np

from anneal_geo.pairs import candidates
from anneal_geo.pairs.candidates import IVF_MAX_DIM, knn_candidates, principal_projection


def low_rank(n: int, dim: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T  # (rank, dim), orthonormal
    return (rng.standard_normal((n, rank)) @ basis + 0.3).astype(np.float32)


def test_projection_keeps_distances_of_data_in_fewer_dimensions() -> None:
    emb = low_rank(3000, 300, 12)
    out = principal_projection(emb, 16)
    assert out.shape == (3000, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    pairs = np.random.default_rng(1).integers(0, 3000, (500, 2))
    full = np.linalg.norm(emb[pairs[:, 0]] - emb[pairs[:, 1]], axis=1)
    kept = np.linalg.norm(out[pairs[:, 0]] - out[pairs[:, 1]], axis=1)
    np.testing.assert_allclose(kept, full, rtol=1e-3, atol=1e-4)
    # Fewer components than the data's rank lose distance: the projection does reduce.
    four = principal_projection(emb, 4)
    shrunk = np.linalg.norm(four[pairs[:, 0]] - four[pairs[:, 1]], axis=1)
    assert shrunk.mean() < 0.9 * full.mean()
    narrow = emb[:, :IVF_MAX_DIM].copy()
    assert principal_projection(narrow, IVF_MAX_DIM) is narrow


def test_wide_embeddings_graph_finds_the_full_neighbours() -> None:
    rng = np.random.default_rng(2)
    n, dim = 30_000, 300
    centres = rng.standard_normal((60, dim)).astype(np.float32)
    emb = centres[rng.integers(0, 60, n)] + 0.15 * low_rank(n, dim, 20, seed=3)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    stats: dict = {}
    pairs = knn_candidates(emb, ids, 5, 0.0, None, 0, method="ivf", stats=stats)
    assert stats["knn_method"] == "ivf" and stats["knn_dim"] == IVF_MAX_DIM
    # Recall of each sampled patch's exact 5 nearest in the full embedding.
    import faiss

    sample = np.sort(rng.choice(n, 200, replace=False))
    _, nearest = faiss.knn(emb[sample], emb, 6)
    want = []
    for i, row in zip(sample.tolist(), nearest.tolist(), strict=True):
        want += [min(i, j) * n + max(i, j) for j in [j for j in row if j != i][:5]]
    keys = candidates.pair_keys(pairs, n)
    recall = candidates.in_sorted(np.array(want, dtype=np.int64), keys).mean()
    assert recall > 0.7, recall


def test_ivf_lists_sized_up_front_give_the_neighbours_of_lists_grown_by_faiss(
    eurosat_embeddings: np.ndarray,
) -> None:
    # _ivf_neighbours allocates each list at its final size before faiss adds the points
    # (less memory than faiss's doubling growth); the search must not see a difference.
    import faiss

    emb = np.ascontiguousarray(
        np.tile(eurosat_embeddings, (8, 1))
        + np.float32(0.01)
        * np.random.default_rng(4).standard_normal(
            (8 * len(eurosat_embeddings), eurosat_embeddings.shape[1]), dtype=np.float32
        )
    )
    # The same search with the lists grown by faiss, as before.
    cells, probe, probe_dist = candidates.ivf_cells(emb)
    quantizer = faiss.IndexFlatL2(emb.shape[1])
    quantizer.add(cells)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, emb.shape[1], cells.shape[0], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2
    )
    index.train(emb[:1])
    own_cell = np.ascontiguousarray(probe[:, 0])
    index.add_core(emb.shape[0], faiss.swig_ptr(emb), None, faiss.swig_ptr(own_cell))
    index.nprobe = probe.shape[1]
    _, want = index.search_preassigned(emb, 6, probe, probe_dist)
    got = np.empty_like(want)
    for block_rows, nbr in candidates._ivf_neighbours(emb, 5):
        got[block_rows] = nbr
    np.testing.assert_array_equal(got, want)
