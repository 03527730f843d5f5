"""Protocol v1 messages: one pydantic model per message type.

Every frame is one JSON object with ``type`` (the discriminator), ``id`` (a UUIDv7 string)
and ``ts`` (RFC 3339, UTC); a reply carries ``re`` = the request's ``id``. Unknown fields
are ignored (forward compatible); unknown ``type`` values are a protocol error (see
``codec``). ``docs/protocol.md`` is the prose spec of these models and
``docs/protocol.schema.json`` their exported schema; a test keeps the three in step.

Models are frozen: a message, once built, is a value that can be retransmitted as is.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
SUBPROTOCOL = "cyberun.agent.v1"
WS_PATH = "/agent/v1/ws"
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by protocol v1 (4000-4999 are application codes)."""

    NORMAL = 1000  # orderly shutdown after drain
    GOING_AWAY = 1001  # the process is stopping
    POLICY = 1008  # credential revoked mid-session
    TOO_BIG = 1009  # a frame exceeded the size cap
    INTERNAL = 1011  # the peer hit an unexpected condition
    PROTOCOL_ERROR = 4000  # malformed or out-of-order message the peer cannot recover from
    HANDSHAKE_TIMEOUT = 4001  # no hello/welcome within the handshake deadline
    UNSUPPORTED_VERSION = 4002  # hello.protocol is not served at this path
    SUPERSEDED = 4003  # a newer session of the same agent_id replaced this one


class Pool(enum.StrEnum):
    """Task pools: the agent's own team, or the cross-team community pool (opt-in)."""

    TEAM = "team"
    COMMUNITY = "community"


class Tool(enum.StrEnum):
    """Runtimes an agent can drive."""

    COMFYUI = "comfyui"
    NERFSTUDIO = "nerfstudio"


class AgentStatus(enum.StrEnum):
    """Documented agent statuses; only ``idle`` and ``busy`` receive new work."""

    IDLE = "idle"
    BUSY = "busy"
    SYNCING = "syncing"
    TUNNEL = "tunnel"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class TaskPhase(enum.StrEnum):
    """Where an agent-side task is, as reported in ``hello.in_flight``."""

    ACCEPTED = "accepted"
    PREPARING = "preparing"
    RUNNING = "running"
    UPLOADING = "uploading"
    REPORTING = "reporting"  # terminal message sent, not yet acknowledged


PREEMPTED = "preempted"
"""``task.cancelled.reason`` of a community task stopped for a team task: the gateway hands
the task back to the queue without counting a retry."""


class RejectReason(enum.StrEnum):
    """Machine-readable reasons for ``task.reject`` (a reject never counts as a retry)."""

    POLICY_DENIED = "policy_denied"
    UNSUPPORTED_NODE = "unsupported_node"
    UNSUPPORTED_TOOL = "unsupported_tool"
    INSUFFICIENT_VRAM = "insufficient_vram"
    MISSING_MODEL = "missing_model"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"
    NO_CAPACITY = "no_capacity"
    DUPLICATE = "duplicate"
    INVALID = "invalid"


class ResumeAction(enum.StrEnum):
    """The gateway's verdict on a task an agent still holds after reconnecting."""

    CONTINUE = "continue"
    ABANDON = "abandon"


class ErrorCode(enum.StrEnum):
    """Codes of the ``error`` message (protocol errors, either direction)."""

    UNKNOWN_TYPE = "unknown_type"
    INVALID_MESSAGE = "invalid_message"
    UNEXPECTED_MESSAGE = "unexpected_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    TOO_LARGE = "too_large"
    UNKNOWN_TASK = "unknown_task"


# ------------------------------------------------------------------ shared pieces

TaskId = Annotated[str, Field(min_length=1, max_length=128)]
Attempt = Annotated[int, Field(ge=0, le=1_000_000)]
ShortText = Annotated[str, Field(max_length=256)]
Text = Annotated[str, Field(max_length=16_384)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
NonNegInt = Annotated[int, Field(ge=0)]


class Model(BaseModel):
    """Base of every protocol structure: frozen, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", use_enum_values=False)


class TaskRef(Model):
    """One attempt of one task; terminal messages are idempotent on this pair."""

    task_id: TaskId
    attempt: Attempt


class ToolInfo(Model):
    """A runtime this agent offers, with its version when known."""

    name: Tool
    version: ShortText | None = None


class GpuInfo(Model):
    """One GPU as NVML reports it (bytes for memory)."""

    index: NonNegInt
    uuid: ShortText = ""
    name: ShortText = ""
    vram_total: NonNegInt = 0
    vram_free: NonNegInt = 0
    compute_capability: ShortText | None = None
    driver_version: ShortText | None = None
    cuda_version: ShortText | None = None
    mig: bool = False
    pci_bus_id: ShortText | None = None
    power_limit_w: Annotated[float, Field(ge=0)] | None = None


class CpuInfo(Model):
    """CPU inventory."""

    count: NonNegInt = 0
    model: ShortText = ""


class Capability(Model):
    """Static-ish inventory sent in ``hello``."""

    platform_arch: ShortText = ""
    cpu: CpuInfo = CpuInfo()
    ram_bytes: NonNegInt = 0
    disk_free_bytes: NonNegInt = 0
    """Free bytes where tasks run (``work_dir``)."""
    cache_free_bytes: NonNegInt | None = None
    """Free bytes where models are cached (``cache_dir``)."""
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    """The GPUs that may be offered work (an unhealthy GPU is left out)."""


class SystemStats(Model):
    """The documented ``system_stats`` block (from the runtime, e.g. ComfyUI)."""

    comfyui_version: ShortText | None = None
    pytorch_version: ShortText | None = None
    os_type: ShortText | None = None


class InFlight(TaskRef):
    """A task the agent still holds when it (re)connects."""

    phase: TaskPhase


class GpuSnapshot(Model):
    """Live readings of one GPU; ``problem`` says why it is not offered work."""

    index: NonNegInt
    utilization: Annotated[float, Field(ge=0, le=100)] | None = None
    memory_used: NonNegInt | None = None
    memory_total: NonNegInt | None = None
    memory_free: NonNegInt | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    throttle_reasons: list[ShortText] = Field(default_factory=list, max_length=32)
    ecc_uncorrected: NonNegInt | None = None
    problem: ShortText | None = None


class ResourceSnapshot(Model):
    """Live resource readings carried by ``status``."""

    cpu_percent: Annotated[float, Field(ge=0)] | None = None
    ram_used: NonNegInt | None = None
    ram_total: NonNegInt | None = None
    disk_free: NonNegInt | None = None
    gpus: list[GpuSnapshot] = Field(default_factory=list, max_length=64)


class SyncProgress(Model):
    """Model-sync progress, the documented ``sync_*`` fields."""

    sync_phase: ShortText = ""
    sync_detail: ShortText = ""
    sync_percent: Annotated[float, Field(ge=0, le=100)] = 0.0


class SyncModel(Model):
    """One model of the team's active set (sent in ``welcome.sync``)."""

    model_type: ShortText
    model_path: ShortText
    file_size: NonNegInt
    file_hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    download_url: Text


class Injection(Model):
    """A resolved parameter value and where it goes.

    ComfyUI: ``workflow[node_id].inputs[field] = value``; Nerfstudio: the dotted
    ``target_path`` into the pipeline spec. For a ``file`` parameter ``value`` is the
    ``file_key``; the matching entry of ``task.assign.inputs`` carries its download URL.
    """

    key: ShortText
    type: Literal["string", "number", "boolean", "select", "file"]
    value: str | int | float | bool | None
    node_id: ShortText | None = None
    field: ShortText | None = None
    target_path: ShortText | None = None


class InputFile(Model):
    """An input file to download before the task runs."""

    key: ShortText
    file_key: Text
    download_url: Text
    size: NonNegInt
    content_type: ShortText
    sha256: Sha256Hex | None = None


class ErrorInfo(Model):
    """Why a task failed."""

    code: ShortText
    message: Text
    node_id: ShortText | None = None
    retryable: bool = False


class OutputPart(Model):
    """One uploaded part of a multipart output (the gateway completes the upload)."""

    part_number: Annotated[int, Field(ge=1, le=10_000)]
    etag: ShortText


class OutputFile(Model):
    """An uploaded output, keyed like the documented ``download_urls`` (``9.images.0``)."""

    key: ShortText
    storage_key: Text
    size: NonNegInt
    sha256: Sha256Hex
    content_type: ShortText
    upload_id: ShortText | None = None
    """For a multipart upload: the ``upload_id`` from ``task.upload_urls``."""
    parts: list[OutputPart] | None = Field(default=None, max_length=10_000)


class UploadFile(Model):
    """A file the agent is about to upload."""

    name: ShortText
    size: NonNegInt
    content_type: ShortText
    sha256: Sha256Hex
    upload_id: ShortText | None = None
    """Resume this multipart upload (fresh part URLs; parts already sent are not re-sent)."""


class UploadPart(Model):
    """A presigned URL for one part of a multipart upload."""

    part_number: Annotated[int, Field(ge=1, le=10_000)]
    upload_url: Text
    size: NonNegInt


class UploadTarget(Model):
    """Where (and how) to PUT one output. ``upload_headers`` are sent verbatim."""

    name: ShortText
    storage_key: Text
    upload_url: Text | None = None
    upload_headers: dict[str, str] = Field(default_factory=dict)
    expires_at: AwareDatetime
    upload_id: ShortText | None = None
    parts: list[UploadPart] | None = Field(default=None, max_length=10_000)


class Timings(Model):
    """Seconds spent per stage of a task, as measured by the agent."""

    queued_s: Annotated[float, Field(ge=0)] | None = None
    prepare_s: Annotated[float, Field(ge=0)] | None = None
    run_s: Annotated[float, Field(ge=0)] | None = None
    upload_s: Annotated[float, Field(ge=0)] | None = None


class LogLine(Model):
    """One log line of a task."""

    stream: Literal["stdout", "stderr", "agent"] = "agent"
    text: Annotated[str, Field(max_length=4096)]


class ResumeEntry(TaskRef):
    """The gateway's verdict on one ``hello.in_flight`` entry."""

    action: ResumeAction


# ------------------------------------------------------------------ envelope


class Envelope(Model):
    """Fields every message carries."""

    id: Annotated[str, Field(min_length=1, max_length=64)]
    ts: AwareDatetime
    re: Annotated[str, Field(max_length=64)] | None = None


# ------------------------------------------------------------------ agent -> gateway


class Hello(Envelope):
    """First message of a session: who the agent is and what it can do."""

    type: Literal["hello"] = "hello"
    agent_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    agent_version: ShortText
    protocol: int = PROTOCOL_VERSION
    tools: list[ToolInfo] = Field(default_factory=list, max_length=8)
    labels: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=256)
    pools: list[Pool] = Field(default_factory=lambda: [Pool.TEAM], max_length=2)
    region: Annotated[str, Field(max_length=64)] = ""
    capacity: dict[Pool, NonNegInt] = Field(default_factory=dict)
    capability: Capability = Capability()
    system_stats: SystemStats | None = None
    models: list[Sha256Hex] = Field(default_factory=list, max_length=100_000)
    in_flight: list[InFlight] = Field(default_factory=list, max_length=1024)
    features: list[ShortText] = Field(default_factory=list, max_length=64)


class Status(Envelope):
    """Heartbeat and change notification; renews the lease of every task in ``running``."""

    type: Literal["status"] = "status"
    agent_status: AgentStatus
    free_slots: dict[Pool, NonNegInt] = Field(default_factory=dict)
    running: list[TaskRef] = Field(default_factory=list, max_length=1024)
    reason: ShortText | None = None
    labels: list[Annotated[str, Field(max_length=63)]] | None = Field(default=None, max_length=256)
    resources: ResourceSnapshot | None = None
    sync: SyncProgress | None = None
    models: list[Sha256Hex] | None = Field(default=None, max_length=100_000)
    """The content hashes held now (``hello.models`` goes stale after a sync)."""


class TaskAccept(Envelope, TaskRef):
    """ACK of a ``task.assign`` (``re`` = the assign's id): the task is now running."""

    type: Literal["task.accept"] = "task.accept"


class TaskReject(Envelope, TaskRef):
    """Refusal of a ``task.assign``; the gateway re-dispatches without counting a retry."""

    type: Literal["task.reject"] = "task.reject"
    reason: RejectReason
    message: Text = ""


class TaskProgress(Envelope, TaskRef):
    """Execution progress (coalesced by the agent to a few per second per task)."""

    type: Literal["task.progress"] = "task.progress"
    progress: Annotated[float, Field(ge=0, le=1)]
    current_node: ShortText | None = None
    step_current: NonNegInt | None = None
    step_total: NonNegInt | None = None


class TaskLog(Envelope, TaskRef):
    """A bounded batch of log lines; ``dropped`` counts lines left out since the last batch."""

    type: Literal["task.log"] = "task.log"
    lines: list[LogLine] = Field(max_length=1000)
    dropped: NonNegInt = 0


class TaskUploadRequest(Envelope, TaskRef):
    """Ask for presigned upload URLs (again, when one expired or was refused)."""

    type: Literal["task.upload_request"] = "task.upload_request"
    files: list[UploadFile] = Field(min_length=1, max_length=1000)


class TaskComplete(Envelope, TaskRef):
    """Terminal: the task succeeded; every output is already uploaded."""

    type: Literal["task.complete"] = "task.complete"
    outputs: list[OutputFile] = Field(default_factory=list, max_length=10_000)
    timings: Timings = Timings()


class TaskFail(Envelope, TaskRef):
    """Terminal: the task failed."""

    type: Literal["task.fail"] = "task.fail"
    error: ErrorInfo
    outputs: list[OutputFile] = Field(default_factory=list, max_length=10_000)
    timings: Timings = Timings()


class TaskCancelled(Envelope, TaskRef):
    """Terminal: the task was cancelled (by the gateway, a drain or a pre-emption)."""

    type: Literal["task.cancelled"] = "task.cancelled"
    reason: ShortText = ""
    outputs: list[OutputFile] = Field(default_factory=list, max_length=10_000)
    timings: Timings = Timings()


# ------------------------------------------------------------------ gateway -> agent


class Welcome(Envelope):
    """Answer to ``hello``: the session is established."""

    type: Literal["welcome"] = "welcome"
    agent_id: ShortText
    session_id: ShortText
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=3600)]
    lease_ttl_s: Annotated[float, Field(gt=0, le=86_400)]
    server_time: AwareDatetime
    resume: list[ResumeEntry] = Field(default_factory=list, max_length=1024)
    pools: list[Pool] = Field(default_factory=lambda: [Pool.TEAM], max_length=2)
    sync: list[SyncModel] | None = Field(default=None, max_length=100_000)
    features: list[ShortText] = Field(default_factory=list, max_length=64)


class TaskAssign(Envelope, TaskRef):
    """The scheduler chose this agent for a task (the documented ``queued`` state)."""

    type: Literal["task.assign"] = "task.assign"
    pool: Pool
    tool: Tool
    workflow_id: ShortText = ""
    workflow_version: NonNegInt = 0
    workflow: dict[str, Any]
    injections: list[Injection] = Field(default_factory=list, max_length=100)
    inputs: list[InputFile] = Field(default_factory=list, max_length=100)
    required_models: list[ShortText] = Field(default_factory=list, max_length=1000)
    min_vram_gb: Annotated[float, Field(ge=0)] = 0
    timeout_s: Annotated[float, Field(ge=0)] = 0
    lease_expires_at: AwareDatetime


class TaskCancel(Envelope):
    """Abort a task; ``attempt`` omitted means every local attempt of ``task_id``."""

    type: Literal["task.cancel"] = "task.cancel"
    task_id: TaskId
    attempt: Attempt | None = None
    reason: ShortText = ""


class TaskUploadUrls(Envelope, TaskRef):
    """Reply to ``task.upload_request`` (``re`` = its id)."""

    type: Literal["task.upload_urls"] = "task.upload_urls"
    files: list[UploadTarget] = Field(max_length=1000)


class Ack(Envelope, TaskRef):
    """Acknowledges a terminal message (``re`` = its id); retransmission stops."""

    type: Literal["ack"] = "ack"


class Drain(Envelope):
    """Stop taking work; finish what is running."""

    type: Literal["drain"] = "drain"
    reason: ShortText = ""


class Sync(Envelope):
    """The team's active model set changed: ``models`` replaces the previous set whole."""

    type: Literal["sync"] = "sync"
    models: list[SyncModel] = Field(default_factory=list, max_length=100_000)


# ------------------------------------------------------------------ either direction


class Error(Envelope):
    """A protocol error about the message ``re`` (when it could be identified)."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: Text = ""


AgentMessage = Annotated[
    Hello
    | Status
    | TaskAccept
    | TaskReject
    | TaskProgress
    | TaskLog
    | TaskUploadRequest
    | TaskComplete
    | TaskFail
    | TaskCancelled
    | Error,
    Field(discriminator="type"),
]
"""Everything an agent sends."""

GatewayMessage = Annotated[
    Welcome | TaskAssign | TaskCancel | TaskUploadUrls | Ack | Drain | Sync | Error,
    Field(discriminator="type"),
]
"""Everything a gateway sends."""

TerminalMessage = TaskComplete | TaskFail | TaskCancelled
"""Messages that end a task attempt; retransmitted until acknowledged."""

AGENT_MESSAGE_TYPES: tuple[type[Envelope], ...] = (
    Hello,
    Status,
    TaskAccept,
    TaskReject,
    TaskProgress,
    TaskLog,
    TaskUploadRequest,
    TaskComplete,
    TaskFail,
    TaskCancelled,
    Error,
)
GATEWAY_MESSAGE_TYPES: tuple[type[Envelope], ...] = (
    Welcome,
    TaskAssign,
    TaskCancel,
    TaskUploadUrls,
    Ack,
    Drain,
    Sync,
    Error,
)
