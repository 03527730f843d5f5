"""The policy engine against the REAL node catalog of a running ComfyUI (CPU, 0.3.75).

The unit tests (tests/unit/test_policy.py) use a synthetic catalog; these prove that the
rules read the real ``GET /object_info`` the way they assume: built-in modules, the test-only
custom nodes of tests/comfyui_nodes, combo and upload specs, multiline prompt inputs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest

from agent.policy import RESTRICTED_BUILT_INS, Violation, check_task
from agent.protocol.messages import Injection, Pool, TaskAssign, Tool
from agent.settings import PolicySettings
from tests.comfyui import COMFYUI_TEST_TIMEOUT_S, ComfyUIServer
from tests.factories import T0, next_id

pytest_plugins = ["tests.comfyui"]
pytestmark = pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)

CKPT = "sd15.safetensors"
INVERT: dict[str, Any] = {
    "3": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0},
    },
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "cyberun"}},
}
SLOW: dict[str, Any] = {
    **INVERT,
    "4": {
        "class_type": "CyberunSlowPassthrough",
        "inputs": {"image": ["3", 0], "steps": 2, "step_s": 0.0},
    },
}
SAMPLER: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 512, "height": 512, "batch_size": 1},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "model": ["4", 0],
            "seed": 1,
            "steps": 20,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
        },
    },
}


@pytest.fixture(scope="module")
def catalog(comfyui: ComfyUIServer) -> dict[str, Any]:
    """The running server's whole node catalog (``GET /object_info``)."""
    response = httpx.get(f"{comfyui.url}/object_info", timeout=60)
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    assert "EmptyImage" in found
    return found


def check(
    catalog: dict[str, Any],
    workflow: dict[str, Any],
    *injections: dict[str, Any],
    settings: PolicySettings | None = None,
    models: tuple[str, ...] = (CKPT,),
) -> Violation | None:
    """Check a community ComfyUI task of ``workflow`` against the real catalog."""
    assign = TaskAssign(
        id=next_id(),
        ts=T0,
        task_id="t1",
        attempt=0,
        pool=Pool.COMMUNITY,
        tool=Tool.COMFYUI,
        workflow=workflow,
        injections=[Injection(**item) for item in injections],
        lease_expires_at=T0 + timedelta(seconds=60),
    )
    return check_task(assign, settings or PolicySettings(), node_catalog=catalog, models=models)


def with_inputs(workflow: dict[str, Any], node_id: str, **inputs: Any) -> dict[str, Any]:
    """A copy of ``workflow`` with some inputs of one node replaced."""
    node = workflow[node_id]
    return {**workflow, node_id: {**node, "inputs": {**node["inputs"], **inputs}}}


def test_builtin_image_graph_passes(catalog: dict[str, Any]) -> None:
    """EmptyImage → SaveImage passes the default policy against the real catalog."""
    assert check(catalog, INVERT) is None


def test_test_custom_node_is_not_builtin(catalog: dict[str, Any]) -> None:
    """The test-only custom node is refused as not built in, and passes once in allow_nodes."""
    violation = check(catalog, SLOW)
    assert violation is not None
    assert violation.rule == "comfyui.nodes"
    assert "node 4 (CyberunSlowPassthrough)" in violation.message
    assert "custom_nodes.cyberun_test_nodes" in violation.message
    allowed = PolicySettings.model_validate({"comfyui": {"allow_nodes": "CyberunSlowPassthrough"}})
    assert check(catalog, SLOW, settings=allowed) is None


def test_sampler_graph_with_a_cached_model_passes(catalog: dict[str, Any]) -> None:
    """A text-to-image graph within limits, its checkpoint in the cache, passes."""
    assert check(catalog, SAMPLER) is None


def test_ksampler_steps_over_the_limit_are_refused(catalog: dict[str, Any]) -> None:
    """KSampler steps above policy.comfyui.max_steps are refused."""
    violation = check(catalog, with_inputs(SAMPLER, "3", steps=101))
    assert violation is not None
    assert str(violation) == (
        "comfyui.limits.steps: node 3 (KSampler): steps 101 exceeds policy.comfyui.max_steps 100"
    )


def test_checkpoint_not_in_the_models_is_refused(catalog: dict[str, Any]) -> None:
    """A CheckpointLoaderSimple ckpt_name the cache does not hold is refused."""
    violation = check(catalog, SAMPLER, models=())
    assert violation is not None
    assert violation.rule == "comfyui.models"
    assert "node 4 (CheckpointLoaderSimple): ckpt_name 'sd15.safetensors'" in violation.message


def test_load_image_must_be_a_file_the_task_supplies(catalog: dict[str, Any]) -> None:
    """LoadImage.image not filled by a file injection is refused; with one it passes."""
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "someone-elses.png"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    violation = check(catalog, graph)
    assert violation is not None
    assert violation.rule == "comfyui.inputs"
    assert "node 1 (LoadImage): image 'someone-elses.png'" in violation.message
    upload = {"key": "image", "type": "file", "value": "f/a.png", "node_id": "1", "field": "image"}
    assert check(catalog, graph, upload) is None


def test_save_prefix_escaping_the_output_folder_is_refused(catalog: dict[str, Any]) -> None:
    """A SaveImage filename_prefix of "../escape" is refused as a path."""
    violation = check(catalog, with_inputs(INVERT, "9", filename_prefix="../escape"))
    assert violation is not None
    assert violation.rule == "comfyui.paths"
    assert "node 9 (SaveImage): filename_prefix '../escape'" in violation.message


def test_prompt_text_may_hold_paths_and_urls(catalog: dict[str, Any]) -> None:
    """CLIPTextEncode text (multiline in the real catalog) with "../" and "http://x" passes."""
    graph = with_inputs(SAMPLER, "6", text="go ../ and see http://x")
    assert check(catalog, graph) is None


def test_values_computed_by_string_nodes_are_refused(catalog: dict[str, Any]) -> None:
    """A prefix built by StringConcatenate, a width from StringLength: refused; prompts pass."""
    concat = {"class_type": "StringConcatenate", "inputs": {"string_a": "/et", "string_b": "c/"}}
    prefix = check(catalog, {**with_inputs(INVERT, "9", filename_prefix=["2", 0]), "2": concat})
    assert prefix is not None
    assert str(prefix).startswith(
        "comfyui.paths: node 9 (SaveImage): filename_prefix is computed by node 2 "
        "(StringConcatenate)"
    )
    length = {"class_type": "StringLength", "inputs": {"string": "x" * 50_000}}
    width = check(catalog, {**with_inputs(INVERT, "3", width=["2", 0]), "2": length})
    assert width is not None
    assert width.rule == "comfyui.limits.resolution"
    assert "width is computed by node 2 (StringLength)" in width.message
    prompt = check(catalog, {**with_inputs(SAMPLER, "6", text=["2", 0]), "2": concat})
    assert prompt is None


def test_restricted_built_ins_are_real_built_in_classes(catalog: dict[str, Any]) -> None:
    """Every class the policy restricts exists in the real catalog as a built-in (no drift)."""
    missing = [name for name in RESTRICTED_BUILT_INS if name not in catalog]
    assert missing == []
    modules = {catalog[name]["python_module"] for name in RESTRICTED_BUILT_INS}
    assert all(module.startswith("comfy_extras.") for module in modules), modules
    graph = {**INVERT, "4": {"class_type": "VAESave", "inputs": {"filename_prefix": "vae/x"}}}
    violation = check(catalog, graph)
    assert violation is not None
    assert violation.rule == "comfyui.nodes"
    assert "node 4 (VAESave): writes files its history does not report" in violation.message
