"""``cyberun-agent doctor``: check a machine before (or while) it serves, with the fix for each.

Each check gives ``ok``, ``warn`` or ``fail`` with a one-line detail and, when not ok, what
to do about it. ``doctor`` exits non-zero when any check fails. The checks, in order:

- ``config``: the configuration loads (file, environment, flags);
- ``credential``: present, well formed, and its file not readable by others;
- ``gateway``: reachable over HTTP, and the credential accepted in a real protocol
  handshake (``hello`` → ``welcome``, as a separate ``<agent_id>.doctor`` session with no
  capacity, so a running agent keeps its session and is offered nothing twice);
- ``clock``: the skew against the gateway's ``welcome.server_time`` (presigned URLs and
  leases are time-based);
- ``gpu`` / ``gpu N``: NVML, the driver, and the health of every GPU;
- ``comfyui`` / ``nerfstudio``: each configured runtime reachable or launchable;
- ``disk work_dir`` / ``disk cache_dir``: free space against ``limits.min_free_disk_bytes``;
- ``state_dir``: writable.

Nothing here changes the machine except a probe file in ``state_dir`` (removed at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from agent import __version__
from agent.errors import ConfigError, CredentialError
from agent.hardware import GIB, disk_free
from agent.health import GpuMonitor, GpuPolicy, GpuState
from agent.protocol.codec import DecodeError, decode_gateway, encode
from agent.protocol.messages import SUBPROTOCOL, CloseCode, Hello, Pool, Welcome
from agent.settings import (
    AGENT_ID_FILE,
    LoadedSettings,
    Settings,
    credential_kind,
    generate_agent_id,
)

Level = Literal["ok", "warn", "fail"]
SKEW_WARN_S = 2.0
SKEW_FAIL_S = 30.0
HTTP_TIMEOUT_S = 10.0
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Level
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Handshake:
    """What the gateway said to the doctor's ``hello``."""

    welcome: Welcome
    skew_s: float
    """Gateway clock minus local clock, at the midpoint of the round trip."""


def ok(name: str, detail: str) -> Check:
    """A passing check."""
    return Check(name, "ok", detail)


def warn(name: str, detail: str, fix: str) -> Check:
    """A check worth attention that does not stop the agent."""
    return Check(name, "warn", detail, fix)


def fail(name: str, detail: str, fix: str) -> Check:
    """A check that stops the agent from working."""
    return Check(name, "fail", detail, fix)


def diagnose(load: Callable[[], LoadedSettings]) -> list[Check]:
    """Run every check; ``load`` reads the configuration (its errors become the first check)."""
    try:
        loaded = load()
    except ConfigError as exc:
        fix = "correct that value (cyberun-agent config show lists every key and its source)"
        return [fail("config", str(exc), fix)]
    settings = loaded.settings
    checks = [ok("config", str(loaded.config_file or "no config file; defaults and environment"))]
    credential, credential_check = check_credential(loaded)
    checks.append(credential_check)
    checks += check_gateway(settings, credential)
    checks += check_gpus(settings)
    checks += check_runtimes(settings)
    checks += check_disks(settings)
    checks.append(check_state_dir(settings))
    return checks


# ------------------------------------------------------------------ credential


def check_credential(loaded: LoadedSettings) -> tuple[str | None, Check]:
    """The credential's presence, format and file permissions (never its value)."""
    settings = loaded.settings
    origin = settings.credential_origin()
    if origin is None:
        fix = "run `cyberun-agent login`, or set credential_file or CYBERUN_AGENT_CREDENTIAL"
        return None, fail("credential", "no credential is configured", fix)
    try:
        value = settings.credential_value()
    except CredentialError as exc:
        fix = "put one dk-… or ak-… key in the file (or run `cyberun-agent login`)"
        return None, fail("credential", str(exc), fix)
    if value is None:  # pragma: no cover - origin said there is one
        return None, fail("credential", "the credential vanished while reading it", "retry")
    where = loaded.source_of("credential") if settings.credential is not None else origin
    detail = f"{credential_kind(value)}-… from {where}"
    loose = [w for w in loaded.warnings if "readable by group/others" in w]
    if loose:
        return value, warn("credential", f"{detail}; {loose[0].split(';')[0]}", loose[0])
    return value, ok("credential", detail)


# ------------------------------------------------------------------ gateway and clock


def check_gateway(settings: Settings, credential: str | None) -> list[Check]:
    """Reachability, the credential in a real handshake, and the clock skew."""
    if settings.gateway_url is None:
        fix = "set gateway_url (config file, CYBERUN_AGENT_GATEWAY_URL or --gateway-url)"
        return [fail("gateway", "no gateway_url is configured", fix)]
    url = settings.gateway_url
    unreachable = _unreachable(url)
    if unreachable is not None:
        return [unreachable]
    if credential is None:
        return [warn("gateway", f"{url} reachable; handshake skipped (no credential)", "")]
    try:
        shake = asyncio.run(handshake(settings, credential))
    except CredentialError as exc:
        fix = "the key is revoked, mistyped or for another gateway: run `cyberun-agent login`"
        return [fail("gateway", str(exc), fix)]
    except (OSError, TimeoutError, WebSocketException, DecodeError) as exc:
        fix = "a proxy or load balancer may block WebSockets to /agent/v1/ws"
        return [fail("gateway", f"handshake failed: {type(exc).__name__}: {exc}"[:300], fix)]
    welcome = shake.welcome
    detail = (
        f"{url}: credential accepted (session {welcome.session_id}, "
        f"heartbeat {welcome.heartbeat_interval_s:g} s, pools {', '.join(welcome.pools)})"
    )
    return [ok("gateway", detail), check_clock(shake.skew_s)]


def _unreachable(url: str) -> Check | None:
    """A failing check when the gateway's ``/healthz`` cannot be had, else ``None``."""
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            answer = http.get(url + "/healthz")
    except httpx.HTTPError as exc:
        fix = "check the URL, DNS, the firewall and any proxy; is the gateway up?"
        return fail("gateway", f"cannot reach {url}: {type(exc).__name__}", fix)
    if answer.status_code >= 500:
        fix = "the gateway is up but failing; try again later or ask its operator"
        return fail("gateway", f"{url}/healthz answered HTTP {answer.status_code}", fix)
    return None


async def handshake(settings: Settings, credential: str) -> Handshake:
    """Open the agent endpoint, say ``hello`` with no capacity, await ``welcome``, close.

    Raises `CredentialError` for 401/403, the websockets/OS errors otherwise.
    """
    agent_id = f"{_agent_id(settings)[:56].rstrip('.-_')}.doctor"
    timeout = settings.timeouts.connect_s
    try:
        ws = await connect(
            settings.agent_ws_url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {credential}"},
            user_agent_header=f"cyberun-agent/{__version__} doctor",
            open_timeout=timeout,
            max_size=settings.limits.max_frame_bytes,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise CredentialError(f"the gateway refused the credential (HTTP {status})") from None
        raise InvalidHandshake(f"the gateway answered HTTP {status}") from None
    try:
        hello = Hello(
            id=str(uuid.uuid4()),
            ts=datetime.now(UTC),
            agent_id=agent_id,
            agent_version=__version__,
            pools=[Pool.TEAM],
            capacity={Pool.TEAM: 0},
            features=["doctor"],
        )
        sent = time.time()
        await ws.send(encode(hello))
        async with asyncio.timeout(timeout):
            while True:
                message = decode_gateway(await ws.recv())
                if isinstance(message, Welcome):
                    received = time.time()
                    break
        local_mid = (sent + received) / 2
        return Handshake(welcome=message, skew_s=message.server_time.timestamp() - local_mid)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(CloseCode.NORMAL, "doctor done"), 2)


def _agent_id(settings: Settings) -> str:
    """The agent's id without creating it: configured, stored, else one from the host name."""
    if settings.agent_id is not None:
        return settings.agent_id
    try:
        stored = (settings.state_dir / AGENT_ID_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        stored = ""
    valid = AGENT_ID.fullmatch(stored)  # a hand-edited file must not break the handshake
    return stored if valid else generate_agent_id(socket.gethostname())


def check_clock(skew_s: float) -> Check:
    """The clock skew against the gateway."""
    detail = f"{abs(skew_s):.2f} s {'behind' if skew_s > 0 else 'ahead of'} the gateway"
    fix = "enable time synchronisation (e.g. `timedatectl set-ntp true`, chrony or ntpd)"
    if abs(skew_s) >= SKEW_FAIL_S:
        return fail("clock", detail + "; presigned URLs and leases will fail", fix)
    if abs(skew_s) >= SKEW_WARN_S:
        return warn("clock", detail, fix)
    return ok("clock", detail)


# ------------------------------------------------------------------ GPUs


def check_gpus(settings: Settings) -> list[Check]:
    """NVML, the driver, and every GPU's health."""
    policy = GpuPolicy.of(settings.gpu)
    monitor = GpuMonitor(policy)
    try:
        state = monitor.start()
    finally:
        monitor.close()
    if not settings.gpu.enabled:
        return [ok("gpu", "GPU use disabled (gpu.enabled: false): CPU-only")]
    if state.nvml:
        fix = (
            "install the NVIDIA driver (nvidia-smi must work); in Docker run with --gpus all "
            "and the NVIDIA container toolkit; ignore this on a CPU-only machine"
        )
        return [warn("gpu", f"{state.nvml}: the agent runs CPU-only (no gpu label)", fix)]
    inventory = state.inventory
    if not inventory.gpus:
        return [warn("gpu", "NVML found no GPU: the agent runs CPU-only", "check nvidia-smi")]
    head = ok(
        "gpu",
        f"{len(inventory.gpus)} GPU(s), driver {inventory.driver_version}, "
        f"CUDA {inventory.cuda_version}",
    )
    return [head, *(_gpu_check(state, index) for index in range(len(inventory.gpus)))]


def _gpu_check(state: GpuState, index: int) -> Check:
    gpu = state.inventory.gpus[index]
    name = f"gpu {gpu.index}"
    problem = state.problems.get(gpu.index)
    if problem is not None:
        fix = (
            "check cooling, the PCIe seating and `nvidia-smi -q`; reset or replace the GPU "
            "(the agent offers it again once it is healthy)"
        )
        return fail(name, problem, fix)
    reading = state.reading(gpu.index)
    parts = [f"{gpu.name}, {gpu.vram_total / GIB:.0f} GiB"]
    if reading is not None and reading.vram_free is not None:
        parts.append(f"{reading.vram_free / GIB:.1f} GiB free")
    if gpu.compute_capability:
        parts.append(f"compute {gpu.compute_capability}")
    if reading is not None and reading.temperature_c is not None:
        parts.append(f"{reading.temperature_c:g} °C")
    parts.append("MIG on" if gpu.mig else "MIG off")
    if gpu.pci_bus_id:
        parts.append(gpu.pci_bus_id)
    reasons = reading.throttle_reasons if reading is not None else None
    throttled = [r for r in reasons or () if "slowdown" in r]
    if throttled:
        detail = ", ".join(parts) + f"; clocks slowed down: {', '.join(throttled)}"
        return warn(name, detail, "check cooling, airflow and the power supply")
    return ok(name, ", ".join(parts))


# ------------------------------------------------------------------ runtimes


def check_runtimes(settings: Settings) -> list[Check]:
    """Each configured runtime: reachable (ComfyUI by URL), launchable, or present (ns-*)."""
    runtimes = settings.runtimes
    checks = []
    comfyui = runtimes.comfyui
    if comfyui.url is not None:
        checks.append(_comfyui_attached(comfyui.url))
    elif comfyui.launch is not None:
        launch = comfyui.launch
        missing = [str(p) for p in (launch.python, launch.main) if not p.is_file()]
        if missing:
            fix = "point runtimes.comfyui.launch.python/main at a ComfyUI installation"
            checks.append(fail("comfyui", f"not found: {', '.join(missing)}", fix))
        elif not os.access(launch.python, os.X_OK):
            fix = f"chmod +x {launch.python}, or name the venv's python"
            checks.append(fail("comfyui", f"{launch.python} is not executable", fix))
        else:
            version = _comfyui_version(launch.main)
            detail = f"launchable: {launch.python} {launch.main} (ComfyUI {version})"
            checks.append(ok("comfyui", detail))
    if runtimes.nerfstudio.enabled:
        checks.append(_nerfstudio(settings))
    if not checks and not runtimes.extra:
        fix = "set runtimes.comfyui.url or .launch, or runtimes.nerfstudio.enabled"
        checks.append(warn("runtimes", "no runtime configured: the agent takes no task", fix))
    return checks


def _comfyui_attached(url: str) -> Check:
    fix = f"start ComfyUI (listening at {url}) or correct runtimes.comfyui.url"
    try:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            answer = http.get(url + "/system_stats")
        stats = answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        return fail("comfyui", f"cannot reach {url}: {type(exc).__name__}", fix)
    if not isinstance(stats, dict):
        return fail("comfyui", f"{url}/system_stats answered HTTP {answer.status_code}", fix)
    system = stats.get("system")
    version = system.get("comfyui_version") if isinstance(system, dict) else None
    return ok("comfyui", f"{url}: ComfyUI {version or '(version unknown)'}")


def _comfyui_version(main: Path) -> str:
    """The version a ComfyUI installation declares next to its ``main.py``."""
    try:
        text = (main.parent / "comfyui_version.py").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return "version unknown"
    found = re.search(r"""__version__\s*=\s*["']([^"']{1,64})["']""", text)
    return found.group(1) if found else "version unknown"


def _nerfstudio(settings: Settings) -> Check:
    config = settings.runtimes.nerfstudio
    if config.bin_dir is not None:
        bin_dir: Path | None = config.bin_dir
    else:
        found = shutil.which("ns-train")
        bin_dir = Path(found).parent if found else None
    missing = [
        name
        for name in ("ns-train", "ns-export")
        if bin_dir is None or not os.access(bin_dir / name, os.X_OK)
    ]
    if missing:
        where = str(bin_dir) if bin_dir is not None else "PATH"
        fix = "install nerfstudio (pip install nerfstudio) or set runtimes.nerfstudio.bin_dir"
        return fail("nerfstudio", f"{', '.join(missing)} not found in {where}", fix)
    return ok("nerfstudio", f"ns-train and ns-export in {bin_dir}")


# ------------------------------------------------------------------ disks and state


def check_disks(settings: Settings) -> list[Check]:
    """Free space where tasks run and where models are cached."""
    floor = settings.limits.min_free_disk_bytes
    checks = []
    for key, path in (("work_dir", settings.work_dir), ("cache_dir", settings.cache_dir)):
        free = disk_free(path)
        name = f"disk {key}"
        detail = f"{free / GIB:.1f} GiB free at {path}"
        fix = f"free space under {path}, or point {key} at a larger disk"
        if free < floor:
            limit = f"limits.min_free_disk_bytes is {floor / GIB:.1f} GiB"
            checks.append(fail(name, f"{detail}; no task is accepted below it ({limit})", fix))
        elif free < 2 * floor:
            checks.append(warn(name, f"{detail}; close to limits.min_free_disk_bytes", fix))
        else:
            checks.append(ok(name, detail))
    return checks


def check_state_dir(settings: Settings) -> Check:
    """The state dir (agent id, journal) must be writable."""
    path = settings.state_dir
    fix = f"create {path} owned by the agent's user (chown), or set state_dir"
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return ok("state_dir", f"{path} does not exist yet; the agent will create it")
        return fail("state_dir", f"{path} does not exist and {parent} is not writable", fix)
    probe = path / f".doctor-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return fail("state_dir", f"{path} is not writable: {exc.strerror}", fix)
    return ok("state_dir", f"{path} writable")


# ------------------------------------------------------------------ report


def failed(checks: list[Check]) -> bool:
    """Whether any check failed (``doctor`` exits non-zero then)."""
    return any(c.status == "fail" for c in checks)


def as_json(checks: list[Check]) -> dict[str, object]:
    """The machine-readable report."""
    return {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}


def as_table(checks: list[Check]) -> str:
    """The human report: one row per check, its fix indented below it."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.name:<{width}}  {check.status.upper():<4}  {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"{'':<{width}}        fix: {check.fix}")
    verdict = "FAILED" if failed(checks) else "all checks passed"
    warnings = sum(c.status == "warn" for c in checks)
    lines.append(f"\n{verdict}" + (f" ({warnings} warning(s))" if warnings else ""))
    return "\n".join(lines)
