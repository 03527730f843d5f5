"""The agent's configuration: one typed, frozen `Settings`, and where each value came from.

Sources, highest precedence first::

    flags         --slots 2                              (the CLI passes them as dotted keys)
    environment   CYBERUN_AGENT_TIMEOUTS__CONNECT_S=5    (nested keys joined with ``__``)
    file          cyberun-agent.yaml                     (first existing of the lookup order)
    defaults      the models below

The file is looked up at ``--config``, then ``$CYBERUN_AGENT_CONFIG``, then
``/etc/cyberun-agent/cyberun-agent.yaml``, then ``$XDG_CONFIG_HOME/cyberun-agent/`` (default
``~/.config/cyberun-agent/``); the first existing file wins, and an explicitly named file that
does not exist is an error.

This is the only module that reads ``os.environ``: `load_settings` captures everything it
needs (``HOME``, ``XDG_*``, ``CREDENTIALS_DIRECTORY``) at load time. Every invalid value
becomes one `ConfigError` naming the dotted key, its source and the rule; a malformed
credential becomes a `CredentialError` that never repeats the value. Reading, merging and
translating the sources is `agent.config_sources`; this module supplies the models, the
environment and the default locations.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent import config_sources

# Names marked "re-export" belong to this module's API; mypy --strict needs `X as X` for that.
from agent.config_sources import CONFIG_ENV as CONFIG_ENV  # noqa: PLC0414 re-export
from agent.config_sources import ENV_PREFIX as ENV_PREFIX  # noqa: PLC0414 re-export
from agent.config_sources import FLAG_NAMES as FLAG_NAMES  # noqa: PLC0414 re-export
from agent.config_sources import (
    Layers,
    env_layer,
    flag_layer,
    leaf_sources,
    read_config_file,
    source_for,
    split_commas,
    validate,
)
from agent.config_sources import flag_label as flag_label  # noqa: PLC0414 re-export
from agent.errors import ConfigError, CredentialError

CONFIG_FILE_NAME = "cyberun-agent.yaml"
SYSTEM_CONFIG_FILE = Path("/etc/cyberun-agent") / CONFIG_FILE_NAME
CREDENTIAL_NAME = "cyberun-agent-credential"  # systemd LoadCredential= name
AGENT_ID_FILE = "agent_id"
LOGIN_CREDENTIAL_FILE = "credential"  # <state_dir>/credential, written by `login`

_CREDENTIAL_RE = re.compile(r"(dk|ak)-[A-Za-z0-9_-]{20,256}")
_CREDENTIAL_RULE = "must look like dk-… or ak-… (the value is not shown)"
_AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_WINDOW_RE = re.compile(r"(\d{2}):(\d{2})\s*-\s*(\d{2}):(\d{2})")
_GATEWAY_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_AGENT_WS_PATH = "/agent/v1/ws"
_LOOSE_MODE_BITS = 0o077

# ---------------------------------------------------------------- value rules


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    context = info.context
    return context if isinstance(context, Mapping) else {}


def _expand_path(value: Path, info: ValidationInfo) -> Path:
    """Expand ``~`` (with the HOME captured at load time) and make the path absolute."""
    text = str(value)
    if text == "~" or text.startswith("~/"):
        home = _context(info).get("home")
        base = Path(home) if home else Path.home()
        value = base / text[2:]
    elif text.startswith("~"):
        value = value.expanduser()
    return value if value.is_absolute() else value.absolute()


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _strip(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


def _check_label(value: str) -> str:
    if not _LABEL_RE.fullmatch(value):
        raise ValueError(
            "must be 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    return value


def _check_agent_id(value: str) -> str:
    if not _AGENT_ID_RE.fullmatch(value):
        raise ValueError(
            "must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return value


def _parse_window(text: str) -> tuple[int, int]:
    """Parse ``"HH:MM-HH:MM"`` into minutes since midnight; the end may be ``24:00``."""
    match = _WINDOW_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError('must look like "HH:MM-HH:MM", e.g. "22:00-06:00"')
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        raise ValueError("has a time outside 00:00-24:00")
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if start == end % (24 * 60):
        raise ValueError("start and end must differ (leave hours empty for all day)")
    return start, end


def _check_window(value: str) -> str:
    start, end = _parse_window(value)
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_gateway_url(value: str, *, allow_insecure: bool) -> str:
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme not in _GATEWAY_SCHEMES:
        raise ValueError("must start with https://, wss://, http:// or ws://")
    if not parts.hostname:
        raise ValueError("must include a host name")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain a user name or password")
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query or fragment")
    try:
        _ = parts.port  # reading .port validates it
    except ValueError:
        raise ValueError("has an invalid port") from None
    insecure = scheme in {"http", "ws"}
    if insecure and not allow_insecure and not _is_loopback(parts.hostname):
        raise ValueError(
            "plain http:// or ws:// is only allowed for a loopback host "
            "(127.0.0.0/8, ::1, localhost); use https:// or wss://, "
            "or set allow_insecure_gateway: true"
        )
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def derive_agent_ws_url(gateway_url: str) -> str:
    """Return the agent endpoint ``ws(s)://host[:port][/base]/agent/v1/ws`` of a gateway URL.

    ``http`` becomes ``ws`` and ``https`` becomes ``wss``; a URL that already ends with the
    endpoint path is returned with only its scheme mapped.
    """
    parts = urlsplit(gateway_url)
    path = parts.path.rstrip("/")
    if not path.endswith(_AGENT_WS_PATH):
        path += _AGENT_WS_PATH
    return urlunsplit((_GATEWAY_SCHEMES[parts.scheme.lower()], parts.netloc, path, "", ""))


def _check_http_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.strip().rstrip("/")


def _auto_slots(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in {"", "auto"}:
        return None
    return value


def _team_flag(value: object) -> object:
    """Accept ``team: true`` and ``team: {enabled: true}``."""
    if isinstance(value, Mapping) and set(value) <= {"enabled"}:
        return value.get("enabled", True)
    return value


ExpandedPath = Annotated[Path, AfterValidator(_expand_path)]
Seconds = Annotated[float, Field(gt=0)]
Label = Annotated[str, BeforeValidator(_lower), AfterValidator(_check_label)]
HoursWindow = Annotated[str, AfterValidator(_check_window)]
AgentId = Annotated[str, BeforeValidator(_strip), AfterValidator(_check_agent_id)]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]

_FROZEN = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

# ---------------------------------------------------------------- default locations


def running_as_root() -> bool:
    """Say whether the process runs as root (system-wide default paths then apply)."""
    return os.geteuid() == 0


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path.home()


def _xdg(environ: Mapping[str, str], name: str, fallback: str) -> Path:
    value = environ.get(name, "")
    return Path(value) if value and Path(value).is_absolute() else _home(environ) / fallback


def default_state_dir(environ: Mapping[str, str], *, root: bool) -> Path:
    """Return the default ``state_dir``: ``/var/lib/cyberun-agent`` as root, else XDG state."""
    if root:
        return Path("/var/lib/cyberun-agent")
    return _xdg(environ, "XDG_STATE_HOME", ".local/state") / "cyberun-agent"


def default_cache_dir(environ: Mapping[str, str], *, root: bool) -> Path:
    """Return the default ``cache_dir``: ``/var/cache/cyberun-agent`` as root, else XDG cache."""
    if root:
        return Path("/var/cache/cyberun-agent")
    return _xdg(environ, "XDG_CACHE_HOME", ".cache") / "cyberun-agent"


def user_config_file(environ: Mapping[str, str]) -> Path:
    """Return the per-user config file path (``~/.config/cyberun-agent/cyberun-agent.yaml``)."""
    return _xdg(environ, "XDG_CONFIG_HOME", ".config") / "cyberun-agent" / CONFIG_FILE_NAME


def default_init_path(
    environ: Mapping[str, str] | None = None, *, root: bool | None = None
) -> Path:
    """Return where ``config init`` writes by default (system-wide as root, else per user)."""
    env = os.environ if environ is None else environ
    is_root = running_as_root() if root is None else root
    return SYSTEM_CONFIG_FILE if is_root else user_config_file(env)


# ---------------------------------------------------------------- models


class TimeoutSettings(BaseModel):
    """Every wait the agent makes, in seconds (each a number > 0)."""

    model_config = _FROZEN

    connect_s: Seconds = 10.0
    ping_interval_s: Seconds = 20.0
    ping_timeout_s: Seconds = 20.0
    heartbeat_s: Seconds = 15.0  # until the gateway's welcome says otherwise
    ack_s: Seconds = 10.0
    retransmit_s: Seconds = 5.0  # re-send interval of unacknowledged terminal messages
    drain_grace_s: Seconds = 900.0
    cancel_grace_s: Seconds = 15.0
    kill_grace_s: Seconds = 10.0
    upload_s: Seconds = 3600.0
    download_s: Seconds = 3600.0
    runtime_ready_s: Seconds = 120.0


class LimitSettings(BaseModel):
    """Sizes and rates the agent enforces on itself."""

    model_config = _FROZEN

    max_frame_bytes: int = Field(default=1_048_576, ge=65_536)
    max_input_bytes: int = Field(default=524_288_000, ge=1)
    max_output_bytes: int = Field(default=10_737_418_240, ge=1)
    progress_per_s: float = Field(default=4.0, gt=0, le=20)
    log_lines_per_batch: int = Field(default=200, ge=1)
    log_bytes_per_task: int = Field(default=5_242_880, ge=0)
    min_free_disk_bytes: int = Field(default=1_073_741_824, ge=0)


class CommunityPoolSettings(BaseModel):
    """Opt-in to the community pool: tasks from any team, within limits and hours."""

    model_config = _FROZEN

    enabled: bool = False
    max_concurrent: int = Field(default=1, ge=1)
    hours: tuple[HoursWindow, ...] = ()  # "HH:MM-HH:MM" windows; may wrap midnight
    timezone: str = "UTC"
    only_when_idle: bool = False
    """Community credit only while no team task runs and the GPUs are idle (see below)."""
    idle_max_utilization: float = Field(default=10.0, ge=0, le=100)
    """``only_when_idle``: every usable GPU's utilisation must be below this (percent)."""
    idle_check_processes: bool = True
    """``only_when_idle``: a GPU process outside the agent's own process tree means busy."""
    preempt: bool = False

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                'must be an IANA time zone name such as "UTC" or "Europe/Berlin"'
            ) from None
        return value

    def is_open(self, at: datetime) -> bool:
        """Say whether the aware datetime *at* falls inside the hours (always, if none)."""
        if not self.hours:
            return True
        local = at.astimezone(ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        for window in self.hours:
            start, end = _parse_window(window)
            inside = start <= minute < end if start < end else minute >= start or minute < end
            if inside:
                return True
        return False


class PoolSettings(BaseModel):
    """The pools this agent serves: always its team's, optionally the community's."""

    model_config = _FROZEN

    team: Annotated[bool, BeforeValidator(_team_flag)] = True
    community: CommunityPoolSettings = Field(default_factory=CommunityPoolSettings)

    @field_validator("team")
    @classmethod
    def _team_always_on(cls, value: bool) -> bool:
        if not value:
            raise ValueError("the team pool cannot be disabled")
        return value

    @property
    def names(self) -> list[str]:
        """Return the pool names advertised to the gateway."""
        return ["team", "community"] if self.community.enabled else ["team"]


NerfstudioMethod = Literal[
    "splatfacto", "splatfacto-big", "nerfacto", "nerfacto-big", "nerfacto-huge"
]
_ALL_METHODS: tuple[NerfstudioMethod, ...] = (
    "splatfacto",
    "splatfacto-big",
    "nerfacto",
    "nerfacto-big",
    "nerfacto-huge",
)
NodeClass = Annotated[str, Field(min_length=1, max_length=200)]


class ComfyUIPolicy(BaseModel):
    """What a policed ComfyUI graph may contain (see ``docs/community.md``)."""

    model_config = _FROZEN

    allow_nodes: Annotated[tuple[NodeClass, ...], BeforeValidator(split_commas)] = ()
    """Node classes allowed besides ComfyUI's built-in nodes (e.g. a vetted custom node)."""
    deny_nodes: Annotated[tuple[NodeClass, ...], BeforeValidator(split_commas)] = ()
    """Built-in node classes refused all the same."""
    max_side: int = Field(default=2048, ge=1)
    """Largest ``width``/``height`` (pixels)."""
    max_pixels: int = Field(default=4_194_304, ge=1)
    """Largest ``width`` x ``height`` of one node."""
    max_batch_size: int = Field(default=4, ge=1)
    max_steps: int = Field(default=100, ge=1)
    max_frames: int = Field(default=240, ge=1)
    """Largest frame count (``length``, ``frames``, ``video_frames``, ``num_frames``…)."""
    max_seconds: float = Field(default=60.0, gt=0)
    """Largest media length (``seconds``, ``duration``) a node may generate."""
    max_scale: float = Field(default=4.0, gt=0)
    """Largest upscale factor (``scale_by``, ``upscale_factor``…)."""
    allow_models: Annotated[tuple[NodeClass, ...], BeforeValidator(split_commas)] = ()
    """Model file names usable besides the models the agent's cache holds."""


class NerfstudioPolicy(BaseModel):
    """What a policed Nerfstudio spec may ask for."""

    model_config = _FROZEN

    methods: Annotated[tuple[NerfstudioMethod, ...], BeforeValidator(split_commas)] = _ALL_METHODS
    allow_options: Annotated[tuple[str, ...], BeforeValidator(split_commas)] | None = None
    """``train.options``/``train.dataparser`` keys allowed; ``None``: all the spec allows."""
    max_iterations: int = Field(default=30_000, ge=1)
    max_points: int = Field(default=2_000_000, ge=1_000)
    max_frames: int = Field(default=300, ge=10)
    """Largest ``process.num_frames_target``."""


class PolicySettings(BaseModel):
    """The policy engine: checked before ``task.accept`` (community tasks; team with ``team``)."""

    model_config = _FROZEN

    team: bool = False
    """Police team tasks too (community tasks always are)."""
    max_duration_s: float = Field(default=3600.0, gt=0)
    """Longest a policed task may run: a longer ``timeout_s`` is refused, none gets this."""
    comfyui: ComfyUIPolicy = Field(default_factory=ComfyUIPolicy)
    nerfstudio: NerfstudioPolicy = Field(default_factory=NerfstudioPolicy)

    def applies(self, pool: str) -> bool:
        """Say whether tasks of *pool* (``team``/``community``) are policed."""
        return pool == "community" or self.team


class ComfyUILaunch(BaseModel):
    """Launch and supervise ComfyUI as a child process."""

    model_config = _FROZEN

    python: ExpandedPath
    main: ExpandedPath
    args: tuple[str, ...] = ()
    port: int = Field(default=8188, ge=1, le=65535)
    base_directory: ExpandedPath | None = None
    gpus: Annotated[
        tuple[Annotated[int, Field(ge=0, le=63)], ...], BeforeValidator(split_commas)
    ] = ()
    """One ComfyUI per listed GPU (``CUDA_VISIBLE_DEVICES``, ports ``port``, ``port+1``…);
    empty: a single ComfyUI with every device visible."""


class ComfyUISettings(BaseModel):
    """ComfyUI: attach to ``url`` or ``launch`` it; neither disables the runtime."""

    model_config = _FROZEN

    url: Annotated[str, AfterValidator(_check_http_url)] | None = None
    launch: ComfyUILaunch | None = None
    directory: ExpandedPath | None = None
    """The attached ComfyUI's base directory (its ``input/``, ``output/``, ``temp/``): the agent
    deletes a community task's files there. Launch mode knows it already."""

    @model_validator(mode="after")
    def _url_or_launch(self) -> Self:
        if self.url is not None and self.launch is not None:
            raise ValueError("set either url or launch, not both")
        if self.launch is not None and self.directory is not None:
            raise ValueError("directory is for an attached ComfyUI (url); launch knows its own")
        return self

    @property
    def enabled(self) -> bool:
        """Say whether ComfyUI is configured at all."""
        return self.url is not None or self.launch is not None


RuntimePlugin = Annotated[
    str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$", max_length=200)
]


@dataclass(frozen=True)
class SystemdEnvironment:
    """What systemd passes a ``Type=notify`` service (captured at load time)."""

    notify_socket: str | None = None
    watchdog_usec: int | None = None
    watchdog_pid: int | None = None


def _systemd_environment(env: Mapping[str, str]) -> SystemdEnvironment:
    def number(name: str) -> int | None:
        value = env.get(name, "")
        return int(value) if value.isdigit() else None

    return SystemdEnvironment(
        notify_socket=env.get("NOTIFY_SOCKET") or None,
        watchdog_usec=number("WATCHDOG_USEC"),
        watchdog_pid=number("WATCHDOG_PID"),
    )


class NerfstudioSettings(BaseModel):
    """Nerfstudio: run the ``ns-*`` commands found in ``bin_dir`` (or on PATH)."""

    model_config = _FROZEN

    enabled: bool = False
    bin_dir: ExpandedPath | None = None
    keep_checkpoint: bool = False
    torch_home: ExpandedPath | None = None
    """``TORCH_HOME`` for the ``ns-*`` commands (pre-seeded weights: nothing is downloaded)."""
    colmap_gpu: bool = False
    """COLMAP's SIFT on the GPU in ``ns-process-data`` (needs a CUDA build of COLMAP)."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into its parts; ``ValueError`` naming the rule."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('must look like "127.0.0.1:9464" (HOST:PORT, [v6]:PORT for IPv6)')
    return host, int(port)


def _check_listen(value: str) -> str:
    value = value.strip()
    if value:
        parse_listen(value)
    return value


class ObserveSettings(BaseModel):
    """The local endpoint: ``/healthz``, ``/readyz``, ``/metrics`` and ``/status``."""

    model_config = _FROZEN

    listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:9464"
    """``HOST:PORT`` to serve on; "" turns the endpoint off."""
    token_file: ExpandedPath | None = None
    """A file holding the bearer token ``/metrics`` and ``/status`` require; needed to bind
    beyond loopback (``/healthz`` and ``/readyz`` stay open for probes)."""

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> Self:
        if self.listen and not _is_loopback(parse_listen(self.listen)[0]) and not self.token_file:
            raise ValueError(
                "binding observe.listen beyond loopback needs observe.token_file "
                "(/metrics and /status would be open to the network)"
            )
        return self

    @property
    def address(self) -> tuple[str, int] | None:
        """Where to listen, or ``None`` when the endpoint is off."""
        return parse_listen(self.listen) if self.listen else None

    def token(self) -> str | None:
        """The bearer token (read from ``token_file`` each call), or ``None``."""
        if self.token_file is None:
            return None
        origin = f"observe.token_file {self.token_file}"
        try:
            value = self.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("observe.token_file", origin, f"cannot read it: {exc}") from None
        if len(value) < 16:
            raise ConfigError("observe.token_file", origin, "the token must be 16+ characters")
        return value


class ModelSettings(BaseModel):
    """The team's models: where they are placed, and how much cache they may use."""

    model_config = _FROZEN

    dir: ExpandedPath | None = None
    """The runtime's models folder (``models/<type>/<path>`` go there); default: the launched
    ComfyUI's ``<base_directory>/models``, else ``<cache_dir>/comfyui-models``."""
    budget_bytes: int | None = Field(default=None, ge=0)
    """Most bytes of cached models; beyond it the least recently used ones outside the
    team's set are evicted. None: no limit."""
    parallel: int = Field(default=2, ge=1, le=16)
    """Downloads at once."""


class GpuSettings(BaseModel):
    """GPU discovery (NVML) and the health limits beyond which a GPU gets no work."""

    model_config = _FROZEN

    enabled: bool = True
    """False: never open NVML; the agent advertises no GPU (CPU-only)."""
    max_temperature_c: float = Field(default=90.0, gt=0, le=150)
    """A GPU at or above this temperature is not offered work until it cools down."""
    devices: Annotated[tuple[str, ...], BeforeValidator(split_commas)] = ()
    """The GPUs this agent owns, by NVML index or UUID; empty: every GPU of the machine."""


class RuntimeSettings(BaseModel):
    """The runtimes this agent offers."""

    model_config = _FROZEN

    comfyui: ComfyUISettings = Field(default_factory=ComfyUISettings)
    nerfstudio: NerfstudioSettings = Field(default_factory=NerfstudioSettings)
    extra: Annotated[tuple[RuntimePlugin, ...], BeforeValidator(split_commas)] = ()
    """Additional runtimes as ``module:factory`` (``factory(settings) -> Runtime``)."""


def _default_state_dir() -> Path:
    return default_state_dir(os.environ, root=running_as_root())


def _default_cache_dir() -> Path:
    return default_cache_dir(os.environ, root=running_as_root())


def _default_work_dir(data: dict[str, Any]) -> Path:
    state_dir = data.get("state_dir")  # absent only when state_dir itself failed validation
    return (state_dir if isinstance(state_dir, Path) else _default_state_dir()) / "work"


class Settings(BaseModel):
    """Everything the agent is configured with; build it with `load_settings`."""

    model_config = _FROZEN

    # Declared before gateway_url: the gateway_url rule reads it.
    allow_insecure_gateway: bool = False
    gateway_url: str | None = None
    credential: SecretStr | None = None
    credential_file: ExpandedPath | None = None
    agent_id: AgentId | None = None
    region: str = ""
    agent_labels: Annotated[tuple[Label, ...], BeforeValidator(split_commas)] = ()
    pools: PoolSettings = Field(default_factory=PoolSettings)
    slots: Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_auto_slots)] = None
    runtimes: RuntimeSettings = Field(default_factory=RuntimeSettings)
    gpu: GpuSettings = Field(default_factory=GpuSettings)
    observe: ObserveSettings = Field(default_factory=ObserveSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    state_dir: ExpandedPath = Field(default_factory=_default_state_dir)
    work_dir: ExpandedPath = Field(default_factory=_default_work_dir)
    cache_dir: ExpandedPath = Field(default_factory=_default_cache_dir)
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"
    log_format: Annotated[LogFormat, BeforeValidator(_lower)] = "auto"
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)

    _credentials_directory: Path | None = PrivateAttr(default=None)
    _systemd: SystemdEnvironment = PrivateAttr(default_factory=SystemdEnvironment)

    @field_validator("gateway_url")
    @classmethod
    def _check_gateway(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        allow = info.data.get("allow_insecure_gateway") is True
        return _check_gateway_url(value, allow_insecure=allow)

    @field_validator("credential")
    @classmethod
    def _check_credential(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value().strip()
        if not _CREDENTIAL_RE.fullmatch(secret):
            raise ValueError(_CREDENTIAL_RULE)
        return SecretStr(secret)

    @field_validator("region", mode="before")
    @classmethod
    def _normalise_region(cls, value: object) -> object:
        if value is None:
            return ""
        if isinstance(value, str):
            value = value.strip().lower()
            if len(value) > 64:
                raise ValueError("must be at most 64 characters")
        return value

    @field_validator("agent_labels")
    @classmethod
    def _dedupe_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _community_can_clean_up(self) -> Self:
        comfyui = self.runtimes.comfyui
        if self.pools.community.enabled and comfyui.url is not None and comfyui.directory is None:
            raise ValueError(
                "runtimes.comfyui.directory is required when pools.community.enabled and ComfyUI"
                " is attached by url: the agent deletes each community task's files there"
            )
        return self

    @model_validator(mode="after")
    def _capture_credentials_directory(self, info: ValidationInfo) -> Self:
        context = _context(info)
        directory = (
            context.get("credentials_directory")
            if "credentials_directory" in context
            else os.environ.get("CREDENTIALS_DIRECTORY")
        )
        self._credentials_directory = Path(directory) if directory else None
        systemd = context.get("systemd")
        self._systemd = systemd if isinstance(systemd, SystemdEnvironment) else SystemdEnvironment()
        return self

    @property
    def systemd(self) -> SystemdEnvironment:
        """``NOTIFY_SOCKET``/``WATCHDOG_*`` as they were when the settings were loaded."""
        return self._systemd

    @property
    def agent_ws_url(self) -> str:
        """Return the gateway's agent endpoint; raises `ConfigError` when no gateway is set."""
        if self.gateway_url is None:
            raise ConfigError("gateway_url", "default", "is required to run the agent")
        return derive_agent_ws_url(self.gateway_url)

    @property
    def pool_names(self) -> list[str]:
        """Return the pool names this agent serves (``["team"]`` or ``["team", "community"]``)."""
        return self.pools.names

    def credential_origin(self) -> str | None:
        """Say where the credential comes from, without reading it; None when there is none."""
        if self.credential is not None:
            return "setting credential"
        found = self._credential_path()
        return found[1] if found is not None else None

    def credential_value(self) -> str | None:
        """Return the credential: ``credential`` > ``credential_file`` > systemd credential.

        Reads the file each call. Raises `CredentialError` (never echoing the value) when the
        file cannot be read or its content does not look like ``dk-…``/``ak-…``.
        """
        if self.credential is not None:
            return self.credential.get_secret_value()
        found = self._credential_path()
        if found is None:
            return None
        path, origin = found
        return pick_credential(_read_secret_file(path, origin), origin)

    def _credential_path(self) -> tuple[Path, str] | None:
        if self.credential_file is not None:
            return self.credential_file, f"credential_file {self.credential_file}"
        if self._credentials_directory is not None:
            path = self._credentials_directory / CREDENTIAL_NAME
            if path.is_file():
                return path, f"systemd credential {path}"
        stored = self.state_dir / LOGIN_CREDENTIAL_FILE
        return (stored, f"login credential {stored}") if stored.is_file() else None

    def models_dir(self) -> Path:
        """Where the team's models are placed (see ``models.dir``)."""
        if self.models.dir is not None:
            return self.models.dir
        launch = self.runtimes.comfyui.launch
        if launch is not None and launch.base_directory is not None:
            return launch.base_directory / "models"
        return self.cache_dir / "comfyui-models"

    @property
    def login_credential_file(self) -> Path:
        """Where ``cyberun-agent login`` stores the keys: ``credential_file``, else state_dir."""
        return self.credential_file or self.state_dir / LOGIN_CREDENTIAL_FILE


def pick_credential(text: str, origin: str) -> str:
    """The credential in a credential file's ``text``.

    The file holds one key, or the pair ``cyberun-agent login`` writes (the ``dk-`` device
    credential and its companion ``ak-`` agent key, one per line; blank lines and ``#``
    comments are ignored). The connection uses the ``ak-`` when there is one: it is the
    key meant for the long-lived agent process. Raises `CredentialError` (never echoing a
    value) for a line that is not a credential.
    """
    lines = (line.strip() for line in text.splitlines())
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise credential_error(origin, "the file is empty")
    if not all(_CREDENTIAL_RE.fullmatch(key) for key in keys):
        raise credential_error(origin, _CREDENTIAL_RULE)
    return next((key for key in keys if key.startswith("ak-")), keys[0])


def credential_error(source: str, rule: str) -> CredentialError:
    """Build the one-line credential error, in the same shape as `ConfigError`."""
    return CredentialError(f"config error: credential (from {source}): {rule}")


def credential_kind(value: str) -> str:
    """Return the kind prefix of a well-formed credential (``"dk"`` or ``"ak"``)."""
    return value.split("-", 1)[0]


def _read_secret_file(path: Path, origin: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise credential_error(origin, f"cannot read the file: {reason}") from None
    if not value:
        raise credential_error(origin, "the file is empty")
    return value


# ---------------------------------------------------------------- agent id


def generate_agent_id(hostname: str) -> str:
    """Return ``<sanitised short hostname>-<8 hex digits>``."""
    base = re.sub(r"[^a-z0-9._-]+", "-", hostname.split(".", 1)[0].lower())
    base = re.sub(r"^[^a-z0-9]+", "", base)[:55].rstrip("-._") or "agent"
    return f"{base}-{secrets.token_hex(4)}"


def write_private_file(path: Path, text: str, *, overwrite: bool = False) -> None:
    """Create *path* with mode 0600 from the start (parents 0700); atomic when overwriting.

    Raises `FileExistsError` when *path* exists and *overwrite* is false.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if overwrite else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    if overwrite:
        target.replace(path)


def _read_agent_id(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "agent_id", str(path), f"cannot read the stored agent id: {exc}"
        ) from None
    if not _AGENT_ID_RE.fullmatch(value):
        raise ConfigError("agent_id", str(path), "the stored agent id is invalid; fix or delete it")
    return value


def resolve_agent_id(settings: Settings) -> str:
    """Return ``agent_id``, or the one generated once and kept in ``state_dir/agent_id``."""
    if settings.agent_id is not None:
        return settings.agent_id
    path = settings.state_dir / AGENT_ID_FILE
    stored = _read_agent_id(path)
    if stored is not None:
        return stored
    agent_id = generate_agent_id(socket.gethostname())
    try:
        write_private_file(path, agent_id + "\n")
    except FileExistsError:  # another process won the race; its id is the id
        stored = _read_agent_id(path)
        if stored is None:
            raise
        return stored
    except OSError as exc:
        raise ConfigError("state_dir", str(path), f"cannot store the agent id: {exc}") from None
    return agent_id


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedSettings:
    """Validated settings, the source of every key, the file read and any warnings."""

    settings: Settings
    sources: dict[str, str]  # dotted leaf key -> "default" | "FILE:LINE" | "env X" | "flag --x"
    config_file: Path | None
    warnings: tuple[str, ...] = ()

    def source_of(self, key: str) -> str:
        """Return where *key* (dotted) came from."""
        return source_for(key, self.sources)

    def check_runnable(self) -> None:
        """Check that ``run`` could start: a gateway URL and a well-formed credential.

        Raises `ConfigError` (no gateway) or `CredentialError` (missing or malformed).
        """
        if self.settings.gateway_url is None:
            raise ConfigError(
                "gateway_url",
                self.source_of("gateway_url"),
                "is required to run the agent (config file, "
                f"{ENV_PREFIX}GATEWAY_URL or --gateway-url)",
            )
        if self.settings.credential_value() is None:
            raise credential_error(
                "default",
                f"is required to run the agent ({ENV_PREFIX}CREDENTIAL, credential_file, "
                f"--credential-file or the systemd credential {CREDENTIAL_NAME})",
            )


def load_settings(
    *,
    config_path: Path | None = None,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedSettings:
    """Load and validate the settings from flags > environment > file > defaults.

    *flags* maps dotted keys (``"pools.community.enabled"``) to values; None values are
    ignored. *environ* defaults to ``os.environ``. Raises `ConfigError` or `CredentialError`.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    layers = Layers()
    config_file = find_config_file(config_path, env)
    file_data: dict[str, Any] = {}
    if config_file is not None:
        file_data, file_sources = read_config_file(config_file, Settings)
        layers.merge(file_data, file_sources)
    layers.merge(*env_layer(env, Settings))
    layers.merge(*flag_layer(flags or {}))
    root = running_as_root()
    for key, default in (
        ("state_dir", default_state_dir(env, root=root)),
        ("cache_dir", default_cache_dir(env, root=root)),
    ):
        layers.data.setdefault(key, str(default))
    context = {
        "home": str(_home(env)),
        "credentials_directory": env.get("CREDENTIALS_DIRECTORY"),
        "systemd": _systemd_environment(env),
    }
    settings = _validate(layers, context)
    warnings = _permission_warnings(settings, config_file, "credential" in file_data)
    return LoadedSettings(settings, leaf_sources(settings, layers.sources), config_file, warnings)


def _validate(layers: Layers, context: Mapping[str, Any]) -> Settings:
    """Validate the merged layers; an invalid credential is a `CredentialError`."""
    try:
        return validate(Settings, layers, context)
    except ConfigError as error:
        if error.key != "credential":
            raise
        raise credential_error(error.source, error.rule) from None


def find_config_file(config_path: Path | None, environ: Mapping[str, str]) -> Path | None:
    """Return the config file to read: ``--config``, ``$CYBERUN_AGENT_CONFIG``, then defaults.

    Raises `ConfigError` when an explicitly named file does not exist.
    """
    defaults = (SYSTEM_CONFIG_FILE, user_config_file(environ))
    return config_sources.find_config_file(
        config_path, environ, home=_home(environ), defaults=defaults
    )


def loose_permissions(path: Path) -> int | None:
    """Return the mode of *path* when group or others may access it, else None."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    return mode if mode & _LOOSE_MODE_BITS else None


def _permission_warnings(
    settings: Settings, config_file: Path | None, file_has_credential: bool
) -> tuple[str, ...]:
    candidates: list[tuple[Path | None, str]] = [
        (config_file if file_has_credential else None, "config file with a credential"),
        (settings.credential_file, "credential file"),
    ]
    if settings.credential_file is None and settings.credential is None:
        found = settings._credential_path()
        candidates.append((found[0] if found else None, "credential file"))
    out: list[str] = []
    for path, what in candidates:
        mode = loose_permissions(path) if path is not None else None
        if path is not None and mode is not None:
            out.append(
                f"{what} {path} is readable by group/others (mode {mode:04o}); "
                f"run: chmod 600 {path}"
            )
    return tuple(out)
