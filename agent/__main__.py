"""``python -m agent``: the same command line as the ``cyberun-agent`` console script."""

from __future__ import annotations

from agent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
