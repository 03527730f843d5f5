"""Launch mode: start ComfyUI as a child process group, keep it up, stop it with the agent.

Readiness follows the process, not a fixed wait: the child must be alive and answer
``/system_stats`` and ``/object_info``. When it dies it is restarted with jittered
exponential backoff (``stamina``); ``ready`` is cleared meanwhile, which makes the agent
``unhealthy`` (no new tasks) until it is back.

The child gets the agent's environment less what would redirect its interpreter
(``PYTHONPATH``, ``PYTHONHOME``, ``PYTHONSTARTUP``, ``VIRTUAL_ENV``: ComfyUI runs in its
own venv), and a ``base_directory`` gets the ``custom_nodes`` folder ComfyUI insists on.
A start-up that fails logs the last lines ComfyUI printed.

ComfyUI's output goes to the agent's log (at debug level) except while a community prompt
holds the server (:meth:`ComfyProcess.withhold`): ComfyUI prints validation errors with
input file names (``Invalid image file: <name>``), exception messages and tracebacks that
quote a node's inputs, so those lines are only counted until :meth:`ComfyProcess.forward`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import stamina
import structlog

from agent.errors import AgentError
from agent.runtimes.comfyui.cleanup import ComfyDirectories, directories_from_argv
from agent.runtimes.process import ManagedProcess, Stream

log = structlog.get_logger("agent.comfyui")
READY_POLL_S = 0.25
TAIL_LINES = 20
_NOT_INHERITED = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"})


class LaunchError(AgentError):
    """ComfyUI could not be started or did not become ready in time."""


class ComfyProcess:
    """One supervised ComfyUI server on ``127.0.0.1:port``."""

    def __init__(
        self,
        python: Path,
        main: Path,
        *,
        port: int,
        args: Sequence[str] = (),
        base_directory: Path | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        """Describe the server; nothing starts until :meth:`run`."""
        self.url = f"http://127.0.0.1:{port}"
        argv = [
            str(python),
            str(main),
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-auto-launch",
        ]
        if base_directory is not None:
            argv += ["--base-directory", str(base_directory)]
        self.base_directory = base_directory
        self.argv = [*argv, *args]
        self.cwd = main.parent
        source = env if env is not None else os.environ
        self.env = {k: v for k, v in source.items() if k not in _NOT_INHERITED}
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.ready_timeout = ready_timeout
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.restarts = 0
        self._process: ManagedProcess | None = None
        self._private: set[str] = set()
        self._withheld = 0

    @property
    def directories(self) -> ComfyDirectories:
        """The ``input/``, ``output/`` and ``temp/`` this server uses (from its arguments)."""
        return directories_from_argv(self.argv[2:], self.cwd)

    def withhold(self, key: str) -> None:
        """Keep ComfyUI's output out of the agent's log while ``key`` (a private prompt) runs."""
        self._private.add(key)

    def forward(self, key: str) -> None:
        """``key`` is over (purged); forward ComfyUI's output again once no private one is left."""
        self._private.discard(key)
        if not self._private and self._withheld:
            log.debug("ComfyUI output withheld during community prompts", lines=self._withheld)
            self._withheld = 0

    @property
    def pid(self) -> int | None:
        """The current server's pid."""
        return self._process.pid if self._process else None

    async def run(self) -> None:
        """Keep ComfyUI running until cancelled (then stop it)."""
        async for attempt in stamina.retry_context(
            on=LaunchError, attempts=None, timeout=None, wait_initial=1.0, wait_max=30.0
        ):
            with attempt:
                await self._once()

    async def _once(self) -> None:
        started = time.monotonic()
        self.exited.clear()
        self.tail.clear()
        if self.base_directory is not None:  # ComfyUI's start-up fails without it
            await asyncio.to_thread(
                (self.base_directory / "custom_nodes").mkdir, parents=True, exist_ok=True
            )
        try:
            process = await ManagedProcess.start(
                self.argv, cwd=self.cwd, env=self.env, on_line=self._line
            )
        except AgentError as exc:
            raise LaunchError(f"cannot start ComfyUI: {exc}") from exc
        self._process = process
        try:
            async with process:
                await self._wait_ready(process)
                log.info(
                    "ComfyUI is ready",
                    url=self.url,
                    pid=process.pid,
                    seconds=round(time.monotonic() - started, 1),
                )
                self.ready.set()
                code = await process.wait()
        finally:
            self.ready.clear()
            self.exited.set()
            self._process = None
        self.restarts += 1
        log.warning("ComfyUI exited; restarting", exit_code=code)
        raise LaunchError(f"ComfyUI exited with {code}")

    async def _wait_ready(self, process: ManagedProcess) -> None:
        deadline = time.monotonic() + self.ready_timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5, trust_env=False) as http:
            while time.monotonic() < deadline:
                if process.returncode is not None:
                    log.warning(
                        "ComfyUI exited during start-up",
                        exit_code=process.returncode,
                        output=list(self.tail),
                    )
                    raise LaunchError(f"ComfyUI exited during start-up with {process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    stats = await http.get("/system_stats")
                    info = await http.get("/object_info")
                    if stats.status_code == 200 and info.status_code == 200:
                        return
                await asyncio.sleep(READY_POLL_S)  # probing a starting server: nothing to await
        raise LaunchError(f"ComfyUI was not ready within {self.ready_timeout:g} s")

    async def stop(self) -> None:
        """Stop the server now (the supervisor, if running, will restart it)."""
        if self._process is not None:
            await self._process.stop(interrupt_grace=5, term_grace=5)

    def _line(self, stream: Stream, line: str) -> None:
        if self._private:
            self._withheld += 1
            return
        self.tail.append(line[:500])
        log.debug("comfyui", stream=stream, line=line[:500])
