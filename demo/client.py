"""A platform user's side of the Cyberun REST API, as the demo and the end-to-end tests use it.

Only the documented public API: ``POST /workflows/import``, ``POST /r/files/presign`` and the
presigned PUT, ``POST /r/workflows/{id}/run``, ``GET /r/tasks/{id}/events`` (SSE),
``GET /r/tasks/{id}/result`` and its download URLs, ``GET /r/agents``. Every non-2xx answer
becomes an :class:`ApiError` carrying the gateway's ``field`` and ``rule``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

API = "/api/v1"
TERMINAL = frozenset({"completed", "failed", "cancelled"})


class ApiError(Exception):
    """The gateway refused a request: status, code, message, and the field/rule named."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        """Keep the error body's parts."""
        found = body.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        self.status = status
        self.code = str(error.get("code", ""))
        self.field = error.get("field")
        self.rule = error.get("rule")
        message = str(error.get("message", "")) or json.dumps(body)[:300]
        where = f" ({self.field}: {self.rule})" if self.field else ""
        super().__init__(f"HTTP {status} {self.code}: {message}{where}")


@dataclass(frozen=True)
class Event:
    """One server-sent event of a task."""

    event: str
    data: dict[str, Any]


class PlatformClient:
    """A team's REST client (``sk-``/``dk-`` key); usable as a context manager."""

    def __init__(self, base_url: str, credential: str, *, timeout: float = 60.0) -> None:
        """Talk to the gateway at ``base_url`` (without ``/api/v1``)."""
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url + API,
            headers={"Authorization": f"Bearer {credential}"},
            timeout=timeout,
        )

    def __enter__(self) -> PlatformClient:
        """Return the client."""
        return self

    def __exit__(self, *_: object) -> None:
        """Close the connections."""
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    # ------------------------------------------------------------------ calls

    def import_workflow(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /workflows/import``: the stored workflow (a new version for a known slug)."""
        return self._json(self.http.post("/workflows/import", json=body))

    def upload_input(self, path: Path, content_type: str) -> str:
        """Presign, PUT the file with the signed headers verbatim; return its ``file_key``."""
        size = path.stat().st_size
        slot = self._json(
            self.http.post(
                "/r/files/presign",
                json={"file_name": path.name, "file_size": size, "content_type": content_type},
            )
        )
        with path.open("rb") as body:
            put = httpx.put(
                slot["upload_url"], content=body, headers=slot["upload_headers"], timeout=300
            )
        if put.status_code >= 300:
            raise ApiError(put.status_code, {"error": {"message": put.text[:300]}})
        return str(slot["file_key"])

    def run(self, workflow_id: str, parameters: dict[str, Any], **request: Any) -> str:
        """``POST /r/workflows/{id}/run``: the new task's id."""
        body = {"parameters": parameters, **request}
        return str(
            self._json(self.http.post(f"/r/workflows/{workflow_id}/run", json=body))["task_id"]
        )

    def events(self, task_id: str, *, read_timeout: float = 600.0) -> Iterator[Event]:
        """Follow ``GET /r/tasks/{id}/events`` until the terminal event (included)."""
        timeout = httpx.Timeout(30.0, read=read_timeout)
        with self.http.stream("GET", f"/r/tasks/{task_id}/events", timeout=timeout) as answer:
            if answer.status_code != 200:
                answer.read()
                raise ApiError(answer.status_code, _body(answer))
            kind, data = "", ""
            for line in answer.iter_lines():
                if line.startswith("event:"):
                    kind = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data += line.removeprefix("data:").strip()
                elif not line and kind:
                    event = Event(kind, json.loads(data) if data else {})
                    yield event
                    if kind in TERMINAL:
                        return
                    kind, data = "", ""

    def follow(self, task_id: str, on_event: Callable[[Event], None] = lambda _: None) -> Event:
        """Follow the task to its end; return the terminal event."""
        for event in self.events(task_id):
            on_event(event)
            if event.event in TERMINAL:
                return event
        raise ApiError(0, {"error": {"message": "the event stream ended before the task did"}})

    def result(self, task_id: str) -> dict[str, Any]:
        """``GET /r/tasks/{id}/result``."""
        return self._json(self.http.get(f"/r/tasks/{task_id}/result"))

    def task(self, task_id: str) -> dict[str, Any]:
        """``GET /r/tasks/{id}``."""
        return self._json(self.http.get(f"/r/tasks/{task_id}"))

    def agents(self) -> list[dict[str, Any]]:
        """``GET /r/agents``: the team's connected agents."""
        return list(self._json(self.http.get("/r/agents"))["agent_list"])

    def download(self, result: dict[str, Any], directory: Path) -> list[Path]:
        """Save every output of a result as ``<key><ext>`` in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        saved = []
        for key, url in sorted((result.get("download_urls") or {}).items()):
            answer = httpx.get(url, timeout=300)
            if answer.status_code != 200:
                raise ApiError(answer.status_code, {"error": {"message": f"download of {key}"}})
            target = directory / f"{key}{_extension(answer.headers.get('content-type', ''))}"
            target.write_bytes(answer.content)
            saved.append(target)
        return saved

    def wait_for_agent(self, agent_id: str, label: str, timeout: float) -> dict[str, Any]:
        """Wait until ``agent_id`` is connected, idle and carries ``label`` (a hang guard)."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((a for a in self.agents() if a["agent_id"] == agent_id), None)
            if found and found["agent_status"] == "idle" and label in found["agent_labels"]:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {agent_id} not ready with {label!r}: {found}")
            time.sleep(0.2)  # the gateway learns of it from the agent's next status frame

    @staticmethod
    def _json(answer: httpx.Response) -> dict[str, Any]:
        if answer.status_code >= 300:
            raise ApiError(answer.status_code, _body(answer))
        data = answer.json()
        if not isinstance(data, dict):
            raise ApiError(answer.status_code, {"error": {"message": "not a JSON object"}})
        return data


def _body(answer: httpx.Response) -> dict[str, Any]:
    try:
        data = answer.json()
    except ValueError:
        return {"error": {"message": answer.text[:300]}}
    return data if isinstance(data, dict) else {"error": {"message": str(data)[:300]}}


def _extension(content_type: str) -> str:
    kind = content_type.split(";", maxsplit=1)[0].strip().lower()
    return {
        "image/png": ".png",
        "image/jpeg": ".jpg",
        "image/webp": ".webp",
        "application/json": ".json",
        "text/plain": ".txt",
    }.get(kind, "")
