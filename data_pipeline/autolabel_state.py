"""The auto-labeller's state database: which inbox files it has seen, what became of each, and its rounds.

SQLite in WAL mode, one transaction per batch of files, so a `kill -9` loses at most the batch in flight, which
the restarted daemon does again from the start. A round's files are fixed when it opens, so a resumed round
labels exactly the files an uninterrupted one would have.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    album TEXT NOT NULL,
    name TEXT NOT NULL,
    seen REAL NOT NULL,
    round INTEGER,
    sha256 TEXT,
    outcome TEXT,            -- labelled, rejected or error; NULL while pending
    reason TEXT,             -- why it was rejected or failed: "<code>: <detail>"
    destination TEXT,        -- where the file was moved, relative to the work folder
    moved INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_pending ON files (moved, album, name);
CREATE INDEX IF NOT EXISTS files_round ON files (round, outcome);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
CREATE TABLE IF NOT EXISTS faces (
    face TEXT PRIMARY KEY,   -- <file sha256>_<face index>: also the crop's file name
    file_id INTEGER NOT NULL REFERENCES files (id),
    box TEXT NOT NULL,
    landmarks TEXT NOT NULL,
    quality TEXT NOT NULL,   -- every part of the score, JSON
    score REAL NOT NULL,
    kept INTEGER NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS embeddings (
    face TEXT NOT NULL,
    model TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (face, model)
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    model TEXT NOT NULL,     -- the key of the embedding model: a registry version or a checkpoint hash
    model_source TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    version TEXT,
    files INTEGER NOT NULL,
    seconds REAL,
    job_id TEXT
);
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 0), at REAL NOT NULL, state TEXT NOT NULL);
"""


GONE = "gone"  # a file renamed or removed from the inbox before its decision: forgotten, not an outcome
RETRAIN_PENDING = "pending:"  # a round's job id while the job store cannot take its retraining: "pending:<count>"


@dataclass(frozen=True)
class InboxFile:
    id: int
    album: str
    name: str
    round: int | None

    @property
    def source(self) -> str:
        return f"{self.album}/{self.name}"


@dataclass(frozen=True)
class Round:
    number: int
    model: str
    model_source: str
    started: float
    finished: float | None
    version: str | None
    files: int
    job_id: str | None = None


@dataclass(frozen=True)
class FaceOutcome:
    """A detected face of a file: kept for labelling, or rejected for its quality reasons."""

    face: str
    box: list[float]
    landmarks: list[list[float]]
    quality: dict[str, float | None]
    score: float
    reason: str | None
    vector: np.ndarray | None  # the embedding of a kept face


ROUND_COLUMNS = "round, model, model_source, started, finished, version, files, job_id"  # Round's fields


# What SQLite says of a file that is not a database, or whose pages are damaged; a busy or unopenable one is
# another error, for which moving the file aside would be the wrong advice.
DAMAGED = {sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT}


class StateError(ValueError):
    """The state database cannot be read: one line for the user, saying what to do."""


def outcome_name(file_id: int, name: str) -> str:
    """`<id>_<file name>` within the 255 bytes a file name may have: its stem is cut, keeping the suffix, or its end
    if the suffix alone leaves no room (no file type is that long); the id keeps it unique."""
    prefix, suffix = f"{file_id}_", Path(name).suffix
    budget = 255 - len(prefix.encode())
    if len(suffix.encode()) > budget:
        suffix = ""
    return prefix + cut_utf8(name.removesuffix(suffix), budget - len(suffix.encode())) + suffix


def cut_utf8(text: str, size: int) -> str:
    """At most `size` bytes of `text` in UTF-8, without the part of a character split by the cut."""
    return text.encode()[:size].decode(errors="ignore")


class StateDB:
    """One connection per process; every write is one short transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            self.db.close()
            if err.sqlite_errorcode & 0xFF not in DAMAGED:  # the primary code, under any extended one
                raise
            raise StateError(
                f"{path}: not a readable state database ({err}); move it aside and the next run starts a new one, "
                "which knows only the files that arrive from then on (the labelled photos and dataset versions "
                "on disk are kept)"
            ) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # Files

    def unmoved_sources(self) -> set[tuple[str, str]]:
        """Inbox files the database already holds (still in the inbox): never registered twice."""
        return set(self.db.execute("SELECT album, name FROM files WHERE moved = 0"))

    def register(self, found: Sequence[tuple[str, str]]) -> None:
        now = time.time()
        with self.transaction() as db:
            db.executemany("INSERT INTO files (album, name, seen) VALUES (?, ?, ?)", [(*f, now) for f in found])

    def unassigned_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM files WHERE round IS NULL").fetchone()[0]

    def pending_files(self, round_number: int) -> list[InboxFile]:
        rows = self.db.execute(
            "SELECT id, album, name, round FROM files WHERE round = ? AND outcome IS NULL ORDER BY album, name, id",
            (round_number,),
        )
        return [InboxFile(*row) for row in rows]

    def earlier_copy(self, sha256: str, before_id: int) -> str | None:
        """An earlier file (in processing order) with these bytes, labelled or rejected: the original."""
        row = self.db.execute(
            "SELECT album, name FROM files WHERE sha256 = ? AND outcome IN ('labelled', 'rejected') AND id != ? "
            "ORDER BY round, album, name, id LIMIT 1",
            (sha256, before_id),
        ).fetchone()
        return f"{row[0]}/{row[1]}" if row else None

    def record_batch(self, results: Sequence[tuple[InboxFile, str | None, str, str | None, list[FaceOutcome]]]) -> None:
        """(file, sha256, outcome, reason, faces) of a batch, all or nothing; the moves come after."""
        with self.transaction() as db:
            for file, sha256, outcome, reason, faces in results:
                if outcome == GONE:  # under its new name it is registered as a new file
                    db.execute("DELETE FROM files WHERE id = ?", (file.id,))
                    continue
                destination = f"{outcome}/{file.album}/{outcome_name(file.id, file.name)}"
                db.execute(
                    "UPDATE files SET sha256 = ?, outcome = ?, reason = ?, destination = ? WHERE id = ?",
                    (sha256, outcome, reason, destination, file.id),
                )
                db.executemany(
                    "INSERT OR REPLACE INTO faces VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            f.face,
                            file.id,
                            json.dumps(f.box),
                            json.dumps(f.landmarks),
                            json.dumps(f.quality),
                            f.score,
                            int(f.reason is None),
                            f.reason,
                        )
                        for f in faces
                    ],
                )

    def store_embeddings(self, model: str, faces: Sequence[str], vectors: np.ndarray) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                [
                    (face, model, np.asarray(v, dtype=np.float32).tobytes())
                    for face, v in zip(faces, vectors, strict=True)
                ],
            )

    def unmoved_outcomes(self) -> list[tuple[int, str, str, str | None, str]]:
        """(id, album, name, sha256, destination) of decided files still to be moved out of the inbox."""
        return list(
            self.db.execute(
                "SELECT id, album, name, sha256, destination FROM files "
                "WHERE outcome IS NOT NULL AND moved = 0 ORDER BY id"
            )
        )

    def mark_moved(self, file_id: int) -> None:
        self.db.execute("UPDATE files SET moved = 1 WHERE id = ?", (file_id,))

    def set_destination(self, file_id: int, destination: str) -> None:
        self.db.execute("UPDATE files SET destination = ? WHERE id = ?", (destination, file_id))

    # Faces

    def kept_faces(self) -> list[dict]:
        """Every kept face of every labelled file, in a fixed order."""
        rows = self.db.execute(
            "SELECT faces.face, files.sha256, files.album, files.name, faces.box, faces.landmarks, faces.quality, "
            "faces.score, files.round FROM faces JOIN files ON files.id = faces.file_id "
            "WHERE faces.kept = 1 AND files.outcome = 'labelled' ORDER BY faces.face"
        )
        keys = ("face", "sha256", "album", "name", "box", "landmarks", "quality", "score", "round")
        faces = [dict(zip(keys, row, strict=True)) for row in rows]
        for face in faces:
            for key in ("box", "landmarks", "quality"):
                face[key] = json.loads(face[key])
        return faces

    def embeddings(self, model: str, faces: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(faces), 500):
            chunk = list(faces[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT face, vector FROM embeddings WHERE model = ? AND face IN ({marks})", (model, *chunk)
            )
            found.update((face, np.frombuffer(blob, dtype=np.float32)) for face, blob in rows)
        return found

    # Rounds

    def open_round(self) -> Round | None:
        return self._round("finished IS NULL ORDER BY round")

    def last_round(self) -> Round | None:
        return self._round("finished IS NOT NULL ORDER BY round DESC")

    def _round(self, where: str) -> Round | None:
        row = self.db.execute(f"SELECT {ROUND_COLUMNS} FROM rounds WHERE {where} LIMIT 1").fetchone()
        return Round(*row) if row else None

    def start_round(self, model: str, model_source: str, after: int = 0) -> Round:
        """The next round, numbered past every round here and `after`; it takes every registered file no round
        has taken yet."""
        with self.transaction() as db:
            number = db.execute("SELECT MAX(COALESCE(MAX(round), 0), ?) + 1 FROM rounds", (after,)).fetchone()[0]
            files = db.execute("UPDATE files SET round = ? WHERE round IS NULL", (number,)).rowcount
            started = time.time()
            db.execute(
                "INSERT INTO rounds (round, model, model_source, started, files) VALUES (?, ?, ?, ?, ?)",
                (number, model, model_source, started, files),
            )
        return Round(number, model, model_source, started, None, None, files)

    def finish_round(self, number: int, version: str, job_id: str | None) -> None:
        """Record a round's end; an earlier round's pending retraining is passed on to this one (the caller adds its
        new identities), whose version holds its faces."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET finished = ?, version = ?, seconds = ? - started, job_id = ? WHERE round = ?",
                (now, version, now, job_id, number),
            )
            passed_on = (f"{RETRAIN_PENDING}%", number)
            db.execute("UPDATE rounds SET job_id = NULL WHERE job_id LIKE ? AND round < ?", passed_on)

    def set_job(self, number: int, job_id: str | None) -> None:
        self.db.execute("UPDATE rounds SET job_id = ? WHERE round = ?", (job_id, number))

    def rounds(self) -> list[dict]:
        cursor = self.db.execute("SELECT * FROM rounds ORDER BY round")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def outcome_counts(self) -> dict[str, int]:
        """Files per outcome and reason code (`rejected:no_face`, `error:corrupt`...), and pending."""
        counts: dict[str, int] = {}
        for outcome, reason, count in self.db.execute(
            "SELECT outcome, reason, COUNT(*) FROM files GROUP BY outcome, substr(reason, 1, instr(reason || ':', ':'))"
        ):
            key = "pending" if outcome is None else outcome if reason is None else f"{outcome}:{reason.split(':')[0]}"
            counts[key] = counts.get(key, 0) + count
        return counts

    def recent_problems(self, limit: int = 10) -> list[tuple[str, str, str]]:
        rows = self.db.execute(
            "SELECT album || '/' || name, outcome, reason FROM files WHERE outcome IN ('rejected', 'error') "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return list(rows)

    def beat(self, state: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO heartbeat VALUES (0, ?, ?)", (time.time(), state))

    def heartbeat(self) -> tuple[float, str] | None:
        row = self.db.execute("SELECT at, state FROM heartbeat").fetchone()
        return (row[0], row[1]) if row else None
