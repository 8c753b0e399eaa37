"""kNN graph at scale, clustering quality on real faces, and the 3-album merge.

1. kNN graph (`knn_graph`, k = 30, D = 512) at N = 100k and 1M: wall time of index build + search of every row,
   peak resident memory of the process (features included: 1M x 512 float32 is 2 GiB), and recall@k against
   exact search on a random sample of rows. Each (N, method) runs in a fresh process so the peaks do not mix.
   Data: synthetic face-like embeddings. N / 20 identities (so ~20 faces each, Poisson sizes); identity centres
   are Gaussian with a power-law spectrum (variance of the j-th of 512 random orthogonal directions ∝ 1/(j+1)),
   so, as in real embeddings, some people look alike and the cloud is not a uniform sphere; a face is its
   identity's unit centre plus isotropic noise of norm `--noise` (0.9: genuine cosine 0.55, impostor 0.00 ± 0.10,
   0.31 at its 99.9th percentile), then L2-normalised. 30 neighbours are then ~19 of the same person plus
   look-alikes.
2. Clustering of dlib's LFW embeddings (../shared/data/lfw_dlib128_features.npz), or with `--model` of a
   checkpoint's embeddings of LFW aligned by `faceforge data align` (identities with >= 2 images, exact 30-NN
   graph), with each method over a threshold sweep: pairwise and BCubed P/R/F, NMI, clusters, singletons; then,
   per method, the best pairwise F whose pairwise precision is >= 0.95.
3. Album merge: LFW people with >= 4 images dealt over 3 albums (clusters = true identities within an album, so
   the merge alone is measured), then with people of 2-3 images added whole to one album (no partner: any merge
   of theirs is false), merged back at thresholds calibrated at FMR 1e-3 and 1e-4 on image pairs of a disjoint
   quarter of the people, with and without a runner-up margin, over `--deals` random deals; with `--model`, on
   its embeddings. dlib's share a large common direction (impostor cosine ~0.84), hence thresholds near 1. LFW
   files one man, FIFA's president Joseph "Sepp" Blatter, under two names; the merge counts them as one person
   (`LFW_ALIASES`), or joining his two names would count as a false merge.

Run from the repo root:

    .venv/bin/python bench/bench_cluster.py                          # IVF-PQ: 100k ~20 s, 1M ~7 min
    .venv/bin/python bench/bench_cluster.py --sizes 100000 --methods ivfpq ivf hnsw
    .venv/bin/python bench/bench_cluster.py --skip-knn               # only the LFW parts, seconds
    .venv/bin/python bench/bench_cluster.py --skip-knn --model <checkpoint> --aligned-lfw <aligned LFW>
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import multiprocessing
import resource
import time
from pathlib import Path

import faiss
import numpy as np
from machine import machine_line

from faceforge.data_pipeline import (
    CLUSTERERS,
    calibrate_threshold,
    cluster_scores,
    knn_graph,
    knn_recall,
    l2_normalise,
    merge_albums,
    pair_scores,
)
from faceforge.data_pipeline.dedup import deal_into_albums
from faceforge.data_pipeline.knn import IVFPQ_REFINE, default_nprobe, ivf_cells
from faceforge.eval.embed import embed_images
from faceforge.eval.sources import load_model

FEATURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw_dlib128_features.npz"
LFW_ALIASES = {"Sepp_Blatter": "Joseph_Blatter"}  # one person filed under two names in LFW


def synthetic_faces(n: int, dim: int, noise: float, seed: int = 0) -> np.ndarray:
    """Face-like unit embeddings (see the module docstring), generated in chunks to stay near N x D x 4 bytes."""
    rng = np.random.default_rng(seed)
    people = max(1, n // 20)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = 1 / np.sqrt(np.arange(1, dim + 1))
    centres = l2_normalise((rng.standard_normal((people, dim)) * spectrum) @ basis.T)
    labels = rng.integers(people, size=n)
    features = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        rows = slice(start, min(n, start + 65536))
        jitter = rng.standard_normal((rows.stop - start, dim), dtype=np.float32) * (noise / math.sqrt(dim))
        features[rows] = l2_normalise(centres[labels[rows]] + jitter)
    return features


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def knn_case(n: int, dim: int, k: int, method: str, noise: float, queries: int, options: dict) -> dict:
    """One (N, method) measurement, run in its own process."""
    features = synthetic_faces(n, dim, noise)
    data_gib = peak_rss_gib()
    start = time.perf_counter()
    indices, _ = knn_graph(features, k, method, **options)
    seconds = time.perf_counter() - start
    peak = peak_rss_gib()  # before the exact search below adds its own copy of the vectors
    sample = np.random.default_rng(1).choice(n, min(n, queries), replace=False)
    exact, _ = knn_graph(features, k, "exact", query_rows=sample)
    return {"seconds": seconds, "data_gib": data_gib, "peak_gib": peak, "recall": knn_recall(indices[sample], exact)}


def bench_knn(args: argparse.Namespace) -> None:
    print(f"\n## kNN graph: k = {args.k}, D = {args.dim}, recall on {args.queries} random rows against exact\n")
    print("| N | method | parameters | build + search (s) | peak RSS (GiB) | of which data (GiB) | recall@k |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    options = {"nprobe": args.nprobe, "ef_search": args.ef_search, "hnsw_m": args.hnsw_m}
    context = multiprocessing.get_context("spawn")
    for n in args.sizes:
        for method in args.methods:
            nprobe = args.nprobe or default_nprobe(ivf_cells(n))
            params = {
                "ivfpq": f"nlist {ivf_cells(n)}, nprobe {nprobe}, PQ{args.dim // 2}x4fs, re-rank {IVFPQ_REFINE}k",
                "ivf": f"nlist {ivf_cells(n)}, nprobe {nprobe}",
                "hnsw": f"M {args.hnsw_m}, efSearch {args.ef_search}",
                "exact": "flat inner product",
            }[method]
            with context.Pool(1) as pool:
                result = pool.apply(knn_case, (n, args.dim, args.k, method, args.noise, args.queries, options))
            print(
                f"| {n:,} | {method} | {params} | {result['seconds']:.1f} | {result['peak_gib']:.2f} | "
                f"{result['data_gib']:.2f} | {result['recall']:.4f} |",
                flush=True,
            )


def dlib_lfw() -> tuple[np.ndarray, np.ndarray]:
    """dlib's embeddings of LFW and their identity names."""
    data = np.load(FEATURES)
    return data["feats"], data["names"]


def model_lfw(model: str, aligned: Path) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's (or MLflow model's) flip-summed embeddings of aligned LFW crops, and their identity names."""
    files = sorted(aligned.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no aligned crops under {aligned} (faceforge data align ../shared/data/lfw {aligned})")
    module = load_model(model)
    input_size = int(getattr(module, "input_size", 112))
    features = embed_images(module, [f.read_bytes() for f in files], input_size=input_size, batch_size=128)
    return features, np.array([f.parent.name for f in files])


def bench_lfw_clustering(thresholds: list[float], features: np.ndarray, names: np.ndarray, source: str) -> None:
    _, inverse, counts = np.unique(names, return_inverse=True, return_counts=True)
    rows = np.flatnonzero(counts[inverse] >= 2)
    features, names = l2_normalise(features[rows]), names[rows]
    indices, sims = knn_graph(features, 30)
    print(f"\n## Clustering {source}: {len(rows)} faces of {len(np.unique(names))} identities (>= 2 each)\n")
    print("| method | threshold | pairwise P | pairwise R | pairwise F | BCubed P | BCubed R | BCubed F | NMI | "
          "clusters | singletons | seconds |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    best: dict[str, tuple[float, str]] = {}
    for method, cluster in CLUSTERERS.items():
        if method == "infomap" and importlib.util.find_spec("infomap") is None:
            print("| infomap | - | not installed (pip install infomap) | | | | | | | | | |")
            continue
        for threshold in thresholds:
            start = time.perf_counter()
            labels = cluster(indices, sims, threshold)
            seconds = time.perf_counter() - start
            s = cluster_scores(labels, names)
            row = (
                f"| {method} | {threshold:.3f} | {s.pairwise_precision:.4f} | {s.pairwise_recall:.4f} | "
                f"{s.pairwise_f:.4f} | {s.bcubed_precision:.4f} | {s.bcubed_recall:.4f} | {s.bcubed_f:.4f} | "
                f"{s.nmi:.4f} | {s.clusters} | {s.singletons} | {seconds:.2f} |"
            )
            print(row, flush=True)
            if s.pairwise_precision >= 0.95 and s.pairwise_f > best.get(method, (-1.0, ""))[0]:
                best[method] = (s.pairwise_f, row)
    print("\nBest pairwise F at pairwise precision >= 0.95, per method:\n")
    for _, row in best.values():
        print(row)


def bench_album_merge(features: np.ndarray, names: np.ndarray, deals: int) -> None:
    features = l2_normalise(features)
    names = np.array([LFW_ALIASES.get(str(name), str(name)) for name in names])
    people, counts = np.unique(names, return_counts=True)
    calibration_people = np.isin(names, people[1::4])
    genuine, impostor = pair_scores(features[calibration_people], names[calibration_people])
    print("\n## Album merge: LFW people with >= 4 images split over 3 albums (clusters = true identities within an")
    print("album), optionally with people of 2-3 images added whole to one album; thresholds calibrated on image")
    print(f"pairs of a disjoint quarter of the people ({len(genuine)} genuine, {len(impostor)} impostor pairs)\n")
    print("| faces | deal | FMR | threshold | margin | merges | wrong merges | split pairs joined | pairwise P | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (smallest, what), deal in itertools.product(
        ((4, "split people only"), (2, "+ one-album people")), range(deals)
    ):
        rows = ~calibration_people & np.isin(names, people[counts >= smallest])
        albums = deal_into_albums(names[rows], 4, seed=deal)
        keys = sorted({(int(a), str(n)) for a, n in zip(albums, names[rows], strict=True)})
        same = [(x, y) for i, x in enumerate(keys) for y in keys[i + 1 :] if x[1] == y[1]]
        for fmr in (1e-3, 1e-4):
            calibration = calibrate_threshold(genuine, impostor, fmr)
            for margin in (0.0, 0.01):
                start = time.perf_counter()
                labels, decisions = merge_albums(features[rows], albums, names[rows], calibration.threshold, margin)
                seconds = time.perf_counter() - start
                label_of = {(int(a), str(n)): int(g) for a, n, g in zip(albums, names[rows], labels, strict=True)}
                joined = sum(label_of[x] == label_of[y] for x, y in same) / len(same)
                wrong = sum(d.subject.split("/", 1)[1] != d.target.split("/", 1)[1] for d in decisions)
                precision = cluster_scores(labels, names[rows]).pairwise_precision
                print(
                    f"| {rows.sum()} ({what}) | {deal} | {fmr:g} | {calibration.threshold:.4f} | {margin:g} | "
                    f"{len(decisions)} | {wrong} ({wrong / max(len(decisions), 1):.2%}) | {joined:.4f} | "
                    f"{precision:.4f} | {seconds:.2f} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="N of the kNN runs")
    parser.add_argument("--methods", nargs="+", choices=("ivfpq", "ivf", "hnsw", "exact"), default=["ivfpq"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.9, help="norm of a face's offset from its identity centre")
    parser.add_argument("--queries", type=int, default=2000, help="rows whose recall is checked by exact search")
    parser.add_argument("--nprobe", type=int, help="IVF cells scanned per query (default: knn_graph's, ~3%%)")
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        help="clustering cosine thresholds (default: a sweep around dlib's 0.95, or 0.30-0.85 with --model)",
    )
    parser.add_argument("--model", help="cluster LFW with this checkpoint's embeddings of --aligned-lfw, not dlib's")
    parser.add_argument("--aligned-lfw", type=Path, help="LFW aligned by `faceforge data align`, for --model")
    parser.add_argument("--deals", type=int, default=3, help="random deals of the people into the 3 albums")
    parser.add_argument("--skip-knn", action="store_true")
    parser.add_argument("--skip-lfw", action="store_true")
    args = parser.parse_args()
    print(
        machine_line(f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads", f"numpy {np.__version__}")
    )
    if not args.skip_lfw and args.model:
        if not args.aligned_lfw:
            raise SystemExit("--model needs --aligned-lfw")
        thresholds = args.thresholds or [round(t, 2) for t in np.arange(0.30, 0.86, 0.05)]
        features, names = model_lfw(args.model, args.aligned_lfw)
        bench_lfw_clustering(thresholds, features, names, f"{args.model} on aligned LFW")
        bench_album_merge(features, names, args.deals)
    elif not args.skip_lfw:
        if not FEATURES.is_file():
            raise SystemExit(f"{FEATURES} not found (use --skip-lfw)")
        thresholds = args.thresholds or [0.93, 0.94, 0.945, 0.95, 0.955, 0.96, 0.965]
        features, names = dlib_lfw()
        bench_lfw_clustering(thresholds, features, names, "dlib LFW embeddings")
        bench_album_merge(features, names, args.deals)
    if not args.skip_knn:
        bench_knn(args)


if __name__ == "__main__":
    main()
