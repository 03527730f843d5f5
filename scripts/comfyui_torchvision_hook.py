"""Let a CUDA build of torchvision import beside a CPU-only torch (test/runtime venvs only).

``scripts/install-comfyui`` copies this file into the ComfyUI venv's site-packages as
``cyberun_torchvision_hook.py`` and adds ``cyberun_torchvision_hook.pth`` (one line,
``import cyberun_torchvision_hook``) so that every interpreter of that venv runs
``install()`` at start-up. Nothing else uses it, and the project's own venv never has it.

Why: torchvision on PyPI is built against CUDA torch. Its compiled operator library
(``torchvision/_C.so``) does not load beside the CPU wheel of torch, so the
``torchvision::*`` operators are never defined, and ``import torchvision`` then dies in
``torchvision/_meta_registrations.py``, which registers fake (meta) implementations for
operators that must already exist ("operator torchvision::nms does not exist"). ComfyUI
imports torchvision at start-up (image transforms, spandrel), although it never calls those
operators for model-free nodes.

What: ``install()`` puts a finder at the front of ``sys.meta_path`` that acts once, on the
first ``import torchvision``, before torchvision's own code runs. It imports torch and tries
to load the real ``_C`` library itself; if that works (a matching torch/torchvision pair) it
does nothing more. Otherwise it defines the 13 operator schemas that
``_meta_registrations.py`` refers to, with no kernels, through ``torch.library``: the import
then succeeds, every pure-Python part of torchvision works, and calling one of these
operators raises torch's "no kernel registered" error instead of silently doing nothing.

The schemas are torchvision 0.28's, as its ``csrc/ops/*.cpp`` declare them (and as the
strings of its ``_C.so`` show).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

TARGET = "torchvision"

SCHEMAS: tuple[str, ...] = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    (
        "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    (
        "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, "
        "float rois_scale, int rois_zero_point, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    (
        "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
        "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    (
        "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    (
        "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    (
        "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
    ),
    (
        "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
        "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
        "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
        "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)

# The torch.library.Library that owns the schemas: kept alive for the life of the
# process (the definitions are removed when it is garbage-collected).
_LIBRARIES: list[Any] = []


class _TorchvisionFinder:
    """A meta path finder that fires once, on the first ``import torchvision``.

    It never finds anything itself (``find_spec`` returns None), so the normal finders
    then import torchvision as usual, after the operators exist.
    """

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """Prepare torch's operator registry when ``torchvision`` itself is imported."""
        del path, target
        if fullname != TARGET:
            return None
        _uninstall(self)  # first: importing torch below must not re-enter this finder
        _prepare()
        return None


def install() -> None:
    """Put the finder in front of ``sys.meta_path`` (idempotent; run by the ``.pth`` file)."""
    if TARGET in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())


def _uninstall(finder: _TorchvisionFinder) -> None:
    """Remove ``finder`` from ``sys.meta_path`` if it is still there."""
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


def _prepare() -> None:
    """Load torchvision's real operators, or define their schemas when they cannot load."""
    torch: Any = importlib.import_module("torch")  # now, never at interpreter start-up
    if _real_library_loads(torch):
        return
    library = torch.library.Library(TARGET, "FRAGMENT")
    for schema in SCHEMAS:
        library.define(schema)
    _LIBRARIES.append(library)


def _real_library_loads(torch: Any) -> bool:
    """Try to load torchvision's compiled ``_C`` library; return whether it loaded."""
    spec = importlib.machinery.PathFinder.find_spec(TARGET)
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for candidate in sorted(Path(folder).glob("_C.*so")):
            try:
                torch.ops.load_library(str(candidate))
            except (OSError, RuntimeError):
                return False
            return True
    return False


install()
