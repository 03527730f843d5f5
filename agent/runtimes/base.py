"""The contract between the task runner and a runtime (ComfyUI, Nerfstudio, plugins).

A runtime turns one task's workflow into output files. It knows nothing of the gateway or
the protocol (this package never imports ``agent.protocol`` or ``agent.control``): the
runner hands it a :class:`TaskSpec` with local input paths, and listens to
:class:`RuntimeEvents` for progress, log lines, outputs as they appear, and a handle to
journal so a restarted agent can re-attach.

Cancellation contract: the runner first calls :meth:`Runtime.interrupt` (cooperative:
ComfyUI ``/interrupt``, SIGINT to a process group) and waits ``cancel_grace`` for
:meth:`Runtime.run` to end (raising :class:`TaskInterrupted`); if it does not, the runner
cancels the ``run`` coroutine, which must then stop the work before re-raising
``CancelledError`` (e.g. SIGKILL the process group). A runtime never swallows
``CancelledError``.

Privacy contract: a task whose :attr:`TaskSpec.private` is set (the community pool) is a
stranger's. The agent's own log then carries ids, codes, counts and sizes only — never
file names, prompt text, URLs or error details (those go to the task's owner, through
:meth:`RuntimeEvents.log` and :class:`TaskFailure`) — and a runtime that is also
:class:`Purging` removes every trace of it once the runner is done with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

Stream = Literal["stdout", "stderr", "agent"]
PRIVATE_POOLS = frozenset({"community"})
"""Pools whose tasks are strangers': kept out of the agent's log and purged afterwards."""


@dataclass(frozen=True)
class Injection:
    """A resolved parameter value and its target (see ``task.assign.injections``)."""

    key: str
    type: str
    value: str | int | float | bool | None
    node_id: str | None = None
    field: str | None = None
    target_path: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Everything a runtime needs to run one task attempt."""

    task_id: str
    attempt: int
    tool: str
    pool: str
    workflow: Mapping[str, Any]
    injections: tuple[Injection, ...] = ()
    inputs: Mapping[str, Path] = field(default_factory=dict)
    """Parameter key → downloaded input file (inside the workspace)."""
    timeout_s: float = 0.0

    @property
    def private(self) -> bool:
        """A stranger's task (community pool): log ids, codes and sizes only; purge it after."""
        return self.pool in PRIVATE_POOLS


@dataclass(frozen=True)
class Progress:
    """How far a task is."""

    progress: float
    current_node: str | None = None
    step_current: int | None = None
    step_total: int | None = None


@dataclass(frozen=True)
class Output:
    """A finished output file, keyed like ``9.images.0``."""

    key: str
    path: Path
    content_type: str


class TaskFailure(Exception):  # noqa: N818 - a task outcome, not an agent error
    """The task failed; ``code`` is machine-readable, ``message`` is for people."""

    def __init__(
        self, code: str, message: str, *, node_id: str | None = None, retryable: bool = False
    ) -> None:
        """Describe the failure."""
        super().__init__(message)
        self.code = code
        self.message = message
        self.node_id = node_id
        self.retryable = retryable


class TaskInterrupted(Exception):  # noqa: N818 - a task outcome
    """The runtime stopped the task because :meth:`Runtime.interrupt` asked it to."""


class RuntimeEvents(Protocol):
    """What a runtime reports while it runs (all calls are non-blocking)."""

    def progress(self, progress: Progress) -> None:
        """The task advanced."""

    def log(self, stream: Stream, line: str) -> None:
        """One line of the runtime's output for this task."""

    def output(self, output: Output) -> None:
        """An output file is complete (it may be uploaded at once)."""

    def handle(self, data: Mapping[str, Any]) -> None:
        """Journal this to re-attach after an agent restart (e.g. a prompt id)."""


class Runtime(Protocol):
    """One kind of runtime; the runner calls it for every task of its ``tool``."""

    tool: str
    version: str | None

    async def start(self) -> None:
        """Get ready before the agent connects (launch a supervised server, read versions)."""
        ...

    async def healthy(self) -> bool:
        """Whether the runtime can take a task now."""
        ...

    async def prepare(self, spec: TaskSpec, workspace: Path) -> None:
        """Validate and stage the task; raise :class:`TaskFailure` for bad input."""
        ...

    async def run(self, spec: TaskSpec, workspace: Path, events: RuntimeEvents) -> list[Output]:
        """Execute the task; return every output (including ones already announced)."""
        ...

    async def interrupt(self, spec: TaskSpec) -> None:
        """Ask a running task to stop; :meth:`run` then raises :class:`TaskInterrupted`."""
        ...

    async def resume(
        self, spec: TaskSpec, workspace: Path, handle: Mapping[str, Any], events: RuntimeEvents
    ) -> list[Output] | None:
        """Re-attach to work started before an agent restart; ``None`` if that is impossible."""
        ...

    async def close(self) -> None:
        """Release what the runtime holds (stop a supervised process, close clients)."""
        ...


@runtime_checkable
class Purging(Protocol):
    """A runtime that can remove what a task left outside its workspace (optional).

    The runner calls :meth:`purge` for every private task once it is finished with it —
    completed, failed or cancelled, its outputs already uploaded — but not when the agent
    is going down (a restarted agent resumes the task). Plugin runtimes without it work.
    """

    async def purge(self, spec: TaskSpec) -> None:
        """Remove the task's files and records (best effort: never raises but CancelledError).

        Logs counts only. May be called for a task that never ran, or after an agent restart
        with ``spec.inputs`` empty.
        """
        ...
