"""onnxruntime sessions for exported models: embedding with them and timing them the way a device runs them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from faceforge.eval.embed import embed_images

WARMUP_RUNS = 5
LATENCY_RUNS = 50


def onnx_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with every graph optimisation (the QDQ -> int8 kernel fusions live there).

    threads=None lets onnxruntime use every core; threads=1 also runs the graph sequentially, the
    setting of a microcontroller or a single serving worker.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEmbedder:
    """An exported model as the callable `faceforge.eval.embed_images` accepts: B x 3 x H x W -> B x D."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.cpu().numpy()})[0]


def onnx_latency_ms(path: str | Path, input_size: int, runs: int = LATENCY_RUNS) -> float:
    """Median batch-1 latency on one thread, after warm-up runs that let onnxruntime allocate its buffers."""
    if runs < 1:
        raise ValueError(f"latency runs must be >= 1, got {runs}")
    embedder = OnnxEmbedder(path, threads=1)
    x = {embedder.input_name: np.random.default_rng(0).uniform(-1, 1, (1, 3, input_size, input_size)).astype("f4")}
    times = []
    for i in range(WARMUP_RUNS + runs):
        start = time.perf_counter()
        embedder.session.run(None, x)
        if i >= WARMUP_RUNS:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def embedding_agreement(
    first: str | Path, second: str | Path, faces: Sequence[bytes | np.ndarray], *, input_size: int, crop_fraction: float
) -> dict[str, float]:
    """Mean and 1st-percentile cosine between two exported graphs' embeddings (unflipped) of the same faces: how
    much of the fp32 model an int8 one keeps."""
    first_embeddings, second_embeddings = (
        embed_images(OnnxEmbedder(path), faces, input_size=input_size, crop_fraction=crop_fraction, flip=False)
        for path in (first, second)
    )
    cosine = (first_embeddings * second_embeddings).sum(axis=1)
    return {"mean_cosine": float(cosine.mean()), "p1_cosine": float(np.percentile(cosine, 1))}
