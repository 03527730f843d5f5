"""Running the project's runtime installers (``scripts/install-*``) from test fixtures."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

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
