"""k-nearest-neighbour graphs of face embeddings with faiss: exact for an album, IVF-PQ for millions of faces.

Every method searches inner products of L2-normalised features, i.e. cosine similarity. Exact search costs
O(N² D): 20k x 512 is ~0.4 TFLOP, seconds on 2 cores, while 1M would take hours, so `auto` switches to IVF-PQ
above `EXACT_MAX_N` (to IVF for an odd D, which 2-dimension codes cannot split). The approximate methods scan
few candidates per query:
- IVF: k-means cells, and only the `nprobe` cells nearest a query are scanned, with full float vectors;
- IVF-PQ: the same cells, but scanned as 4-bit product-quantised codes (2 dimensions per code, 16x smaller than
  the vectors) with faiss's SIMD "fast-scan"; the best `IVFPQ_REFINE` x k candidates are then re-ranked by exact
  cosine against the caller's own array, so the returned similarities are exact and no second copy is kept;
- HNSW: a navigable small-world graph, M links per vector, no training, but a slow build.
On the benchmark's clustered 512-d data at k = 30 (bench/bench_cluster.py), IVF-PQ builds and searches 1M faces in
about 7 minutes on 2 cores with recall 0.97, where HNSW took 54 minutes for 0.91. The recall of any method is
measured by `knn_recall` against exact search on a sample of queries.
"""

from __future__ import annotations

import faiss
import numpy as np

METHODS = ("auto", "exact", "ivf", "ivfpq", "hnsw")
EXACT_MAX_N = 20_000
IVF_TRAIN_PER_CELL = 64  # k-means on nlist x 64 samples: faiss warns below 39, and more only slows training
IVF_KMEANS_ITERATIONS = 10
IVF_SCAN_FRACTION = 1 / 32  # default nprobe: ~3% of the cells (125 of 4000 at 1M), never fewer than 32
IVFPQ_REFINE = 8  # PQ candidates re-ranked exactly per wanted neighbour; 16 gained 0.002 recall at 1M, 1.3x slower
SEARCH_CHUNK = 4096  # queries per search call, which bounds the candidate buffers
HNSW_EF_CONSTRUCTION = 80


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as contiguous float32, the only layout faiss searches without a copy."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def ivf_cells(n: int) -> int:
    """About 4 sqrt(N) k-means cells (faiss's usual range is 4-16 sqrt(N)): 4000 at 1M faces, 1264 at 100k; never
    fewer than the 39 training points per cell faiss asks for."""
    return int(max(1, min(4 * np.sqrt(n), n // 39, 65536)))


def default_nprobe(nlist: int) -> int:
    """Cells an IVF query scans unless told: ~3% of them, never fewer than 32."""
    return max(32, round(nlist * IVF_SCAN_FRACTION))


def knn_graph(
    features: np.ndarray,
    k: int,
    method: str = "auto",
    *,
    query_rows: np.ndarray | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar other faces of each face: (indices, cosine similarities), both N x k, most similar first.

    `query_rows` limits the rows searched (all faces still indexed), e.g. to measure recall on a sample of a large
    set. k is capped at N - 1. An approximate index may find fewer than k: missing entries have index -1.
    `nprobe` (IVF and IVF-PQ; default ~3% of the cells) and `ef_search` (HNSW) trade time for recall.
    """
    if method not in METHODS:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(METHODS)}")
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be an N x D array with N >= 2, got shape {features.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1)
    if not np.isfinite(norms).all():
        raise ValueError("features contain NaN or infinity: the embedding model has diverged or the input is corrupt")
    if not norms.all():
        raise ValueError("features have rows that are all zero: cosine similarity is undefined")
    if np.abs(norms - 1).max() > 1e-3:
        raise ValueError("features must be L2-normalised (see l2_normalise): cosine similarity is an inner product")
    n, dim = features.shape
    k = min(k, n - 1)
    if method == "auto":
        method = "exact" if n <= EXACT_MAX_N else "ivf" if dim % 2 else "ivfpq"
    if method == "ivfpq" and dim % 2:
        raise ValueError(f"ivfpq codes pairs of dimensions, so D must be even, got {dim}")
    if method == "ivfpq" and n < 16:
        raise ValueError(f"ivfpq trains 16 centroids per code, so it needs at least 16 faces, got {n}; use exact")
    if method == "exact":
        index = faiss.IndexFlatIP(dim)
    elif method in ("ivf", "ivfpq"):
        nlist = ivf_cells(n)
        codes = f"PQ{dim // 2}x4fs" if method == "ivfpq" else "Flat"
        index = faiss.index_factory(dim, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = IVF_KMEANS_ITERATIONS
        sample = np.random.default_rng(0).choice(n, min(n, nlist * IVF_TRAIN_PER_CELL), replace=False)
        index.train(features[np.sort(sample)])
        index.nprobe = nprobe or default_nprobe(nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(ef_search, k + 1)
    index.add(features)
    rows = np.arange(n) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
    indices = np.empty((len(rows), k + 1), dtype=np.int64)
    sims = np.empty((len(rows), k + 1), dtype=np.float32)
    for start in range(0, len(rows), SEARCH_CHUNK):
        chunk = slice(start, start + SEARCH_CHUNK)
        queries = features[chunk] if query_rows is None else features[rows[chunk]]  # a view when searching all
        if method == "ivfpq":
            _, candidates = index.search(queries, (k + 1) * IVFPQ_REFINE)
            sims[chunk], indices[chunk] = _rerank(features, queries, candidates, k + 1)
        else:
            sims[chunk], indices[chunk] = index.search(queries, k + 1)
    return _drop_self(indices, sims, rows)


def _rerank(features: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k candidates of each query with the highest exact cosine, most similar first (faiss reads the candidate
    rows in place, in parallel); candidates are -1-padded at the end, and so are the results."""
    sims = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    candidates = np.ascontiguousarray(candidates)
    faiss.knn_inner_products_by_idx(
        faiss.swig_ptr(np.ascontiguousarray(queries)),
        faiss.swig_ptr(features),
        faiss.swig_ptr(candidates),
        features.shape[1],
        len(queries),
        len(features),
        candidates.shape[1],
        k,
        faiss.swig_ptr(sims),
        faiss.swig_ptr(indices),
        candidates.shape[1],  # the row stride of the ids; faiss 1.15 mis-strides rows with the default -1
    )
    return sims, indices


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
