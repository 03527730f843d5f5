"""A real ComfyUI server for tests: stock ComfyUI 0.3.75 on CPU, on loopback.

``scripts/install-comfyui`` installs it once per recipe into a cache directory (about 1.5 min
cold, well under a second when cached; docs/comfyui-runtime-install.md). ``start_comfyui()``
runs ``main.py --cpu`` with its whole state (models, input, output, temp, user, custom nodes)
in a fresh base directory, an in-memory database and the test-only nodes of
``tests/comfyui_nodes`` copied into ``<base>/custom_nodes/``, and returns once the process is
alive, ``GET /system_stats`` answers and ``GET /object_info/<class>`` lists every test node.

Test modules get the session-wide server by listing this module as a plugin::

    pytest_plugins = ["tests.comfyui"]

    def test_something(comfyui: ComfyUIServer) -> None: ...

Timeouts: the install runs in ``pytest_collection_modifyitems`` as soon as a collected test
uses the ``comfyui`` fixture, so its minute and a half counts against no test's timeout; the
server's start-up (about 10 s here, ``STARTUP_DEADLINE_S`` at most) happens in the first such
test's setup, so those tests take ``pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)``. When the
install cannot be done (no PyPI, no Python 3.11+), every test that uses the fixture fails with
the installer's output: it never skips.

Registering the plugin more than once is harmless (pytest loads it once, so the session shares
one server). PYTEST_DONT_REWRITE (assertion rewriting is off here, so importing names from this
module before pytest registers it draws no warning).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
import psutil
import pytest

from tests.installers import install_once, run_installer

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "scripts" / "install-comfyui"
TEST_NODES_SOURCE = Path(__file__).resolve().with_name("comfyui_nodes")
TEST_NODES_PACKAGE = "cyberun_test_nodes"  # its folder name under <base>/custom_nodes/
TEST_NODE_CLASSES = ("CyberunSlowPassthrough", "CyberunFail", "CyberunEmitText")
FIXTURE_NAME = "comfyui"

INSTALL_TIMEOUT_S = 1200.0  # a cold install is ~90 s here; a slow mirror may take far longer
STARTUP_DEADLINE_S = 90.0  # ~10 s on an idle 2-core machine; much longer under load
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this (it exits in well under a second)
POLL_INTERVAL_S = 0.2
PROBE_TIMEOUT_S = 5.0  # one readiness request
START_ATTEMPTS = 3  # a probed free port can be taken by someone else before ComfyUI binds it
# The per-test timeout for tests that use the fixture: the first one starts the server.
COMFYUI_TEST_TIMEOUT_S = int(STARTUP_DEADLINE_S) + 60
LOG_TAIL_CHARS = 4000

_INSTALL_KEY = pytest.StashKey["ComfyUIInstall | str"]()  # the install, or why it failed


class ComfyUIError(RuntimeError):
    """ComfyUI could not be installed, or did not start."""


class _ExitedEarlyError(ComfyUIError):
    """The server exited during start-up (typically: its probed port was taken meanwhile)."""


@dataclass(frozen=True)
class ComfyUIInstall:
    """An installed ComfyUI: its ``main.py`` and the venv interpreter that runs it."""

    main: Path
    python: Path

    @property
    def directory(self) -> Path:
        """The ComfyUI source directory (holds ``main.py``)."""
        return self.main.parent


@dataclass
class ComfyUIServer:
    """A running ComfyUI server. ``stop()`` ends it; ``restart()`` starts it again."""

    install: ComfyUIInstall
    base_directory: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    extra_args: tuple[str, ...] = ()
    starts: int = 1
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """The HTTP base URL, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def python(self) -> Path:
        """The interpreter of ComfyUI's venv."""
        return self.install.python

    @property
    def main(self) -> Path:
        """ComfyUI's ``main.py``."""
        return self.install.main

    @property
    def output_directory(self) -> Path:
        """Where SaveImage writes (``<base>/output``)."""
        return self.base_directory / "output"

    def ws_url(self, client_id: str) -> str:
        """The WebSocket URL for a client (open it before posting that client's prompts)."""
        return f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}"

    def rss_bytes(self) -> int:
        """The server process's resident memory in bytes."""
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def log_tail(self) -> str:
        """Return the end of the server's combined stdout/stderr (for failure messages)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``STOP_GRACE_S``. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        _terminate(self.process)

    def restart(self) -> None:
        """Stop the server and start it again on the same port and base directory.

        Waits until it is ready again; raises ``ComfyUIError`` when it is not. Queue, history
        and cache are gone afterwards (as after any restart); files in the base directory stay.
        """
        self.stop()
        self.process, self.log_path = _launch(
            self.install, self.base_directory, self.port, self.extra_args
        )
        self.starts += 1
        self._stopped = False
        try:
            _wait_until_ready(self)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> ComfyUIServer:
        """Return the running server."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()


def install_comfyui(timeout_s: float = INSTALL_TIMEOUT_S) -> ComfyUIInstall:
    """Run ``scripts/install-comfyui`` (a no-op when cached) and return the install.

    Raises ``ComfyUIError`` with the end of the installer's output when it fails.
    """
    values = run_installer(INSTALLER, ComfyUIError, timeout_s)
    return parse_install_line(values)


def parse_install_line(values: dict[str, str]) -> ComfyUIInstall:
    """The install named by the installer's last line (``COMFYUI_MAIN=… COMFYUI_PYTHON=…``)."""
    line = " ".join(f"{key}={value}" for key, value in values.items())  # for error messages
    try:
        install = ComfyUIInstall(
            main=Path(values["COMFYUI_MAIN"]), python=Path(values["COMFYUI_PYTHON"])
        )
    except KeyError as error:
        raise ComfyUIError(f"unexpected installer output: {line!r}") from error
    if not install.main.is_file() or not install.python.is_file():
        raise ComfyUIError(f"installer reported missing files: {line!r}")
    return install


def start_comfyui(
    install: ComfyUIInstall, base_directory: Path, *, extra_args: tuple[str, ...] = ()
) -> ComfyUIServer:
    """Start ComfyUI with all state under ``base_directory``; return it once it is ready.

    Raises ``ComfyUIError`` (with the server's log tail) when it does not become ready within
    ``STARTUP_DEADLINE_S``.
    """
    _install_test_nodes(base_directory / "custom_nodes")
    last: ComfyUIError | None = None
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        process, log_path = _launch(install, base_directory, port, extra_args)
        server = ComfyUIServer(install, base_directory, port, process, log_path, extra_args)
        try:
            _wait_until_ready(server)
        except _ExitedEarlyError as error:
            server.stop()
            last = error  # maybe a port race: retry on a fresh port
            continue
        except BaseException:
            server.stop()
            raise
        return server
    assert last is not None
    raise last


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Install ComfyUI before any test runs when a collected test uses the fixture."""
    install_once(
        config,
        items,
        fixture=FIXTURE_NAME,
        key=_INSTALL_KEY,
        label=f"ComfyUI with {INSTALLER.relative_to(REPO)}",
        install=install_comfyui,
        error=ComfyUIError,
    )


@pytest.fixture(scope="session")
def comfyui(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyUIServer]:
    """One real ComfyUI server shared by the whole test session (fails if not installable)."""
    install = request.config.stash.get(_INSTALL_KEY, None)
    if install is None:  # requested dynamically: the collection hook did not see it
        try:
            install = install_comfyui()
        except ComfyUIError as error:
            install = str(error)
        request.config.stash[_INSTALL_KEY] = install
    if isinstance(install, str):
        pytest.fail(f"ComfyUI is not installed: {install}", pytrace=False)
    server = start_comfyui(install, tmp_path_factory.mktemp("comfyui", numbered=True))
    try:
        yield server
    finally:
        server.stop()


def _install_test_nodes(custom_nodes: Path) -> None:
    """Copy the test node package into ``custom_nodes`` (a copy: ComfyUI writes caches there)."""
    target = custom_nodes / TEST_NODES_PACKAGE
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(
        TEST_NODES_SOURCE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )


def _launch(
    install: ComfyUIInstall,
    base_directory: Path,
    port: int,
    extra_args: tuple[str, ...],
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the server process (not yet ready); return it and its log file."""
    base_directory.mkdir(parents=True, exist_ok=True)
    args = [
        str(install.python),
        str(install.main),
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        str(base_directory),
        "--database-url",
        "sqlite:///:memory:",
        *extra_args,
    ]
    log_path = _unused_log_path(base_directory)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            cwd=base_directory,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the server
        )
    return process, log_path


def _unused_log_path(base_directory: Path) -> Path:
    """Return ``<base>/comfyui-<n>.log`` for the first ``n`` not yet used (one per start)."""
    number = 0
    while (base_directory / f"comfyui-{number}.log").exists():
        number += 1
    return base_directory / f"comfyui-{number}.log"


def _environment() -> dict[str, str]:
    """Return the server's environment: ours, less what would redirect its interpreter."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    }
    env["PYTHONUNBUFFERED"] = "1"  # the log file shows start-up as it happens
    return env


def _free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_ready(server: ComfyUIServer) -> None:
    """Poll until the process is alive, /system_stats answers and every test node is listed."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    pending = ["/system_stats", *(f"/object_info/{name}" for name in TEST_NODE_CLASSES)]
    last = "no answer yet"
    with httpx.Client(base_url=server.url, timeout=PROBE_TIMEOUT_S) as http:
        while pending:
            if server.process.poll() is not None:
                raise _ExitedEarlyError(
                    f"ComfyUI exited with {server.process.returncode} during start-up:\n"
                    f"{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ComfyUIError(
                    f"ComfyUI not ready after {STARTUP_DEADLINE_S} s ({last}):\n{server.log_tail()}"
                )
            try:
                response = http.get(pending[0])
            except httpx.TransportError as error:
                last = f"GET {pending[0]}: {error!r}"
            else:
                last = f"GET {pending[0]}: {response.status_code} {response.text[:200]}"
                if response.status_code == 200 and response.json():  # {} = unknown node
                    pending.pop(0)
                    continue
                if pending[0] != "/system_stats":
                    raise ComfyUIError(
                        f"ComfyUI started without the test nodes ({last}):\n{server.log_tail()}"
                    )
            time.sleep(POLL_INTERVAL_S)  # a poll interval with a deadline, not a wait-and-hope


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``process``, then SIGKILL it if it is still running after ``STOP_GRACE_S``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
