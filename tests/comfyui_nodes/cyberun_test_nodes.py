"""Test-only ComfyUI nodes: behaviour that ComfyUI's model-free built-in nodes never show.

Built-in model-free nodes (EmptyImage, ImageInvert, SaveImage, ...) finish at once, never send
``progress`` and never fail at run time. These nodes do, on demand:

- ``CyberunSlowPassthrough``: returns its IMAGE unchanged after ``steps`` steps of ``step_s``
  seconds, calling ``comfy.utils.ProgressBar.update(1)`` after each. Every update sends a
  ``progress`` message to the prompt's client and is where ``/interrupt`` takes effect
  (ComfyUI's progress hook raises its interrupt exception there).
- ``CyberunFail``: raises ``RuntimeError(message)``, which ComfyUI reports as
  ``execution_error`` naming this node. An output node, so it runs on its own.
- ``CyberunEmitText``: an output node whose ``executed`` message carries ``{"text": [text]}``
  (a UI output with no file), optionally after an IMAGE input, to end a chain.

None of them is ever served from ComfyUI's cache (``IS_CHANGED`` is NaN, which equals nothing),
so every prompt that uses one runs it again.

This module runs inside the ComfyUI server process (``comfy`` is importable there); the
project's own tools only read it (mypy sees ``comfy`` as untyped).
"""

from __future__ import annotations

import time
from typing import Any

import comfy.utils  # type: ignore[import-not-found]

CATEGORY = "cyberun/test"


def never_equal() -> float:
    """A fresh NaN each call: ComfyUI re-runs the node every time.

    A fresh object matters: Python's ``==`` on containers treats the *same* NaN object as
    equal to itself (identity first), so one shared NaN would let ComfyUI's cache match.
    """
    return float("nan")


class CyberunSlowPassthrough:
    """IMAGE in, the same IMAGE out, after ``steps`` progress steps of ``step_s`` seconds."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 -- ComfyUI's name
        """Declare the inputs: the image, the number of steps and each step's duration."""
        return {
            "required": {
                "image": ("IMAGE",),
                "steps": ("INT", {"default": 5, "min": 1, "max": 100_000}),
                "step_s": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 60.0, "step": 0.01}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **_inputs: Any) -> float:  # noqa: N802 -- ComfyUI's name
        """Never cached: a fresh NaN compares unequal to the previous run's value."""
        return never_equal()

    def run(self, image: Any, steps: int, step_s: float) -> tuple[Any]:
        """Sleep ``step_s`` and report one step of progress, ``steps`` times; return ``image``."""
        progress = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            time.sleep(step_s)
            progress.update(1)  # sends `progress`; raises here once /interrupt was called
        return (image,)


class CyberunFail:
    """An output node that raises ``RuntimeError(message)`` when it runs."""

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 -- ComfyUI's name
        """Declare the inputs: the error message and an optional image to run after."""
        return {
            "required": {"message": ("STRING", {"default": "cyberun test failure"})},
            "optional": {"image": ("IMAGE",)},
        }

    @classmethod
    def IS_CHANGED(cls, **_inputs: Any) -> float:  # noqa: N802 -- ComfyUI's name
        """Never cached: a fresh NaN compares unequal to the previous run's value."""
        return never_equal()

    def run(self, message: str, image: Any = None) -> tuple[()]:
        """Raise ``RuntimeError(message)``."""
        del image
        raise RuntimeError(message)


class CyberunEmitText:
    """An output node whose ``executed`` output is ``{"text": [text]}``."""

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 -- ComfyUI's name
        """Declare the inputs: the text and an optional image to run after."""
        return {
            "required": {"text": ("STRING", {"default": "hello"})},
            "optional": {"image": ("IMAGE",)},
        }

    @classmethod
    def IS_CHANGED(cls, **_inputs: Any) -> float:  # noqa: N802 -- ComfyUI's name
        """Never cached: a fresh NaN compares unequal to the previous run's value."""
        return never_equal()

    def run(self, text: str, image: Any = None) -> dict[str, Any]:
        """Return ``text`` as this node's UI output."""
        del image
        return {"ui": {"text": [text]}, "result": ()}


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "CyberunSlowPassthrough": CyberunSlowPassthrough,
    "CyberunFail": CyberunFail,
    "CyberunEmitText": CyberunEmitText,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "CyberunSlowPassthrough": "Cyberun test: slow pass-through",
    "CyberunFail": "Cyberun test: fail",
    "CyberunEmitText": "Cyberun test: emit text",
}
