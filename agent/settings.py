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
credential becomes a `CredentialError` that never repeats the value.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import secrets
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError, CredentialError

if typing.TYPE_CHECKING:
    from pydantic_core import ErrorDetails

ENV_PREFIX = "CYBERUN_AGENT_"
CONFIG_ENV = "CYBERUN_AGENT_CONFIG"
CONFIG_FILE_NAME = "cyberun-agent.yaml"
SYSTEM_CONFIG_FILE = Path("/etc/cyberun-agent") / CONFIG_FILE_NAME
CREDENTIAL_NAME = "cyberun-agent-credential"  # systemd LoadCredential= name
AGENT_ID_FILE = "agent_id"

# Command-line spelling of each key the CLI sets, used to say "from flag --slots".
FLAG_NAMES: dict[str, str] = {
    "gateway_url": "--gateway-url",
    "credential_file": "--credential-file",
    "agent_id": "--agent-id",
    "region": "--region",
    "agent_labels": "--label",
    "slots": "--slots",
    "state_dir": "--state-dir",
    "work_dir": "--work-dir",
    "cache_dir": "--cache-dir",
    "log_level": "--log-level",
    "log_format": "--log-format",
    "pools.community.enabled": "--community",
}

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


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


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


class ComfyUILaunch(BaseModel):
    """Launch and supervise ComfyUI as a child process."""

    model_config = _FROZEN

    python: ExpandedPath
    main: ExpandedPath
    args: tuple[str, ...] = ()
    port: int = Field(default=8188, ge=1, le=65535)
    base_directory: ExpandedPath | None = None


class ComfyUISettings(BaseModel):
    """ComfyUI: attach to ``url`` or ``launch`` it; neither disables the runtime."""

    model_config = _FROZEN

    url: Annotated[str, AfterValidator(_check_http_url)] | None = None
    launch: ComfyUILaunch | None = None

    @model_validator(mode="after")
    def _url_or_launch(self) -> Self:
        if self.url is not None and self.launch is not None:
            raise ValueError("set either url or launch, not both")
        return self

    @property
    def enabled(self) -> bool:
        """Say whether ComfyUI is configured at all."""
        return self.url is not None or self.launch is not None


class NerfstudioSettings(BaseModel):
    """Nerfstudio: run the ``ns-*`` commands found in ``bin_dir`` (or on PATH)."""

    model_config = _FROZEN

    enabled: bool = False
    bin_dir: ExpandedPath | None = None
    keep_checkpoint: bool = False


class RuntimeSettings(BaseModel):
    """The runtimes this agent offers."""

    model_config = _FROZEN

    comfyui: ComfyUISettings = Field(default_factory=ComfyUISettings)
    nerfstudio: NerfstudioSettings = Field(default_factory=NerfstudioSettings)


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
    agent_labels: Annotated[tuple[Label, ...], BeforeValidator(_split_commas)] = ()
    pools: PoolSettings = Field(default_factory=PoolSettings)
    slots: Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_auto_slots)] = None
    runtimes: RuntimeSettings = Field(default_factory=RuntimeSettings)
    state_dir: ExpandedPath = Field(default_factory=_default_state_dir)
    work_dir: ExpandedPath = Field(default_factory=_default_work_dir)
    cache_dir: ExpandedPath = Field(default_factory=_default_cache_dir)
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"
    log_format: Annotated[LogFormat, BeforeValidator(_lower)] = "auto"
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)

    _credentials_directory: Path | None = PrivateAttr(default=None)

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
    def _capture_credentials_directory(self, info: ValidationInfo) -> Self:
        context = _context(info)
        directory = (
            context.get("credentials_directory")
            if "credentials_directory" in context
            else os.environ.get("CREDENTIALS_DIRECTORY")
        )
        self._credentials_directory = Path(directory) if directory else None
        return self

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
        value = _read_secret_file(path, origin)
        if not _CREDENTIAL_RE.fullmatch(value):
            raise credential_error(origin, _CREDENTIAL_RULE)
        return value

    def _credential_path(self) -> tuple[Path, str] | None:
        if self.credential_file is not None:
            return self.credential_file, f"credential_file {self.credential_file}"
        if self._credentials_directory is None:
            return None
        path = self._credentials_directory / CREDENTIAL_NAME
        return (path, f"systemd credential {path}") if path.is_file() else None


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
        return _source_for(key, self.sources)

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


class _Layers:
    """The merged raw data of all sources, and the source of each dotted path in it."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def merge(self, data: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        self._merge_into(self.data, data, "")
        self.sources.update(sources)

    def _merge_into(self, base: dict[str, Any], over: Mapping[str, Any], prefix: str) -> None:
        for key, value in over.items():
            path = f"{prefix}{key}"
            current = base.get(key)
            if isinstance(value, Mapping) and isinstance(current, dict):
                self._merge_into(current, value, path + ".")
                continue
            for stale in [k for k in self.sources if k.startswith((path + ".", path + "["))]:
                del self.sources[stale]
            base[key] = dict(value) if isinstance(value, Mapping) else value


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
    layers = _Layers()
    config_file = find_config_file(config_path, env)
    file_data: dict[str, Any] = {}
    if config_file is not None:
        file_data, file_sources = _read_config_file(config_file)
        layers.merge(file_data, file_sources)
    layers.merge(*_env_layer(env))
    layers.merge(*_flag_layer(flags or {}))
    root = running_as_root()
    for key, default in (
        ("state_dir", default_state_dir(env, root=root)),
        ("cache_dir", default_cache_dir(env, root=root)),
    ):
        layers.data.setdefault(key, str(default))
    context = {"home": str(_home(env)), "credentials_directory": env.get("CREDENTIALS_DIRECTORY")}
    try:
        settings = Settings.model_validate(layers.data, context=context)
    except ValidationError as exc:
        raise _translate(exc, layers.sources) from None
    warnings = _permission_warnings(settings, config_file, "credential" in file_data)
    return LoadedSettings(settings, _leaf_sources(settings, layers.sources), config_file, warnings)


def find_config_file(config_path: Path | None, environ: Mapping[str, str]) -> Path | None:
    """Return the config file to read: ``--config``, ``$CYBERUN_AGENT_CONFIG``, then defaults.

    Raises `ConfigError` when an explicitly named file does not exist.
    """
    explicit = [(config_path, "flag --config")]
    if environ.get(CONFIG_ENV):
        explicit.append((Path(environ[CONFIG_ENV]), f"env {CONFIG_ENV}"))
    for path, source in explicit:
        if path is None:
            continue
        full = _expand_user(path, environ)
        if not full.is_file():
            raise ConfigError("config file", source, f"{full} does not exist or is not a file")
        return full
    for candidate in (SYSTEM_CONFIG_FILE, user_config_file(environ)):
        if candidate.is_file():
            return candidate
    return None


def _expand_user(path: Path, environ: Mapping[str, str]) -> Path:
    text = str(path)
    if text == "~" or text.startswith("~/"):
        path = _home(environ) / text[2:]
    return path if path.is_absolute() else path.absolute()


def _read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError("config file", str(path), f"cannot read it: {reason}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, path) from None
    if data is None or node is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1
        raise ConfigError("(top level)", f"{path}:{line}", "must be a mapping of keys to values")
    sources: dict[str, str] = {}
    _record_lines(node, "", path, sources)
    _drop_empty_groups(data, Settings)
    return data, sources


def _drop_empty_groups(data: dict[str, Any], model: type[BaseModel]) -> None:
    """Treat a group key left empty (``timeouts:`` with its keys commented out) as absent."""
    for key in list(data):
        field = model.model_fields.get(key) if isinstance(key, str) else None
        group = field.annotation if field is not None else None
        if not (isinstance(group, type) and issubclass(group, BaseModel)):
            continue
        if data[key] is None:
            del data[key]
        elif isinstance(data[key], dict):
            _drop_empty_groups(data[key], group)


def _yaml_error(exc: yaml.YAMLError, path: Path) -> ConfigError:
    """Name the file and line of a YAML syntax error, but never quote the offending text."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or "cannot be parsed"
    return ConfigError("yaml syntax", where, f"invalid YAML: {problem}")


def _record_lines(node: yaml.Node, prefix: str, path: Path, sources: dict[str, str]) -> None:
    """Record ``FILE:LINE`` for every mapping key and sequence item below *node*."""
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            sources[f"{prefix}[{index}]"] = f"{path}:{item.start_mark.line + 1}"
            _record_lines(item, f"{prefix}[{index}]", path, sources)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
            raise ConfigError(prefix or "(top level)", where, "keys must be strings")
        dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
        if dotted in sources:
            raise ConfigError(dotted, where, "duplicate key")
        sources[dotted] = where
        _record_lines(value_node, dotted, path, sources)


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        parts = [part.lower() for part in name.removeprefix(ENV_PREFIX).split("__")]
        value = _parse_env_value(parts, environ[name], name)
        _set_nested(data, parts, value, f"env {name}")
        _record(sources, ".".join(parts), value, f"env {name}")
    return data, sources


def _parse_env_value(parts: list[str], raw: str, name: str) -> object:
    """Turn an environment string into what the field expects (lists, JSON objects, null)."""
    annotation = _annotation_at(parts)
    inner = _unwrap_optional(annotation)
    text = raw.strip()
    if typing.get_origin(inner) in {list, tuple}:
        return _env_json(text, parts, name) if text.startswith("[") else _split_commas(text)
    if _is_model(inner) and text.startswith("{"):
        return _env_json(text, parts, name)
    if text == "" and inner is not annotation:  # an optional field: empty means unset
        return None
    return raw


def _env_json(text: str, parts: list[str], name: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(".".join(parts), f"env {name}", f"invalid JSON: {exc.msg}") from None


def _set_nested(data: dict[str, Any], parts: list[str], value: object, source: str) -> None:
    for depth, part in enumerate(parts[:-1]):
        child = data.setdefault(part, {})
        if not isinstance(child, dict):
            key = ".".join(parts[: depth + 1])
            raise ConfigError(
                key, source, "is also set as a single value, so it cannot hold nested keys"
            )
        data = child
    data[parts[-1]] = value


def _record(sources: dict[str, str], path: str, value: object, source: str) -> None:
    """Record *source* for *path* and for everything nested in *value*."""
    sources[path] = source
    if isinstance(value, Mapping):
        for key, item in value.items():
            _record(sources, f"{path}.{key}", item, source)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _record(sources, f"{path}[{index}]", item, source)


def flag_label(key: str, value: object) -> str:
    """Return the spelling of the flag that set *key*, e.g. ``--slots`` or ``--no-community``."""
    name = FLAG_NAMES.get(key, "--" + key.replace(".", "-").replace("_", "-"))
    return "--no-" + name[2:] if value is False else name


def _flag_layer(flags: Mapping[str, object]) -> tuple[dict[str, Any], dict[str, str]]:
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value in flags.items():
        if value is None:
            continue
        source = f"flag {flag_label(key, value)}"
        _set_nested(data, key.split("."), value, source)
        _record(sources, key, value, source)
    return data, sources


def _annotation_at(parts: list[str]) -> Any:
    """Return the annotation of the field at *parts*, or None if there is no such field."""
    model: type[BaseModel] = Settings
    annotation: Any = None
    for index, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        inner = _unwrap_optional(annotation)
        if index < len(parts) - 1:
            if not _is_model(inner):
                return None
            model = inner
    return annotation


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in {typing.Union, types.UnionType}:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# ---------------------------------------------------------------- errors and provenance


def _translate(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError | CredentialError:
    error = exc.errors(include_url=False, include_context=True, include_input=False)[0]
    key = _dotted(error["loc"]) or "(top level)"
    source = _source_for(key, sources)
    rule = _rule(error)
    if key == "credential":
        return credential_error(source, rule)
    return ConfigError(key, source, rule)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _parent(key: str) -> str:
    cut = max(key.rfind("."), key.rfind("["))
    return key[:cut] if cut > 0 else ""


def _source_for(key: str, sources: Mapping[str, str]) -> str:
    """Return the source of *key*, else of its nearest ancestor or of what it contains.

    A mapping set only through nested environment variables or flags has no source of its
    own; the sources of its contents are what made it exist.
    """
    probe = key
    while probe:
        if probe in sources:
            return sources[probe]
        inside = sorted({v for k, v in sources.items() if k.startswith((probe + ".", probe + "["))})
        if inside:
            return " and ".join(inside)
        probe = _parent(probe)
    return "default"


def _rule(error: ErrorDetails) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(error["loc"])
    if kind == "missing":
        return "is required"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return "must be a mapping of keys to values"
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if message.startswith("Input should be "):
        return "must be " + message.removeprefix("Input should be ")
    return message[:1].lower() + message[1:]


def _suggestion(loc: tuple[int | str, ...]) -> str:
    parent = _unwrap_optional(_annotation_at([str(p) for p in loc[:-1]]) if loc[:-1] else Settings)
    if not _is_model(parent):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _leaf_sources(model: BaseModel, sources: Mapping[str, str], prefix: str = "") -> dict[str, str]:
    """Return the source of every leaf key of *model*, in declaration order."""
    out: dict[str, str] = {}
    for name in type(model).model_fields:
        dotted = prefix + name
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_leaf_sources(value, sources, dotted + "."))
        else:
            out[dotted] = sources.get(dotted, "default")
    return out


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
    out: list[str] = []
    for path, what in candidates:
        mode = loose_permissions(path) if path is not None else None
        if path is not None and mode is not None:
            out.append(
                f"{what} {path} is readable by group/others (mode {mode:04o}); "
                f"run: chmod 600 {path}"
            )
    return tuple(out)
