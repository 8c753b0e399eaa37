"""Verification (1:1) and identification (1:N) metrics on similarity scores: higher means more alike.

Every threshold rule here accepts a pair when `score > threshold`, so thresholds and accuracies agree
across k-fold accuracy, TAR@FAR and the reported best threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

DEFAULT_FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _check_pairs(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, issame = np.asarray(scores, dtype=np.float64), np.asarray(issame)
    if scores.ndim != 1 or scores.shape != issame.shape:
        raise ValueError(f"scores {scores.shape} and issame {issame.shape} must be 1-D of equal length")
    if issame.dtype != bool:
        raise ValueError(f"issame must be boolean, got {issame.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    if issame.all() or not issame.any():
        raise ValueError("need both genuine (issame) and impostor pairs")
    return scores, issame


def _accuracy_per_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of every distinct decision: accept-all, a cut between each pair of unique scores, reject-all.

    Cumulative counts over the sorted unique scores make this O(n log n) with no loop over thresholds.
    """
    unique, inverse = np.unique(scores, return_inverse=True)
    negatives_at = np.bincount(inverse, weights=~issame, minlength=len(unique))
    positives_at = np.bincount(inverse, weights=issame, minlength=len(unique))
    # Threshold j rejects the j lowest unique scores: TN = impostors among them, TP = genuines above.
    rejected_negatives = np.concatenate([[0.0], np.cumsum(negatives_at)])
    accepted_positives = issame.sum() - np.concatenate([[0.0], np.cumsum(positives_at)])
    accuracy = (rejected_negatives + accepted_positives) / len(scores)
    cuts = unique[:-1] + np.diff(unique) / 2
    cuts = np.where(cuts < unique[1:], cuts, unique[:-1])  # two scores 1 ulp apart: the midpoint rounds onto one
    thresholds = np.concatenate([[np.nextafter(unique[0], -np.inf)], cuts, [unique[-1]]])
    return thresholds, accuracy


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """The threshold maximising accuracy (the lowest one on a tie) and that accuracy."""
    scores, issame = _check_pairs(scores, issame)
    thresholds, accuracy = _accuracy_per_threshold(scores, issame)
    best = int(np.argmax(accuracy))
    return float(thresholds[best]), float(accuracy[best])


def check_folds(issame: np.ndarray, folds: np.ndarray) -> None:
    """Refuse a fold split that k-fold accuracy cannot score, before anything is embedded or trained.

    Each fold's threshold is fitted on the other folds, so those must hold both genuine and impostor pairs.
    """
    issame, folds = np.asarray(issame, dtype=bool), np.asarray(folds)
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds, got {len(fold_ids)}")
    for fold in fold_ids:
        rest = issame[folds != fold]
        if rest.all() or not rest.any():
            only = "genuine" if rest.all() else "impostor"
            raise ValueError(f"the folds other than fold {fold} hold only {only} pairs: no threshold can be fitted")


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray) -> tuple[float, float, np.ndarray]:
    """LFW protocol: each fold is scored with the threshold fitted on all other folds.

    Returns the mean and (population) std of the per-fold accuracies and the per-fold thresholds.
    """
    scores, issame = _check_pairs(scores, issame)
    folds = np.asarray(folds)
    if folds.shape != scores.shape:
        raise ValueError(f"folds {folds.shape} must match scores {scores.shape}")
    check_folds(issame, folds)
    fold_ids = np.unique(folds)
    accuracies, thresholds = np.empty(len(fold_ids)), np.empty(len(fold_ids))
    for i, fold in enumerate(fold_ids):
        held_out = folds == fold
        thresholds[i], _ = best_threshold(scores[~held_out], issame[~held_out])
        accuracies[i] = np.mean((scores[held_out] > thresholds[i]) == issame[held_out])
    return float(accuracies.mean()), float(accuracies.std()), thresholds


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float] = DEFAULT_FARS) -> dict[float, float]:
    """True-accept rate at the lowest threshold that lets at most `far` of the impostors through.

    FARs below 1/num_impostors cannot be measured and are left out. Tied impostor scores are all
    accepted or all rejected together, so a tie can make the realised FAR lower than asked, never higher.
    """
    scores, issame = _check_pairs(scores, issame)
    impostors = np.sort(scores[~issame])[::-1]
    genuine = scores[issame]
    result: dict[float, float] = {}
    for far in fars:
        if not 0.0 < far <= 1.0:
            raise ValueError(f"FAR must be in (0, 1], got {far}")
        allowed = int(np.floor(far * len(impostors) + 1e-9))
        if allowed < 1:
            continue
        # Accepting exactly the impostors above the (allowed+1)-th highest keeps at most `allowed`.
        threshold = impostors[allowed] if allowed < len(impostors) else -np.inf
        result[far] = float(np.mean(genuine > threshold))
    return result


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) with thresholds descending; point i accepts `score >= thresholds[i]`.

    Starts at (0, 0) with an infinite threshold and ends at (1, 1).
    """
    scores, issame = _check_pairs(scores, issame)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], issame[order]
    # Last index of every run of equal scores: a threshold admits a whole tie at once.
    ends = np.flatnonzero(np.diff(sorted_scores, append=-np.inf))
    true_accepts = np.cumsum(sorted_same)[ends]
    false_accepts = (ends + 1) - true_accepts
    far = np.concatenate([[0.0], false_accepts / (~issame).sum()])
    tar = np.concatenate([[0.0], true_accepts / issame.sum()])
    thresholds = np.concatenate([[np.inf], sorted_scores[ends]])
    return far, tar, thresholds


def roc_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, so ties count half)."""
    far, tar, _ = roc_curve(scores, issame)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))


def eer(scores: np.ndarray, issame: np.ndarray) -> float:
    """Equal error rate: where FAR = 1 - TAR, linearly interpolated between ROC points."""
    far, tar, _ = roc_curve(scores, issame)
    gap = far - (1.0 - tar)  # rises from -1 at (0, 0) to +1 at (1, 1)
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0:
        return float(far[i])
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def gallery_probe_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One random gallery image per identity with >= 2 images; that identity's other images are probes.

    Single-image identities are dropped: with no probe they cannot be searched for.
    """
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[counts[inverse[order]] >= 2]
    if len(order) == 0:
        raise ValueError("no identity has 2 or more images: nothing to split into gallery and probes")
    order = order[np.argsort(inverse[order], kind="stable")]
    first = np.concatenate([[True], inverse[order][1:] != inverse[order][:-1]])
    return np.sort(order[first]), np.sort(order[~first])


def _normalized(feats: np.ndarray, what: str) -> np.ndarray:
    feats = np.array(feats, dtype=np.float32, order="C")
    if feats.ndim != 2:
        raise ValueError(f"{what} features must be N x D, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{what} features contain NaN or infinity")
    if not np.linalg.norm(feats, axis=1).all():
        raise ValueError(f"{what} features have rows that are all zero: cosine similarity is undefined")
    faiss.normalize_L2(feats)
    return feats


def identification_rank_k(
    gallery_feats: np.ndarray,
    gallery_labels: np.ndarray,
    probe_feats: np.ndarray,
    probe_labels: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """Closed-set rank-k rate: share of probes with fewer than k other identities at least as similar as their own.

    The gallery holds one entry (image or averaged template) per identity, and every probe's identity
    is in it; similarity is cosine (inner product of L2-normalised features). A tie counts against the probe,
    as tied scores do in verification: a collapsed model that scores every entry alike finds no one.
    """
    gallery, probes = _normalized(gallery_feats, "gallery"), _normalized(probe_feats, "probe")
    gallery_labels, probe_labels = np.asarray(gallery_labels), np.asarray(probe_labels)
    if gallery.shape[1] != probes.shape[1]:
        raise ValueError(f"gallery dim {gallery.shape[1]} != probe dim {probes.shape[1]}")
    if len(gallery_labels) != len(gallery) or len(probe_labels) != len(probes):
        raise ValueError("one label per gallery and per probe feature row is required")
    if len(np.unique(gallery_labels)) != len(gallery_labels):
        raise ValueError("gallery labels must be unique: average each identity's features into one template")
    if not np.isin(probe_labels, gallery_labels).all():
        raise ValueError("every probe identity must be in the gallery (closed-set identification)")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {ks}")
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    depth = min(max(ks), len(gallery))
    scores, nearest = index.search(probes, depth)
    own = gallery_labels[nearest] == probe_labels[:, None]
    found = own.any(axis=1)
    own_score = np.where(found, scores[np.arange(len(probes)), own.argmax(axis=1)], np.inf)
    rivals = ((scores >= own_score[:, None]) & ~own).sum(axis=1)  # not found: all `depth` outrank it
    rivals[~found] = depth
    # Ties may run past the searched depth when its last score equals the probe's own: count those exactly.
    for i in np.flatnonzero(found & (scores[:, -1] >= own_score) & (depth < len(gallery))):
        similarity = gallery @ probes[i]
        rivals[i] = int((similarity >= similarity[gallery_labels == probe_labels[i]][0]).sum()) - 1
    return {k: float((rivals < k).mean()) for k in ks}
