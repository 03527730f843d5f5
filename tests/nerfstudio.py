"""A real Nerfstudio 1.1.5 for tests: the ``ns-*`` commands on a CPU-only torch, offline.

``scripts/install-nerfstudio`` installs it once per recipe into a cache directory (2 to 2.5 min
and 3.7 GB cold, a quarter of a second when cached; docs/nerfstudio-runtime-install.md).
The session fixture ``nerfstudio`` is a ``NerfstudioInstall``:

- ``.bin``: the venv's ``bin`` directory, holding ``ns-process-data``, ``ns-train``,
  ``ns-export`` (and the venv's ``python``);
- ``.torch_home``: the install's ``TORCH_HOME`` (AlexNet state dict with random weights, so
  nerfacto's LPIPS metric downloads nothing);
- ``.env()``: the environment to run them in: ours, less what would redirect their interpreter,
  plus ``TORCH_HOME``, ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (new torch refuses nerfstudio's
  checkpoints otherwise), Hugging Face / wandb offline flags, ``MPLBACKEND=Agg``,
  ``PYTHONUNBUFFERED=1`` and ``bin`` first on ``PATH``;
- ``.run(args, cwd=…, timeout_s=…)``: run one command (``args[0]`` an ``ns-*`` name or any
  path) in that environment in its own process group, capture stdout and stderr apart, and kill
  the whole group when it overruns (nerfacto's data loader starts worker processes).

Test modules get it by listing this module as a plugin (``tests/conftest.py`` does)::

    pytest_plugins = ["tests.nerfstudio"]

    def test_something(nerfstudio: NerfstudioInstall) -> None: ...

Timeouts: the install runs in ``pytest_collection_modifyitems`` as soon as a collected test
uses the ``nerfstudio`` fixture, so a cold install counts against no test's timeout. When the
install cannot be done (no PyPI, no Python 3.11+, no libusb, colmap or ffmpeg and no root to
install them), every test that uses the fixture fails with the installer's output: it never
skips.

Registering the plugin more than once is harmless (pytest loads it once). PYTEST_DONT_REWRITE
(assertion rewriting is off here, so importing names from this module before pytest registers
it draws no warning).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.installers import install_once, run_installer

REPO = Path(__file__).resolve().parents[1]
INSTALLER = REPO / "scripts" / "install-nerfstudio"
FIXTURE_NAME = "nerfstudio"
COMMANDS = ("ns-process-data", "ns-train", "ns-export")

INSTALL_TIMEOUT_S = 1800.0  # a cold install is 2-2.5 min here; a slow mirror may take far longer
LOG_TAIL_CHARS = 4000

#: What every ``ns-*`` process gets on top of the caller's environment (TORCH_HOME and PATH
#: come from the install): nothing reaches the network, nothing needs a display.
OFFLINE_ENV: Mapping[str, str] = {
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",  # torch >= 2.6 refuses nerfstudio's checkpoints
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_DISABLED": "true",
    "WANDB_SILENT": "true",
    "MPLBACKEND": "Agg",
    "PYTHONUNBUFFERED": "1",  # output arrives as it is printed (progress parsing)
}
_DROPPED_ENV = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"})

_INSTALL_KEY = pytest.StashKey["NerfstudioInstall | str"]()  # the install, or why it failed


class NerfstudioError(RuntimeError):
    """Nerfstudio could not be installed, or a command overran its timeout."""


@dataclass(frozen=True)
class NerfstudioInstall:
    """An installed Nerfstudio: the directory of its ``ns-*`` commands and its TORCH_HOME."""

    bin: Path
    torch_home: Path

    @property
    def python(self) -> Path:
        """The interpreter of Nerfstudio's venv."""
        return self.bin / "python"

    def command(self, name: str) -> Path:
        """The full path of one command of the venv, e.g. ``command("ns-train")``."""
        return self.bin / name

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to run the ``ns-*`` commands offline in (``extra`` on top)."""
        env = {name: value for name, value in os.environ.items() if name not in _DROPPED_ENV}
        env.update(OFFLINE_ENV)
        env["TORCH_HOME"] = str(self.torch_home)
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", os.defpath)])
        env.update(extra or {})
        return env

    def run(
        self,
        args: Sequence[str | Path],
        *,
        cwd: Path,
        timeout_s: float,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run one command to completion; a bare ``args[0]`` is looked up in ``bin``.

        stdout and stderr are captured apart (text, undecodable bytes replaced). When it runs
        past ``timeout_s`` its whole process group is killed and ``NerfstudioError`` raised
        with the end of its output.
        """
        argv = [str(arg) for arg in args]
        if os.sep not in argv[0]:
            argv[0] = str(self.command(argv[0]))
        with subprocess.Popen(
            argv,
            cwd=cwd,
            env=self.env(extra_env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # its own group: a timeout kills the data loader workers too
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                stdout, stderr = process.communicate()
                raise NerfstudioError(
                    f"{shlex.join(argv)} did not finish within {timeout_s} s:\n"
                    f"{(stdout + stderr)[-LOG_TAIL_CHARS:]}"
                ) from None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # leftovers of a finished command
        return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def install_nerfstudio(timeout_s: float = INSTALL_TIMEOUT_S) -> NerfstudioInstall:
    """Run ``scripts/install-nerfstudio`` (a no-op when cached) and return the install.

    Raises ``NerfstudioError`` with the end of the installer's output when it fails.
    """
    values = run_installer(INSTALLER, NerfstudioError, timeout_s)
    return parse_install_line(values)


def parse_install_line(values: dict[str, str]) -> NerfstudioInstall:
    """The install named by the installer's last line (``NERFSTUDIO_BIN=… TORCH_HOME=…``)."""
    line = " ".join(f"{key}={value}" for key, value in values.items())  # for error messages
    try:
        install = NerfstudioInstall(
            bin=Path(values["NERFSTUDIO_BIN"]), torch_home=Path(values["TORCH_HOME"])
        )
    except KeyError as error:
        raise NerfstudioError(f"unexpected installer output: {line!r}") from error
    missing = [name for name in COMMANDS if not install.command(name).is_file()]
    if missing or not install.torch_home.is_dir():
        raise NerfstudioError(f"installer reported missing files ({missing}): {line!r}")
    return install


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Install Nerfstudio before any test runs when a collected test uses the fixture."""
    install_once(
        config,
        items,
        fixture=FIXTURE_NAME,
        key=_INSTALL_KEY,
        label=f"Nerfstudio with {INSTALLER.relative_to(REPO)}",
        install=install_nerfstudio,
        error=NerfstudioError,
    )


@pytest.fixture(scope="session")
def nerfstudio(request: pytest.FixtureRequest) -> NerfstudioInstall:
    """The installed Nerfstudio 1.1.5 (CPU torch), shared by the session (fails if absent)."""
    install = request.config.stash.get(_INSTALL_KEY, None)
    if install is None:  # requested dynamically: the collection hook did not see it
        try:
            install = install_nerfstudio()
        except NerfstudioError as error:
            install = str(error)
        request.config.stash[_INSTALL_KEY] = install
    if isinstance(install, str):
        pytest.fail(f"Nerfstudio is not installed: {install}", pytrace=False)
    return install
