"""What the sans-I/O session asks its shell to do.

The session returns a list of these from every call; the shell (``agent.control``) carries
them out in order. None of them is optional: a shell that drops an action breaks the
protocol's guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocol.messages import (
    CloseCode,
    Envelope,
    Error,
    SyncModel,
    TaskAssign,
    TaskRef,
    TaskUploadUrls,
    Welcome,
)


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``message`` to the WebSocket (as one frame)."""

    message: Envelope


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket with ``code``; the shell then calls ``Session.disconnected``."""

    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Established:
    """The gateway welcomed us (systemd READY, reset the reconnect backoff)."""

    welcome: Welcome


@dataclass(frozen=True, slots=True)
class Evaluate:
    """Decide whether to run ``assign`` (policy, VRAM, models), then call ``Session.decide``.

    A slot in the assign's pool is reserved until then.
    """

    assign: TaskAssign


@dataclass(frozen=True, slots=True)
class StartTask:
    """The task was accepted: run it."""

    assign: TaskAssign


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Stop running ``task`` and report it with ``Session.cancelled``."""

    task: TaskRef
    reason: str


@dataclass(frozen=True, slots=True)
class AbandonTask:
    """Stop ``task`` and discard its outputs; it must NOT be reported (it runs elsewhere)."""

    task: TaskRef


@dataclass(frozen=True, slots=True)
class Forget:
    """The session no longer holds ``task`` (acknowledged, or abandoned after it finished).

    Drop it from durable state (the journal).
    """

    task: TaskRef


@dataclass(frozen=True, slots=True)
class Deliver:
    """A reply to a request of ours (``message.re``): hand it to whoever waits for it."""

    message: TaskUploadUrls


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """The gateway asked us to drain; the lifecycle treats it like a first SIGTERM."""

    reason: str


@dataclass(frozen=True, slots=True)
class SyncModels:
    """The team's model set (from ``welcome.sync`` or a ``sync``): bring the cache in line."""

    models: tuple[SyncModel, ...]


@dataclass(frozen=True, slots=True)
class PeerError:
    """The gateway reported a protocol error about one of our messages: log it."""

    error: Error


Action = (
    Send
    | Close
    | Established
    | Evaluate
    | StartTask
    | CancelTask
    | AbandonTask
    | Forget
    | Deliver
    | DrainRequested
    | SyncModels
    | PeerError
)
