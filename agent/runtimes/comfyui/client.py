"""An asyncio client for one ComfyUI server: its HTTP API and its ``/ws`` event stream.

The adapter boundary for ComfyUI: httpx and websockets errors are translated into
:class:`ComfyError` here, and nobody else talks to ComfyUI. Endpoints used:
``GET /system_stats``, ``GET /object_info``, ``POST /prompt``, ``GET /history/{id}``,
``GET /queue``, ``POST /queue`` (delete), ``POST /interrupt``, ``GET /view``,
``POST /upload/image``, and ``GET /ws?clientId=`` (open it BEFORE posting: progress goes
only to the client that submitted).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from agent.errors import AgentError

MAX_WS_FRAME = 64 * 1024 * 1024  # execution_error can carry huge current_inputs
CHUNK = 1024 * 1024


class ComfyError(AgentError):
    """ComfyUI could not be reached or answered something unusable."""


class PromptRejectedError(ComfyError):
    """``POST /prompt`` answered 400: the graph is invalid (``body`` holds the details)."""

    def __init__(self, body: dict[str, Any]) -> None:
        """Keep ComfyUI's error body (``error`` and ``node_errors``)."""
        super().__init__("ComfyUI rejected the prompt")
        self.body = body


class ComfyClient:
    """See the module docstring; ``base_url`` is like ``http://127.0.0.1:8188``."""

    def __init__(
        self, base_url: str, *, timeout: float = 30.0, headers: Mapping[str, str] | None = None
    ) -> None:
        """Create the HTTP client (no I/O); ``headers`` go with every request (API keys)."""
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, trust_env=False, headers=self.headers
        )

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ComfyError(f"ComfyUI {method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 400 and path == "/prompt":
            raise PromptRejectedError(_json_body(response))
        if response.status_code >= 400:
            raise ComfyError(f"ComfyUI {method} {path}: HTTP {response.status_code}")
        return _json_body(response) if response.content else None

    async def system_stats(self) -> dict[str, Any]:
        """``GET /system_stats`` (versions, devices)."""
        found: dict[str, Any] = await self._json("GET", "/system_stats")
        return found

    async def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every node class and its inputs."""
        found: dict[str, Any] = await self._json("GET", "/object_info")
        return found

    async def post_prompt(
        self, prompt: dict[str, Any], client_id: str, prompt_id: str
    ) -> dict[str, Any]:
        """Queue a graph under our ``prompt_id``; raises :class:`PromptRejectedError` on 400."""
        body = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        found: dict[str, Any] = await self._json("POST", "/prompt", json=body)
        return found

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a prompt, or ``None`` while it has none."""
        found = await self._json("GET", f"/history/{prompt_id}")
        if isinstance(found, dict) and isinstance(found.get(prompt_id), dict):
            entry: dict[str, Any] = found[prompt_id]
            return entry
        return None

    async def queue_state(self, prompt_id: str) -> str | None:
        """``"running"``, ``"pending"`` or ``None`` (not queued)."""
        queue = await self._json("GET", "/queue")
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            for item in (queue or {}).get(key, []):
                if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
                    return state
        return None

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt the prompt if it is the one running."""
        await self._json("POST", "/interrupt", json={"prompt_id": prompt_id})

    async def delete_pending(self, prompt_id: str) -> None:
        """Remove a prompt that has not started from the queue."""
        await self._json("POST", "/queue", json={"delete": [prompt_id]})

    async def delete_history(self, prompt_id: str) -> None:
        """Forget a prompt's history entry."""
        await self._json("POST", "/history", json={"delete": [prompt_id]})

    async def download(self, filename: str, subfolder: str, kind: str, dest: Path) -> None:
        """Stream ``/view`` of an output file into ``dest``."""
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        try:
            async with self._http.stream("GET", "/view", params=params) as response:
                if response.status_code != 200:
                    raise ComfyError(f"ComfyUI /view {filename}: HTTP {response.status_code}")
                with dest.open("wb") as handle:
                    async for chunk in response.aiter_bytes(CHUNK):
                        handle.write(chunk)
        except httpx.HTTPError as exc:
            raise ComfyError(f"ComfyUI /view {filename}: {type(exc).__name__}") from exc

    async def upload_image(self, path: Path, name: str) -> str:
        """Upload an input into ComfyUI's ``input/`` (``overwrite``); return its name there."""
        with path.open("rb") as handle:
            files = {"image": (name, handle, "application/octet-stream")}
            found = await self._json(
                "POST", "/upload/image", files=files, data={"overwrite": "true"}
            )
        subfolder = str(found.get("subfolder") or "")
        uploaded = str(found.get("name") or name)
        return f"{subfolder}/{uploaded}" if subfolder else uploaded

    @asynccontextmanager
    async def events(self, client_id: str) -> AsyncIterator[EventStream]:
        """The ``/ws`` stream for ``client_id`` (open before posting the prompt)."""
        url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        try:
            ws = await connect(
                url,
                max_size=MAX_WS_FRAME,
                proxy=None,
                open_timeout=10,
                additional_headers=self.headers,
            )
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ComfyError(f"ComfyUI /ws: {type(exc).__name__}") from exc
        try:
            yield EventStream(ws)
        finally:
            await ws.close()


class EventStream:
    """JSON events from ComfyUI's WebSocket (binary preview frames are skipped)."""

    def __init__(self, ws: ClientConnection) -> None:
        """Wrap an open connection."""
        self._ws = ws

    async def registered(self, within: float) -> None:
        """Wait for ComfyUI's first ``status`` message: only then are events routed to us.

        ComfyUI registers the socket under its client id after the handshake; a prompt
        posted before that could finish before any of its events reach us.
        """
        async with asyncio.timeout(within):
            while (event := await self.next()) is not None:
                if event.get("type") == "status":
                    return

    async def next(self) -> dict[str, Any] | None:
        """The next event, or ``None`` when the stream ended."""
        while True:
            try:
                frame = await self._ws.recv()
            except ConnectionClosed:
                return None
            if isinstance(frame, bytes):
                continue
            try:
                event = json.loads(frame)
            except ValueError:
                continue
            if isinstance(event, dict):
                return event


def _json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ComfyError(f"ComfyUI answered non-JSON ({response.status_code})") from exc
