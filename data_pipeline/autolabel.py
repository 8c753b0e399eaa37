"""The auto-label daemon: albums of raw photos in, a new versioned dataset of identities out, round after round.

A round takes every file that has arrived in the inbox (`INBOX/<album>/...`) and, a batch at a time, decides
each one: labelled (it gave at least one good face), rejected (no face, low quality, a copy of an earlier file)
or error (empty, truncated, corrupt, unsupported, huge). The decision is committed, then the file is moved to
`<workdir>/<outcome>/<album>/`: every input ends in exactly one place, and a bad file is just one more decision.
Then the round embeds the faces with the embedding model (the registry's champion by default), clusters each
album, de-duplicates and merges across albums, against known and evaluation identities, and writes version N.
When the champion changes, the next round re-embeds and re-clusters everything, new files or not: better model,
better labels, and optionally a retraining job per round that found enough new people: the loop closes.

Crash safety: the state database (`autolabel_state`) commits a batch at a time and fixes a round's files when
it opens, crops are written before their batch commits, moves are redone from the database, and a version is
renamed into place whole. A restarted daemon finishes the open round, and writes the same manifest.
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from stat import S_ISREG

import cv2
import numpy as np
import yaml
from torch import nn

from faceforge.data.folder import IMAGE_EXTENSIONS
from faceforge.data.image import ImageDecodeError, decode_image
from faceforge.data_pipeline.align import align_face, write_atomic
from faceforge.data_pipeline.autolabel_state import (
    GONE,
    RETRAIN_PENDING,
    FaceOutcome,
    InboxFile,
    Round,
    StateDB,
    cut_utf8,
)
from faceforge.data_pipeline.cluster import CLUSTERERS
from faceforge.data_pipeline.dedup import (
    CopyEvidence,
    Decision,
    calibrate_threshold,
    cluster_centroids,
    crop_fingerprint,
    drop_evaluation_identities,
    match_known_identities,
    merge_albums,
    near_duplicates,
    open_set_threshold,
    pair_scores,
)
from faceforge.data_pipeline.detect import Detector, get_detector
from faceforge.data_pipeline.knn import knn_graph
from faceforge.data_pipeline.mtcnn import Detections
from faceforge.data_pipeline.quality import QualityConfig, QualityScore, score_face
from faceforge.data_pipeline.versions import FaceRecord, list_versions, version_name, version_number, write_version

CROP_SIZE = 112
ROOT_ALBUM = "."  # files put straight into the inbox: the inbox itself, a name no album folder can have
STATE = "state.db"
LOCK = "daemon.lock"  # beside the state database: a folder holding both is a work folder a daemon has run in
# A file that looks cut short waits this many times settle_seconds (a minute by default) before it is decided.
INCOMPLETE_SETTLE_FACTOR = 30
LOCK_PATIENCE_SECONDS = 1.0
INBOX_LOCKS = Path(tempfile.gettempdir()) / "faceforge-inbox-locks"  # see `exclusive`
OUTCOMES = ("labelled", "rejected", "error")
WORK_FOLDERS = (*OUTCOMES, "crops", "versions", "models")  # what the daemon writes below its work folder
OWN_OUTPUT = "the daemon would take its own output as new photos"  # why an inbox and its work folder must not meet
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PGM_GAP = rb"(?:\s|#[^\r\n]*[\r\n])+"  # whitespace and comments between the fields of a PGM header
PGM_HEADER = re.compile(rb"P5" + (PGM_GAP + rb"(\d+)") * 3 + rb"\s")  # width, height, maxval, then one whitespace
FINGERPRINT_KEY = "crop-fingerprint-16"  # stored beside the models' embeddings, under a key no model has
CHECKPOINT_KEY = "sha256:"  # a checkpoint's model key: the hash of its weights (a registered model's is its URI)

# (file, sha256 of its bytes, outcome, reason, faces): what a batch commits for each file.
Decided = tuple[InboxFile, str | None, str, str | None, list[FaceOutcome]]


class AutolabelError(ValueError):
    """A configuration or set-up mistake: one line for the user."""


@dataclass
class ClusterSettings:
    method: str = "chinese_whispers"
    threshold: float = 0.5
    neighbours: int = 30
    min_size: int = 2


@dataclass
class DedupSettings:
    near_threshold: float = 0.95
    copy_pixel_threshold: float = 0.92
    album_threshold: float = 0.5
    album_margin: float = 0.01
    known_root: str | None = None
    known_threshold: float = 0.5
    eval_root: str | None = None
    eval_threshold: float = 0.5
    fmr: float = 1e-3
    calibrate: bool = True
    calibration_root: str | None = None
    fpir: float = 0.01


@dataclass
class RetrainSettings:
    min_new_identities: int = 0
    overrides: list[str] = field(default_factory=list)


@dataclass
class AutolabelConfig:
    model: str = "models:/faceforge@champion"
    tracking_uri: str | None = None
    detector: str = "mtcnn"
    min_face_size: int = 40
    batch_files: int = 16
    embed_batch: int = 64
    max_file_mb: float = 50.0
    settle_seconds: float = 2.0
    poll_seconds: float = 10.0
    quality: QualityConfig = field(default_factory=QualityConfig)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> AutolabelConfig:
    """configs/autolabel.yaml (or `path`) with `key=value` overrides, type-checked into AutolabelConfig."""
    from faceforge.train.app import CONFIG_DIR
    from faceforge.train.config import ConfigError, build_typed

    path = path or CONFIG_DIR / "autolabel.yaml"
    if not path.is_file():
        raise AutolabelError(f"{path}: autolabel config not found")
    values = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(values, dict):
        raise AutolabelError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise AutolabelError(f"override {override!r} is not key=value")
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AutolabelError(f"override {override!r}: {part} is not a group")
        node[leaf] = _yaml(text, f"override {override!r}")
    try:
        config = build_typed(AutolabelConfig, values)
    except ConfigError as err:
        raise AutolabelError(str(err)) from None
    check_config(config)
    return config


def _yaml(text: str, where: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise AutolabelError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None


def check_config(config: AutolabelConfig) -> None:
    """Every setting a round would trip over, checked before the daemon touches the inbox."""
    from faceforge.data_pipeline.detect import DETECTORS

    retrain = config.retrain.overrides
    checks = [
        (config.detector in DETECTORS, f"detector must be one of {', '.join(sorted(DETECTORS))}"),
        (config.min_face_size >= 1, f"min_face_size must be >= 1, got {config.min_face_size}"),
        (config.settle_seconds >= 0, f"settle_seconds must be >= 0, got {config.settle_seconds}"),
        (config.poll_seconds > 0, f"poll_seconds must be positive, got {config.poll_seconds}"),
        (config.cluster.method in CLUSTERERS, f"cluster.method must be one of {', '.join(sorted(CLUSTERERS))}"),
        (config.cluster.min_size >= 1 and config.cluster.neighbours >= 1, "cluster.min_size and neighbours >= 1"),
        (config.batch_files >= 1 and config.embed_batch >= 1, "batch_files and embed_batch must be >= 1"),
        (0 < config.dedup.fmr < 1, f"dedup.fmr must be in (0, 1), got {config.dedup.fmr}"),
        (0 < config.dedup.fpir < 1, f"dedup.fpir must be in (0, 1), got {config.dedup.fpir}"),
        (config.dedup.calibrate or not config.dedup.calibration_root, "dedup.calibration_root needs dedup.calibrate"),
        (-1 <= config.dedup.copy_pixel_threshold <= 1, "dedup.copy_pixel_threshold is a cosine, in [-1, 1]"),
        (config.max_file_mb > 0, "max_file_mb must be positive"),
        (
            isinstance(retrain, list) and all(isinstance(o, str) for o in retrain),
            "retrain.overrides must be a list of key=value",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise AutolabelError(message)
    if config.retrain.min_new_identities > 0:  # composed now, not after a round has moved every file
        from faceforge.jobs import compose_config
        from faceforge.train.config import ConfigError

        try:
            compose_config(["data=folder", "data.root=/the/dataset/version", *retrain])
        except ConfigError as err:
            raise AutolabelError(f"retrain.overrides: {err}") from None


# One file


def file_problem(path: Path, size: int, max_bytes: float) -> str | None:
    """Why a file cannot be an image at all ("<code>: detail"), judged before reading it; None if it may be one."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"unsupported: {path.suffix or 'no extension'} is not one of {' '.join(sorted(IMAGE_EXTENSIONS))}"
    if not size:
        return "empty: 0 bytes"
    if size > max_bytes:
        return f"huge: {size / 1e6:.1f} MB exceeds max_file_mb={max_bytes / 1e6:g}"
    return None


def truncation_problem(data: bytes) -> str | None:
    """A cut-off JPEG or PNG still decodes (grey below the cut); what it lacks is its end. WebP and binary PGM
    declare their size in their header, so one shorter than that is a copy still arriving, not corruption (a BMP's
    bfSize is not trusted: many writers fill it wrongly). The format is read from the bytes, not the name, and
    anything after the end is allowed: phones append a video to "motion photos"."""
    if data.startswith(b"\xff\xd8") and data.find(b"\xff\xd9", jpeg_scan_start(data)) < 0:
        return "truncated: the JPEG has no end-of-image marker"
    if data.startswith(PNG_SIGNATURE) and png_cut_short(data):
        return "truncated: the PNG has no IEND chunk"
    if (declared := declared_size(data)) and len(data) < declared[1]:
        return f"truncated: the {declared[0]} header declares {declared[1]} bytes, the file has {len(data)}"
    return None


def declared_size(data: bytes) -> tuple[str, int] | None:
    """(format, size in bytes) that a WebP (RIFF chunk size) or binary PGM header (width x height samples of one
    or two bytes, by maxval) declares; None for any other format or a header that does not parse."""
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP", 8 + int.from_bytes(data[4:8], "little")
    if header := PGM_HEADER.match(data):
        width, height, maxval = map(int, header.groups())
        return "PGM", header.end() + width * height * (1 if maxval < 256 else 2)
    return None


def jpeg_scan_start(data: bytes) -> int:
    """Offset of the first start-of-scan marker, found by walking the segments, so that the end marker of a
    thumbnail inside the EXIF segment is skipped; a file whose segments do not parse is searched whole."""
    offset = 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        if marker == 0xDA:
            return offset
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, or a marker with no length
            offset += 1 if marker == 0xFF else 2
            continue
        offset += 2 + int.from_bytes(data[offset + 2 : offset + 4], "big")
    return 2


def png_cut_short(data: bytes) -> bool:
    """Whether the chain of chunks (length, type, data, CRC) runs off the end of the data before IEND. A chain that
    breaks (a type that is not four letters) is corruption, which decoding reports."""
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        kind = data[offset + 4 : offset + 8]
        if kind == b"IEND" or not kind.isalpha():
            return False
        offset += 12 + int.from_bytes(data[offset : offset + 4], "big")
    return True


def sha256_of(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def decode_problem(err: ImageDecodeError) -> str:
    return f"{'huge' if 'pixel limit' in str(err) else 'corrupt'}: {err}"


# The embedding model


@dataclass(frozen=True)
class EmbeddingModel:
    key: str  # what the embeddings are stored under: a registry version, or the checkpoint's hash
    source: str  # what loads it again
    module: nn.Module

    @property
    def input_size(self) -> int:
        return int(getattr(self.module, "input_size", CROP_SIZE))


def resolve_model(source: str, tracking_uri: str | None) -> tuple[str, str]:
    """(key, loadable source): an alias resolves to its current version, so a new champion is a new key."""
    from faceforge.eval.sources import MLFLOW_SCHEMES

    if source.startswith("models:/") and "@" in source:
        from faceforge.registry.champion import registered_version
        from faceforge.registry.database import default_tracking_uri, open_database

        try:
            found = registered_version(open_database(tracking_uri or default_tracking_uri()), source)
        except (ValueError, FileNotFoundError) as err:  # no database yet, or no such model or alias
            raise AutolabelError(f"{source}: no registered model to embed with yet ({err})") from None
        pinned = f"models:/{found.name}/{found.version}"
        return pinned, pinned
    if source.startswith(MLFLOW_SCHEMES):
        return source, source
    from faceforge.train.checkpoint import resolve_checkpoint

    if not Path(source).exists():
        raise AutolabelError(f"model {source}: neither a checkpoint nor an MLflow model URI")
    weights = resolve_checkpoint(Path(source)) / "model.pt"
    return weights_key(weights), str(weights.parent)


def checkpoint_key(sha256: str) -> str:
    return CHECKPOINT_KEY + sha256[:16]


_weights_keys: dict[Path, tuple[tuple[int, int, int], str]] = {}  # model.pt -> ((size, mtime_ns, inode), key)


def weights_key(weights: Path) -> str:
    """The checkpoint key of a model.pt, hashed again only when it is another file (its size, mtime or inode
    changed): the daemon resolves its model every pass, and an idle one must not read a large checkpoint each
    poll. A file written or replaced while it is hashed is not cached, so the next pass hashes it again."""
    path = weights.resolve()
    signature = file_signature(path.stat())
    if (cached := _weights_keys.get(path)) and cached[0] == signature:
        return cached[1]
    with path.open("rb") as stream:
        key = checkpoint_key(hashlib.file_digest(stream, "sha256").hexdigest())
        if file_signature(os.fstat(stream.fileno())) == signature:
            _weights_keys[path] = (signature, key)
    return key


def file_signature(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def load_embedding_model(key: str, source: str, tracking_uri: str | None) -> EmbeddingModel:
    from faceforge.eval.sources import load_model

    return EmbeddingModel(key, source, load_model(source, tracking_uri))


def embed_crops(model: EmbeddingModel, crops: Sequence[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from faceforge.eval.embed import embed_images

    return embed_images(model.module, crops, input_size=model.input_size, batch_size=batch_size, with_norms=True)


def check_embeds(model: EmbeddingModel) -> None:
    """A diverged model (NaN weights) loads, but no face it embeds could be scored, clustered or kept."""
    noise = np.random.default_rng(0).integers(0, 256, (CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    vectors, norms = embed_crops(model, [noise], 1)
    if not (np.isfinite(vectors).all() and np.isfinite(norms).all()):
        raise AutolabelError(f"model {model.source}: its embeddings are not finite (diverged weights?); not used")


# The daemon


@dataclass
class RoundReport:
    round: int
    version: str
    files: int
    seconds: float
    stats: dict
    job_id: str | None


class Autolabeller:
    """Owns a work folder: state.db, crops/, versions/ and the labelled/, rejected/ and error/ file trees."""

    def __init__(self, inbox: Path, workdir: Path, config: AutolabelConfig, log: Callable[[str], None] = print):
        self.inbox, self.workdir, self.config, self.log = Path(inbox), Path(workdir), config, log
        check_folders(self.inbox, self.workdir)
        check_inputs(self.inbox, config)
        self.crops = self.workdir / "crops"
        self.versions = self.workdir / "versions"
        self.state = StateDB(self.workdir / STATE)
        self.stop = threading.Event()
        self._detector: Detector | None = None
        self._model: EmbeddingModel | None = None
        self.unmovable: set[int] = set()  # files whose move failed, each reported once
        self.ahead: dict[Path, tuple[int, float, float]] = {}  # files dated in the future: (size, mtime, first seen)

    # Inbox

    def scan(self) -> int:
        """Register inbox files not seen before that have been left alone for `settle_seconds`; returns how many.

        A file that looks cut short (empty, or see `truncation_problem`) waits INCOMPLETE_SETTLE_FACTOR times
        as long: a copy that pauses would otherwise be decided as truncated and moved to error/ mid-copy.
        """
        known = self.state.unmoved_sources()
        now, settle = time.time(), self.config.settle_seconds
        found = []
        for path in self.inbox_files():
            album, *rest = path.relative_to(self.inbox).parts
            album, name = (album, Path(*rest).as_posix()) if rest else (ROOT_ALBUM, album)
            if (album, name) in known:
                continue
            stat = path.stat()
            age = now - stat.st_mtime
            if age < 0:  # dated ahead of this clock (a camera's, an archive's): quiet since first seen instead
                seen = self.ahead.get(path)
                if seen is None or seen[:2] != (stat.st_size, stat.st_mtime):
                    self.ahead[path] = seen = (stat.st_size, stat.st_mtime, now)
                age = now - seen[2]
            if age >= settle and (age >= settle * INCOMPLETE_SETTLE_FACTOR or not self.looks_cut_short(path)):
                found.append((album, name))
                self.ahead.pop(path, None)
        if found:
            self.state.register(found)
        return len(found)

    def looks_cut_short(self, path: Path) -> bool:
        try:
            size = path.stat().st_size
            if size > self.config.max_file_mb * 1e6:
                return False  # decided as huge without reading it, at any age
            return not size or truncation_problem(path.read_bytes()) is not None
        except OSError:
            return False  # decided (as unreadable) like any other file

    def inbox_files(self) -> list[Path]:
        """Every file of the inbox but hidden ones, in a fixed order. Album folders that are links are followed (each
        real folder once); a name that is not UTF-8 (the database stores text) is first renamed to its escaped form."""
        files, seen, inside = [], set(), self.inbox.resolve()
        for folder, subfolders, names in os.walk(self.inbox, followlinks=True):
            if (real := os.path.realpath(folder)) in seen:
                subfolders.clear()
                continue
            seen.add(real)
            self.check_inbox_folder(Path(folder), Path(real), linked=not Path(real).is_relative_to(inside))
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            files += [Path(folder, name) for name in names if not name.startswith(".")]
        return sorted(self.utf8_named(path) for path in files if path.is_file())

    def check_inbox_folder(self, folder: Path, real: Path, linked: bool) -> None:
        """An inbox folder must not be another daemon's work folder nor, reached through a link, lead into the work
        folder, the model checkpoint or a reference folder, hold one, or lead into another daemon's: the daemon would
        take that daemon's files, its own output as new photos round after round, or the files it reads. Checked on
        every scan: a link may be made while the daemon runs."""
        if linked:
            work = self.workdir.resolve()
            if real.is_relative_to(work):
                raise AutolabelError(f"{folder}: leads into the work folder {self.workdir}; {OWN_OUTPUT}")
            if work.is_relative_to(real):
                raise AutolabelError(f"{folder}: holds the work folder {self.workdir}; {OWN_OUTPUT}")
            for key, value, input_real in input_paths(self.config):  # the inbox itself is checked by check_inputs
                if overlap(real, input_real):
                    raise AutolabelError(
                        f"{folder}: links to {key}={value} or a folder holding it; the daemon would move its files away"
                    )
        # A folder's parents inside the inbox were walked before it, and the inbox's own checked up front.
        if owner := next((f for f in (real, *(real.parents if linked else ())) if is_work_folder(f)), None):
            raise AutolabelError(
                f"{folder}: the inbox reaches into the autolabel work folder {owner}; the daemon would take its files"
            )

    def utf8_named(self, path: Path) -> Path:
        relative = path.relative_to(self.inbox).as_posix()
        try:
            relative.encode()
            return path
        except UnicodeEncodeError:
            escaped = os.fsencode(relative).decode(errors="backslashreplace")
        renamed = self.inbox / escaped
        if renamed.exists():  # never rename over a file: the inode number tells the two apart
            renamed = renamed.with_name(f"{renamed.stem}~{path.stat().st_ino}{renamed.suffix}")
        renamed.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, renamed)
        self.log(f"{escaped}: renamed from a file name that is not UTF-8")
        return renamed

    def inbox_path(self, album: str, name: str) -> Path:
        return self.inbox / album / name

    def move_decided(self) -> None:
        """Move every decided file to its outcome folder; redone safely after a crash.

        A file whose bytes are no longer those decided (replaced under the same name) is not moved: the database
        lets it go, and the next scan registers it as a new file. A file that cannot be moved (permissions) stays
        in the inbox, and the move is tried again on every pass.
        """
        for file_id, album, name, sha256, destination in self.state.unmoved_outcomes():
            source = self.inbox_path(album, name)
            present = os.path.lexists(source)  # a link whose target has gone is still moved, not left behind
            try:
                if present and (sha256 is None or sha256_of(source) == sha256):
                    planned = self.workdir / destination
                    moved = move_file(source, planned, partial(self.record_beside, file_id, destination))
                    if moved != planned:
                        self.log(f"{album}/{name}: {destination} holds another file; moved to {moved.name} beside it")
                elif present:
                    self.log(f"{album}/{name}: replaced after it was decided; it will be decided as a new file")
                else:
                    self.log(f"{album}/{name}: gone from the inbox before it was moved")
            except OSError as err:
                if file_id not in self.unmovable:
                    self.unmovable.add(file_id)
                    self.log(f"{album}/{name}: cannot move it out of the inbox ({err.strerror or err}); will retry")
                continue
            self.state.mark_moved(file_id)

    def record_beside(self, file_id: int, destination: str, where: Path) -> None:
        """Where a file goes when its planned destination holds another, recorded before it leaves the inbox."""
        if (placed := where.relative_to(self.workdir).as_posix()) != destination:
            self.state.set_destination(file_id, placed)

    # Models

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            options = {"min_face_size": self.config.min_face_size} if self.config.detector != "center" else {}
            self._detector = get_detector(self.config.detector, **options)
        return self._detector

    def model_for(self, key: str, source: str) -> EmbeddingModel:
        if self._model is None or self._model.key != key:
            self.log(f"embedding model: {source}")
            self._model = load_embedding_model(key, source, self.config.tracking_uri)
        return self._model

    # Rounds

    def next_round(self) -> Round | None:
        """The open round (a crash interrupted it), or a new one if files arrived or the model changed."""
        if (current := self.state.open_round()) is not None:
            return current
        key, source = resolve_model(self.config.model, self.config.tracking_uri)
        last = self.state.last_round()
        if self.state.unassigned_count() or (last is not None and last.model != key):
            check_embeds(self.model_for(key, source))  # an open round keeps its model, so it must work first
            # Past every version on disk too: a state database started afresh must not take up an old number.
            written = max(map(version_number, list_versions(self.versions)), default=0)
            return self.state.start_round(key, self.pinned(key, source), after=written)
        return None

    def pinned(self, key: str, source: str) -> str:
        """A checkpoint's weights copied into the work folder, the only copy kept: training may write a new
        model.pt where this one came from, and a round resumed after a crash must embed with the weights it
        started with (its embeddings are stored under their hash)."""
        if not key.startswith(CHECKPOINT_KEY):
            return source
        pinned = self.workdir / "models" / key.removeprefix(CHECKPOINT_KEY)
        if not (pinned / "model.pt").is_file():
            data = (Path(source) / "model.pt").read_bytes()
            if checkpoint_key(hashlib.sha256(data).hexdigest()) != key:
                raise AutolabelError(f"{source}: its model.pt changed while it was read; trying again")
            write_atomic(pinned / "model.pt", data)
        for other in (self.workdir / "models").iterdir():
            if other != pinned:
                shutil.rmtree(other, ignore_errors=True)
        return str(pinned)

    def run_once(self) -> RoundReport | None:
        """Scan, then run a round if there is anything to do; None if there was not."""
        self.retry_retraining()
        self.move_decided()
        self.scan()
        current = self.next_round()
        if current is None:
            return None
        self.log(f"round {current.number}: {current.files} new file(s), model {current.model}")
        model = self.model_for(current.model, current.model_source)
        while not self.stop.is_set() and (pending := self.state.pending_files(current.number)):
            batch = pending[: self.config.batch_files]
            self.state.record_batch(self.decide(batch, model))
            self.move_decided()
            self.state.beat(f"round {current.number}: {len(pending) - len(batch)} file(s) to go")
        if self.stop.is_set():
            return None
        return self.finish_round(current, model)

    def decide(self, batch: Sequence[InboxFile], model: EmbeddingModel) -> list[Decided]:
        """The outcome of each file of a batch; a bad file is an outcome, never an exception.

        Detection runs once over the batch's photos and embedding once over all their faces.
        """
        decided: dict[int, Decided] = {}
        photos: list[tuple[InboxFile, str, np.ndarray]] = []
        batch_copies: dict[str, str] = {}
        for file in batch:
            path = self.inbox_path(file.album, file.name)
            try:
                with path.open("rb") as stream:  # a huge file is hashed as a stream, never read whole
                    problem = file_problem(path, os.fstat(stream.fileno()).st_size, self.config.max_file_mb * 1e6)
                    data = b"" if problem else stream.read()
                    sha256 = (hashlib.file_digest(stream, "sha256") if problem else hashlib.sha256(data)).hexdigest()
            except OSError as err:
                gone = not os.path.lexists(path)  # moved or renamed away since the scan: no outcome of its own
                problem = None if gone else f"unreadable: {err.strerror or err}"
                decided[file.id] = (file, None, GONE if gone else "error", problem, [])
                continue
            try:
                if problem := problem or truncation_problem(data):
                    decided[file.id] = (file, sha256, "error", problem, [])
                    continue
                image = decode_image(data, file.source)
            except ImageDecodeError as err:
                decided[file.id] = (file, sha256, "error", decode_problem(err), [])
                continue
            if original := batch_copies.get(sha256) or self.state.earlier_copy(sha256, file.id):
                decided[file.id] = (file, sha256, "rejected", f"duplicate: same bytes as {original}", [])
                continue
            batch_copies[sha256] = file.source
            photos.append((file, sha256, image))
        detections = self.detector.detect([image for _, _, image in photos]) if photos else []
        crops = [
            align_face(image, landmarks, CROP_SIZE)
            for (_, _, image), found in zip(photos, detections, strict=True)
            for landmarks in found.landmarks
        ]
        vectors, norms = embed_crops(model, crops, self.config.embed_batch) if crops else (None, None)
        face_index = 0
        for (file, sha256, _), found in zip(photos, detections, strict=True):
            faces = []
            for k in range(len(found)):
                crop, vector, norm = crops[face_index], vectors[face_index], float(norms[face_index])
                face_index += 1
                faces.append(self.assess(f"{sha256[:32]}_{k}", crop, found, k, vector, norm))
            decided[file.id] = outcome_of(file, sha256, faces)
        kept = [face for *_, faces in decided.values() for face in faces if face.reason is None]
        if kept:
            self.state.store_embeddings(model.key, [f.face for f in kept], np.stack([f.vector for f in kept]))
        return [decided[file.id] for file in batch]

    def assess(
        self, face: str, crop: np.ndarray, found: Detections, k: int, vector: np.ndarray, norm: float
    ) -> FaceOutcome:
        """Score a face's quality; a face that passes has its crop stored before its batch commits."""
        score = score_face(crop, found.landmarks[k], norm)
        reasons = score.reasons(self.config.quality)
        if not reasons:
            write_atomic(self.crops / f"{face}.jpg", encode_jpeg(crop))
        return FaceOutcome(
            face=face,
            box=[round(float(v), 1) for v in found.boxes[k]],
            landmarks=[[round(float(x), 2), round(float(y), 2)] for x, y in found.landmarks[k]],
            quality=score.to_dict(),
            score=float(score.score),
            reason=", ".join(reasons) if reasons else None,
            vector=None if reasons else vector,
        )

    def features_of(self, faces: list[dict], model: EmbeddingModel) -> np.ndarray:
        """The model's embedding of every face; faces it has not embedded yet (a new champion) are re-embedded."""
        return self.cached_embeddings(model, [f["face"] for f in faces], lambda face: self.crops / f"{face}.jpg")

    def fingerprints_of(self, faces: list[dict]) -> np.ndarray:
        """Every face's crop fingerprint (see `crop_fingerprint`), computed once per face."""
        keys = [f["face"] for f in faces]
        return self.cached_vectors(
            FINGERPRINT_KEY,
            keys,
            lambda key: self.crops / f"{key}.jpg",
            lambda crops: np.stack([crop_fingerprint(crop) for crop in crops]),
        )

    def cached_embeddings(self, model: EmbeddingModel, keys: list[str], crop_path: Callable[[str], Path]) -> np.ndarray:
        """Embeddings by key from the state database, computing and storing only those this model lacks."""
        return self.cached_vectors(
            model.key, keys, crop_path, lambda crops: embed_crops(model, crops, self.config.embed_batch)[0]
        )

    def cached_vectors(
        self,
        kind: str,
        keys: list[str],
        crop_path: Callable[[str], Path],
        compute: Callable[[list[np.ndarray]], np.ndarray],
    ) -> np.ndarray:
        """Vectors of one kind (a model's embeddings, or fingerprints) by key from the state database, computing and
        storing only those missing."""
        stored = self.state.embeddings(kind, keys)
        missing = [key for key in dict.fromkeys(keys) if key not in stored]
        for start in range(0, len(missing), 1024):
            chunk = missing[start : start + 1024]
            vectors = compute([read_crop(crop_path(key)) for key in chunk])
            self.state.store_embeddings(kind, chunk, vectors)
            stored.update(zip(chunk, vectors, strict=True))
        return np.stack([stored[key] for key in keys]) if keys else np.zeros((0, 1), dtype=np.float32)

    def finish_round(self, current: Round, model: EmbeddingModel) -> RoundReport:
        self.state.beat(f"round {current.number}: clustering and writing the version")
        faces = self.state.kept_faces()
        features = self.features_of(faces, model)
        fingerprints = self.fingerprints_of(faces)
        labelled = label_identities(faces, features, fingerprints, self.config, self.reference_sets(model))
        previous = list_versions(self.versions)
        new_people = count_new_identities(labelled.records, current.number)
        stats = {
            "round": current.number,
            "model": current.model,
            "files": self.state.outcome_counts(),
            "thresholds": labelled.thresholds,
            "new_identities": new_people,
            "unclustered_faces": labelled.unclustered,
        }
        name = version_name(current.number)
        path = write_version(self.versions, current.number, labelled.records, self.crops, labelled.decisions, stats)
        last = self.state.last_round()
        job_id = self.enqueue_retraining(path, new_people + awaiting(last.job_id if last else None), current.started)
        self.state.finish_round(current.number, name, job_id)
        seconds = time.time() - current.started
        self.log(
            f"round {current.number}: {name} with {len(labelled.records)} faces of "
            f"{len({r.identity for r in labelled.records})} identities ({new_people} new) in {seconds:.1f} s"
            + (f"; previous {previous[-1].name}" if previous else "")
        )
        return RoundReport(
            current.number, name, current.files, seconds, json.loads((path / "stats.json").read_text()), job_id
        )

    def reference_sets(self, model: EmbeddingModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Embeddings and names of the known (training), evaluation and calibration identity folders, if configured."""
        dedup = self.config.dedup
        sets = {}
        for kind, root in (
            ("known", dedup.known_root),
            ("eval", dedup.eval_root),
            ("calibration", dedup.calibration_root),
        ):
            if root:
                sets[kind] = self.embed_folder(Path(root), model)
        return sets

    def embed_folder(self, root: Path, model: EmbeddingModel) -> tuple[np.ndarray, np.ndarray]:
        """An identity folder of aligned crops: (embeddings, identity name per image).

        Cached by file content, so each round embeds only the images this model has not seen: a folder can
        change between rounds, and a training set is large next to a round's new faces.
        """
        from faceforge.data.folder import ImageFolderDataset

        if not root.is_dir():
            raise AutolabelError(f"{root}: identity folder not found")
        folder = ImageFolderDataset(root)
        keys = ["ref:" + hashlib.sha256(Path(path).read_bytes()).hexdigest() for path, _ in folder.samples]
        paths = {key: Path(path) for key, (path, _) in zip(keys, folder.samples, strict=True)}
        names = np.array([folder.classes[label] for _, label in folder.samples])
        return self.cached_embeddings(model, keys, paths.__getitem__), names

    def enqueue_retraining(self, version: Path, new_people: int, round_started: float) -> str | None:
        """maybe_retrain, except that a job store that cannot take the job leaves the round finished with its
        retraining pending (`pending:<new identities>`), which each later pass tries again, and a later round adds
        its own new identities to: the version is what the round is for, and later files must not wait for the
        job store."""
        try:
            return self.maybe_retrain(version, new_people, round_started)
        except OSError as err:
            self.log(f"{version.name}: could not enqueue retraining ({err}); trying again each pass")
            return f"{RETRAIN_PENDING}{new_people}"

    def retry_retraining(self) -> None:
        """Enqueue the retraining the last round could not; only the last is pending, its version holding the
        faces of every earlier one."""
        last = self.state.last_round()
        if last is not None and last.version is not None and (new_people := awaiting(last.job_id)):
            job_id = self.enqueue_retraining(self.versions / last.version, new_people, last.started)
            self.state.set_job(last.number, job_id)

    def maybe_retrain(self, version: Path, new_people: int, round_started: float) -> str | None:
        """Enqueue retraining on a version once: its job id derives from the version and its round, so a daemon
        killed after the submit and before the round was recorded finds the job instead of submitting another."""
        settings = self.config.retrain
        if settings.min_new_identities <= 0 or new_people < settings.min_new_identities:
            return None
        from faceforge.jobs import JobStore, make_jobs, quoted_path
        from faceforge.jobs.paths import store_path

        store, key = JobStore(store_path()), f"{version.resolve()}@{round_started!r}"
        job_id = f"job-autolabel-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        try:
            store.get(job_id)
            return job_id
        except KeyError:
            pass
        overrides = ["data=folder", f"data.root={quoted_path((version / 'images').resolve())}", *settings.overrides]
        (job,) = make_jobs(overrides, name=f"retrain on autolabel {version.name}")
        job.id = job_id
        store.submit([job])
        self.log(f"{new_people} new identities: enqueued retraining job {job.id}")
        return job.id

    def watch(self) -> None:
        """Run rounds until stopped (SIGTERM or SIGINT finish the batch in flight, then exit). A pass that fails
        is logged and tried again after `poll_seconds`, like the scheduler's ticks: the daemon outlives it."""
        waiting = ""
        with self._signals_stop():
            while not self.stop.is_set():
                try:
                    report, idle = self.run_once(), "idle"
                except AutolabelError as err:  # no champion registered yet: the files wait in the inbox
                    report, idle = None, f"waiting: {err}"
                except Exception as err:  # a full disk, say: a batch commits whole or not at all, so try again later
                    report, idle = None, f"error: {type(err).__name__}: {err}"
                    if idle != waiting:
                        self.log(traceback.format_exc().rstrip())
                if idle not in (waiting, "idle"):
                    self.log(idle)
                waiting = idle
                if report is None and not self.stop.is_set():
                    self.state.beat(idle)
                    self.stop.wait(self.config.poll_seconds)

    @contextmanager
    def _signals_stop(self) -> Iterator[None]:
        handlers = {sig: signal.signal(sig, lambda *_: self.stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


@contextmanager
def exclusive(workdir: Path, inbox: Path) -> Iterator[None]:
    """One daemon per work folder and per inbox: a second one fails within a second instead of racing the first
    (two work folders on one inbox would both label, and move, the same photos).

    It retries for that second because `daemon_running` (status, the web page) takes the lock for an instant.
    The inbox is locked as a directory, so nothing is written into it. Nested inboxes are refused through lock
    files of the daemons' own (`inbox_lock`): the inbox's exclusively, each folder holding it shared. Locks on the
    folders themselves would meet other programs' (the demo locks its home, which holds its inbox).
    """
    check_folders(inbox, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    real = inbox.resolve()
    INBOX_LOCKS.mkdir(exist_ok=True)
    if INBOX_LOCKS.stat().st_uid == os.getuid():
        INBOX_LOCKS.chmod(0o1777)  # like /tmp: every user's daemons lock here, none removes another's files
    with ExitStack() as locks:
        locks.enter_context(
            _locked(workdir / LOCK, f"{workdir}: another autolabel daemon is running on this work folder")
        )
        locks.enter_context(_locked(inbox, f"{inbox}: another autolabel daemon is taking files from this inbox"))
        taken = f"{inbox}: another autolabel daemon is taking files from a folder inside it"
        locks.enter_context(_locked(inbox_lock(real), taken))
        for holder in real.parents:
            taken = f"{inbox}: another autolabel daemon is taking files from {holder}, which holds this inbox"
            locks.enter_context(_locked(inbox_lock(holder), taken, shared=True))
        yield


def inbox_lock(folder: Path) -> Path:
    """The lock file standing for `folder` among every user's daemons on this machine."""
    return INBOX_LOCKS / hashlib.sha256(os.fsencode(folder)).hexdigest()[:32]


def awaiting(job_id: str | None) -> int:
    """New identities whose retraining the job store could not take yet, recorded as their round's job id."""
    return int(job_id.removeprefix(RETRAIN_PENDING)) if job_id and job_id.startswith(RETRAIN_PENDING) else 0


def check_folders(inbox: Path, workdir: Path) -> None:
    """Refuse an inbox and a work folder that overlap, or an inbox inside another daemon's work folder: the daemon
    takes every file of its inbox, so it would label its own output round after round (error/ files are errors
    again each round, a new version each time), empty its versions or state, or take another daemon's files."""
    if not inbox.is_dir():
        raise AutolabelError(f"{inbox}: inbox folder not found")
    inbox_real, work_real = inbox.resolve(), workdir.resolve()
    if work_real.is_relative_to(inbox_real):
        raise AutolabelError(f"{workdir}: the work folder must not be inside the inbox")
    if inbox_real.is_relative_to(work_real):
        raise AutolabelError(f"{inbox}: the inbox must not be inside the work folder {workdir}; {OWN_OUTPUT}")
    if owner := next((f for f in (inbox_real, *inbox_real.parents) if is_work_folder(f)), None):
        raise AutolabelError(
            f"{inbox}: the inbox is inside the autolabel work folder {owner}; the daemon would take its files"
        )
    for name in WORK_FOLDERS:  # a link made by hand, to put versions on a bigger disk say
        if (workdir / name).resolve().is_relative_to(inbox_real):
            raise AutolabelError(f"{workdir / name}: leads into the inbox {inbox}; {OWN_OUTPUT}")


def check_inputs(inbox: Path, config: AutolabelConfig) -> None:
    """The model checkpoint and the reference folders must not overlap the inbox: the daemon would move their files
    away as photos (and a reference folder holding the inbox would change under it with every move)."""
    inbox_real = inbox.resolve()
    for key, value, real in input_paths(config):
        if overlap(real, inbox_real):
            raise AutolabelError(f"{key}={value} and the inbox {inbox} must not hold one another")


def input_paths(config: AutolabelConfig) -> list[tuple[str, str, Path]]:
    """(setting, value, real path) of each existing file or folder the daemon reads and must never take from."""
    dedup = config.dedup
    settings = (
        ("model", config.model),
        ("dedup.known_root", dedup.known_root),
        ("dedup.eval_root", dedup.eval_root),
        ("dedup.calibration_root", dedup.calibration_root),
    )
    return [(key, value, Path(value).resolve()) for key, value in settings if value and Path(value).exists()]


def overlap(one: Path, other: Path) -> bool:
    return one.is_relative_to(other) or other.is_relative_to(one)


def is_work_folder(folder: Path) -> bool:
    return (folder / STATE).is_file() and (folder / LOCK).is_file()


@contextmanager
def _locked(path: Path, taken: str, shared: bool = False) -> Iterator[None]:
    """flock on `path`, a directory or a lock file (created if missing), exclusive unless `shared`."""
    descriptor = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_PATIENCE_SECONDS
        while True:
            try:
                fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AutolabelError(taken) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(descriptor)


def daemon_running(workdir: Path) -> bool:
    path = workdir / LOCK
    if not path.exists():
        return False
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def outcome_of(file: InboxFile, sha256: str, faces: list[FaceOutcome]) -> Decided:
    """Labelled if any face passed; otherwise rejected, for want of a face or for every reason a face failed."""
    if not faces:
        return file, sha256, "rejected", "no_face: the detector found none", []
    if any(face.reason is None for face in faces):
        return file, sha256, "labelled", None, faces
    reasons = sorted({r for face in faces for r in (face.reason or "").split(", ")})
    return file, sha256, "rejected", f"low_quality: {', '.join(reasons)}", faces


def move_file(source: Path, target: Path, placed: Callable[[Path], None] = lambda where: None) -> Path:
    """Move a file, never over another: a state database started afresh numbers files from 1 again, so `target`
    may hold an earlier photo; the file then goes beside it as `<stem>~<n><suffix>`. Returns where it went, also
    told to `placed` before the source goes, so that a record of it survives a crash at any step.

    A hard link then an unlink, or, across file systems or on one without hard links, a whole copy then an unlink;
    a source that cannot be removed leaves no copy. A target that is already the same file is a move a crash cut
    short: only the unlink is left to do.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = numbered(target, n) if n else target
        try:
            place(source, candidate)
        except FileExistsError:
            if not same_file(source, candidate):
                n += 1
                continue
            placed(candidate)
            source.unlink()
            return candidate
        try:
            placed(candidate)
            source.unlink()
        except BaseException:
            candidate.unlink()
            raise
        return candidate


def place(source: Path, target: Path) -> None:
    """A second name (or a whole copy) of `source` at `target`; FileExistsError if a file holds `target`."""
    if link(source, target):
        return
    temporary = target.parent / ".moving.tmp"  # one move at a time: the work folder has one daemon
    try:
        shutil.copyfile(source, temporary)
        if not link(temporary, target):  # no hard links here, and the daemon alone writes its work folder
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
            os.rename(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def link(source: Path, target: Path) -> bool:
    """Hard-link `source` (a link itself, not what it points to) at `target`, which fails if a file holds it;
    False where the two are on different file systems or the file system has no hard links."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            return False
        raise
    return True


def same_file(one: Path, other: Path) -> bool:
    """The same inode, or the same bytes: across file systems `place` copies what a linked source points to."""
    if os.path.samestat(os.lstat(one), os.lstat(other)):
        return True
    try:
        regular = S_ISREG(os.stat(one).st_mode) and S_ISREG(os.stat(other).st_mode)
    except FileNotFoundError:  # a link to nowhere
        return False
    return regular and filecmp.cmp(one, other, shallow=False)


def numbered(target: Path, n: int) -> Path:
    """`<stem>~<n><suffix>`, its stem cut to keep within the 255 bytes a file name may have."""
    tail = f"~{n}{target.suffix}"
    return target.with_name(cut_utf8(target.stem, 255 - len(tail.encode())) + tail)


def encode_jpeg(crop: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def read_crop(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), str(path))


# Labelling: clusters, merges and drops


@dataclass
class Labelled:
    records: list[FaceRecord]
    decisions: list[dict]
    thresholds: dict[str, float]
    unclustered: int


def _decision(decision: Decision, names: Callable[[int | str], str]) -> dict:
    record = asdict(decision)
    record["subject"], record["target"] = names(decision.subject), names(decision.target)
    return record


def label_identities(
    faces: list[dict], features: np.ndarray, fingerprints: np.ndarray, config: AutolabelConfig, references: dict
) -> Labelled:
    """Drop near copies, cluster each album, merge albums, match known and evaluation identities, name people."""
    thresholds = calibrated_thresholds(config.dedup, references)
    if not faces:
        return Labelled([], [], thresholds, 0)
    face_name = [f["face"] for f in faces]
    # Faces of earlier rounds were scored with other models' norms: copies are ranked on what all share.
    quality = np.array([QualityScore.from_dict(f["quality"]).heuristic for f in faces])
    # A re-encoded or resized copy is a copy wherever it was put: any two faces, before clustering counts them.
    copies = CopyEvidence(fingerprints, config.dedup.copy_pixel_threshold, thresholds["album"])
    near = near_duplicates(features, quality, None, config.dedup.near_threshold, copies=copies)
    decisions = [_decision(d, lambda i: face_name[i]) for d in near]
    keep = np.ones(len(faces), dtype=bool)
    keep[[d.subject for d in near]] = False
    rows = np.flatnonzero(keep)
    albums = np.array([faces[row]["album"] for row in rows])
    clusters = np.zeros(len(rows), dtype=np.int64)
    for album in np.unique(albums):
        members = np.flatnonzero(albums == album)
        if len(members) > 1:
            k = min(config.cluster.neighbours, len(members) - 1)
            indices, sims = knn_graph(features[rows[members]], k, "exact")
            clusters[members] = CLUSTERERS[config.cluster.method](indices, sims, config.cluster.threshold)
    identity, merges = merge_albums(features[rows], albums, clusters, thresholds["album"], config.dedup.album_margin)
    decisions += [asdict(d) for d in merges]
    first_face: dict[int, str] = {}
    for person, row in zip(identity.tolist(), rows.tolist(), strict=True):
        first_face[person] = min(first_face.get(person, face_name[row]), face_name[row])
    names = np.array([f"id_{first_face[person][:12]}" for person in identity.tolist()])
    named = match_references(features[rows], names, references, thresholds, decisions)
    sizes = Counter(named)
    records = []
    unclustered = 0
    for position, (row, person) in enumerate(zip(rows.tolist(), named, strict=True)):
        if person is None:
            continue
        if sizes[person] < config.cluster.min_size:
            unclustered += 1
            continue
        face = faces[row]
        records.append(
            FaceRecord(
                face=face["face"],
                image_sha256=face["sha256"],
                source=f"{face['album']}/{face['name']}",
                album=face["album"],
                box=face["box"],
                landmarks=face["landmarks"],
                quality=face["quality"],
                cluster=int(clusters[position]),
                identity=person,
                round=face["round"],
            )
        )
    return Labelled(records, decisions, thresholds, unclustered)


def match_references(
    features: np.ndarray, names: np.ndarray, references: dict, thresholds: dict, decisions: list[dict]
) -> list[str | None]:
    """Rename identities that are known training identities; None for those of an evaluation set (dropped)."""
    keys, centroids = cluster_centroids(features, names)
    renamed: dict[str, str | None] = {}
    if "known" in references:
        known_keys, known_centres = cluster_centroids(*references["known"])
        for d in match_known_identities(list(keys), centroids, known_centres, list(known_keys), thresholds["known"]):
            decisions.append(asdict(d))
            renamed[str(d.subject)] = f"known_{d.target}"
    if "eval" in references:
        eval_keys, eval_centres = cluster_centroids(*references["eval"])
        for d in drop_evaluation_identities(list(keys), centroids, eval_centres, list(eval_keys), thresholds["eval"]):
            decisions.append(asdict(d))
            renamed[str(d.subject)] = None
    return [renamed.get(n, n) for n in names.tolist()]


def calibrated_thresholds(
    settings: DedupSettings, references: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, float]:
    """The configured cosine thresholds, or with `calibrate`: all three at `fmr` on the genuine and impostor pairs
    of the calibration folder (else the known one); then, with a calibration folder, the known and evaluation
    thresholds at `fpir` of its people searched against all of the known (evaluation) people."""
    thresholds = {"album": settings.album_threshold, "known": settings.known_threshold, "eval": settings.eval_threshold}
    if not settings.calibrate:
        return thresholds
    labelled = references.get("calibration", references.get("known"))
    folder = "dedup.calibration_root" if "calibration" in references else "dedup.known_root"
    if labelled is not None:  # too few pairs for the rate is an error: the configured thresholds may be far off
        genuine, impostor = pair_scores(*labelled)
        try:
            value = round(calibrate_threshold(genuine, impostor, settings.fmr).threshold, 6)
        except ValueError as err:
            raise AutolabelError(f"dedup.calibrate on {folder}: {err}; add people there or raise dedup.fmr") from None
        thresholds = dict.fromkeys(thresholds, value)
    if "calibration" in references:
        people, centroids = cluster_centroids(*references["calibration"])
        for kind in ("known", "eval"):
            if kind in references:
                names, centres = cluster_centroids(*references[kind])
                outsiders = centroids[~np.isin(people, names)]
                if settings.fpir * len(outsiders) < 1:
                    raise AutolabelError(
                        f"dedup.calibrate: {len(outsiders)} people of {folder} outside the {kind} folder are too "
                        f"few for dedup.fpir={settings.fpir:g}; add people there or raise dedup.fpir"
                    )
                thresholds[kind] = round(open_set_threshold(outsiders, centres, settings.fpir), 6)
    return thresholds


def count_new_identities(records: Sequence[FaceRecord], round_number: int) -> int:
    """People all of whose faces arrived in this round."""
    first_round: dict[str, int] = {}
    for record in records:
        first_round[record.identity] = min(first_round.get(record.identity, record.round), record.round)
    return sum(r == round_number for r in first_round.values())


# Status, for the CLI and the web UI


def status(workdir: Path) -> dict:
    """What the daemon did last and what waits: for `faceforge autolabel status` and the datasets page."""
    if not (workdir / STATE).is_file():
        return {"workdir": str(workdir), "running": False, "rounds": [], "files": {}, "versions": [],
                "retraining_job": None, "retraining_pending": 0}  # fmt: skip
    state = StateDB(workdir / STATE)
    try:
        rounds = state.rounds()
        beat = state.heartbeat()
        files = state.outcome_counts()
        problems = state.recent_problems()
    finally:
        state.close()
    done = [r for r in rounds if r["finished"]]
    last = done[-1] if done else None
    rate = last["files"] / last["seconds"] if last and last["seconds"] else None
    job_id = last["job_id"] if last else None
    pending = awaiting(job_id)
    return {
        "workdir": str(workdir),
        "running": daemon_running(workdir),
        "heartbeat": beat,
        "rounds": rounds,
        "last_round": last,
        "files_per_second": rate,
        "retraining_job": None if pending else job_id,  # the job the last round enqueued
        "retraining_pending": pending,  # new identities whose retraining waits for the job store
        "files": files,
        "recent_problems": problems,
        "versions": [summary for v in list_versions(workdir / "versions") if (summary := version_summary(v))],
    }


def version_summary(version: Path) -> dict | None:
    """None for a folder named like a version without readable stats (a copy in progress, or damaged)."""
    try:
        stats = json.loads((version / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    keys = ("version", "round", "identities", "images", "merges", "drops", "ari_with_previous", "new_identities")
    return {"path": str(version), "created": version.stat().st_mtime, **{k: stats.get(k) for k in keys}}
