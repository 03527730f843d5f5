"""The gateway's documented records: workflows, parameters, runs, tasks, agents, pairing.

Field names are the platform's (``docs/gateway.md``, after the public Cyberun docs).
These are API/domain models; the agent wire format lives in ``agent.protocol``.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
MAX_PARAMETER_KEYS = 100
MAX_REGION = 64


class ToolType(enum.StrEnum):
    """Runtimes a workflow targets."""

    COMFYUI = "comfyui"
    NERFSTUDIO = "nerfstudio"


class DispatchTarget(enum.StrEnum):
    """Where a run executes: a BYOC agent, or a ComfyUI-compatible cloud endpoint."""

    AGENT = "agent"
    COMFY_CLOUD = "comfy_cloud"


class TargetPool(enum.StrEnum):
    """Which agents may serve a run."""

    TEAM = "team"
    COMMUNITY = "community"


class WorkflowStatus(enum.StrEnum):
    """A disabled workflow cannot be run."""

    ACTIVE = "active"
    DISABLED = "disabled"


class ParameterType(enum.StrEnum):
    """Types of a ``ParameterDef``."""

    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    SELECT = "select"
    FILE = "file"


class TaskStatus(enum.StrEnum):
    """The documented task lifecycle."""

    PENDING = "pending"
    WAITING = "waiting"
    PROVISIONING = "provisioning"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Completed, failed and cancelled are final."""
        return self in {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}


Scalar = str | int | float | bool


class ApiModel(BaseModel):
    """Base of request/response bodies: unknown keys are refused (they are typos)."""

    model_config = ConfigDict(extra="forbid")


class ParameterDef(ApiModel):
    """One declared parameter of a workflow and where its value is injected."""

    key: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
    type: ParameterType
    label: Annotated[str, Field(max_length=200)] = ""
    description: Annotated[str, Field(max_length=2000)] = ""
    required: bool = False
    default: Scalar | None = None
    min: float | None = None
    max: float | None = None
    options: list[Scalar] | None = Field(default=None, max_length=1000)
    accept: Annotated[str, Field(max_length=500)] | None = None
    node_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    field: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    target_path: (
        Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")]
        | None
    ) = None

    @model_validator(mode="after")
    def _consistent(self) -> ParameterDef:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        if self.type is ParameterType.SELECT and not self.options:
            raise ValueError("a select parameter needs options")
        if (self.node_id is None) != (self.field is None):
            raise ValueError("node_id and field go together")
        return self


class WorkflowIn(ApiModel):
    """Create/import/update body of a workflow."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    description: Annotated[str, Field(max_length=5000)] = ""
    workflow_slug: Annotated[str, Field(max_length=100)] | None = None
    workflow_json: dict[str, Any]
    parameters: list[ParameterDef] = Field(default_factory=list, max_length=MAX_PARAMETER_KEYS)
    required_labels: list[Annotated[str, Field(min_length=1, max_length=63)]] = Field(
        default_factory=list, max_length=64
    )
    task_timeout: Annotated[int, Field(ge=0, le=7 * 86_400)] = 0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 0
    min_vram_gb: Annotated[float, Field(ge=0, le=4096)] = 0
    preferred_gpu: Annotated[str, Field(max_length=100)] | None = None
    required_models: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, max_length=1000
    )
    tool_type: ToolType = ToolType.COMFYUI
    default_dispatch_target: DispatchTarget = DispatchTarget.AGENT
    workflow_status: WorkflowStatus = WorkflowStatus.ACTIVE

    @field_validator("workflow_slug")
    @classmethod
    def _slug(cls, value: str | None) -> str | None:
        if value is not None and not SLUG_RE.fullmatch(value):
            raise ValueError("workflow_slug must match ^[a-z0-9]+(?:-[a-z0-9]+)*$")
        return value

    @model_validator(mode="after")
    def _targets(self) -> WorkflowIn:
        keys = [p.key for p in self.parameters]
        if len(keys) != len(set(keys)):
            raise ValueError("parameter keys must be unique")
        for param in self.parameters:
            if self.tool_type is ToolType.COMFYUI and param.node_id is None:
                raise ValueError(f"parameter {param.key}: a comfyui parameter needs node_id+field")
            if self.tool_type is ToolType.NERFSTUDIO and param.target_path is None:
                raise ValueError(f"parameter {param.key}: a nerfstudio parameter needs target_path")
        return self


class Workflow(WorkflowIn):
    """A stored workflow (one version)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    team_id: str
    version: int
    created_at: datetime
    updated_at: datetime


class RunRequest(ApiModel):
    """Body of ``POST /r/workflows/{id}/run`` (every field optional)."""

    parameters: dict[str, Any] | None = None
    dispatch_target: DispatchTarget | None = None
    target_pool: TargetPool = TargetPool.TEAM
    submitter_region: str | None = None
    tool_type: ToolType | None = None

    @field_validator("submitter_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is None:
            return None
        normalised = value.strip().lower()
        if len(normalised) > MAX_REGION:
            raise ValueError(f"submitter_region must be at most {MAX_REGION} characters")
        return normalised


class RunAccepted(ApiModel):
    """202 answer of a run request."""

    task_id: str


class TaskRecord(BaseModel):
    """The documented task record (``GET /r/tasks/{id}``)."""

    id: str
    workflow_id: str
    workflow_version: int
    task_status: TaskStatus
    task_error: str | None = None
    retry_count: int = 0
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    agent_id: str | None = None
    agent_labels: list[str] = Field(default_factory=list)
    gateway_id: str
    gpu_type: str | None = None
    dispatch_target: DispatchTarget
    target_pool: TargetPool
    tool_type: ToolType
    submitter_region: str = ""
    progress: float = 0.0


class PageMeta(BaseModel):
    """Paging block of list answers."""

    current_page: int
    per_page: int
    total_count: int


class TaskList(BaseModel):
    """``GET /r/tasks`` answer."""

    task_list: list[TaskRecord]
    page_meta: PageMeta


class TaskOutput(BaseModel):
    """The documented ``task_output`` block."""

    storage_key: str | None
    image_count: int
    outputs: dict[str, str] = Field(default_factory=dict)


class TaskResult(BaseModel):
    """``GET /r/tasks/{id}/result``."""

    id: str
    task_status: TaskStatus
    task_output: TaskOutput | None
    download_url: str | None
    download_urls: dict[str, str]
    expires_at: datetime | None
    task_error: str | None
    completed_at: datetime | None


class PresignRequest(ApiModel):
    """Body of ``POST /r/files/presign``."""

    file_name: Annotated[str, Field(min_length=1, max_length=255)]
    file_size: Annotated[int, Field(ge=1)]
    content_type: Annotated[
        str, Field(min_length=3, max_length=255, pattern=r"^[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+$")
    ]


class PresignResponse(BaseModel):
    """Answer of ``POST /r/files/presign``: PUT the bytes with ``upload_headers`` verbatim."""

    file_key: str
    upload_url: str
    upload_headers: dict[str, str]
    expires_at: datetime


class PairStartRequest(ApiModel):
    """Optional body of ``POST /desktop/pair/start``."""

    device_name: Annotated[str, Field(max_length=64)] = ""


class PairStartResponse(BaseModel):
    """Answer of ``POST /desktop/pair/start``: show ``user_code``, poll with ``device_code``."""

    device_code: str
    user_code: str
    verification_uri: str
    expires_in: int
    interval: int


class PairPollRequest(ApiModel):
    """Body of ``POST /desktop/pair/poll``."""

    device_code: Annotated[str, Field(min_length=1, max_length=256)]


class PairPollResponse(BaseModel):
    """``{"status": "pending"}``, or once ``approved`` with both secrets."""

    status: Literal["pending", "approved"]
    raw_key: str | None = None
    """The ``dk-`` device credential (approved only)."""
    agent_key: str | None = None
    """The companion ``ak-`` agent key (approved only)."""


class PairApproveRequest(ApiModel):
    """Body of ``POST /desktop/pair/approve`` (case, dashes and spaces are ignored)."""

    user_code: Annotated[str, Field(min_length=1, max_length=32)]


class PairApproveResponse(BaseModel):
    """Answer of ``POST /desktop/pair/approve``."""

    status: Literal["approved"]
    user_code: str
    team_id: str


class GpuDevice(BaseModel):
    """One entry of ``system_stats.gpu_devices``."""

    device_name: str
    device_type: Literal["cuda"] = "cuda"
    vram_total: int
    vram_free: int


class SystemStatsOut(BaseModel):
    """The documented ``system_stats`` block of an agent."""

    comfyui_version: str | None = None
    pytorch_version: str | None = None
    os_type: str | None = None
    gpu_devices: list[GpuDevice] = Field(default_factory=list)


class AgentRecord(BaseModel):
    """The documented fields of ``GET /r/agents``."""

    agent_id: str
    agent_status: str
    agent_status_reason: str | None = None
    """Why the agent is ``unhealthy``/``syncing``/``tunnel`` (from its last ``status``)."""
    agent_labels: list[str]
    last_heartbeat: datetime | None
    agent_version: str
    tool: str | None
    tool_version: str | None
    comfyui_version: str | None
    gpu_capacity: int
    running_count: int
    running_tasks: list[str]
    current_task_id: str | None
    tasks_completed: int
    platform_arch: str
    connected_at: datetime
    sync_phase: str = ""
    sync_detail: str = ""
    sync_percent: float = 0.0
    region: str = ""
    pools: list[str] = Field(default_factory=list)
    system_stats: SystemStatsOut = SystemStatsOut()


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: ``{"error": {code, message, field?, rule?}}``."""

    class Detail(BaseModel):
        """What went wrong, naming the field and the rule where there is one."""

        code: str
        message: str
        field: str | None = None
        rule: str | None = None

    error: Detail


# ---------------------------------------------------------------------- team models

MODEL_TYPE_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
FILE_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
MAX_MODEL_BYTES = 64 * 1024**3
"""The largest model ``/models/presign`` accepts (64 GiB, one PUT)."""
MAX_MODEL_PATH = 256
"""The longest ``model_path`` (what ``SyncModel.model_path`` carries on the wire)."""


class ModelStatus(enum.StrEnum):
    """An active model is in the team's sync set; a disabled one is not."""

    ACTIVE = "active"
    DISABLED = "disabled"


class ModelIn(ApiModel):
    """Body of ``POST /models/presign`` and ``POST /models``."""

    model_type: Annotated[str, Field(max_length=64, pattern=MODEL_TYPE_PATTERN)]
    """A ComfyUI ``models/`` subfolder: ``checkpoints``, ``loras``, ``vae``…"""
    model_path: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_PATH)]
    """Relative to ``models/<model_type>/`` (no ``..``, no backslash, never absolute)."""
    file_size: Annotated[int, Field(ge=1, le=MAX_MODEL_BYTES)]
    file_hash: Annotated[str, Field(max_length=71, pattern=FILE_HASH_PATTERN)]


class ModelPresignResponse(BaseModel):
    """Answer of ``POST /models/presign``: PUT the bytes with ``upload_headers`` verbatim."""

    upload_url: str
    upload_headers: dict[str, str]
    storage_key: str
    expires_at: datetime
    already_uploaded: bool
    """The team's storage already holds this content: skip the PUT (it would answer 412)."""


class ModelRecord(BaseModel):
    """A registered team model."""

    id: str
    model_type: str
    model_path: str
    file_size: int
    file_hash: str
    model_status: ModelStatus
    created_at: datetime


class ModelPatch(ApiModel):
    """Body of ``PATCH /models/{id}``."""

    model_status: ModelStatus


class ModelList(BaseModel):
    """``GET /models`` answer."""

    model_list: list[ModelRecord]
