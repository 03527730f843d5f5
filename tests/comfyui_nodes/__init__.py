"""Test-only ComfyUI custom nodes (a custom node package; ``tests/comfyui.py`` installs it).

ComfyUI loads ``<base>/custom_nodes/<package>/__init__.py`` and reads the two mappings below.
"""

from .cyberun_test_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
