"""The ComfyUI servers one runtime uses, and which task runs on which.

Attach mode has one server; launch mode has one supervised server per configured GPU
(``runtimes.comfyui.launch.gpus``), so each task slot gets a ComfyUI of its own. A task
holds its server from the start of its run to its end; a restarted agent finds the server
that still knows its prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.runtimes.comfyui.cleanup import ComfyDirectories
from agent.runtimes.comfyui.client import ComfyClient, ComfyError
from agent.runtimes.comfyui.supervisor import ComfyProcess

log = structlog.get_logger("agent.comfyui")


@dataclass
class Server:
    """One ComfyUI: its client and, in launch mode, its supervised process."""

    client: ComfyClient
    process: ComfyProcess | None = None
    directories: ComfyDirectories | None = None
    """Its ``input/``, ``output/``, ``temp/`` (``None``: an attached ComfyUI of unknown place)."""
    supervisor: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self, ready_timeout: float) -> None:
        """Launch (launch mode) and wait until ready, without failing the agent if it is slow."""
        if self.process is None or self.supervisor is not None:
            return
        self.supervisor = asyncio.create_task(
            self.process.run(), name=f"comfyui {self.process.url}"
        )
        try:
            await asyncio.wait_for(self.process.ready.wait(), ready_timeout)
        except TimeoutError:
            log.warning(
                "ComfyUI is not ready yet; the agent stays unhealthy until it is",
                url=self.process.url,
            )

    async def healthy(self) -> bool:
        """Answers ``/system_stats`` (and, supervised, is marked ready)."""
        if self.process is not None and not self.process.ready.is_set():
            return False
        try:
            await self.client.system_stats()
        except ComfyError:
            return False
        return True

    async def close(self) -> None:
        """Stop the supervised process and close the client."""
        if self.supervisor is not None:
            self.supervisor.cancel()
            await asyncio.wait({self.supervisor})
            self.supervisor = None
        await self.client.close()


class ServerPool:
    """Hands each prompt a server of its own (see the module docstring)."""

    def __init__(self, servers: Sequence[Server]) -> None:
        """Pool ``servers`` (at least one)."""
        if not servers:
            raise ValueError("a ComfyUI runtime needs at least one server")
        self.servers = list(servers)
        self._free = list(servers)
        self._held: dict[str, Server] = {}
        self._changed = asyncio.Condition()

    @classmethod
    def attach(
        cls,
        url: str,
        headers: Mapping[str, str] | None = None,
        directory: Path | None = None,
    ) -> ServerPool:
        """One ComfyUI that someone else runs (``directory``: its base directory, if known)."""
        directories = ComfyDirectories.under(directory) if directory is not None else None
        return cls([Server(ComfyClient(url, headers=headers), directories=directories)])

    @classmethod
    def launch(cls, processes: Sequence[ComfyProcess]) -> ServerPool:
        """Supervised ComfyUIs, one per process (directories taken from their arguments)."""
        return cls([Server(ComfyClient(p.url), p, directories=p.directories) for p in processes])

    @property
    def any(self) -> ComfyClient:
        """A client for questions every server answers alike (versions, node classes)."""
        return self.servers[0].client

    async def acquire(self, prompt_id: str) -> ComfyClient:
        """The server for ``prompt_id`` (held until :meth:`release`); waits for a free one."""
        async with self._changed:
            while prompt_id not in self._held:
                if self._free:
                    self._held[prompt_id] = self._free.pop(0)
                else:
                    await self._changed.wait()
            return self._held[prompt_id].client

    def server_of(self, prompt_id: str) -> Server | None:
        """The server holding ``prompt_id``, if any."""
        return self._held.get(prompt_id)

    def held(self, prompt_id: str) -> ComfyClient | None:
        """The server running ``prompt_id``, if any."""
        server = self._held.get(prompt_id)
        return server.client if server else None

    async def adopt(self, prompt_id: str, client: ComfyClient) -> None:
        """Hold the server that already runs ``prompt_id`` (after an agent restart)."""
        async with self._changed:
            for server in list(self._free):
                if server.client is client:
                    self._free.remove(server)
                    self._held[prompt_id] = server

    async def release(self, prompt_id: str) -> None:
        """Give the prompt's server back."""
        async with self._changed:
            server = self._held.pop(prompt_id, None)
            if server is not None:
                self._free.append(server)
                self._changed.notify()
