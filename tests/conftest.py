"""Fixtures shared by every test package."""

from __future__ import annotations

# Session-wide real components (SeaweedFS S3, ComfyUI and Nerfstudio on the CPU), set up only
# when a test asks for their fixture.
pytest_plugins = ["tests.seaweedfs", "tests.comfyui", "tests.nerfstudio", "tests.nvml_fake"]
