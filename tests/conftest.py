"""Fixtures shared by every test package."""

from __future__ import annotations

# Session-wide real servers (SeaweedFS S3, ComfyUI on the CPU), started only by tests that
# ask for their fixture.
pytest_plugins = ["tests.seaweedfs", "tests.comfyui"]
