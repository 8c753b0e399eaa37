"""Cluster an album's kNN graph into identities: cosine threshold + connected components, Chinese Whispers, Infomap.

Each method takes the (indices, similarities) of `knn_graph`, keeps the edges at or above a cosine threshold as an
undirected graph, and returns one int label per face, 0..C-1 in order of first appearance; a face with no edge is
a cluster of its own (no -1 "noise" label). Connected components chain: one wrong edge joins two people, so it
needs a strict threshold. Chinese Whispers (Biemann 2006, dlib's face clustering) lets each face take the label
with the largest summed similarity among its neighbours, so a stray edge is outvoted. Infomap (Rosvall & Bergstrom
2008) picks the partition that gives a random walk on the graph the shortest description (the `infomap` package,
maintained by the map-equation group).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def similarity_edges(
    indices: np.ndarray, sims: np.ndarray, threshold: float, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The undirected edges (i < j, each once) of a kNN graph with cosine >= threshold: (i, j, similarity).

    `rows` names the face of each line of `indices` when only some faces were searched (default: line i is face i).
    """
    if indices.shape != sims.shape or indices.ndim != 2:
        raise ValueError(f"indices and sims must be matching N x k arrays, got {indices.shape} and {sims.shape}")
    rows = np.repeat(np.arange(len(indices)) if rows is None else np.asarray(rows), indices.shape[1])
    cols, weights = indices.ravel(), sims.ravel()
    kept = (cols >= 0) & (weights >= threshold) & (cols != rows)
    lo, hi, weights = np.minimum(rows, cols)[kept], np.maximum(rows, cols)[kept], weights[kept]
    # An edge found from both ends appears twice; approximate search may give it two slightly different weights.
    _, first = np.unique(lo * (int(hi.max(initial=0)) + 1) + hi, return_index=True)
    return lo[first], hi[first], weights[first].astype(np.float64)


def first_seen_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..C-1 in order of first appearance, so equal partitions get equal arrays."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def threshold_components(indices: np.ndarray, sims: np.ndarray, threshold: float) -> np.ndarray:
    """Faces joined by any chain of edges with cosine >= threshold share a label."""
    i, j, _ = similarity_edges(indices, sims, threshold)
    n = len(indices)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))  # explicit zeros would not count as edges
    _, labels = connected_components(graph, directed=False)
    return first_seen_labels(labels)


def chinese_whispers(
    indices: np.ndarray, sims: np.ndarray, threshold: float, iterations: int = 20, seed: int = 0
) -> np.ndarray:
    """Label propagation weighted by cosine: every face starts alone, then, in a random order each pass, takes the
    label with the largest summed similarity among its neighbours; stops early when a pass changes nothing.

    Plain Python over adjacency lists, O(iterations x edges): right for an album (up to ~1e5 faces)."""
    i, j, weights = similarity_edges(indices, sims, threshold)
    n = len(indices)
    neighbours: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for a, b, w in zip(i.tolist(), j.tolist(), weights.tolist(), strict=True):
        neighbours[a].append((b, w))
        neighbours[b].append((a, w))
    labels = list(range(n))
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        changed = 0
        for node in rng.permutation(n).tolist():
            if not neighbours[node]:
                continue
            votes: defaultdict[int, float] = defaultdict(float)
            for other, w in neighbours[node]:
                votes[labels[other]] += w
            best = max(votes, key=votes.__getitem__)
            if best != labels[node]:
                labels[node] = best
                changed += 1
        if not changed:
            break
    return first_seen_labels(np.array(labels))


def infomap_clusters(
    indices: np.ndarray, sims: np.ndarray, threshold: float, trials: int = 3, seed: int = 0
) -> np.ndarray:
    """Two-level Infomap modules of the cosine-weighted graph, best of `trials` runs."""
    import infomap

    i, j, weights = similarity_edges(indices, sims, threshold)
    n = len(indices)
    graph = coo_matrix((weights, (i, j)), shape=(n, n)).tocsr()
    modules = infomap.run(graph, seed=seed + 1, num_trials=trials, two_level=True).modules()  # seed 0 is invalid
    return first_seen_labels(np.array([modules[node] for node in range(n)]))


CLUSTERERS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "components": threshold_components,
    "chinese_whispers": chinese_whispers,
    "infomap": infomap_clusters,
}
