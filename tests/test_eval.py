"""Verification and identification metrics, embedding with flip TTA, reports; dlib's LFW figure as a check."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from faceforge.data import ImageDecodeError, VerificationSet, decode_image, load_pairs
from faceforge.eval import (
    best_threshold,
    check_folds,
    eer,
    embed_images,
    evaluate_model,
    evaluate_verification,
    format_metrics,
    gallery_probe_split,
    identification_rank_k,
    kfold_accuracy,
    pair_scores,
    roc_auc,
    roc_curve,
    save_roc_plot,
    tar_at_far,
)

DATA = Path("/work/shared/data")
LFW = DATA / "lfw"
DLIB_FEATURES = DATA / "lfw_dlib128_features.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def separable_scores(rng: np.random.Generator, n: int = 6000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    issame = np.arange(n) % 2 == 0
    scores = np.where(issame, rng.uniform(0.6, 1.0, n), rng.uniform(-1.0, 0.4, n))
    return scores, issame, np.repeat(np.arange(10), n // 10)


# ---------------------------------------------------------------- verification metrics


def test_separable_scores_give_perfect_metrics() -> None:
    scores, issame, folds = separable_scores(np.random.default_rng(0))
    mean, std, thresholds = kfold_accuracy(scores, issame, folds)
    assert (mean, std) == (1.0, 0.0)
    assert thresholds.shape == (10,) and ((thresholds > 0.4) & (thresholds < 0.6)).all()
    assert roc_auc(scores, issame) == 1.0
    assert eer(scores, issame) == 0.0
    # 3000 impostors: FAR 1e-4 and below cannot be measured.
    assert tar_at_far(scores, issame) == {1e-1: 1.0, 1e-2: 1.0, 1e-3: 1.0}


def test_uninformative_scores_are_at_chance() -> None:
    rng = np.random.default_rng(1)
    scores, issame = rng.normal(size=6000), rng.random(6000) < 0.5
    mean, _, _ = kfold_accuracy(scores, issame, np.repeat(np.arange(10), 600))
    assert abs(mean - 0.5) < 0.03
    assert abs(roc_auc(scores, issame) - 0.5) < 0.03
    assert abs(eer(scores, issame) - 0.5) < 0.03


def test_kfold_applies_threshold_fitted_on_the_other_folds() -> None:
    # Fold 1 alone separates perfectly at 0.5, which fold 0 scores at 3/4. Fold 0's best accuracy (3/4)
    # is reached at cuts 0.2 and 0.6; the lowest wins, and fold 1 scores 3/4 under it.
    scores = np.array([0.1, 0.3, 0.5, 0.7, 0.2, 0.4, 0.6, 0.8])
    issame = np.array([False, True, False, True, False, False, True, True])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mean, std, thresholds = kfold_accuracy(scores, issame, folds)
    np.testing.assert_allclose(thresholds, [0.5, 0.2])
    assert mean == pytest.approx(0.75) and std == pytest.approx(0.0)


def test_best_threshold_matches_exhaustive_search() -> None:
    rng = np.random.default_rng(2)
    issame = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + issame, 1)  # coarse rounding makes many ties
    candidates = np.concatenate([[-np.inf], np.unique(scores)])
    exhaustive = max(np.mean((scores >= t) == issame) for t in candidates)
    threshold, accuracy = best_threshold(scores, issame)
    assert accuracy == pytest.approx(exhaustive)
    assert np.mean((scores > threshold) == issame) == pytest.approx(accuracy)


def test_tar_at_far_handles_ties_and_unreachable_fars() -> None:
    impostors = [0.9, 0.8, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1]
    genuine = [0.95, 0.85, 0.8, 0.7, 0.6]
    scores = np.array(impostors + genuine)
    issame = np.array([False] * 10 + [True] * 5)
    # FAR 0.2 would admit two impostors, but the second and third are tied at 0.8: only 0.9 gets through.
    # FAR 0.05 is half an impostor out of ten: not measurable, so left out.
    result = tar_at_far(scores, issame, fars=(0.3, 0.2, 0.1, 0.05))
    assert result == {0.3: 1.0, 0.2: 0.4, 0.1: 0.4}
    with pytest.raises(ValueError, match="FAR must be in"):
        tar_at_far(scores, issame, fars=(0.0,))


def test_roc_curve_groups_ties_and_auc_equals_mann_whitney() -> None:
    far, tar, thresholds = roc_curve(np.array([0.5, 0.5, 0.2, 0.1]), np.array([True, False, True, False]))
    np.testing.assert_allclose(far, [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tar, [0, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.5, 0.2, 0.1])

    rng = np.random.default_rng(3)
    issame = rng.random(400) < 0.5
    scores = np.round(rng.normal(size=400) + issame, 1)
    pos, neg = scores[issame][:, None], scores[~issame][None, :]
    mann_whitney = np.mean((pos > neg) + 0.5 * (pos == neg))
    assert roc_auc(scores, issame) == pytest.approx(mann_whitney)


def test_a_roc_of_fully_tied_scores_is_drawn(tmp_path: Path) -> None:
    """A dead model scores every pair alike: its ROC is one point, drawn on a FAR axis that is not empty."""
    issame = np.arange(20) % 2 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of identical axis limits
        png = save_roc_plot(np.zeros(20), issame, tmp_path / "roc.png", "tied")
    image = cv2.imread(str(png))
    assert image is not None and image.std() > 10


def test_eer_interpolates_between_roc_points() -> None:
    # ROC (0, 2/3) -> (1/2, 2/3): FAR = 1 - TAR is crossed at FAR 1/3, between two operating points.
    scores = np.array([0.9, 0.8, 0.6, 0.3, 0.2])
    issame = np.array([True, True, False, True, False])
    assert eer(scores, issame) == pytest.approx(1 / 3)


def test_metric_input_errors() -> None:
    scores, issame = np.array([0.1, 0.9]), np.array([False, True])
    with pytest.raises(ValueError, match="equal length"):
        roc_curve(scores, issame[:1])
    with pytest.raises(ValueError, match="both genuine"):
        roc_auc(scores, np.array([True, True]))
    with pytest.raises(ValueError, match="boolean"):
        eer(scores, np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        tar_at_far(np.array([np.nan, 0.9]), issame)
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_accuracy(scores, issame, np.zeros(2))


def test_a_fold_whose_other_folds_lack_impostors_is_refused_up_front() -> None:
    folds = np.repeat(np.arange(10), 2)
    issame = folds != 9  # every impostor pair sits in fold 9: its threshold would be fitted on genuine pairs only
    with pytest.raises(ValueError, match="the folds other than fold 9 hold only genuine pairs"):
        check_folds(issame, folds)
    with pytest.raises(ValueError, match="fold 9"):
        kfold_accuracy(np.linspace(0, 1, 20), issame, folds)
    check_folds(folds % 2 == 0, folds)


def test_a_threshold_between_scores_one_ulp_apart_separates_them() -> None:
    low = np.nextafter(0.5, 1.0)  # an odd last mantissa bit: the midpoint rounds (to even) up onto `high`
    high = np.nextafter(low, 1.0)
    scores, issame = np.array([low, high]), np.array([False, True])
    threshold, accuracy = best_threshold(scores, issame)
    assert accuracy == 1.0
    assert np.mean((scores > threshold) == issame) == 1.0  # the reported accuracy is the one the threshold gives


def test_non_finite_or_zero_features_are_refused_not_scored() -> None:
    gallery, labels = np.eye(3, dtype=np.float32), np.array([10, 20, 30])
    for probe, message in [(np.nan, "NaN or infinity"), (np.inf, "NaN or infinity"), (0.0, "all zero")]:
        probes = np.full((2, 3), probe, dtype=np.float32)
        with pytest.raises(ValueError, match=message):
            identification_rank_k(gallery, labels, probes, np.array([30, 30]))
    with pytest.raises(ValueError, match="gallery features contain NaN"):
        identification_rank_k(np.where(np.eye(3) > 0, np.nan, 0), labels, np.eye(3)[:1], np.array([10]))
    vset = VerificationSet("v", [b"a", b"b"], np.array([0]), np.array([1]), np.array([True]), np.array([0]))
    with pytest.raises(ValueError, match="NaN or infinity"):
        pair_scores(np.array([[1.0, 0.0], [np.nan, 1.0]]), vset)
    # A dead (all-zero) embedding is a poor model, not an evaluation that fails after the training.
    assert pair_scores(np.array([[1.0, 0.0], [0.0, 0.0]]), vset).tolist() == [0.0]


# ---------------------------------------------------------------- identification


def test_gallery_probe_split_one_gallery_image_per_repeated_identity() -> None:
    labels = np.array(["a", "b", "a", "c", "c", "a", "d"])
    gallery, probes = gallery_probe_split(labels, seed=0)
    assert sorted(labels[gallery]) == ["a", "c"]
    assert sorted(labels[probes]) == ["a", "a", "c"]
    assert not set(gallery) & set(probes)
    np.testing.assert_array_equal(gallery_probe_split(labels, seed=0)[0], gallery)
    galleries = {tuple(gallery_probe_split(labels, seed=s)[0]) for s in range(20)}
    assert len(galleries) > 1
    with pytest.raises(ValueError, match="2 or more images"):
        gallery_probe_split(np.array([1, 2, 3]))


def test_identification_on_synthetic_clusters() -> None:
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(50, 64))
    labels = np.repeat(np.arange(50), 6)
    gallery, probes = gallery_probe_split(labels)
    tight = centres[labels] + 0.1 * rng.normal(size=(300, 64))
    assert identification_rank_k(tight[gallery], labels[gallery], tight[probes], labels[probes]) == {
        1: 1.0,
        5: 1.0,
    }
    loose = centres[labels] + 1.2 * rng.normal(size=(300, 64))
    rates = identification_rank_k(loose[gallery], labels[gallery], loose[probes], labels[probes], ks=(1, 5, 50))
    assert 0.0 < rates[1] < rates[5] < rates[50] == 1.0


def test_identification_counts_ties_against_the_probe() -> None:
    collapsed = np.ones((10, 4))  # a model that embeds every face alike identifies no one
    names = np.arange(10)
    assert identification_rank_k(collapsed, names, collapsed[:3], names[:3], ks=(1, 5, 10)) == {1: 0.0, 5: 0.0, 10: 1.0}
    rng = np.random.default_rng(0)  # coarse features: many ties, some past the depth faiss searches
    gallery, probes = rng.integers(-1, 2, (40, 3)).astype(float), rng.integers(-1, 2, (200, 3)).astype(float)
    gallery[0], probes[:, 0] = [1.0, 0.0, 0.0], probes[:, 0] + 0.01  # no zero rows
    truth = rng.integers(0, 40, 200)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(probes) @ unit(gallery).T
    own = similarity[np.arange(200), truth]
    rivals = (similarity >= own[:, None] - 1e-6).sum(axis=1) - 1
    expected = {k: float((rivals < k).mean()) for k in (1, 2, 5)}
    assert identification_rank_k(gallery, np.arange(40), probes, truth, ks=(1, 2, 5)) == expected


def test_identification_ranks_by_cosine_not_raw_inner_product() -> None:
    gallery = np.array([[10.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # Probe "b" has inner product 6 with the long "a" vector but cosine 0.8 with "b"; probe "c" is
    # nearer "b" than "c", so it is found at rank 2 only.
    probes = np.array([[0.6, 0.8, 0.0], [0.0, 0.8, 0.6]])
    result = identification_rank_k(gallery, np.array(["a", "b", "c"]), probes, np.array(["b", "c"]), ks=(1, 2))
    assert result == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="unique"):
        identification_rank_k(gallery, np.array(["a", "a", "c"]), probes, np.array(["a", "c"]))
    with pytest.raises(ValueError, match="closed-set"):
        identification_rank_k(gallery, np.array(["a", "b", "c"]), probes, np.array(["a", "z"]))


# ---------------------------------------------------------------- embedding


class TinyEmbedder(nn.Module):
    """Conv + BatchNorm + global average pooling + linear: BatchNorm makes train vs eval mode visible."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def lfw_bytes() -> list[bytes]:
    if not LFW.is_dir():
        pytest.skip("LFW not available")
    return [path.read_bytes() for path in sorted(LFW.glob("A*/*.jpg"))[:6]]


def test_embeddings_are_unit_norm_and_flip_summed(lfw_bytes: list[bytes]) -> None:
    torch.manual_seed(0)
    model = TinyEmbedder()
    model.train()
    images = [decode_image(b) for b in lfw_bytes]
    emb = embed_images(model, lfw_bytes, input_size=56, crop_fraction=0.6, batch_size=4)
    assert model.training, "train/eval mode must be restored"
    assert emb.shape == (6, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # Arrays and encoded bytes go through the same preprocessing; eval mode makes batching irrelevant.
    np.testing.assert_allclose(embed_images(model, images, input_size=56, crop_fraction=0.6), emb, atol=1e-6)
    np.testing.assert_allclose(embed_images(model, images[:1], input_size=56, crop_fraction=0.6), emb[:1], atol=1e-6)
    # Flip-summing makes an image and its mirror embed identically, which a single pass does not.
    mirrored = [np.ascontiguousarray(img[:, ::-1]) for img in images]
    np.testing.assert_allclose(embed_images(model, mirrored, input_size=56, crop_fraction=0.6), emb, atol=1e-5)
    single = embed_images(model, images, input_size=56, crop_fraction=0.6, flip=False)
    single_mirrored = embed_images(model, mirrored, input_size=56, crop_fraction=0.6, flip=False)
    assert np.abs(single - single_mirrored).max() > 1e-3
    # A mirror-symmetric input is its own flip: the flip-sum equals the single pass.
    symmetric = [np.concatenate([img[:, :125], img[:, :125][:, ::-1]], axis=1) for img in images]
    np.testing.assert_allclose(
        embed_images(model, symmetric, input_size=56),
        embed_images(model, symmetric, input_size=56, flip=False),
        atol=1e-5,
    )


def test_embed_accepts_any_batch_callable(lfw_bytes: list[bytes]) -> None:
    torch.manual_seed(0)
    model = TinyEmbedder().eval()
    expected = embed_images(model, lfw_bytes, input_size=56)
    from_numpy_callable = embed_images(lambda batch: model(batch).numpy(), lfw_bytes, input_size=56)
    np.testing.assert_allclose(from_numpy_callable, expected, atol=1e-6)


def test_embeddings_too_large_to_square_keep_their_direction(lfw_bytes: list[bytes]) -> None:
    """An untrained or diverging model's 1e21 outputs overflow a float32 norm; they must not become zero rows."""
    torch.manual_seed(0)
    model = TinyEmbedder().eval()
    expected = embed_images(model, lfw_bytes, input_size=56)
    huge = embed_images(lambda batch: model(batch) * 1e21, lfw_bytes, input_size=56)
    np.testing.assert_allclose(huge, expected, atol=1e-6)


def test_embed_errors(lfw_bytes: list[bytes]) -> None:
    model = TinyEmbedder()
    with pytest.raises(ImageDecodeError, match="image 1"):
        embed_images(model, [lfw_bytes[0], b"not an image"], input_size=56)
    with pytest.raises(ValueError, match="RGB uint8"):
        embed_images(model, [np.zeros((56, 56), dtype=np.uint8)], input_size=56)
    with pytest.raises(ValueError, match="x D"):
        embed_images(lambda batch: batch.mean(dim=(1, 2, 3)), lfw_bytes, input_size=56)
    with pytest.raises(ValueError, match="no images"):
        embed_images(model, [], input_size=56)


# ---------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def small_lfw_set(tmp_path_factory: pytest.TempPathFactory) -> VerificationSet:
    """40 matched + 40 mismatched LFW pairs in two folds, written in pairs.txt format."""
    if not LFW.is_dir():
        pytest.skip("LFW not available")
    lines = (LFW / "pairs.txt").read_text().splitlines()[1:]
    chosen = [line for start in (0, 300, 600, 900) for line in lines[start : start + 20]]
    pairs_txt = tmp_path_factory.mktemp("pairs") / "pairs.txt"
    pairs_txt.write_text("2\t20\n" + "\n".join(chosen) + "\n")
    return load_pairs(pairs_txt, LFW, name="lfw-small")


def test_evaluate_model_reports_metrics_and_roc_png(small_lfw_set: VerificationSet, tmp_path: Path) -> None:
    torch.manual_seed(0)
    roc_path = tmp_path / "plots" / "roc.png"
    metrics = evaluate_model(
        TinyEmbedder(), small_lfw_set, input_size=56, crop_fraction=0.5, batch_size=32, roc_path=roc_path
    )
    assert list(metrics) == ["accuracy", "accuracy_std", "best_threshold", "tar_far_1e-01", "roc_auc", "eer"]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("accuracy", "tar_far_1e-01", "roc_auc", "eer"))
    assert roc_path.read_bytes().startswith(PNG_MAGIC)
    assert cv2.imread(str(roc_path)).shape == (400, 500, 3)
    text = format_metrics(metrics)
    assert len(text.splitlines()) == 6 and f"accuracy        {metrics['accuracy']:.4f}" in text


def test_pair_scores_are_cosine_whatever_the_feature_scale(small_lfw_set: VerificationSet) -> None:
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(len(small_lfw_set.images), 8))
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    expected = (unit[small_lfw_set.left] * unit[small_lfw_set.right]).sum(axis=1)
    scaled = feats * rng.uniform(0.1, 10.0, size=(len(feats), 1))
    np.testing.assert_allclose(pair_scores(scaled, small_lfw_set), expected)
    with pytest.raises(ValueError, match="one feature row per image"):
        pair_scores(feats[:-1], small_lfw_set)


def test_dlib_features_reproduce_published_lfw_accuracy(tmp_path: Path) -> None:
    """dlib's 128-d features score 98.45% on this LFW copy; our protocol must agree."""
    if not DLIB_FEATURES.is_file() or not LFW.is_dir():
        pytest.skip("dlib features or LFW not available")
    data = np.load(DLIB_FEATURES)
    row = {name: i for i, name in enumerate(data["files"])}
    lines = [line.split() for line in (LFW / "pairs.txt").read_text().splitlines()[1:] if line.strip()]
    left, right = [], []
    for fields in lines:
        name_a, i, name_b, j = fields if len(fields) == 4 else (fields[0], fields[1], fields[0], fields[2])
        left.append(row[f"{name_a}_{int(i):04d}.jpg"])
        right.append(row[f"{name_b}_{int(j):04d}.jpg"])
    # The rows of `feats` stand in for images: only their order matters to the scoring.
    vset = VerificationSet(
        name="lfw-dlib",
        images=[name.encode() for name in data["files"]],
        left=np.array(left),
        right=np.array(right),
        issame=np.array([len(fields) == 3 for fields in lines]),
        folds=np.repeat(np.arange(10), 600),
    )
    metrics = evaluate_verification(data["feats"], vset)
    assert metrics["accuracy"] == pytest.approx(0.9845, abs=0.003)
    assert {"tar_far_1e-01", "tar_far_1e-02", "tar_far_1e-03"} <= set(metrics)
    assert "tar_far_1e-04" not in set(metrics)  # 3000 impostor pairs
    roc_png = save_roc_plot(pair_scores(data["feats"], vset), vset.issame, tmp_path / "dlib.png", "dlib")
    assert roc_png.read_bytes().startswith(PNG_MAGIC)
    print("\n" + format_metrics(metrics))
