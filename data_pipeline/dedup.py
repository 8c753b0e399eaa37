"""De-duplication of auto-labelled faces: exact copies, near copies, one person split across albums, people the
training set already has, and people of the verification sets (dropped, so the benchmarks stay clean).

Every function returns `Decision` records, one per merge or drop, with the evidence; the dataset's log and stats
(rejects by reason) are built from them. Features are face embeddings; they are L2-normalised here, so cosine
similarity is an inner product.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from faceforge.data_pipeline.cluster import first_seen_labels, similarity_edges
from faceforge.data_pipeline.knn import knn_graph, l2_normalise

ALBUM_NEIGHBOURS = 30  # centroids searched per cluster for its best match in each other album
NEAR_NEIGHBOURS = 10  # neighbours per image searched for its near copies
FINGERPRINT_SIDE = 16  # pixels a side of a crop's fingerprint


@dataclass(frozen=True)
class Decision:
    """One merge or drop. `reason` is a fixed code for counting; `detail` is the sentence for a person."""

    action: str  # "drop" or "merge"
    subject: int | str  # the image (index or path) or cluster dropped or merged
    target: int | str  # what it duplicates, is merged into or matched
    reason: str  # exact_duplicate, near_duplicate, album_merge, known_identity, evaluation_identity
    similarity: float | None  # the cosine behind it; None for a byte-for-byte match
    detail: str


@dataclass(frozen=True)
class Calibration:
    """A similarity threshold and the error rates it gives on the scores it was picked from."""

    threshold: float
    fmr: float  # impostor pairs at or above the threshold
    fnmr: float  # genuine pairs below it


def sha256_file(path: str | Path) -> str:
    with Path(path).open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def exact_duplicates(paths: Sequence[str | Path]) -> list[Decision]:
    """Files whose bytes equal an earlier file's; the first copy in `paths` is kept."""
    first_with: dict[str, str | Path] = {}
    decisions = []
    for path in paths:
        digest = sha256_file(path)
        if digest in first_with:
            original = first_with[digest]
            decisions.append(
                Decision(
                    "drop",
                    str(path),
                    str(original),
                    "exact_duplicate",
                    None,
                    f"same bytes (sha256 {digest[:16]}) as {original}",
                )
            )
        else:
            first_with[digest] = path
    return decisions


def _groups(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each label's members, in input order within a group."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return np.split(np.argsort(inverse.ravel(), kind="stable"), np.cumsum(counts)[:-1])


def crop_fingerprint(crop: np.ndarray) -> np.ndarray:
    """A 16 x 16 grey thumbnail of an aligned RGB crop, mean-removed and L2-normalised: cosine compares two crops.

    A resized or re-encoded copy of a photo aligns to nearly the same crop, and at 16 x 16 the resampling, the JPEG
    blocks and a pixel of alignment jitter vanish: copies score >= 0.93 (LFW photos shrunk to 70% and saved at JPEG
    quality 40) whatever an embedding model makes of them. Different photos score that high too (469 pairs >= 0.92
    among LFW's 6,410 crops, most of different people), so a fingerprint only counts with an embedding match.
    A flat crop gets a fixed unit vector: it matches only other flat crops.
    """
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32)
    thumbnail = cv2.resize(grey, (FINGERPRINT_SIDE, FINGERPRINT_SIDE), interpolation=cv2.INTER_AREA).ravel()
    thumbnail -= thumbnail.mean()
    norm = float(np.linalg.norm(thumbnail))
    if norm < 1e-3:
        thumbnail = np.zeros_like(thumbnail)
        thumbnail[0], norm = 1.0, 1.0
    return thumbnail / norm


@dataclass(frozen=True)
class CopyEvidence:
    """A second route to a near copy: crop fingerprints within `pixel_threshold` and embeddings at least within
    `person_threshold` (the same-person cosine), for models whose embeddings move under resizing or re-encoding."""

    fingerprints: np.ndarray
    pixel_threshold: float
    person_threshold: float


def near_duplicates(
    features: np.ndarray,
    quality: np.ndarray,
    identities: np.ndarray | None,
    threshold: float,
    neighbours: int = NEAR_NEIGHBOURS,
    copies: CopyEvidence | None = None,
) -> list[Decision]:
    """Images whose embedding is within `threshold` cosine of a better-quality kept image (or that `copies` shows to
    be one): re-encodes, resizes, burst shots. Best quality first, each image is kept unless it matches one already
    kept, so the kept set has no such pair and every drop names the better copy it duplicates. Pairs come from kNN
    graphs (`neighbours` per image, exact up to 20k images), so the cost stays near-linear; with `identities`, only
    pairs within one identity count, with None any two images (a copy put in another album is still a copy)."""
    n = len(features)
    if not n == len(quality) == (n if identities is None else len(identities)):
        sizes = f"{n}, {len(quality)}" + ("" if identities is None else f", {len(identities)}")
        raise ValueError(f"features, quality and identities differ in length: {sizes}")
    if copies is not None and len(copies.fingerprints) != n:
        raise ValueError(f"{len(copies.fingerprints)} crop fingerprints for {n} images")
    if n < 2:
        return []
    quality = np.asarray(quality, dtype=np.float64)
    features = l2_normalise(features)
    a, b, pair_sims = all_edges_above(features, threshold, neighbours)
    if copies is not None:
        pixel_a, pixel_b, _ = all_edges_above(copies.fingerprints, copies.pixel_threshold, neighbours)
        person_sims = np.einsum("nd,nd->n", features[pixel_a], features[pixel_b]).astype(np.float64)
        same_person = person_sims >= copies.person_threshold
        a, b = np.r_[a, pixel_a[same_person]], np.r_[b, pixel_b[same_person]]
        pair_sims = np.r_[pair_sims, person_sims[same_person]]
        _, first = np.unique(a * n + b, return_index=True)  # a pair found both ways counts once
        a, b, pair_sims = a[first], b[first], pair_sims[first]
    if identities is not None:
        same = np.asarray(identities)[a] == np.asarray(identities)[b]
        a, b, pair_sims = a[same], b[same], pair_sims[same]
    graph = coo_matrix((np.r_[pair_sims, pair_sims], (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr()
    kept = np.zeros(n, dtype=bool)
    decisions = []
    for image in np.argsort(-quality, kind="stable").tolist():
        row = slice(graph.indptr[image], graph.indptr[image + 1])
        others, similarities = graph.indices[row], graph.data[row]
        matches = kept[others]
        if not matches.any():
            kept[image] = True
            continue
        best = int(np.argmax(np.where(matches, similarities, -np.inf)))
        original, similarity = int(others[best]), float(similarities[best])
        evidence = f">= {threshold:.3f}" if similarity >= threshold else "(same person) and a near-identical crop"
        detail = (
            f"cosine {similarity:.3f} {evidence} to image {original}, whose quality "
            f"{quality[original]:.3f} >= {quality[image]:.3f}"
        )
        decisions.append(Decision("drop", image, original, "near_duplicate", similarity, detail))
    return decisions


def all_edges_above(
    vectors: np.ndarray, threshold: float, neighbours: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair at cosine >= threshold (exactly, up to knn_graph's exact size): a row whose `neighbours` nearest
    all pass may have more (a burst of many copies, or exact ties, which faiss breaks by index), so it is searched
    again with twice as many until its list ends below the threshold."""
    n = len(vectors)
    k = min(neighbours, n - 1)
    indices, sims = knn_graph(vectors, k)
    found = [similarity_edges(indices, sims, threshold)]
    rows = np.flatnonzero(sims[:, -1] >= threshold)
    while len(rows) and k < n - 1:
        k = min(2 * k, n - 1)
        indices, sims = knn_graph(vectors, k, query_rows=rows)
        found.append(similarity_edges(indices, sims, threshold, rows))
        rows = rows[sims[:, -1] >= threshold]
    a, b, pair_sims = (np.concatenate(parts) for parts in zip(*found, strict=True))
    _, first = np.unique(a * n + b, return_index=True)
    return a[first], b[first], pair_sims[first]


def cluster_centroids(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique labels, their L2-normalised mean embeddings)."""
    keys, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    starts = np.searchsorted(inverse.ravel()[order], np.arange(len(keys)))
    return keys, l2_normalise(np.add.reduceat(l2_normalise(features)[order], starts, axis=0))


def calibrate_threshold(genuine: np.ndarray, impostor: np.ndarray, fmr: float) -> Calibration:
    """The lowest threshold at which at most a fraction `fmr` of impostor scores reach it (score >= threshold)."""
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    genuine = np.asarray(genuine, dtype=np.float64)
    if not 0 < fmr < 1:
        raise ValueError(f"fmr must be between 0 and 1, got {fmr}")
    if len(genuine) == 0 or fmr * len(impostor) < 1:
        raise ValueError(
            f"an FMR of {fmr:g} needs at least {int(np.ceil(1 / fmr))} impostor scores and some genuine ones; "
            f"got {len(impostor)} impostor, {len(genuine)} genuine"
        )
    threshold = _threshold_at_rate(impostor, fmr)
    return Calibration(threshold, float((impostor >= threshold).mean()), float((genuine < threshold).mean()))


def _threshold_at_rate(descending: np.ndarray, rate: float) -> float:
    """The lowest threshold that at most a share `rate` of these scores (sorted high to low) reach."""
    allowed = int(np.floor(rate * len(descending)))
    return float(np.nextafter(descending[allowed], np.inf))


def open_set_threshold(outsiders: np.ndarray, centres: np.ndarray, fpir: float) -> float:
    """The lowest threshold at which at most a share `fpir` of outsiders (centroids of people not among `centres`)
    find any centre at or above it: the false positive identification rate of a 1:N search.

    A pair threshold at FMR f lets a new person match one of N people about N·f times as often, so matching new
    clusters against a training or evaluation set of N people needs a threshold chosen against all N at once.
    """
    if not 0 < fpir < 1 or fpir * len(outsiders) < 1:
        raise ValueError(f"an FPIR of {fpir:g} needs at least {int(np.ceil(1 / fpir))} outsiders, got {len(outsiders)}")
    best = (l2_normalise(outsiders) @ l2_normalise(centres).T).max(axis=1)
    return _threshold_at_rate(np.sort(best)[::-1], fpir)


def pair_scores(
    features: np.ndarray, identities: np.ndarray, max_impostors: int = 1_000_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of every same-identity pair (genuine) and of every different-identity pair (impostor), or of about
    `max_impostors` random pairs when there are more: the scores `calibrate_threshold` picks a threshold from."""
    features, identities = l2_normalise(features), np.unique(identities, return_inverse=True)[1].ravel()
    n = len(features)
    genuine = [(features[m] @ features[m].T)[np.triu_indices(len(m), 1)] for m in _groups(identities) if len(m) > 1]
    if n * (n - 1) // 2 <= max_impostors:
        a, b = np.triu_indices(n, 1)
    else:
        a, b = np.random.default_rng(seed).integers(n, size=(2, max_impostors))
    different = identities[a] != identities[b]
    a, b = a[different], b[different]
    chunks = range(0, len(a), 65536)  # bounded memory: 65536 pairs of rows at a time
    impostor = [np.einsum("ij,ij->i", features[a[i : i + 65536]], features[b[i : i + 65536]]) for i in chunks]
    return np.concatenate([np.zeros(0), *genuine]), np.concatenate([np.zeros(0), *impostor])


def merge_albums(
    features: np.ndarray, albums: np.ndarray, clusters: np.ndarray, threshold: float, margin: float = 0.0
) -> tuple[np.ndarray, list[Decision]]:
    """Join clusters of different albums whose centroids are mutual nearest neighbours (each is the other's most
    similar cluster in the other's album) with cosine >= threshold. Returns one global identity label per face
    (0..C-1, first seen first) and a decision per merge. A person in several albums is joined pairwise, so
    transitively, except where that would join two clusters of one album below the threshold of each other; the
    threshold (see `calibrate_threshold`) keeps distinct look-alikes apart.

    A person found in one album only has no partner, yet is compared with every cluster of the other albums, so
    a look-alike passes a pair-level threshold far more often than its FMR. `margin` > 0 also asks each match to
    lead the runner-up in its album by that much cosine (a ratio test): on LFW with dlib's embeddings, 0.01 cut
    such false merges from ~6% to <1% of merges for ~3% of the true ones (bench/bench_cluster.py)."""
    albums, clusters = np.asarray(albums), np.asarray(clusters)
    if not len(features) == len(albums) == len(clusters):
        raise ValueError(
            f"features, albums and clusters differ in length: {len(features)}, {len(albums)}, {len(clusters)}"
        )
    album_names, album_of = np.unique(albums, return_inverse=True)
    cluster_names, cluster_of = np.unique(clusters, return_inverse=True)
    codes, face_key = np.unique(album_of.ravel() * len(cluster_names) + cluster_of.ravel(), return_inverse=True)
    face_key = face_key.ravel()
    key_album, key_cluster = codes // len(cluster_names), codes % len(cluster_names)
    _, centroids = cluster_centroids(features, face_key)
    a, b, sims = _without_album_clashes(
        *_mutual_across_albums(centroids, key_album, threshold, margin), centroids, key_album, threshold
    )
    n_keys = len(codes)
    _, component = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n_keys, n_keys)), directed=False)
    name = [f"{album_names[i]}/{cluster_names[j]}" for i, j in zip(key_album, key_cluster, strict=True)]
    decisions = []
    for i, j, sim in zip(a.tolist(), b.tolist(), sims.tolist(), strict=True):
        detail = f"centroids are mutual nearest neighbours across albums, cosine {sim:.3f} >= {threshold:.3f}"
        decisions.append(Decision("merge", name[j], name[i], "album_merge", sim, detail))
    return first_seen_labels(component[face_key]), decisions


def _without_album_clashes(
    a: np.ndarray, b: np.ndarray, sims: np.ndarray, centroids: np.ndarray, album: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The merges to make, strongest first, leaving out any that would put two clusters of one album that are below
    the threshold of each other into one identity: a chain of look-alikes across albums (A/0 ~ B/0 ~ A/1) must not
    overrule what the album's own clustering kept apart. Two clusters of one album that do reach it may still join
    (one person the album's clustering split)."""
    component = list(range(len(centroids)))
    members = {key: [key] for key in component}
    kept = []
    for edge in np.argsort(-sims, kind="stable").tolist():
        left, right = component[a[edge]], component[b[edge]]
        if left != right:
            same_album = [(i, j) for i in members[left] for j in members[right] if album[i] == album[j]]
            if any(float(centroids[i] @ centroids[j]) < threshold for i, j in same_album):
                continue
            for key in members[right]:
                component[key] = left
            members[left] += members.pop(right)
        kept.append(edge)
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    return a[kept], b[kept], sims[kept]


def _mutual_across_albums(
    centroids: np.ndarray, album: np.ndarray, threshold: float, margin: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j, cosine) of clusters in different albums, each the other's best match in its album, at
    cosine >= threshold and ahead of the runner-up in that album by >= margin, both ways."""
    n = len(centroids)
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
    neighbours, sims = knn_graph(centroids, ALBUM_NEIGHBOURS)
    # A runner-up ranking below a full row of neighbours is at most as similar as that row's last one.
    unseen = np.full(n, -np.inf) if neighbours.shape[1] >= n - 1 else sims[:, -1].astype(np.float64)
    unseen[neighbours[:, -1] < 0] = -np.inf  # an approximate search that came back short: nothing was left out
    source = np.repeat(np.arange(n), neighbours.shape[1])
    other, sim = neighbours.ravel(), sims.ravel().astype(np.float64)
    across = other >= 0
    across[across] = album[source[across]] != album[other[across]]
    source, other, sim = source[across], other[across], sim[across]
    # Neighbours come most similar first, so within each (cluster, other album) group, in input order, the first
    # hit is the best match there and the second the runner-up (none: `unseen` bounds it).
    group = source * (album.max() + 1) + album[other]
    order = np.argsort(group, kind="stable")
    _, start, count = np.unique(group[order], return_index=True, return_counts=True)
    best = order[start]
    runner_up = np.where(count > 1, sim[order[np.minimum(start + 1, len(order) - 1)]], unseen[source[best]])
    source, other, sim, lead = source[best], other[best], sim[best], sim[best] - runner_up
    # Each best match's code source * n + other, sorted, so a pair's reverse direction is found by binary search.
    codes = source * n + other
    by_code = np.argsort(codes)
    reverse = by_code[np.minimum(np.searchsorted(codes[by_code], other * n + source), len(codes) - 1)]
    mutual = (codes[reverse] == other * n + source) & (source < other) & (sim >= threshold)
    mutual &= (lead >= margin) & (lead[reverse] >= margin)
    return source[mutual], other[mutual], sim[mutual]


def _match_centres(
    action: str,
    reason: str,
    cluster_ids: Sequence[int | str],
    centroids: np.ndarray,
    centres: np.ndarray,
    names: Sequence[str],
    threshold: float,
) -> list[Decision]:
    """A decision for each cluster whose best-matching centre reaches cosine >= threshold."""
    if centroids.shape[1] != centres.shape[1] or len(centres) != len(names) or len(centroids) != len(cluster_ids):
        raise ValueError(
            f"{len(centroids)} x {centroids.shape[1]} centroids for {len(cluster_ids)} clusters against "
            f"{len(centres)} x {centres.shape[1]} centres for {len(names)} names: counts and widths must agree"
        )
    index = faiss.IndexFlatIP(centres.shape[1])
    index.add(l2_normalise(centres))
    sims, rows = index.search(l2_normalise(centroids), 1)
    kind = "training" if reason == "known_identity" else "verification"
    decisions = []
    for i, (sim, row) in enumerate(zip(sims[:, 0].tolist(), rows[:, 0].tolist(), strict=True)):
        if sim >= threshold:
            detail = f"matches {kind} identity {names[row]}: cosine {sim:.3f} >= {threshold:.3f}"
            decisions.append(Decision(action, cluster_ids[i], names[row], reason, sim, detail))
    return decisions


def match_known_identities(
    cluster_ids: Sequence[int | str],
    centroids: np.ndarray,
    known_centres: np.ndarray,
    known_names: Sequence[str],
    threshold: float,
) -> list[Decision]:
    """New clusters that are people the training set already has: merge each into the identity whose centre
    (a classifier weight row, or the class centroid) it matches best at cosine >= threshold."""
    return _match_centres("merge", "known_identity", cluster_ids, centroids, known_centres, known_names, threshold)


def drop_evaluation_identities(
    cluster_ids: Sequence[int | str],
    centroids: np.ndarray,
    eval_centres: np.ndarray,
    eval_names: Sequence[str],
    threshold: float,
) -> list[Decision]:
    """New clusters that are people of a verification set: drop them, or training on them would leak the test."""
    return _match_centres("drop", "evaluation_identity", cluster_ids, centroids, eval_centres, eval_names, threshold)


def deal_into_albums(names: np.ndarray, split_from: int, seed: int = 0) -> np.ndarray:
    """The benchmark's split of identities into 3 synthetic albums: album 0-2 of each face.

    A person with >= `split_from` images has them dealt round-robin from a random album, so is split over
    all 3; anyone else sits whole in one random album, with no partner to be merged with.
    """
    rng = np.random.default_rng(seed)
    albums = np.empty(len(names), dtype=int)
    for person in np.unique(names):
        members = rng.permutation(np.flatnonzero(names == person))
        first = rng.integers(3)
        albums[members] = (np.arange(len(members)) + first) % 3 if len(members) >= split_from else first
    return albums
