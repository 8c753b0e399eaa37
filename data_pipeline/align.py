"""5-point similarity alignment to the ArcFace template, and whole trees of photos turned into aligned crops."""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from faceforge.cores import usable_cores
from faceforge.data.folder import IMAGE_EXTENSIONS
from faceforge.data.image import declared_size, read_image
from faceforge.data_pipeline.detect import DETECTORS, Detector, get_detector
from faceforge.data_pipeline.mtcnn import Detections

# Where ArcFace's 112x112 training crops put the left eye, right eye, nose tip, left and right mouth corners
# (x, y; left and right as seen), as released with insightface. Other sizes scale it by size / 112.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
MANIFEST = "manifest.jsonl"
SETTINGS = "align.json"  # what shapes the crops (size, one face or all): a resumed run must not mix two kinds
MAX_SIZE = 1024


def template_transform(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that best maps the 5 landmarks onto the template.

    Least squares over all five points, as insightface's alignment: the RANSAC threshold admits every point.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5 (x, y) landmarks, got an array of shape {landmarks.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    template = ARCFACE_TEMPLATE * (size / 112)
    matrix, _ = cv2.estimateAffinePartial2D(landmarks, template, method=cv2.RANSAC, ransacReprojThreshold=1e9)
    if matrix is None:
        raise ValueError(f"degenerate landmarks (no similarity maps them onto the template): {landmarks.tolist()}")
    return matrix


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The size x size crop whose five landmarks sit on the ArcFace template; outside the photo is black."""
    matrix = template_transform(landmarks, size)
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    if scale < 0.5:  # bilinear sampling far below the source resolution aliases: area-average the face first
        image, matrix = area_shrink(image, matrix, scale, size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


def area_shrink(image: np.ndarray, matrix: np.ndarray, scale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of the photo the crop shows, area-resized by `scale`, and the matrix mapping it onto the crop."""
    square = np.array([[[0, 0], [size, 0], [0, size], [size, size]]], dtype=np.float32)
    corners = cv2.transform(square, cv2.invertAffineTransform(matrix))[0]
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - 2, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, image.shape[1::-1])
    if x1 <= x0 or y1 <= y0:  # the crop shows none of the photo: all border
        return np.zeros((1, 1, *image.shape[2:]), image.dtype), matrix
    offset = matrix[:, :2] @ np.array([x0, y0], dtype=np.float64)
    small = cv2.resize(image[y0:y1, x0:x1], None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    # cv2.resize maps pixel centres as p_small = (p + 0.5) * scale - 0.5; fold its inverse into the matrix.
    offset += matrix[:, :2] @ np.full(2, 0.5 / scale - 0.5)
    return small, np.hstack([matrix[:, :2] / scale, matrix[:, 2:] + offset[:, None]])


def central_face(found: Detections, height: int, width: int) -> int:
    """The largest, most central face: box area minus twice the squared distance of its centre from the photo's."""
    boxes = found.boxes
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 - np.array([width, height]) / 2
    return int(np.argmax(area - 2 * (centre**2).sum(1)))


def write_atomic(path: Path, data: bytes) -> None:
    """Readers (and a resumed run) see the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class AlignSettings:
    src: Path
    dst: Path
    size: int
    all_faces: bool
    detector: str
    fallbacks: tuple[str, ...] = ()
    detector_options: dict = field(default_factory=dict)

    def detectors(self) -> list[Detector]:
        """The detector (with its options), then each fallback for the photos those before it found no face in."""
        return [get_detector(self.detector, **self.detector_options), *map(get_detector, self.fallbacks)]


def _face_records(source: str, image: np.ndarray, found: Detections, by: str, settings: AlignSettings) -> list[dict]:
    """Write the aligned crop(s) of one photo; its manifest records, each with the photo's number of them (`faces`)
    so that a resumed run can tell a photo whose records a kill tore apart."""
    if not len(found):
        return [{"source": source, "status": "no_face", "detector": by}]
    picks = range(len(found)) if settings.all_faces else [central_face(found, *image.shape[:2])]
    records = []
    for k in picks:
        output = Path(source).with_suffix(".jpg")
        if settings.all_faces:
            output = output.with_name(f"{output.stem}_{k}.jpg")
        crop = cv2.cvtColor(align_face(image, found.landmarks[k], settings.size), cv2.COLOR_RGB2BGR)
        encoded = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
        write_atomic(settings.dst / output, encoded.tobytes())
        records.append(
            {
                "source": source,
                "status": "aligned",
                "output": output.as_posix(),
                "box": [round(float(v), 1) for v in found.boxes[k]],
                "score": round(float(found.scores[k]), 4),
                "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in found.landmarks[k]],
                "detector": by,
                "faces": len(picks),
            }
        )
    return records


def align_sources(settings: AlignSettings, sources: list[str], detectors: Sequence[Detector]) -> list[dict]:
    """Decode, detect (one batch per detector) and align a chunk of photos; one that cannot be read or aligned is an
    error record, so that one bad photo neither stops the run nor loses the rest of its chunk."""
    records, decoded = [], []
    for source in sources:
        try:
            decoded.append((source, read_image(settings.src / source)))
        except (OSError, ValueError) as err:
            records.append({"source": source, "status": "error", "error": str(err)})
    found = [Detections.empty()] * len(decoded)
    by = [detectors[0].name] * len(decoded)
    for detector in detectors:
        missing = [i for i, faces in enumerate(found) if not len(faces)]
        for i, faces in zip(missing, detector.detect([decoded[i][1] for i in missing]) if missing else [], strict=True):
            found[i], by[i] = faces, detector.name
    for (source, image), faces, name in zip(decoded, found, by, strict=True):
        try:
            records += _face_records(source, image, faces, name, settings)
        except (ValueError, cv2.error) as err:
            records.append({"source": source, "status": "error", "error": f"{settings.src / source}: {err}"})
    for record in records:  # which version of the photo these records describe: a replaced photo is done again
        record["stat"] = file_stat(settings.src / record["source"])
    return records


def file_stat(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


_worker_detectors: list[Detector] = []


def _start_worker(settings: AlignSettings, threads: int) -> None:
    # A terminal's Ctrl-C reaches the whole process group: the parent takes it and stops its workers, which would
    # otherwise each print a KeyboardInterrupt traceback. Blocked since their spawn, so none came while importing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = multiprocessing.parent_process()
    if parent is not None:  # a run killed with -9 leaves no workers behind: each ends once its parent has gone
        threading.Thread(target=_exit_after, args=(parent.sentinel,), daemon=True).start()
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    _worker_detectors[:] = settings.detectors()


def _exit_after(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _align_in_worker(settings: AlignSettings, sources: list[str]) -> list[dict]:
    assert _worker_detectors, "worker started without _start_worker"
    return align_sources(settings, sources, _worker_detectors)


@contextmanager
def stops_deferred() -> Iterator[None]:
    """A Ctrl-C (or a SIGTERM handled in Python) held back until the block ends, then delivered as usual, so none
    lands while a worker is spawned.

    Blocked in this thread, so workers spawned meanwhile start with it blocked (until `_start_worker`); noted, not
    raised, when another thread (tqdm's monitor) takes it, as Python then runs the handler in this one anyway.
    A SIGTERM this process handles in Python (the demo's stop) is noted too, not blocked: the workers keep dying of
    it. Raised mid-spawn, either loses the worker's pid before it got its instructions, and the orphan prints an
    EOFError traceback once its parent has gone.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(signal.SIGTERM)) else (signal.SIGINT,)
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending here reaches the noting handler
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:  # the stop wins over what the block raised (a worker it killed breaks the pool)
            signal.raise_signal(caught[0])


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's workers now (Python 3.14's `terminate_workers`); the chunks they had not returned are not
    in the manifest, so a rerun aligns them."""
    for process in list((pool._processes or {}).values()):
        process.terminate()


def list_sources(src: Path, exclude: Path) -> list[str]:
    """Image files under src (relative, sorted), hidden ones and anything inside `exclude` left out."""
    exclude = exclude.resolve()
    return sorted(
        path.relative_to(src).as_posix()
        for path in src.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(src).parts)
        and path.is_file()
        and exclude not in path.resolve().parents
    )


def read_manifest(src: Path, dst: Path, redo: Sequence[str] = ()) -> dict[str, list[dict]]:
    """Records per source already handled; the manifest is rewritten without a torn last line (crash mid-write),
    the sources with fewer records than their `faces` (the rest lost to that crash), those whose crop has gone,
    those whose photo has changed since and those with a status in `redo`, so that those run again (their crops
    deleted, so that none of a changed photo's old faces stays behind)."""
    path = dst / MANIFEST
    if not path.is_file():
        return {}
    by_source: dict[str, list[dict]] = {}
    lines = path.read_text().splitlines()
    parsed = 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_source.setdefault(record["source"], []).append(record)
        parsed += 1

    def again(record: dict, recorded: int) -> bool:
        stat = file_stat(src / record["source"])
        return (
            record["status"] in redo
            or record.get("faces", recorded) != recorded
            or (record["status"] == "aligned" and not (dst / record["output"]).is_file())
            or (stat is not None and record.get("stat", stat) != stat)  # records before stats were kept: as they are
        )

    rerun = {source for source, records in by_source.items() if any(again(r, len(records)) for r in records)}
    for source in rerun:
        for record in by_source.pop(source):
            if record["status"] == "aligned":
                (dst / record["output"]).unlink(missing_ok=True)
    if rerun or parsed < len(lines):
        kept = "".join(json.dumps(r) + "\n" for records in by_source.values() for r in records)
        write_atomic(path, kept.encode())
    return by_source


def name_clashes(sources: list[str]) -> list[dict]:
    """Error records for sources whose crop would overwrite an earlier one's (a.png next to a.jpg)."""
    first: dict[str, str] = {}
    clashes = []
    for source in sources:
        stem = Path(source).with_suffix("").as_posix()
        if stem in first:
            error = f"{source}: its crop name clashes with that of {first[stem]}; rename one of them"
            clashes.append({"source": source, "status": "error", "error": error})
        else:
            first[stem] = source
    return clashes


def align_tree(
    src: str | Path,
    dst: str | Path,
    detector: str = "mtcnn",
    workers: int | None = None,
    size: int = 112,
    all_faces: bool = False,
    fallbacks: Sequence[str] = (),
    redo: Sequence[str] = (),
    chunk_size: int = 8,
    progress: bool = True,
    **detector_options: object,
) -> dict[str, int]:
    """Align every photo under src into dst, mirroring its folders as JPEG crops; returns counts of this run.

    One face per photo, the largest and most central (identity folders), or every face (`all_faces`, raw albums:
    `<stem>_<k>.jpg`). Photos the detector finds no face in go to each of `fallbacks` in turn ("haar", then
    "center" makes sure every photo of a pre-cropped evaluation set gets a crop). Each photo gets records in
    dst/manifest.jsonl: aligned (box, score, landmarks, detector, the photo's number of faces), no_face or error
    (why it could not be read or aligned).
    A photo with records is done, so a rerun resumes where a run stopped; `redo` ("no_face", "error") runs the
    photos with those records again, after adding a fallback for instance.
    `workers` processes (default: one per core) each detect `chunk_size` photos per batch; 1 runs in this process.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    for name in (detector, *fallbacks):
        if name not in DETECTORS:
            raise ValueError(f"unknown detector {name!r}; choose from {', '.join(sorted(DETECTORS))}")
    if not 16 <= size <= MAX_SIZE or chunk_size < 1:
        raise ValueError(f"need 16 <= size <= {MAX_SIZE} and chunk_size >= 1, got {size} and {chunk_size}")
    if src.resolve() == dst.resolve() or dst.resolve() in src.resolve().parents:
        raise ValueError(f"{dst}: the crops' folder must not hold the photos ({src}); give another folder")
    workers = workers or usable_cores()
    sources = list_sources(src, exclude=dst)
    if not sources:
        raise ValueError(f"{src}: no images ({' '.join(sorted(IMAGE_EXTENSIONS))})")
    settings = AlignSettings(src, dst, size, all_faces, detector, tuple(fallbacks), dict(detector_options))
    detectors = settings.detectors()  # bad options fail here, in one line, not in every worker
    check_output_folder(dst, {"size": size, "all_faces": all_faces})
    done = read_manifest(src, dst, redo)
    clashes = [record for record in name_clashes(sources) if record["source"] not in done]
    clashing = {record["source"] for record in clashes}
    todo = [source for source in sources if source not in done and source not in clashing]
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    counts = Counter(images=len(sources), skipped=len(done.keys() & set(sources)))
    with (
        (dst / MANIFEST).open("a") as manifest,
        tqdm(total=len(todo), unit="img", disable=not (progress and todo)) as bar,
    ):

        def log(records: list[dict], photos: int) -> None:
            manifest.writelines(json.dumps(record) + "\n" for record in records)
            manifest.flush()
            counts.update(record["status"] for record in records)
            bar.update(photos)

        log(clashes, 0)
        if workers == 1:
            for chunk in chunks:
                log(align_sources(settings, chunk, detectors), len(chunk))
        elif chunks:
            threads = max(1, usable_cores() // workers)
            spawn = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads are running
            with ProcessPoolExecutor(workers, spawn, initializer=_start_worker, initargs=(settings, threads)) as pool:
                try:
                    with stops_deferred():  # workers spawn on submit
                        futures = {pool.submit(_align_in_worker, settings, chunk): len(chunk) for chunk in chunks}
                    for future in as_completed(futures):
                        log(future.result(), futures[future])
                except BaseException:
                    stop_workers(pool)  # not after the rest of the queue: the pool's exit would wait for all of it
                    raise
    return {key: counts[key] for key in ("images", "skipped", "aligned", "no_face", "error")}


def check_output_folder(dst: Path, shape: dict) -> None:
    """Make dst, or take it up again: refused when it holds other files (a crop would overwrite one) or crops of
    another size or face choice than `shape` (a resumed run would mix them)."""
    settings_file, manifest = dst / SETTINGS, dst / MANIFEST
    if dst.is_dir() and not manifest.is_file() and any(p.name != SETTINGS for p in dst.iterdir()):
        raise ValueError(f"{dst}: holds files but no {MANIFEST} of an earlier run; give an empty or new folder")
    earlier = json.loads(settings_file.read_text()) if settings_file.is_file() else shape_of_crops(dst)
    if earlier is not None and earlier != shape:
        changed = ", ".join(f"{key} {earlier.get(key)} (now {value})" for key, value in shape.items())
        raise ValueError(f"{dst}: its crops were made with {changed}; give a new folder for these settings")
    if not settings_file.is_file():
        write_atomic(settings_file, json.dumps(shape).encode())


def shape_of_crops(dst: Path) -> dict | None:
    """The size and face choice of the crops a run made before align.json existed, read off its first one."""
    if not (dst / MANIFEST).is_file():
        return None
    for line in (dst / MANIFEST).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        crop = dst / record.get("output", "")
        if record.get("status") == "aligned" and crop.is_file() and (size := declared_size(crop.read_bytes())):
            return {"size": size[0], "all_faces": Path(record["output"]).stem != Path(record["source"]).stem}
    return None
