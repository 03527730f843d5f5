"""Durable gateway state: teams, credentials, pairings, workflows, files, models, tasks, events.

:class:`Store` is the interface; :class:`SqliteStore` the default implementation (one file
in the data dir, WAL journal). Calls are synchronous and short (a WAL commit is a fraction
of a millisecond here), so the asyncio code calls them directly; a server database would
implement the same Protocol.

Tasks carry their dispatch payload (workflow snapshot, injections, inputs, constraints) as
JSON so a restarted gateway can dispatch or resume them without the workflow table.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from gateway.auth import CredentialKind, StoredCredential
from gateway.models import (
    DispatchTarget,
    ModelIn,
    ModelRecord,
    ModelStatus,
    TargetPool,
    TaskStatus,
    ToolType,
    Workflow,
    WorkflowIn,
)
from gateway.pairing import (
    PURGE_AFTER_S,
    Pairing,
    PairingStatus,
    check_approve,
    check_capacity,
    check_poll,
)

NewCredential = tuple[CredentialKind, str, str]
"""A credential to store: kind, display prefix, sha256 hex of the secret."""


def utcnow() -> datetime:
    """Return the current time, aware, in UTC."""
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Return a fresh identifier like ``task_3f…``."""
    return f"{prefix}_{uuid.uuid4().hex}"


class NotFoundError(LookupError):
    """No such record (or not visible to this team)."""


class ConflictError(Exception):
    """The record would violate a uniqueness rule (e.g. a slug already in use)."""


@dataclass(frozen=True)
class Team:
    """A team: the unit of isolation."""

    id: str
    name: str
    max_agents: int


@dataclass(frozen=True)
class FileRecord:
    """An input file uploaded through ``/r/files/presign``."""

    file_key: str
    team_id: str
    file_name: str
    size: int
    content_type: str
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class TaskRow:
    """A task as stored; ``payload`` holds what the agent needs to run it."""

    id: str
    team_id: str
    workflow_id: str
    workflow_version: int
    task_status: TaskStatus
    dispatch_target: DispatchTarget
    target_pool: TargetPool
    tool_type: ToolType
    submitter_region: str
    payload: dict[str, Any]
    max_retries: int
    task_timeout: int
    created_at: datetime
    task_error: str | None = None
    retry_count: int = 0
    attempt: int = -1
    agent_id: str | None = None
    agent_key: str | None = None
    """``<team_id>/<agent_id>`` of the assigned agent (agent ids are unique per team only)."""
    agent_labels: list[str] = field(default_factory=list)
    gpu_type: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    assigned_at: float | None = None
    lease_expires_at: float | None = None
    progress: float = 0.0
    outputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class TaskEvent:
    """One SSE event of a task, in order (``seq`` is global and increasing)."""

    seq: int
    task_id: str
    event: str
    data: dict[str, Any]


class Store(Protocol):
    """What the gateway needs from its database."""

    def ensure_team(self, name: str) -> Team: ...
    def team(self, team_id: str) -> Team: ...
    def add_credential(
        self, team_id: str, kind: CredentialKind, prefix: str, digest: str
    ) -> str: ...
    def credential_by_hash(self, digest: str) -> StoredCredential | None: ...
    def revoke_credential(self, credential_id: str) -> None: ...
    def revoke_prefix(self, prefix: str) -> int: ...
    def add_pairing(self, pairing: Pairing, max_pending: int) -> None: ...
    def pairing(self, device_hash: str) -> Pairing | None: ...
    def approve_pairing(self, user_code: str, team_id: str, now: datetime) -> Pairing: ...
    def redeem_pairing(
        self, device_hash: str, now: datetime, credentials: Sequence[NewCredential]
    ) -> Pairing: ...
    def create_workflow(self, team_id: str, body: WorkflowIn) -> Workflow: ...
    def update_workflow(self, team_id: str, workflow_id: str, body: WorkflowIn) -> Workflow: ...
    def workflow(self, team_id: str, workflow_id: str, version: int | None = None) -> Workflow: ...
    def workflow_by_slug(self, team_id: str, slug: str, version: int | None = None) -> Workflow: ...
    def workflows(self, team_id: str) -> list[Workflow]: ...
    def add_file(self, record: FileRecord) -> None: ...
    def file(self, file_key: str) -> FileRecord | None: ...
    def add_model(self, team_id: str, body: ModelIn, max_models: int) -> ModelRecord: ...
    def model(self, team_id: str, model_id: str) -> ModelRecord: ...
    def models(self, team_id: str, status: ModelStatus | None = None) -> list[ModelRecord]: ...
    def set_model_status(
        self, team_id: str, model_id: str, status: ModelStatus
    ) -> tuple[ModelRecord, bool]: ...
    def delete_model(self, team_id: str, model_id: str) -> ModelRecord: ...
    def insert_task(self, row: TaskRow) -> None: ...
    def task(self, task_id: str, team_id: str | None = None) -> TaskRow: ...
    def update_task(self, row: TaskRow) -> None: ...
    def tasks(
        self, team_id: str, status: TaskStatus | None, page: int, per_page: int
    ) -> tuple[list[TaskRow], int]: ...
    def tasks_in(self, statuses: set[TaskStatus]) -> list[TaskRow]: ...
    def add_event(self, task_id: str, event: str, data: dict[str, Any]) -> TaskEvent: ...
    def events(self, task_id: str, after_seq: int = 0) -> list[TaskEvent]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, max_agents INTEGER NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL REFERENCES teams(id), kind TEXT NOT NULL,
    prefix TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, revoked INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairings (
    device_hash TEXT PRIMARY KEY, user_code TEXT NOT NULL, device_name TEXT NOT NULL,
    created_at TEXT NOT NULL, expires_at TEXT NOT NULL, status TEXT NOT NULL,
    team_id TEXT REFERENCES teams(id));
CREATE INDEX IF NOT EXISTS pairings_user_code ON pairings(user_code, created_at);
CREATE INDEX IF NOT EXISTS pairings_expiry ON pairings(status, expires_at);
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT NOT NULL, version INTEGER NOT NULL, team_id TEXT NOT NULL, slug TEXT,
    body TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    PRIMARY KEY (id, version));
CREATE INDEX IF NOT EXISTS workflows_slug ON workflows(team_id, slug);
CREATE TABLE IF NOT EXISTS files (
    file_key TEXT PRIMARY KEY, team_id TEXT NOT NULL, file_name TEXT NOT NULL,
    size INTEGER NOT NULL, content_type TEXT NOT NULL, created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL, model_type TEXT NOT NULL,
    model_path TEXT NOT NULL, file_size INTEGER NOT NULL, file_hash TEXT NOT NULL,
    model_status TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (team_id, model_type, model_path));
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, team_id TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_team ON tasks(team_id, created_at);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE TABLE IF NOT EXISTS task_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, event TEXT NOT NULL,
    data TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS task_events_task ON task_events(task_id, seq);
"""

_PAIRING_COLUMNS = "device_hash, user_code, device_name, created_at, expires_at, status, team_id"
_COUNT_TASKS = "SELECT COUNT(*) FROM tasks WHERE team_id=? AND (? IS NULL OR status=?)"
_PAGE_TASKS = (
    "SELECT body FROM tasks WHERE team_id=? AND (? IS NULL OR status=?) "
    "ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
)
_TASK_TIMES = ("created_at", "started_at", "completed_at")
_MODEL_COLUMNS = "id, model_type, model_path, file_size, file_hash, model_status, created_at"


def _stamp(moment: datetime) -> str:
    """A fixed-width UTC timestamp: text order is time order (pairings compare in SQL)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _pairing(row: tuple[Any, ...] | None) -> Pairing | None:
    if row is None:
        return None
    return Pairing(
        device_hash=row[0],
        user_code=row[1],
        device_name=row[2],
        created_at=datetime.fromisoformat(row[3]),
        expires_at=datetime.fromisoformat(row[4]),
        status=PairingStatus(row[5]),
        team_id=row[6],
    )


def _model(row: tuple[Any, ...]) -> ModelRecord:
    return ModelRecord(
        id=row[0],
        model_type=row[1],
        model_path=row[2],
        file_size=row[3],
        file_hash=row[4],
        model_status=ModelStatus(row[5]),
        created_at=datetime.fromisoformat(row[6]),
    )


def _task_to_json(row: TaskRow) -> str:
    data = {k: getattr(row, k) for k in TaskRow.__dataclass_fields__}
    for key in _TASK_TIMES:
        value = data[key]
        data[key] = value.isoformat() if value is not None else None
    return json.dumps(data)


def _task_from_json(text: str) -> TaskRow:
    data = json.loads(text)
    for key in _TASK_TIMES:
        if data[key] is not None:
            data[key] = datetime.fromisoformat(data[key])
    data["task_status"] = TaskStatus(data["task_status"])
    data["dispatch_target"] = DispatchTarget(data["dispatch_target"])
    data["target_pool"] = TargetPool(data["target_pool"])
    data["tool_type"] = ToolType(data["tool_type"])
    return TaskRow(**data)


class SqliteStore:
    """:class:`Store` on one SQLite file (WAL; ``:memory:`` for throwaway use)."""

    def __init__(self, path: Path | str) -> None:
        """Open (and create or migrate) the database at ``path``."""
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ teams, credentials

    def ensure_team(self, name: str) -> Team:
        """Return the team called ``name``, creating it if needed."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id, name, max_agents FROM teams WHERE name=?", (name,)
            ).fetchone()
            if row is None:
                row = (new_id("team"), name, 100)
                db.execute("INSERT INTO teams VALUES (?,?,?,?)", (*row, utcnow().isoformat()))
        return Team(id=row[0], name=row[1], max_agents=row[2])

    def team(self, team_id: str) -> Team:
        """Return a team by id."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, max_agents FROM teams WHERE id=?", (team_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(team_id)
        return Team(id=row[0], name=row[1], max_agents=row[2])

    def add_credential(self, team_id: str, kind: CredentialKind, prefix: str, digest: str) -> str:
        """Store a credential's prefix and hash (never the secret); return its id."""
        with self._tx() as db:
            return self._insert_credential(db, team_id, (kind, prefix, digest))

    @staticmethod
    def _insert_credential(db: sqlite3.Connection, team_id: str, new: NewCredential) -> str:
        credential_id = new_id("cred")
        kind, prefix, digest = new
        db.execute(
            "INSERT INTO credentials VALUES (?,?,?,?,?,0,?)",
            (credential_id, team_id, kind.value, prefix, digest, utcnow().isoformat()),
        )
        return credential_id

    def credential_by_hash(self, digest: str) -> StoredCredential | None:
        """Look a credential up by the hash of its secret."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, team_id, kind, prefix, revoked FROM credentials WHERE digest=?",
                (digest,),
            ).fetchone()
        if row is None:
            return None
        return StoredCredential(
            id=row[0],
            team_id=row[1],
            kind=CredentialKind(row[2]),
            prefix=row[3],
            revoked=bool(row[4]),
        )

    def revoke_credential(self, credential_id: str) -> None:
        """Revoke a credential (it stops working at once)."""
        with self._tx() as db:
            db.execute("UPDATE credentials SET revoked=1 WHERE id=?", (credential_id,))

    def revoke_prefix(self, prefix: str) -> int:
        """Revoke every credential with this display prefix; return how many."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE credentials SET revoked=1 WHERE prefix=? AND revoked=0", (prefix,)
            )
        return cursor.rowcount

    # ------------------------------------------------------------------ pairings

    def add_pairing(self, pairing: Pairing, max_pending: int) -> None:
        """Store a new pending pairing; purge long-expired ones first.

        Raises ``TooManyPairingsError`` when ``max_pending`` unexpired pairings are pending,
        and ``ConflictError`` when a live pairing already has this user code (pick another).
        """
        now = _stamp(pairing.created_at)
        purge_before = _stamp(pairing.created_at - timedelta(seconds=PURGE_AFTER_S))
        with self._tx() as db:
            db.execute("DELETE FROM pairings WHERE expires_at < ?", (purge_before,))
            (pending,) = db.execute(
                "SELECT COUNT(*) FROM pairings WHERE status=? AND expires_at > ?",
                (PairingStatus.PENDING.value, now),
            ).fetchone()
            check_capacity(int(pending), max_pending)
            clash = db.execute(
                "SELECT 1 FROM pairings WHERE user_code=? AND expires_at > ?",
                (pairing.user_code, now),
            ).fetchone()
            if clash is not None:
                raise ConflictError("user code in use")
            db.execute(
                f"INSERT INTO pairings ({_PAIRING_COLUMNS}) VALUES (?,?,?,?,?,?,?)",  # noqa: S608 - constant column list
                (
                    pairing.device_hash,
                    pairing.user_code,
                    pairing.device_name,
                    _stamp(pairing.created_at),
                    _stamp(pairing.expires_at),
                    pairing.status.value,
                    pairing.team_id,
                ),
            )

    def pairing(self, device_hash: str) -> Pairing | None:
        """Return the pairing of a device code's hash, or None."""
        with self._lock:
            return self._pairing_by_hash(self._db, device_hash)

    @staticmethod
    def _pairing_by_hash(db: sqlite3.Connection, device_hash: str) -> Pairing | None:
        return _pairing(
            db.execute(
                f"SELECT {_PAIRING_COLUMNS} FROM pairings WHERE device_hash=?",  # noqa: S608 - constant column list
                (device_hash,),
            ).fetchone()
        )

    def approve_pairing(self, user_code: str, team_id: str, now: datetime) -> Pairing:
        """Approve the newest pairing with this (canonical) user code into ``team_id``.

        Raises ``NotFoundError``, or the ``PairingError`` of :func:`check_approve`.
        """
        with self._tx() as db:
            found = _pairing(
                db.execute(
                    f"SELECT {_PAIRING_COLUMNS} FROM pairings WHERE user_code=? "  # noqa: S608 - constant column list
                    "ORDER BY created_at DESC LIMIT 1",
                    (user_code,),
                ).fetchone()
            )
            try:
                pending = check_approve(found, user_code, now)
            except LookupError as exc:
                raise NotFoundError(str(exc)) from None
            db.execute(
                "UPDATE pairings SET status=?, team_id=? WHERE device_hash=?",
                (PairingStatus.APPROVED.value, team_id, pending.device_hash),
            )
        return replace(pending, status=PairingStatus.APPROVED, team_id=team_id)

    def redeem_pairing(
        self, device_hash: str, now: datetime, credentials: Sequence[NewCredential]
    ) -> Pairing:
        """Consume an approved pairing and store ``credentials`` in its team, atomically.

        Of concurrent redemptions exactly one succeeds; the others (and any later one) raise
        ``NotFoundError``, as does a pairing that is not approved. An expired one raises
        ``PairingExpiredError``. Returns the pairing as it was approved.
        """
        with self._tx() as db:
            try:
                approved = check_poll(self._pairing_by_hash(db, device_hash), now)
            except LookupError as exc:
                raise NotFoundError(str(exc)) from None
            if approved.status is not PairingStatus.APPROVED or approved.team_id is None:
                raise NotFoundError("the pairing is not approved")
            db.execute(
                "UPDATE pairings SET status=? WHERE device_hash=?",
                (PairingStatus.CONSUMED.value, device_hash),
            )
            for new in credentials:
                self._insert_credential(db, approved.team_id, new)
        return approved

    # ------------------------------------------------------------------ workflows

    def create_workflow(self, team_id: str, body: WorkflowIn) -> Workflow:
        """Store version 1 of a new workflow."""
        now = utcnow()
        workflow = Workflow(
            **body.model_dump(),
            id=new_id("wf"),
            team_id=team_id,
            version=1,
            created_at=now,
            updated_at=now,
        )
        with self._tx() as db:
            self._check_slug(db, team_id, body.workflow_slug, workflow.id)
            self._insert_workflow(db, workflow)
        return workflow

    def update_workflow(self, team_id: str, workflow_id: str, body: WorkflowIn) -> Workflow:
        """Store a new version of a workflow (the version number increments)."""
        with self._tx() as db:
            current = self._latest(db, team_id, workflow_id)
            self._check_slug(db, team_id, body.workflow_slug, workflow_id)
            workflow = Workflow(
                **body.model_dump(),
                id=workflow_id,
                team_id=team_id,
                version=current.version + 1,
                created_at=current.created_at,
                updated_at=utcnow(),
            )
            self._insert_workflow(db, workflow)
        return workflow

    def workflow(self, team_id: str, workflow_id: str, version: int | None = None) -> Workflow:
        """Return a workflow of this team (latest version unless one is pinned)."""
        with self._lock:
            if version is None:
                return self._latest(self._db, team_id, workflow_id)
            row = self._db.execute(
                "SELECT body FROM workflows WHERE id=? AND team_id=? AND version=?",
                (workflow_id, team_id, version),
            ).fetchone()
        if row is None:
            raise NotFoundError(workflow_id)
        return Workflow.model_validate_json(row[0])

    def workflow_by_slug(self, team_id: str, slug: str, version: int | None = None) -> Workflow:
        """Return a workflow by its slug (latest version, or the pinned ``slug@version``)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM workflows WHERE team_id=? AND slug=? ORDER BY version DESC LIMIT 1",
                (team_id, slug),
            ).fetchone()
        if row is None:
            raise NotFoundError(slug)
        return self.workflow(team_id, row[0], version)

    def workflows(self, team_id: str) -> list[Workflow]:
        """Return the latest version of every workflow of a team."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM workflows w WHERE team_id=? AND version="
                "(SELECT MAX(version) FROM workflows v WHERE v.id=w.id) ORDER BY created_at",
                (team_id,),
            ).fetchall()
        return [Workflow.model_validate_json(r[0]) for r in rows]

    @staticmethod
    def _latest(db: sqlite3.Connection, team_id: str, workflow_id: str) -> Workflow:
        row = db.execute(
            "SELECT body FROM workflows WHERE id=? AND team_id=? ORDER BY version DESC LIMIT 1",
            (workflow_id, team_id),
        ).fetchone()
        if row is None:
            raise NotFoundError(workflow_id)
        return Workflow.model_validate_json(row[0])

    @staticmethod
    def _check_slug(
        db: sqlite3.Connection, team_id: str, slug: str | None, workflow_id: str
    ) -> None:
        if slug is None:
            return
        row = db.execute(
            "SELECT id FROM workflows WHERE team_id=? AND slug=? AND id<>? LIMIT 1",
            (team_id, slug, workflow_id),
        ).fetchone()
        if row is not None:
            raise ConflictError(f"workflow_slug {slug!r} is already used by another workflow")

    @staticmethod
    def _insert_workflow(db: sqlite3.Connection, workflow: Workflow) -> None:
        db.execute(
            "INSERT INTO workflows VALUES (?,?,?,?,?,?,?)",
            (
                workflow.id,
                workflow.version,
                workflow.team_id,
                workflow.workflow_slug,
                workflow.model_dump_json(),
                workflow.created_at.isoformat(),
                workflow.updated_at.isoformat(),
            ),
        )

    # ------------------------------------------------------------------ files

    def add_file(self, record: FileRecord) -> None:
        """Record an input file upload slot."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO files VALUES (?,?,?,?,?,?,?)",
                (
                    record.file_key,
                    record.team_id,
                    record.file_name,
                    record.size,
                    record.content_type,
                    record.created_at.isoformat(),
                    record.expires_at.isoformat(),
                ),
            )

    def file(self, file_key: str) -> FileRecord | None:
        """Return an input file record (any team: callers check ownership)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE file_key=?", (file_key,)).fetchone()
        if row is None:
            return None
        return FileRecord(
            file_key=row[0],
            team_id=row[1],
            file_name=row[2],
            size=row[3],
            content_type=row[4],
            created_at=datetime.fromisoformat(row[5]),
            expires_at=datetime.fromisoformat(row[6]),
        )

    # ------------------------------------------------------------------ models

    def add_model(self, team_id: str, body: ModelIn, max_models: int) -> ModelRecord:
        """Register an active model; ``ConflictError`` when its type+path is taken.

        Raises ``OverflowError`` when the team already has ``max_models`` models.
        """
        record = ModelRecord(
            **body.model_dump(),
            id=new_id("model"),
            model_status=ModelStatus.ACTIVE,
            created_at=utcnow(),
        )
        with self._tx() as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM models WHERE team_id=?", (team_id,)
            ).fetchone()
            if int(count) >= max_models:
                raise OverflowError(f"a team may register at most {max_models} models")
            try:
                db.execute(
                    f"INSERT INTO models (team_id, {_MODEL_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",  # noqa: S608 - constant column list
                    (
                        team_id,
                        record.id,
                        record.model_type,
                        record.model_path,
                        record.file_size,
                        record.file_hash,
                        record.model_status.value,
                        _stamp(record.created_at),
                    ),
                )
            except sqlite3.IntegrityError:
                raise ConflictError(
                    f"{body.model_type}/{body.model_path} is already registered in this team"
                ) from None
        return record

    def model(self, team_id: str, model_id: str) -> ModelRecord:
        """Return one model of a team (other teams' models are not found)."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE team_id=? AND id=?",  # noqa: S608 - constant column list
                (team_id, model_id),
            ).fetchone()
        if row is None:
            raise NotFoundError(model_id)
        return _model(row)

    def models(self, team_id: str, status: ModelStatus | None = None) -> list[ModelRecord]:
        """Return a team's models (of ``status`` when given), by model_type then model_path."""
        wanted = None if status is None else status.value
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE team_id=? "  # noqa: S608 - constant column list
                "AND (? IS NULL OR model_status=?) ORDER BY model_type, model_path",
                (team_id, wanted, wanted),
            ).fetchall()
        return [_model(r) for r in rows]

    def set_model_status(
        self, team_id: str, model_id: str, status: ModelStatus
    ) -> tuple[ModelRecord, bool]:
        """Enable or disable a model; return it and whether its status changed."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE team_id=? AND id=?",  # noqa: S608 - constant column list
                (team_id, model_id),
            ).fetchone()
            if row is None:
                raise NotFoundError(model_id)
            current = _model(row)
            if current.model_status is status:
                return current, False
            db.execute("UPDATE models SET model_status=? WHERE id=?", (status.value, model_id))
        return current.model_copy(update={"model_status": status}), True

    def delete_model(self, team_id: str, model_id: str) -> ModelRecord:
        """Forget a model (its stored object stays); return it as it was."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE team_id=? AND id=?",  # noqa: S608 - constant column list
                (team_id, model_id),
            ).fetchone()
            if row is None:
                raise NotFoundError(model_id)
            db.execute("DELETE FROM models WHERE id=?", (model_id,))
        return _model(row)

    # ------------------------------------------------------------------ tasks

    def insert_task(self, row: TaskRow) -> None:
        """Store a new task."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO tasks VALUES (?,?,?,?,?)",
                (
                    row.id,
                    row.team_id,
                    row.task_status.value,
                    row.created_at.isoformat(),
                    _task_to_json(row),
                ),
            )

    def task(self, task_id: str, team_id: str | None = None) -> TaskRow:
        """Return a task (of ``team_id`` when given: other teams' tasks are not found)."""
        with self._lock:
            row = self._db.execute(
                "SELECT team_id, body FROM tasks WHERE id=?", (task_id,)
            ).fetchone()
        if row is None or (team_id is not None and row[0] != team_id):
            raise NotFoundError(task_id)
        return _task_from_json(row[1])

    def update_task(self, row: TaskRow) -> None:
        """Replace a task's stored state."""
        with self._tx() as db:
            db.execute(
                "UPDATE tasks SET status=?, body=? WHERE id=?",
                (row.task_status.value, _task_to_json(row), row.id),
            )

    def tasks(
        self, team_id: str, status: TaskStatus | None, page: int, per_page: int
    ) -> tuple[list[TaskRow], int]:
        """Return one page of a team's tasks, newest first, and the total count."""
        wanted = None if status is None else status.value
        args = [team_id, wanted, wanted]  # status NULL matches every status
        with self._lock:
            total = self._db.execute(_COUNT_TASKS, args).fetchone()
            rows = self._db.execute(
                _PAGE_TASKS, [*args, per_page, (page - 1) * per_page]
            ).fetchall()
        return [_task_from_json(r[0]) for r in rows], int(total[0])

    def tasks_in(self, statuses: set[TaskStatus]) -> list[TaskRow]:
        """Return every task in one of ``statuses``, oldest first (dispatch order)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM tasks WHERE status IN (SELECT value FROM json_each(?)) "
                "ORDER BY created_at, id",
                (json.dumps(sorted(s.value for s in statuses)),),
            ).fetchall()
        return [_task_from_json(r[0]) for r in rows]

    def add_event(self, task_id: str, event: str, data: dict[str, Any]) -> TaskEvent:
        """Append an event to a task's history."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO task_events (task_id, event, data, created_at) VALUES (?,?,?,?)",
                (task_id, event, json.dumps(data), utcnow().isoformat()),
            )
        assert cursor.lastrowid is not None  # noqa: S101 - sqlite always sets it on INSERT
        return TaskEvent(seq=cursor.lastrowid, task_id=task_id, event=event, data=data)

    def events(self, task_id: str, after_seq: int = 0) -> list[TaskEvent]:
        """Return a task's events after ``after_seq``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event, data FROM task_events WHERE task_id=? AND seq>? ORDER BY seq",
                (task_id, after_seq),
            ).fetchall()
        return [
            TaskEvent(seq=r[0], task_id=task_id, event=r[1], data=json.loads(r[2])) for r in rows
        ]


__all__ = [
    "ConflictError",
    "FileRecord",
    "NewCredential",
    "NotFoundError",
    "SqliteStore",
    "Store",
    "TaskEvent",
    "TaskRow",
    "Team",
    "new_id",
    "utcnow",
]
