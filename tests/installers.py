"""Running the project's runtime installers (``scripts/install-*``) from test fixtures."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
LOG_TAIL_CHARS = 4000


def run_installer(script: Path, error: type[Exception], timeout_s: float) -> dict[str, str]:
    """Run an installer (a no-op when its cache is warm); return its last line's ``KEY=value``s.

    Raises ``error`` with the end of the installer's output when it fails, times out, or
    prints nothing.
    """
    try:
        result = subprocess.run(
            [str(script)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise error(f"{script} did not finish within {timeout_s} s") from exc
    except OSError as exc:
        raise error(f"cannot run {script}: {exc}") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        output = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:]
        raise error(f"{script} failed (exit {result.returncode}):\n{output}")
    return parse_assignments(lines[-1])


def parse_assignments(line: str) -> dict[str, str]:
    """``A=x B='y z'`` (shell-quoted) as a dict."""
    return dict(word.partition("=")[::2] for word in shlex.split(line))


def install_once(
    config: pytest.Config,
    items: list[pytest.Item],
    *,
    fixture: str,
    key: pytest.StashKey[Any],
    label: str,
    install: Callable[[], object],
    error: type[Exception],
) -> None:
    """From ``pytest_collection_modifyitems``: install before any test runs, if one needs it.

    Done during collection, not in the fixture, so that a cold install counts against no
    test's timeout. A failure is stashed (as its message) for the fixture to report as an
    error of each test that needs it.
    """
    if config.option.collectonly or key in config.stash:
        return
    if not any(fixture in getattr(item, "fixturenames", ()) for item in items):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"installing {label} (if needed)")
    try:
        config.stash[key] = install()
    except error as exc:
        config.stash[key] = str(exc)
