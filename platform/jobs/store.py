"""The job queue's source of truth: one SQLite file (WAL), safe for many processes, with no server.

Claiming is one leased UPDATE inside an IMMEDIATE transaction, so two schedulers never take the same
job, and the slots of running jobs never exceed an executor's capacity. A scheduler renews its lease by
heartbeat; when it dies the lease expires and another scheduler reclaims the job. Delivery is therefore at
least once: executors start a job idempotently, keyed by its id.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from faceforge.locks import held

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST = "queued", "running", "succeeded", "failed", "cancelled", "lost"
LARGEST_NUMBER = 2**31 - 1  # for numbers from users: far inside SQLite's 64-bit integers, and their sums
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED, LOST)
RETRYABLE = (CANCELLED, FAILED, LOST)
EXECUTORS = ("local", "ray")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    overrides TEXT NOT NULL,
    config_yaml TEXT NOT NULL,
    sweep_id TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    slots INTEGER NOT NULL DEFAULT 1,
    nodes INTEGER NOT NULL DEFAULT 1,
    executor TEXT NOT NULL DEFAULT 'local',
    state TEXT NOT NULL DEFAULT 'queued',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    cancelled_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    lease_owner TEXT,
    lease_expires REAL,
    handle TEXT,
    mlflow_run_id TEXT,
    exit_code INTEGER,
    log_path TEXT,
    error TEXT,
    metrics TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, executor, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_sweep ON jobs (sweep_id);
CREATE TABLE IF NOT EXISTS sweep_selections (
    sweep_id TEXT PRIMARY KEY,
    tried_at REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
"""


def _ended_sweeps(among: str = "") -> str:
    """Sweeps with no job left to run, whose champion can be chosen, and each one's latest job; `among` narrows the
    jobs looked at."""
    return (
        f"SELECT sweep_id, MAX(seq) AS seq FROM jobs WHERE sweep_id IS NOT NULL {among} GROUP BY sweep_id "
        f"HAVING SUM(state IN ('{QUEUED}', '{RUNNING}')) = 0"
    )


@dataclass
class Job:
    id: str
    name: str
    overrides: list[str]
    config_yaml: str
    sweep_id: str | None = None
    priority: int = 0
    slots: int = 1
    nodes: int = 1
    executor: str = "local"
    state: str = QUEUED
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    cancelled_at: float | None = None
    cancel_requested: bool = False
    attempts: int = 0
    max_attempts: int = 3
    lease_owner: str | None = None
    lease_expires: float | None = None
    handle: str | None = None
    mlflow_run_id: str | None = None
    exit_code: int | None = None
    log_path: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


_COLUMNS = [f.name for f in fields(Job)]


def new_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _row_to_job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["overrides"] = json.loads(values["overrides"])
    values["metrics"] = json.loads(values["metrics"] or "{}")
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)


class JobStoreBusyError(OSError):
    """Another process held the job database locked for longer than `busy_seconds`: try again, nothing changed."""


class JobStore:
    """All reads and writes of the jobs table. Every method opens its own short transaction."""

    def __init__(self, path: str | Path, busy_seconds: float = 30.0) -> None:
        """`busy_seconds`: how long a transaction waits for another writer before "database is locked"."""
        self.path, self.busy_seconds = Path(path), busy_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Turning a new file to WAL can fail at once with "locked", never waiting, while another process does the
        # same (a scheduler and the web UI started together on a new home): opening takes turns.
        with held(self.path.with_name(self.path.name + ".lock")), self._as_os_errors():
            db = sqlite3.connect(self.path, timeout=busy_seconds, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and the reverse
                selections = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sweep_selections'").fetchone()
                # A database from before the table: its ended sweeps had their turn. One transaction with the
                # table, so a process killed in between cannot leave the table without them.
                ended = f"INSERT INTO sweep_selections SELECT sweep_id, {time.time()}, 1 FROM ({_ended_sweeps()});"
                db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\n{'' if selections else ended}\nCOMMIT;")
            finally:
                db.close()

    @contextmanager
    def _as_os_errors(self) -> Iterator[None]:
        """SQLite's errors about the file as OSErrors naming it, which every command reports in one line."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):  # the caller's mistakes, not the file's
            raise
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise JobStoreBusyError(
                    f"job database {self.path} stayed locked by another process for {self.busy_seconds:g} s; "
                    "nothing was changed, try again"
                ) from None
            raise OSError(f"job database {self.path} cannot be opened: {err}") from None
        except sqlite3.DatabaseError as err:  # not a database, or a damaged one
            raise OSError(f"job database {self.path} cannot be opened: {err}") from None

    @contextmanager
    def _connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=self.busy_seconds, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            with self._as_os_errors():
                db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                yield db
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # not when BEGIN itself failed (database locked): keep that error
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def submit(self, jobs: Iterable[Job]) -> list[Job]:
        """Enqueue jobs in one transaction (a sweep is all or nothing)."""
        now = time.time()
        submitted = []
        with self._connect(immediate=True) as db:
            for job in jobs:
                if job.executor not in EXECUTORS:
                    raise ValueError(f"unknown executor {job.executor!r}; choose from {', '.join(EXECUTORS)}")
                if job.slots < 1 or job.nodes < 1:
                    raise ValueError(f"a job needs at least 1 slot and 1 node, got {job.slots} and {job.nodes}")
                if max(abs(job.priority), job.slots, job.nodes) > LARGEST_NUMBER:
                    raise ValueError(f"priority, slots and nodes must be within ±{LARGEST_NUMBER}")
                job.state, job.created_at = QUEUED, now
                values = {key: getattr(job, key) for key in _COLUMNS if key not in ("seq", "overrides", "metrics")}
                values |= {"overrides": json.dumps(job.overrides), "metrics": json.dumps(job.metrics)}
                cursor = db.execute(
                    f"INSERT INTO jobs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                    list(values.values()),
                )
                job.seq = cursor.lastrowid or 0
                submitted.append(job)
            # An optimiser's next batch joins its sweep: the champion is chosen again once that batch has ended.
            db.executemany(
                "DELETE FROM sweep_selections WHERE sweep_id = ?",
                [(job.sweep_id,) for job in submitted if job.sweep_id],
            )
        return submitted

    def get(self, job_id: str) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id!r}")
        return _row_to_job(row)

    def list(
        self,
        states: Iterable[str] | None = None,
        sweep_id: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[Job]:
        """Newest first."""
        where, args = [], []
        if states is not None:
            states = list(states)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        if sweep_id is not None:
            where.append("sweep_id = ?")
            args.append(sweep_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset]
            ).fetchall()
        return [_row_to_job(row) for row in rows]

    def positions(self) -> dict[str, int]:
        """Queue position (1 = next) of every queued job, per executor: priority first, then FIFO."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, ROW_NUMBER() OVER (PARTITION BY executor ORDER BY priority DESC, seq) AS position "
                "FROM jobs WHERE state = ?",
                (QUEUED,),
            ).fetchall()
        return {row["id"]: row["position"] for row in rows}

    def used_slots(self, executor: str) -> int:
        with self._connect() as db:
            return _used_slots(db, executor)

    def claim(self, executor: str, owner: str, capacity: int, lease_seconds: float) -> Job | None:
        """Lease the next queued job of `executor` if its slots fit in what `capacity` leaves free.

        Strict priority/FIFO order: when the head of the queue does not fit, nothing behind it jumps ahead,
        so a large job is never starved by a stream of small ones.
        """
        now = time.time()
        with self._connect(immediate=True) as db:
            head = db.execute(
                "SELECT id, slots FROM jobs WHERE state = ? AND executor = ? ORDER BY priority DESC, seq LIMIT 1",
                (QUEUED, executor),
            ).fetchone()
            if head is None or _used_slots(db, executor) + head["slots"] > capacity:
                return None
            row = db.execute(
                "UPDATE jobs SET state = ?, lease_owner = ?, lease_expires = ?, started_at = ?, "
                "attempts = attempts + 1 WHERE id = ? AND state = ? RETURNING *",
                (RUNNING, owner, now + lease_seconds, now, head["id"], QUEUED),
            ).fetchone()
        return _row_to_job(row)

    def fail_oversized(self, executor: str, capacity: int) -> list[Job]:
        """Fail queued jobs that ask for more slots than the executor has: they would block the queue forever."""
        with self._connect(immediate=True) as db:
            rows = db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, "
                "error = 'needs ' || slots || ' slots; the ' || executor || ' executor has ' || ? "
                "WHERE state = ? AND executor = ? AND slots > ? RETURNING *",
                (FAILED, time.time(), capacity, QUEUED, executor, capacity),
            ).fetchall()
        return [_row_to_job(row) for row in rows]

    def heartbeat(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Renew the lease; False when this owner lost it (expired and reclaimed, or the job ended)."""
        with self._connect(immediate=True) as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_owner = ? AND state = ?",
                (time.time() + lease_seconds, job_id, owner, RUNNING),
            )
        return cursor.rowcount == 1

    def adopt_expired(self, executor: str, owner: str, lease_seconds: float) -> list[Job]:
        """Take over running jobs whose scheduler stopped renewing their lease.

        The job may still be running under its executor, so the new owner must look at its handle before
        starting it again; that check is what keeps at-least-once delivery from becoming double runs.
        """
        now = time.time()
        with self._connect(immediate=True) as db:
            rows = db.execute(
                "UPDATE jobs SET lease_owner = ?, lease_expires = ? "
                "WHERE state = ? AND executor = ? AND lease_expires < ? RETURNING *",
                (owner, now + lease_seconds, RUNNING, executor, now),
            ).fetchall()
        return [_row_to_job(row) for row in rows]

    def update(self, job_id: str, owner: str | None = None, **values: object) -> bool:
        """Set columns of a job; with `owner`, only while that owner holds the lease."""
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job fields: {', '.join(sorted(unknown))}")
        encoded = {
            key: json.dumps(value) if key in ("overrides", "metrics") else value for key, value in values.items()
        }
        assignments = ", ".join(f"{key} = ?" for key in encoded)
        condition, args = "id = ?", [job_id]
        if owner is not None:
            condition += " AND lease_owner = ?"
            args.append(owner)
        with self._connect(immediate=True) as db:
            cursor = db.execute(f"UPDATE jobs SET {assignments} WHERE {condition}", [*encoded.values(), *args])
        return cursor.rowcount == 1

    def requeue(self, job_id: str, owner: str, error: str) -> Job:
        """Put a job whose run was lost back in the queue, or mark it lost after max_attempts; a job whose cancel
        was asked for meanwhile is cancelled instead."""
        now = time.time()
        with self._connect(immediate=True) as db:
            row = db.execute(
                "UPDATE jobs SET state = CASE WHEN cancel_requested THEN ? WHEN attempts < max_attempts THEN ? "
                "ELSE ? END, "
                "finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts THEN ? END, "
                "cancelled_at = CASE WHEN cancel_requested THEN ? ELSE cancelled_at END, "
                "lease_owner = NULL, lease_expires = NULL, handle = NULL, error = ? "
                "WHERE id = ? AND lease_owner = ? RETURNING *",
                (CANCELLED, QUEUED, LOST, now, now, error, job_id, owner),
            ).fetchone()
        if row is None:
            raise KeyError(f"job {job_id!r} is not leased by {owner}")
        return _row_to_job(row)

    def finish(
        self, job_id: str, owner: str, state: str, exit_code: int | None = None, error: str | None = None
    ) -> bool:
        if state not in TERMINAL:
            raise ValueError(f"{state!r} is not a terminal state")
        now = time.time()
        with self._connect(immediate=True) as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, exit_code = ?, error = ?, finished_at = ?, "
                "cancelled_at = CASE WHEN ? = 'cancelled' THEN ? ELSE cancelled_at END, "
                "lease_owner = NULL, lease_expires = NULL WHERE id = ? AND lease_owner = ? AND state = ?",
                (state, exit_code, error, now, state, now, job_id, owner, RUNNING),
            )
        return cursor.rowcount == 1

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once; ask the owning scheduler to stop a running one. A job that has ended is
        returned as it ended: its record must not say a cancel was asked of it (callers check `terminal` first)."""
        now = time.time()
        with self._connect(immediate=True) as db:
            row = (
                db.execute(
                    "UPDATE jobs SET cancel_requested = 1, "
                    "state = CASE WHEN state = ? THEN ? ELSE state END, "
                    "cancelled_at = CASE WHEN state = ? THEN ? ELSE cancelled_at END, "
                    "finished_at = CASE WHEN state = ? THEN ? ELSE finished_at END "
                    f"WHERE id = ? AND state NOT IN ({', '.join('?' * len(TERMINAL))}) RETURNING *",
                    (QUEUED, CANCELLED, QUEUED, now, QUEUED, now, job_id, *TERMINAL),
                ).fetchone()
                or db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            )
        if row is None:
            raise KeyError(f"no job {job_id!r}")
        return _row_to_job(row)

    def claim_ended_sweeps(self, retry_seconds: float) -> list[Job]:
        """The latest job of each sweep that has no job left to run and no champion chosen yet, however its last
        job ended (finished, failed to start, cancelled while queued, lost). Each sweep is claimed for
        `retry_seconds`, so one scheduler chooses it, and any takes it up again if that one fails or dies."""
        now = time.time()
        untaken = "AND sweep_id NOT IN (SELECT sweep_id FROM sweep_selections WHERE done OR tried_at > ?)"
        query = f"SELECT jobs.* FROM ({_ended_sweeps(untaken)}) AS ended JOIN jobs ON jobs.seq = ended.seq"
        with self._connect() as db:  # most ticks find none: a read takes no write lock
            if db.execute(query, (now - retry_seconds,)).fetchone() is None:
                return []
        with self._connect(immediate=True) as db:
            rows = db.execute(query, (now - retry_seconds,)).fetchall()
            db.executemany(
                "INSERT INTO sweep_selections (sweep_id, tried_at) VALUES (?, ?) "
                "ON CONFLICT (sweep_id) DO UPDATE SET tried_at = excluded.tried_at",
                [(row["sweep_id"], now) for row in rows],
            )
        return [_row_to_job(row) for row in rows]

    def sweep_selected(self, sweep_id: str) -> None:
        """Its champion is chosen (or none qualified): not claimed again unless a job of it is retried."""
        with self._connect(immediate=True) as db:
            db.execute("UPDATE sweep_selections SET done = 1 WHERE sweep_id = ?", (sweep_id,))

    def retry(self, job_id: str) -> Job:
        """Queue a cancelled, failed or lost job again under its own id: the row alone. Callers use
        faceforge.jobs.retry, which also clears what the job's last run left in its directory."""
        with self._connect(immediate=True) as db:
            row = db.execute(
                "UPDATE jobs SET state = ?, cancel_requested = 0, attempts = 0, started_at = NULL, "
                "finished_at = NULL, cancelled_at = NULL, lease_owner = NULL, lease_expires = NULL, handle = NULL, "
                "exit_code = NULL, error = NULL WHERE id = ? AND state IN (?, ?, ?) RETURNING *",
                (QUEUED, job_id, *RETRYABLE),
            ).fetchone()
            if row is not None:  # as for a new batch of the sweep
                db.execute("DELETE FROM sweep_selections WHERE sweep_id = ?", (row["sweep_id"],))
        if row is None:
            raise ValueError(f"job {job_id!r} does not exist or has not ended in cancelled, failed or lost")
        return _row_to_job(row)


def _used_slots(db: sqlite3.Connection, executor: str) -> int:
    row = db.execute("SELECT COALESCE(SUM(slots), 0) FROM jobs WHERE state = ? AND executor = ?", (RUNNING, executor))
    return int(row.fetchone()[0])
