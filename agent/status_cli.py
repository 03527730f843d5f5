"""``cyberun-agent status``: the running agent's ``/status``, as a table or JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

from agent import PROG
from agent.errors import ConfigError, ExitCode
from agent.settings import LoadedSettings


def show(loaded: LoadedSettings, *, as_json: bool) -> int:
    """Ask the running agent's observe endpoint for ``/status`` and print it."""
    observe = loaded.settings.observe
    if observe.address is None:
        raise ConfigError("observe.listen", loaded.source_of("observe.listen"), "is off (empty)")
    host, port = observe.address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 - a wildcard bind
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/status"
    token = observe.token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = httpx.get(url, headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        print(f"{PROG} status: no agent answers at {url} ({type(exc).__name__})", file=sys.stderr)
        return ExitCode.FAILURE
    if answer.status_code != 200:
        print(f"{PROG} status: {url} answered HTTP {answer.status_code}", file=sys.stderr)
        return ExitCode.FAILURE
    state = answer.json()
    print(json.dumps(state, indent=2) if as_json else status_table(state))
    return ExitCode.OK


def status_table(state: dict[str, Any]) -> str:
    """The human table of a ``/status`` document."""
    link = f"connected to {state['gateway_url']}" if state["connected"] else "NOT connected"
    ready = "ready" if state["ready"] else "NOT ready: " + "; ".join(state["not_ready"])
    slots = ", ".join(
        f"{pool} {cap - state['free_slots'].get(pool, 0)}/{cap} busy"
        for pool, cap in state["capacity"].items()
    )
    rows = [
        ("agent", f"{state['agent_id']} ({state['agent_version']}), {link}"),
        ("status", f"{state['agent_status']}, {ready}"),
        ("slots", slots or "none"),
        ("labels", ", ".join(state["labels"]) or "none"),
        ("region", state["region"] or "(unset)"),
    ]
    rows += [("running", f"{t['task_id']} (attempt {t['attempt']})") for t in state["running"]]
    health = {True: "healthy", False: "UNHEALTHY", None: "not checked yet"}
    rows += [
        ("runtime", f"{tool} {rt['version'] or ''} {health[rt['healthy']]}")
        for tool, rt in state["runtimes"].items()
    ]
    rows += [(f"gpu {g['index']}", _gpu_line(g)) for g in state["gpus"]]
    if not state["gpus"]:
        rows.append(("gpu", f"none ({state['nvml']})"))
    community = state.get("community") or {}
    if community.get("enabled"):
        closed = community.get("closed_reason")
        rows.append(("community", f"closed: {closed}" if closed else "open"))
    since = str(state.get("contribution_since") or "start")
    rows += [
        ("served", f"{pool}: {_contribution_line(totals, since)}")
        for pool, totals in (state.get("contribution") or {}).items()
    ]
    return "\n".join(f"{name:<9}  {value}" for name, value in rows)


def _contribution_line(totals: dict[str, float], since: str) -> str:
    """``12 completed, 1 failed, 0 cancelled, 2 preempted, 1.50 GPU-hours (since …)``."""
    counts = ", ".join(f"{totals.get(k, 0):.0f} {k}" for k in totals if k != "gpu_seconds")
    return f"{counts}, {totals.get('gpu_seconds', 0) / 3600:.2f} GPU-hours (since {since})"


def _gpu_line(gpu: dict[str, Any]) -> str:
    parts = []
    if "utilization" in gpu:
        parts.append(f"{gpu['utilization']:.0f} %")
    if "memory_used" in gpu and "memory_total" in gpu:
        parts.append(f"{gpu['memory_used'] / 2**30:.1f}/{gpu['memory_total'] / 2**30:.1f} GiB")
    if "temperature_c" in gpu:
        parts.append(f"{gpu['temperature_c']:g} °C")
    if "power_w" in gpu:
        parts.append(f"{gpu['power_w']:.0f} W")
    if gpu.get("problem"):
        parts.append(f"NOT OFFERED: {gpu['problem']}")
    return ", ".join(parts) or "no readings"
