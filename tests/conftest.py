"""Fixtures shared by every test package."""

from __future__ import annotations

# One session-wide real SeaweedFS S3 server, started only by tests that ask for `seaweedfs`.
pytest_plugins = ["tests.seaweedfs"]
