"""What each message from an agent does to the gateway's tasks.

Messages about an attempt that is no longer the task's current one (re-dispatched,
cancelled, timed out) never change the task: a late accept is answered with
``task.cancel``, a late terminal message is acknowledged and ignored. Terminal messages
are always acknowledged, including duplicates, so the agent stops retransmitting.
"""

from __future__ import annotations

import asyncio
import re
import time

import structlog

from agent.protocol.messages import (
    PREEMPTED,
    Ack,
    AgentMessage,
    Error,
    ErrorCode,
    Hello,
    OutputFile,
    RejectReason,
    Status,
    TaskAccept,
    TaskCancelled,
    TaskComplete,
    TaskFail,
    TaskLog,
    TaskProgress,
    TaskReject,
    TaskUploadRequest,
    TaskUploadUrls,
    UploadFile,
    UploadPart,
    UploadTarget,
)
from gateway.hub import (
    LASTING_REFUSAL_S,
    TRANSIENT_REFUSAL_S,
    AgentConn,
    Hub,
    message_id,
    protocol_error,
    stamp,
)
from gateway.models import TaskStatus
from gateway.storage import ObjectStorage, StorageError
from gateway.store import TaskRow

log = structlog.get_logger("gateway.agents")

TRANSIENT_REJECTS = frozenset(
    {
        RejectReason.DRAINING,
        RejectReason.UNHEALTHY,
        RejectReason.NO_CAPACITY,
        RejectReason.DUPLICATE,
    }
)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class AgentMessages:
    """Applies agent messages to tasks through the hub."""

    def __init__(self, hub: Hub) -> None:
        """Act through ``hub``."""
        self.hub = hub

    async def handle(self, conn: AgentConn, message: AgentMessage) -> None:
        """Handle one decoded message from ``conn``."""
        match message:
            case Status():
                self._status(conn, message)
            case TaskAccept():
                self._accept(conn, message)
            case TaskReject():
                self._reject(conn, message)
            case TaskProgress():
                self._progress(conn, message)
            case TaskUploadRequest():
                await self._upload_request(conn, message)
            case TaskComplete() | TaskFail() | TaskCancelled():
                await self._terminal(conn, message)
            case TaskLog():
                log.debug("task log", task_id=message.task_id, lines=len(message.lines))
            case Error():
                log.warning("agent reported a protocol error", agent=conn.key, code=message.code)
            case Hello():
                conn.send(protocol_error(ErrorCode.UNEXPECTED_MESSAGE, "hello twice", message.id))

    def _current(self, conn: AgentConn, task_id: str, attempt: int) -> TaskRow | None:
        """The task if ``conn`` holds its current attempt, else ``None``."""
        try:
            task = self.hub.store.task(task_id)
        except LookupError:
            return None
        if task.agent_key != conn.key or task.attempt != attempt:
            return None
        return task

    def _status(self, conn: AgentConn, status: Status) -> None:
        conn.status = status
        conn.last_heartbeat = time.time()
        for ref in status.running:
            task = self._current(conn, ref.task_id, ref.attempt)
            if task is not None and task.task_status is TaskStatus.RUNNING:
                self.hub.renew(task)
        self.hub.wake()

    def _accept(self, conn: AgentConn, accept: TaskAccept) -> None:
        task = self._current(conn, accept.task_id, accept.attempt)
        if task is None or task.task_status is not TaskStatus.QUEUED:
            if task is None or task.task_status.terminal:
                self.hub.tell_cancel(
                    conn.key, accept.task_id, accept.attempt, "assignment withdrawn"
                )
            return
        running = self.hub.tasks.start(task, self.hub.config.timeouts.lease_ttl_s)
        if running is not None:
            self.hub.started(running)

    def _reject(self, conn: AgentConn, reject: TaskReject) -> None:
        task = self._current(conn, reject.task_id, reject.attempt)
        if task is None or task.task_status is not TaskStatus.QUEUED:
            return
        lasting = reject.reason not in TRANSIENT_REJECTS
        self.hub.deadlines.ack.pop(task.id, None)
        self.hub.refuse(task.id, conn.key, LASTING_REFUSAL_S if lasting else TRANSIENT_REFUSAL_S)
        reason = f"rejected by {conn.agent_id}: {reject.reason.value}"
        self.hub.tasks.requeue(task, reason, count_retry=False)
        self.hub.wake()

    def _progress(self, conn: AgentConn, progress: TaskProgress) -> None:
        task = self._current(conn, progress.task_id, progress.attempt)
        if task is not None:
            data = progress.model_dump(
                include={"progress", "current_node", "step_current", "step_total"},
                exclude_none=True,
            )
            self.hub.tasks.progress(task, data)

    async def _upload_request(self, conn: AgentConn, request: TaskUploadRequest) -> None:
        task = self._current(conn, request.task_id, request.attempt)
        if task is None or task.task_status is not TaskStatus.RUNNING:
            conn.send(
                protocol_error(
                    ErrorCode.UNKNOWN_TASK, "no running task with that attempt", request.id
                )
            )
            return
        bad = [f.name for f in request.files if not SAFE_NAME.fullmatch(f.name)]
        if bad:
            conn.send(
                protocol_error(
                    ErrorCode.INVALID_MESSAGE, f"unsafe output name {bad[0]!r}", request.id
                )
            )
            return
        try:
            targets = [await self._target(task.id, task.attempt, f) for f in request.files]
        except ValueError as exc:  # e.g. a content type storage cannot sign
            conn.send(protocol_error(ErrorCode.INVALID_MESSAGE, str(exc), request.id))
            return
        except StorageError as exc:
            log.warning("presign failed", task_id=task.id, error=str(exc))
            conn.send(
                protocol_error(ErrorCode.INVALID_MESSAGE, "storage unavailable, retry", request.id)
            )
            return
        reply = TaskUploadUrls(
            id=message_id(),
            ts=stamp(),
            re=request.id,
            task_id=task.id,
            attempt=task.attempt,
            files=targets,
        )
        conn.send(reply)

    async def _target(self, task_id: str, attempt: int, file: UploadFile) -> UploadTarget:
        config = self.hub.config
        storage: ObjectStorage = self.hub.storage
        # per attempt: uploads never overwrite, and a re-dispatched attempt re-uploads its names
        key = f"tasks/{task_id}/{attempt}/{file.name}"
        if file.size <= config.multipart_threshold:
            put = storage.presign_put(
                key, size=file.size, content_type=file.content_type, expires_s=config.upload_ttl_s
            )
            return UploadTarget(
                name=file.name,
                storage_key=key,
                upload_url=put.url,
                upload_headers=put.headers,
                expires_at=put.expires_at,
            )
        upload_id = file.upload_id  # the agent resumes an upload it had started
        if upload_id is None:
            upload_id = await asyncio.to_thread(
                storage.create_multipart, key, content_type=file.content_type
            )
        parts = []
        for number, offset in enumerate(range(0, file.size, config.part_size), start=1):
            url = storage.presign_part(
                key, upload_id=upload_id, part_number=number, expires_s=config.upload_ttl_s
            )
            size = min(config.part_size, file.size - offset)
            parts.append(UploadPart(part_number=number, upload_url=url, size=size))
        _, expires = storage.presign_get(key, expires_s=config.upload_ttl_s)
        return UploadTarget(
            name=file.name, storage_key=key, expires_at=expires, upload_id=upload_id, parts=parts
        )

    async def _terminal(
        self, conn: AgentConn, message: TaskComplete | TaskFail | TaskCancelled
    ) -> None:
        task = self._current(conn, message.task_id, message.attempt)
        if task is not None and not task.task_status.terminal:
            await self._apply_terminal(conn, task, message)
        conn.send(
            Ack(
                id=message_id(),
                ts=stamp(),
                re=message.id,
                task_id=message.task_id,
                attempt=message.attempt,
            )
        )

    async def _apply_terminal(
        self, conn: AgentConn, task: TaskRow, message: TaskComplete | TaskFail | TaskCancelled
    ) -> None:
        outputs = [o.model_dump(exclude_none=True) for o in message.outputs]
        if isinstance(message, TaskComplete):
            problem = await self._verify_outputs(task, message.outputs)
            if problem is None:
                self.hub.tasks.complete(task, outputs)
                conn.tasks_completed += 1
            else:
                self.hub.tasks.fail(task, problem, outputs)
        elif isinstance(message, TaskFail):
            error = message.error
            where = f" (node {error.node_id})" if error.node_id else ""
            self.hub.tasks.fail(task, f"{error.code}: {error.message}{where}", outputs)
        elif message.reason == PREEMPTED:
            # the owner's team task took the slot: hand the task back, not counted as a retry
            self.hub.finished(task.id)
            self.hub.refuse(task.id, conn.key, TRANSIENT_REFUSAL_S)
            self.hub.tasks.requeue(task, f"preempted on {conn.agent_id}", count_retry=False)
            return
        else:
            self.hub.tasks.cancel(task, message.reason or "cancelled by the agent")
        self.hub.finished(task.id)

    async def _verify_outputs(self, task: TaskRow, outputs: list[OutputFile]) -> str | None:
        """Complete multipart uploads and check every object exists with its size."""
        storage = self.hub.storage
        prefix = f"tasks/{task.id}/"
        for output in outputs:
            if not output.storage_key.startswith(prefix):
                return f"output {output.key} is outside the task's storage prefix"
            try:
                if output.parts and output.upload_id:
                    parts = [(p.part_number, p.etag) for p in output.parts]
                    await asyncio.to_thread(
                        storage.complete_multipart,
                        output.storage_key,
                        upload_id=output.upload_id,
                        parts=parts,
                    )
                info = await asyncio.to_thread(storage.head, output.storage_key)
            except (StorageError, ValueError) as exc:
                return f"output {output.key} could not be verified: {exc}"
            if info is None or info.size != output.size:
                return f"output {output.key} is missing or has the wrong size in storage"
        return None


__all__ = ["AgentMessages"]
