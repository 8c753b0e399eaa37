"""Raw photos to labelled identities: detection, 5-point alignment, quality, clustering, de-duplication, versioned
datasets and the auto-label daemon that runs them round after round (`autolabel`)."""

from faceforge.data_pipeline.align import ARCFACE_TEMPLATE, align_face, align_tree, template_transform
from faceforge.data_pipeline.cluster import CLUSTERERS, chinese_whispers, infomap_clusters, threshold_components
from faceforge.data_pipeline.cluster_metrics import ClusterScores, cluster_scores, score_files
from faceforge.data_pipeline.dedup import (
    Calibration,
    CopyEvidence,
    Decision,
    calibrate_threshold,
    cluster_centroids,
    crop_fingerprint,
    drop_evaluation_identities,
    exact_duplicates,
    match_known_identities,
    merge_albums,
    near_duplicates,
    open_set_threshold,
    pair_scores,
)
from faceforge.data_pipeline.detect import DETECTORS, CenterDetector, Detector, HaarDetector, get_detector
from faceforge.data_pipeline.knn import knn_graph, knn_recall, l2_normalise
from faceforge.data_pipeline.mtcnn import MTCNN, Detections, load_mtcnn_nets
from faceforge.data_pipeline.quality import QualityConfig, QualityScore, error_versus_reject, score_face

__all__ = [
    "ARCFACE_TEMPLATE",
    "CLUSTERERS",
    "DETECTORS",
    "MTCNN",
    "Calibration",
    "CenterDetector",
    "ClusterScores",
    "CopyEvidence",
    "Decision",
    "Detections",
    "Detector",
    "HaarDetector",
    "QualityConfig",
    "QualityScore",
    "align_face",
    "align_tree",
    "calibrate_threshold",
    "chinese_whispers",
    "cluster_centroids",
    "cluster_scores",
    "crop_fingerprint",
    "drop_evaluation_identities",
    "error_versus_reject",
    "exact_duplicates",
    "get_detector",
    "infomap_clusters",
    "knn_graph",
    "knn_recall",
    "l2_normalise",
    "load_mtcnn_nets",
    "match_known_identities",
    "merge_albums",
    "near_duplicates",
    "open_set_threshold",
    "pair_scores",
    "score_face",
    "score_files",
    "template_transform",
    "threshold_components",
]
