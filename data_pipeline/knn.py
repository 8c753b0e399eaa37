"""k-nearest-neighbour graphs of face embeddings with faiss: exact for an album, HNSW or IVF for millions of faces.

Every method searches inner products of L2-normalised features, i.e. cosine similarity. Exact search costs
O(N² D): 20k x 512 is ~0.4 TFLOP, seconds on 2 cores, while 1M would take hours, so `auto` switches to HNSW above
`EXACT_MAX_N`. IVF (k-means cells; only the `nprobe` cells nearest a query are scanned) and HNSW (a navigable
small-world graph, M links per vector, no training) cost about the same at 100k x 512 for recall ~0.96
(bench/bench_cluster.py), but with ~4 sqrt(N) cells an IVF query scans ~sqrt(N) vectors while an HNSW query
visits ~log(N) nodes, so HNSW is the one for millions; IVF keeps no graph, so it is the smaller index. The recall
of either is measured by `knn_recall` against exact search on a sample of queries.
"""

from __future__ import annotations

import faiss
import numpy as np

METHODS = ("auto", "exact", "ivf", "hnsw")
EXACT_MAX_N = 20_000
IVF_TRAIN_PER_CELL = 64  # k-means on nlist x 64 samples: faiss warns below 39, and more only slows training
IVF_KMEANS_ITERATIONS = 10
HNSW_EF_CONSTRUCTION = 80


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as contiguous float32, the only layout faiss searches without a copy."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def ivf_cells(n: int) -> int:
    """About 4 sqrt(N) k-means cells (faiss's usual range is 4-16 sqrt(N)): 4000 at 1M faces, 1264 at 100k; never
    fewer than the 39 training points per cell faiss asks for."""
    return int(max(1, min(4 * np.sqrt(n), n // 39, 65536)))


def knn_graph(
    features: np.ndarray,
    k: int,
    method: str = "auto",
    *,
    query_rows: np.ndarray | None = None,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_search: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar other faces of each face: (indices, cosine similarities), both N x k, most similar first.

    `query_rows` limits the rows searched (all faces still indexed), e.g. to measure recall on a sample of a large
    set. k is capped at N - 1. An approximate index may find fewer than k: missing entries have index -1.
    `nprobe` (IVF) and `ef_search` (HNSW) trade time for recall; on the benchmark's clustered 512-d data at k = 30
    the defaults gave recall 0.96 at N = 100k, and HNSW 0.91 at 1M (raise ef_search there).
    """
    if method not in METHODS:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(METHODS)}")
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be an N x D array with N >= 2, got shape {features.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1)
    if np.abs(norms - 1).max() > 1e-3:
        raise ValueError("features must be L2-normalised (see l2_normalise): cosine similarity is an inner product")
    n, dim = features.shape
    k = min(k, n - 1)
    if method == "auto":
        method = "exact" if n <= EXACT_MAX_N else "hnsw"
    if method == "exact":
        index = faiss.IndexFlatIP(dim)
    elif method == "ivf":
        nlist = ivf_cells(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = IVF_KMEANS_ITERATIONS
        sample = np.random.default_rng(0).choice(n, min(n, nlist * IVF_TRAIN_PER_CELL), replace=False)
        index.train(features[np.sort(sample)])
        index.nprobe = nprobe
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(ef_search, k + 1)
    index.add(features)
    if query_rows is None:  # search the array itself: features[all rows] would be a second N x D copy
        rows, queries = np.arange(n), features
    else:
        rows = np.asarray(query_rows, dtype=np.int64)
        queries = features[rows]
    sims, indices = index.search(queries, k + 1)
    return _drop_self(indices, sims, rows)


def _drop_self(indices: np.ndarray, sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query from its own k + 1 results; where it was not found (an exact copy elsewhere outranked it,
    or an approximate miss), drop the least similar result instead."""
    is_self = indices == rows[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    k = indices.shape[1] - 1
    return indices[keep].reshape(-1, k), sims[keep].reshape(-1, k)


def knn_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact neighbours (same rows, same k) that the approximate graph also found."""
    if approx.shape != exact.shape:
        raise ValueError(f"approximate and exact neighbour arrays differ in shape: {approx.shape} vs {exact.shape}")
    # Each row lists distinct ids, so after sorting the two rows together a shared id shows as an equal neighbour.
    both = np.sort(np.concatenate([approx, exact], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
    return float(shared.sum() / max((exact >= 0).sum(), 1))
