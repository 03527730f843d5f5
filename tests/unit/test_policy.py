"""The community policy engine (agent/policy.py): every rule, allowed and refused.

The node catalog is a small synthetic ``/object_info`` with the shapes of the real one
(ComfyUI 0.3.75: combos as ``[[choices], {…}]`` and ``["COMBO", {"options": […]}]``,
``python_module`` per class); the real catalog is tested in
tests/integration/test_policy_comfyui.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from agent.policy import Violation, check_task
from agent.protocol.messages import Injection, Pool, TaskAssign, Tool
from agent.settings import PolicySettings
from tests.factories import T0, next_id

INT: list[Any] = ["INT", {"default": 1, "min": 0, "max": 16384}]
FLOAT: list[Any] = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}]


def node_info(module: str, required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """One class as ``/object_info`` describes it."""
    inputs: dict[str, Any] = {"required": required}
    if optional:
        inputs["optional"] = optional
    return {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": ["IMAGE"],
        "output_is_list": [False],
        "output_name": ["IMAGE"],
        "name": "?",
        "display_name": "?",
        "description": "",
        "python_module": module,
        "category": "test",
        "output_node": False,
    }


CATALOG: dict[str, Any] = {
    "EmptyImage": node_info(
        "nodes", {"width": INT, "height": INT, "batch_size": INT, "color": INT}
    ),
    "ImageInvert": node_info("nodes", {"image": ["IMAGE"]}),
    "SaveImage": node_info(
        "nodes",
        {
            "images": ["IMAGE", {"tooltip": "The images to save."}],
            "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": "The prefix."}],
        },
    ),
    "LoadImage": node_info("nodes", {"image": [["a.png"], {"image_upload": True}]}),
    "LoadVideo": node_info(
        "comfy_extras.nodes_video",
        {"file": ["COMBO", {"multiselect": False, "options": [], "video_upload": True}]},
    ),
    "LoadLatent": node_info("nodes", {"latent": [[]]}),
    "CheckpointLoaderSimple": node_info(
        "nodes", {"ckpt_name": [[], {"tooltip": "The name of the checkpoint (model) to load."}]}
    ),
    "UpscaleModelLoader": node_info(
        "comfy_extras.nodes_upscale_model",
        {"model_name": ["COMBO", {"multiselect": False, "options": []}]},
    ),
    "KSampler": node_info(
        "nodes",
        {
            "model": ["MODEL", {"tooltip": "The model."}],
            "seed": INT,
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": FLOAT,
            "sampler_name": [["euler", "dpmpp_2m"]],
        },
    ),
    "ModelSamplingContinuousEDM": node_info(
        "comfy_extras.nodes_model_advanced",
        {"model": ["MODEL"], "sampling": [["v_prediction", "edm_playground_v2.5"]]},
    ),
    "CLIPTextEncode": node_info(
        "nodes",
        {
            "text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
            "clip": ["CLIP", {"tooltip": "The CLIP model."}],
        },
    ),
    "StringLength": node_info(
        "comfy_extras.nodes_string", {"string": ["STRING", {"multiline": True}]}
    ),
    "StringConcatenate": node_info(
        "comfy_extras.nodes_string",
        {
            "string_a": ["STRING", {"multiline": True}],
            "string_b": ["STRING", {"multiline": True}],
            "delimiter": ["STRING", {"multiline": False, "default": ""}],
        },
    ),
    "ModelFiles": node_info("nodes", {"name": [["a.safetensors", "b.safetensors"]]}),
    "PrimitiveInt": node_info("comfy_extras.nodes_primitive", {"value": INT}),
    "PrimitiveFloat": node_info("comfy_extras.nodes_primitive", {"value": FLOAT}),
    "PrimitiveString": node_info(
        "comfy_extras.nodes_primitive", {"value": ["STRING", {"multiline": False}]}
    ),
    "PrimitiveStringMultiline": node_info(
        "comfy_extras.nodes_primitive", {"value": ["STRING", {"multiline": True}]}
    ),
    "ImageScaleBy": node_info(
        "nodes",
        {"image": ["IMAGE"], "upscale_method": [["nearest-exact", "bicubic"]], "scale_by": FLOAT},
    ),
    "RepeatImageBatch": node_info("comfy_extras.nodes_images", {"image": ["IMAGE"], "amount": INT}),
    "EmptyHunyuanLatentVideo": node_info(
        "comfy_extras.nodes_hunyuan",
        {"width": INT, "height": INT, "length": INT, "batch_size": INT},
    ),
    "EmptyAceStepLatentAudio": node_info(
        "comfy_extras.nodes_ace", {"seconds": FLOAT, "batch_size": INT}
    ),
    "CyberunFail": node_info(
        "custom_nodes.cyberun_test_nodes",
        {"message": ["STRING", {"default": "cyberun test failure"}]},
        image=["IMAGE"],
    ),
    "OpenAIChatNode": node_info(
        "comfy_api_nodes.nodes_openai",
        {"prompt": ["STRING", {"multiline": True}], "model": [["gpt-4.1"]]},
    ),
}
INVERT: dict[str, Any] = {
    "3": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0},
    },
    "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "cyberun"}},
}
SPEC: dict[str, Any] = {
    "input": {"param": "scene", "kind": "dataset"},
    "train": {"method": "nerfacto", "max_num_iterations": 5, "device": "cpu"},
    "export": [{"kind": "pointcloud", "num_points": 2000, "normal_method": "open3d"}],
}
DEFAULT = PolicySettings()


def task(
    workflow: dict[str, Any],
    *injections: dict[str, Any],
    tool: Tool = Tool.COMFYUI,
    timeout_s: float = 0,
) -> TaskAssign:
    """A community ``task.assign`` of ``workflow`` with these injections."""
    return TaskAssign(
        id=next_id(),
        ts=T0,
        task_id="t1",
        attempt=0,
        pool=Pool.COMMUNITY,
        tool=tool,
        workflow=workflow,
        injections=[Injection(**item) for item in injections],
        timeout_s=timeout_s,
        lease_expires_at=T0 + timedelta(seconds=60),
    )


def one(class_type: str, **inputs: Any) -> dict[str, Any]:
    """A one-node graph (node id 3)."""
    return {"3": {"class_type": class_type, "inputs": inputs}}


def policy(**settings: Any) -> PolicySettings:
    """Policy settings as a config file would give them."""
    return PolicySettings.model_validate(settings)


def check(
    workflow: dict[str, Any],
    *injections: dict[str, Any],
    settings: PolicySettings = DEFAULT,
    models: tuple[str, ...] = (),
    catalog: dict[str, Any] = CATALOG,
) -> Violation | None:
    """Check a ComfyUI task against the synthetic catalog."""
    return check_task(task(workflow, *injections), settings, node_catalog=catalog, models=models)


def refused(violation: Violation | None, rule: str, *parts: str) -> Violation:
    """Assert ``violation`` is of ``rule`` and its message names every one of ``parts``."""
    assert violation is not None, f"expected a {rule} violation"
    assert violation.rule == rule, str(violation)
    for part in parts:
        assert part in violation.message, (part, violation.message)
    assert str(violation) == f"{rule}: {violation.message}"
    return violation


def file_param(node_id: str, field: str) -> dict[str, Any]:
    """A ``file`` injection into ``node_id.field``."""
    return {
        "key": "picture",
        "type": "file",
        "value": "uploads/a.png",
        "node_id": node_id,
        "field": field,
    }


# ---------------------------------------------------------------- general


def test_violation_str_is_rule_then_message() -> None:
    """str(Violation) is ``<rule>: <message>``, what task.reject carries."""
    violation = Violation("comfyui.nodes", "node 3 (X): nope")
    assert str(violation) == "comfyui.nodes: node 3 (X): nope"


def test_duration_within_the_limit_is_allowed() -> None:
    """A timeout up to policy.max_duration_s, or none at all (0), passes the duration rule."""
    for timeout_s in (0, 3600):
        assert (
            check_task(task(INVERT, timeout_s=timeout_s), DEFAULT, node_catalog=CATALOG, models=())
            is None
        )


def test_duration_over_the_limit_is_refused() -> None:
    """A timeout_s above policy.max_duration_s is refused, naming both numbers."""
    violation = check_task(task(INVERT, timeout_s=3601), DEFAULT, node_catalog=CATALOG, models=())
    refused(violation, "duration", "timeout_s 3601 s", "policy.max_duration_s 3600 s")


def test_duration_applies_to_nerfstudio_too() -> None:
    """The duration rule is checked for every tool, Nerfstudio included."""
    assign = task(SPEC, tool=Tool.NERFSTUDIO, timeout_s=7200)
    refused(check_task(assign, DEFAULT, node_catalog=None, models=()), "duration")


# ---------------------------------------------------------------- ComfyUI: nodes


def test_builtin_graph_is_allowed() -> None:
    """A graph of built-in nodes (modules nodes and comfy_extras.*) within limits passes."""
    graph = {
        **INVERT,
        "4": {"class_type": "RepeatImageBatch", "inputs": {"image": ["3", 0], "amount": 2}},
    }
    assert check(graph) is None


def test_missing_catalog_refuses_a_comfyui_task() -> None:
    """Without ComfyUI's node catalog a ComfyUI task cannot be checked, so it is refused."""
    violation = check_task(task(INVERT), DEFAULT, node_catalog=None, models=())
    refused(violation, "comfyui.nodes", "the node catalog is unavailable")


def test_custom_node_is_refused_unless_allowed() -> None:
    """A custom_nodes.* class is refused (naming node, class, module, setting) unless allowed."""
    graph = {**INVERT, "4": {"class_type": "CyberunFail", "inputs": {"message": "x"}}}
    refused(
        check(graph),
        "comfyui.nodes",
        "node 4 (CyberunFail)",
        "custom node",
        "custom_nodes.cyberun_test_nodes",
        "policy.comfyui.allow_nodes",
    )
    assert check(graph, settings=policy(comfyui={"allow_nodes": "CyberunFail"})) is None


@pytest.mark.parametrize(
    ("class_type", "module", "inputs", "why"),
    [
        (
            "LoadImageDataSetFromFolder",
            "comfy_extras.nodes_dataset",
            {"folder": [["a"], {}]},
            "reads a folder ComfyUI shares between tasks",
        ),
        (
            "CheckpointSave",
            "comfy_extras.nodes_model_merging",
            {"model": ["MODEL"], "filename_prefix": ["STRING", {"default": "checkpoints/x"}]},
            "writes files its history does not report",
        ),
    ],
)
def test_restricted_built_ins_are_refused_unless_allowed(
    class_type: str, module: str, inputs: dict[str, Any], why: str
) -> None:
    """Built-ins reading shared folders or writing unpurgeable files need allow_nodes."""
    catalog = {**CATALOG, class_type: node_info(module, inputs)}
    literals = {
        name: spec[0][0] if isinstance(spec[0], list) else "x" for name, spec in inputs.items()
    }
    graph = {**INVERT, "4": {"class_type": class_type, "inputs": literals}}
    refused(
        check(graph, catalog=catalog),
        "comfyui.nodes",
        f"node 4 ({class_type}): {why}",
        "policy.comfyui.allow_nodes",
    )
    allowed = policy(comfyui={"allow_nodes": class_type})
    assert check(graph, catalog=catalog, settings=allowed) is None


def test_api_node_is_refused_as_external_service() -> None:
    """A comfy_api_nodes.* class (a paid, external service) is refused unless allowed."""
    graph = one("OpenAIChatNode", prompt="hi", model="gpt-4.1")
    refused(
        check(graph),
        "comfyui.nodes",
        "node 3 (OpenAIChatNode)",
        "external service",
        "comfy_api_nodes.nodes_openai",
    )
    assert check(graph, settings=policy(comfyui={"allow_nodes": ["OpenAIChatNode"]})) is None


def test_unknown_class_is_refused() -> None:
    """A class the catalog does not list is refused as not installed."""
    refused(check(one("NoSuchNode")), "comfyui.nodes", "node 3 (NoSuchNode)", "not in ComfyUI's")


def test_denied_builtin_is_refused_even_when_allowed() -> None:
    """deny_nodes refuses a built-in class, and wins over allow_nodes."""
    settings = policy(comfyui={"deny_nodes": "ImageInvert", "allow_nodes": "ImageInvert"})
    refused(
        check(INVERT, settings=settings),
        "comfyui.nodes",
        "node 5 (ImageInvert)",
        "policy.comfyui.deny_nodes",
    )


def test_nodes_are_checked_in_numeric_id_order() -> None:
    """Numeric ids are checked in numeric order (9 before 10), other ids after them."""
    graph = {
        "b": {"class_type": "NoSuchNode", "inputs": {}},
        "10": {"class_type": "NoSuchNode", "inputs": {}},
        "9": {"class_type": "NoSuchNode", "inputs": {}},
    }
    refused(check(graph), "comfyui.nodes", "node 9 ")
    del graph["9"], graph["10"]
    graph["a"] = {"class_type": "NoSuchNode", "inputs": {}}
    refused(check(graph), "comfyui.nodes", "node a ")


def test_the_node_rule_comes_before_the_limits() -> None:
    """A graph breaking several rules reports the node rule first, whatever the node order."""
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 99999, "height": 8}},
        "2": {"class_type": "NoSuchNode", "inputs": {}},
    }
    refused(check(graph), "comfyui.nodes", "node 2")


def test_invalid_workflow_is_left_to_the_runtime() -> None:
    """A graph the runtime refuses as invalid_workflow (here a bad injection) is not a violation."""
    bad = {"key": "w", "type": "number", "value": 8, "node_id": "77", "field": "width"}
    assert check(INVERT, bad) is None
    assert check({"3": {"inputs": {}}}) is None  # not API format


# ---------------------------------------------------------------- ComfyUI: limits

LIMITS = [
    # class, input, refused value, rule, setting and limit in the message
    ("EmptyImage", "width", 2049, "comfyui.limits.resolution", "max_side 2048"),
    ("EmptyImage", "height", 4096, "comfyui.limits.resolution", "max_side 2048"),
    ("EmptyImage", "batch_size", 5, "comfyui.limits.batch_size", "max_batch_size 4"),
    ("RepeatImageBatch", "amount", 5, "comfyui.limits.batch_size", "max_batch_size 4"),
    ("KSampler", "steps", 101, "comfyui.limits.steps", "max_steps 100"),
    ("EmptyHunyuanLatentVideo", "length", 241, "comfyui.limits.frames", "max_frames 240"),
    ("EmptyImage", "num_frames", 241, "comfyui.limits.frames", "max_frames 240"),
    ("EmptyImage", "video_frames", 241, "comfyui.limits.frames", "max_frames 240"),
    ("EmptyImage", "frames", 241, "comfyui.limits.frames", "max_frames 240"),
    ("EmptyImage", "frame_count", 241, "comfyui.limits.frames", "max_frames 240"),
    ("EmptyAceStepLatentAudio", "seconds", 60.5, "comfyui.limits.seconds", "max_seconds 60"),
    ("EmptyImage", "duration", 61, "comfyui.limits.seconds", "max_seconds 60"),
    ("ImageScaleBy", "scale_by", 4.5, "comfyui.limits.scale", "max_scale 4"),
    ("EmptyImage", "upscale_factor", 8, "comfyui.limits.scale", "max_scale 4"),
    ("EmptyImage", "upscale_by", 5, "comfyui.limits.scale", "max_scale 4"),
]
AT_LIMIT = {
    "width": 2048,
    "height": 2048,
    "batch_size": 4,
    "amount": 4,
    "steps": 100,
    "length": 240,
    "num_frames": 240,
    "video_frames": 240,
    "frames": 240,
    "frame_count": 240,
    "seconds": 60.0,
    "duration": 60,
    "scale_by": 4.0,
    "upscale_factor": 4,
    "upscale_by": 4,
}


@pytest.mark.parametrize(("class_type", "field", "value", "rule", "setting"), LIMITS)
def test_limit_over_is_refused_at_is_allowed(
    class_type: str, field: str, value: float, rule: str, setting: str
) -> None:
    """Each limited input is refused above its limit, naming node, input, value and setting."""
    refused(
        check(one(class_type, **{field: value})),
        rule,
        f"node 3 ({class_type})",
        f"{field} {value:g} exceeds policy.comfyui.{setting}",
    )
    assert check(one(class_type, **{field: AT_LIMIT[field]})) is None


def test_limit_names_are_case_insensitive() -> None:
    """``Width`` and ``STEPS`` are limited like ``width`` and ``steps``."""
    refused(check(one("EmptyImage", Width=4096)), "comfyui.limits.resolution", "Width 4096")
    refused(check(one("KSampler", STEPS=500)), "comfyui.limits.steps", "STEPS 500")


def test_pixels_of_one_node_are_limited() -> None:
    """The width x height of one node above max_pixels is refused even with both sides allowed."""
    settings = policy(comfyui={"max_side": 8192})
    refused(
        check(one("EmptyImage", width=4096, height=2048), settings=settings),
        "comfyui.limits.pixels",
        "node 3 (EmptyImage)",
        "4096 x 2048 = 8388608",
        "policy.comfyui.max_pixels 4194304",
    )
    assert check(one("EmptyImage", width=4096, height=1024), settings=settings) is None


def test_settings_change_the_limits() -> None:
    """The limits are the settings' (here a raised max_steps), not built-in numbers."""
    assert check(one("KSampler", steps=150), settings=policy(comfyui={"max_steps": 150})) is None


def test_primitive_int_feeding_a_limited_input_is_checked() -> None:
    """A width fed by a PrimitiveInt (one link) is checked as that literal, naming its source."""
    graph: dict[str, Any] = {
        "3": {"class_type": "EmptyImage", "inputs": {"width": ["7", 0], "height": 64}},
        "7": {"class_type": "PrimitiveInt", "inputs": {"value": 8192}},
    }
    refused(
        check(graph),
        "comfyui.limits.resolution",
        "node 3 (EmptyImage): width 8192 (from node 7 PrimitiveInt) exceeds",
    )
    graph["7"]["inputs"]["value"] = 512
    assert check(graph) is None


def test_primitive_float_feeding_a_scale_is_checked() -> None:
    """A scale_by fed by a PrimitiveFloat is checked as that literal."""
    graph = {
        "3": {"class_type": "ImageScaleBy", "inputs": {"scale_by": ["8", 0]}},
        "8": {"class_type": "PrimitiveFloat", "inputs": {"value": 16.0}},
    }
    refused(check(graph), "comfyui.limits.scale", "scale_by 16 (from node 8 PrimitiveFloat)")


def test_a_limited_input_computed_by_another_node_is_refused() -> None:
    """A width from StringLength (a prompt's length) cannot be checked, so it is refused."""
    graph: dict[str, Any] = {
        "3": {"class_type": "EmptyImage", "inputs": {"width": ["4", 0], "height": 8}},
        "4": {"class_type": "StringLength", "inputs": {"string": "x" * 100_000}},
    }
    refused(
        check(graph),
        "comfyui.limits.resolution",
        "node 3 (EmptyImage): width is computed by node 4 (StringLength)",
    )


def test_links_into_unlimited_or_non_numeric_inputs_pass() -> None:
    """Links into inputs that are not limited numbers (an IMAGE, a seed) are ordinary graphs."""
    graph: dict[str, Any] = {
        "3": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "color": ["4", 0]}},
        "4": {"class_type": "StringLength", "inputs": {"string": "abc"}},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    }
    assert check(graph) is None


def test_a_link_to_a_missing_node_is_left_to_comfyui() -> None:
    """A dangling link is not a policy matter: ComfyUI refuses the graph, running nothing."""
    assert check(one("EmptyImage", width=["99", 0], height=8)) is None


def test_numbers_comfyui_would_convert_are_checked() -> None:
    """Numeric strings and ``{"__value__": n}`` are checked as the number ComfyUI reads."""
    refused(check(one("EmptyImage", width="8192")), "comfyui.limits.resolution", "width 8192")
    refused(check(one("EmptyImage", width={"__value__": 8192})), "comfyui.limits.resolution")
    assert check(one("EmptyImage", width="512", height="not a number")) is None


def test_booleans_are_not_numbers() -> None:
    """A boolean in a limited input is not a number (True is not 1 here)."""
    settings = policy(comfyui={"max_batch_size": 1})
    assert check(one("EmptyImage", batch_size=True), settings=settings) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf"])
def test_non_finite_numbers_are_refused(value: float | str) -> None:
    """NaN and infinities in a limited input are refused (they would compare as within limits)."""
    refused(
        check(one("KSampler", steps=value)),
        "comfyui.limits.steps",
        "is not finite",
        "policy.comfyui.max_steps 100",
    )


def test_huge_integers_are_refused_with_a_short_message() -> None:
    """An integer too large for a float is still compared exactly, and shown shortened."""
    violation = refused(check(one("EmptyImage", width=10**400)), "comfyui.limits.resolution")
    assert "(401 digits) exceeds policy.comfyui.max_side 2048" in violation.message
    assert len(violation.message) < 200


def test_injections_are_applied_before_the_limits() -> None:
    """A number injection is checked as the value the runtime would set."""
    width = {"key": "width", "type": "number", "value": 8192, "node_id": "3", "field": "width"}
    refused(check(INVERT, width), "comfyui.limits.resolution", "node 3 (EmptyImage): width 8192")
    assert check(INVERT, {**width, "value": 1024}) is None


# ---------------------------------------------------------------- ComfyUI: strings


@pytest.mark.parametrize(
    "prefix",
    [
        "../escape",
        "a/../../b",
        "..",
        "/etc/cron.d/x",
        "~/x",
        "~root",
        "C:\\x",
        "c:/x",
        "\\\\server\\share",
        "a\\b",
        "ok\0",
        " /abs",
    ],
)
def test_path_like_strings_are_refused(prefix: str) -> None:
    """Absolute paths, ~, drive letters, backslashes, .. segments and NUL are refused."""
    graph = {
        **INVERT,
        "9": {**INVERT["9"], "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }
    refused(check(graph), "comfyui.paths", f"node 9 (SaveImage): filename_prefix {prefix!r}")


@pytest.mark.parametrize(
    "prefix", ["cyberun", "video/ComfyUI", "%date:yyyy-MM-dd%/run", "a..b", "v1.5", "x_./y"]
)
def test_relative_strings_are_allowed(prefix: str) -> None:
    """Relative names without .. segments (subfolders, dots inside names) are allowed."""
    graph = {
        **INVERT,
        "9": {**INVERT["9"], "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }
    assert check(graph) is None


@pytest.mark.parametrize(
    "value",
    [
        "http://x",
        "HTTPS://example.com/a.png",
        "s3://bucket/key",
        "//host/x",
        "file:x",
        "FILE:///etc/passwd",
        "see ftp://x",
    ],
)
def test_url_like_strings_are_refused(value: str) -> None:
    """A URL (scheme://, leading //, file:) in a non-prompt string input is refused."""
    refused(
        check(one("SaveImage", filename_prefix=value)),
        "comfyui.urls",
        "node 3 (SaveImage): filename_prefix",
        "URL",
    )


def test_multiline_prompt_text_is_not_inspected() -> None:
    """Multiline (prompt) inputs may hold anything, "../" and URLs included."""
    graph = one("CLIPTextEncode", text="../../etc http://x C:\\y", clip=["4", 0])
    assert check(graph) is None


def test_string_injections_are_checked() -> None:
    """A string injection is checked as the value the runtime would set."""
    prefix = {
        "key": "p",
        "type": "string",
        "value": "../x",
        "node_id": "9",
        "field": "filename_prefix",
    }
    refused(check(INVERT, prefix), "comfyui.paths", "node 9 (SaveImage): filename_prefix '../x'")


def test_string_primitive_feeding_an_input_is_checked() -> None:
    """A path from a PrimitiveStringMultiline (not inspected itself) is refused where it is used."""
    graph: dict[str, Any] = {
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["6", 0]}},
        "6": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "/srv/x"}},
    }
    refused(
        check(graph),
        "comfyui.paths",
        "node 3 (SaveImage): filename_prefix '/srv/x' (from node 6 PrimitiveStringMultiline)",
    )
    graph["6"]["inputs"]["value"] = "fine"
    assert check(graph) is None


def test_a_string_computed_by_another_node_is_refused() -> None:
    """A filename_prefix built by StringConcatenate ("/et" + "c/x") is refused as a path risk."""
    graph: dict[str, Any] = {
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["6", 0]}},
        "6": {"class_type": "StringConcatenate", "inputs": {"string_a": "/et", "string_b": "c/x"}},
    }
    refused(
        check(graph),
        "comfyui.paths",
        "node 3 (SaveImage): filename_prefix is computed by node 6 (StringConcatenate)",
    )


def test_computed_prompt_text_is_allowed() -> None:
    """Prompt text (multiline) may be built by string nodes."""
    graph: dict[str, Any] = {
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": ["6", 0], "clip": ["7", 1]}},
        "6": {"class_type": "StringConcatenate", "inputs": {"string_a": "a", "string_b": "b"}},
        "7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
    }
    assert check(graph, models=("m.safetensors",)) is None


def test_a_non_multiline_primitive_string_is_inspected() -> None:
    """PrimitiveString's own value is not prompt text: a URL there is refused."""
    refused(
        check(one("PrimitiveString", value="http://x")),
        "comfyui.urls",
        "node 3 (PrimitiveString): value 'http://x'",
    )


def test_long_values_are_shortened_in_messages() -> None:
    """A stranger's long value is cut in the message."""
    violation = refused(check(one("SaveImage", filename_prefix="/" + "x" * 500)), "comfyui.paths")
    assert len(violation.message) < 200


# ---------------------------------------------------------------- ComfyUI: combos


def test_upload_combo_must_be_a_supplied_file() -> None:
    """LoadImage.image not filled by a file injection is refused; with one it passes."""
    graph = one("LoadImage", image="someone-elses.png")
    refused(
        check(graph),
        "comfyui.inputs",
        "node 3 (LoadImage): image 'someone-elses.png'",
        "is not a file this task supplies",
    )
    refused(check(one("LoadImage", image="no-extension")), "comfyui.inputs", "image")
    assert check(graph, file_param("3", "image")) is None


def test_combo_form_upload_must_be_a_supplied_file() -> None:
    """The ``["COMBO", {"video_upload": true}]`` form (LoadVideo.file) is a file input too."""
    graph = one("LoadVideo", file="clip.mp4")
    refused(check(graph), "comfyui.inputs", "node 3 (LoadVideo): file 'clip.mp4'")
    assert check(graph, file_param("3", "file")) is None


def test_file_named_in_any_combo_must_be_supplied() -> None:
    """A combo value that looks like a file (LoadLatent.latent) must be a supplied file."""
    refused(
        check(one("LoadLatent", latent="x.latent")),
        "comfyui.inputs",
        "node 3 (LoadLatent): latent 'x.latent'",
    )


@pytest.mark.parametrize(
    ("class_type", "field"),
    [
        ("LoadImage", "image"),  # a picker
        ("CheckpointLoaderSimple", "ckpt_name"),  # an empty model folder
        ("LoadLatent", "latent"),  # an empty input folder
        ("ModelFiles", "name"),  # choices that are files
    ],
)
def test_a_file_combo_fed_by_a_link_is_refused(class_type: str, field: str) -> None:
    """A file or model choice fed by another node's output is not a file the task supplies."""
    graph: dict[str, Any] = {
        "3": {"class_type": class_type, "inputs": {field: ["6", 0]}},
        "6": {"class_type": "StringConcatenate", "inputs": {"string_a": "a", "string_b": "b"}},
    }
    refused(
        check(graph),
        "comfyui.inputs",
        f"node 3 ({class_type}): {field} is fed by node 6, not a file this task supplies",
    )


def test_a_plain_combo_fed_by_a_link_is_left_to_comfyui() -> None:
    """A link into a choice of names (sampler_name) is ComfyUI's type check, not a file risk."""
    graph: dict[str, Any] = {
        "3": {"class_type": "KSampler", "inputs": {"sampler_name": ["6", 0], "steps": 20}},
        "6": {"class_type": "StringConcatenate", "inputs": {"string_a": "a", "string_b": "b"}},
    }
    assert check(graph) is None


def test_plain_combo_choices_are_allowed() -> None:
    """Ordinary choices pass, even with a dot that is not a file extension (v2.5)."""
    assert check(one("KSampler", sampler_name="euler", steps=20)) is None
    assert check(one("ModelSamplingContinuousEDM", sampling="edm_playground_v2.5")) is None


def test_model_not_in_the_cache_is_refused() -> None:
    """A checkpoint neither cached nor in allow_models is refused, naming both."""
    graph = one("CheckpointLoaderSimple", ckpt_name="sd15.safetensors")
    refused(
        check(graph),
        "comfyui.models",
        "node 3 (CheckpointLoaderSimple): ckpt_name 'sd15.safetensors'",
        "model cache",
        "policy.comfyui.allow_models",
    )
    refused(check(one("CheckpointLoaderSimple", ckpt_name="X.CKPT")), "comfyui.models")


def test_cached_or_allowed_models_pass() -> None:
    """Models the cache holds (with subfolders) or allow_models lists are allowed."""
    graph = one("CheckpointLoaderSimple", ckpt_name="sd15.safetensors")
    assert check(graph, models=("sd15.safetensors",)) is None
    allowed = policy(comfyui={"allow_models": "sd15.safetensors"})
    assert check(graph, settings=allowed) is None
    nested = one("UpscaleModelLoader", model_name="esrgan/4x.pth")
    refused(check(nested), "comfyui.models", "model_name 'esrgan/4x.pth'")
    assert check(nested, models=("esrgan/4x.pth",)) is None


def test_a_path_in_a_model_name_is_a_path_violation() -> None:
    """``../x.safetensors`` is refused as a path before it is looked up as a model."""
    graph = one("CheckpointLoaderSimple", ckpt_name="../x.safetensors")
    refused(check(graph, models=("../x.safetensors",)), "comfyui.paths", "ckpt_name")


# ---------------------------------------------------------------- Nerfstudio


def ns(
    spec: dict[str, Any], *injections: dict[str, Any], settings: PolicySettings = DEFAULT
) -> Violation | None:
    """Check a Nerfstudio task."""
    assign = task(spec, *injections, tool=Tool.NERFSTUDIO)
    return check_task(assign, settings, node_catalog=None, models=())


def test_nerfstudio_spec_within_policy_is_allowed() -> None:
    """A valid spec within the defaults passes (no catalog is needed)."""
    assert ns(SPEC) is None


def test_nerfstudio_method_outside_policy_is_refused() -> None:
    """A method not in policy.nerfstudio.methods is refused, naming the setting."""
    settings = policy(nerfstudio={"methods": "splatfacto"})
    refused(
        ns(SPEC, settings=settings),
        "nerfstudio.method",
        "train.method nerfacto",
        "policy.nerfstudio.methods (splatfacto)",
    )


def test_nerfstudio_options_outside_allow_options_are_refused() -> None:
    """train.options and train.dataparser keys must be in allow_options when it is set."""
    spec = {
        **SPEC,
        "train": {
            **SPEC["train"],
            "options": {"pipeline.model.sh-degree": 2},
            "dataparser": {"downscale-factor": 2},
        },
    }
    assert ns(spec) is None  # allow_options None: whatever the spec allows
    settings = policy(nerfstudio={"allow_options": "downscale-factor"})
    refused(
        ns(spec, settings=settings),
        "nerfstudio.options",
        "train.options 'pipeline.model.sh-degree'",
        "policy.nerfstudio.allow_options",
    )
    settings = policy(nerfstudio={"allow_options": "pipeline.model.sh-degree"})
    refused(
        ns(spec, settings=settings), "nerfstudio.options", "train.dataparser 'downscale-factor'"
    )


def test_nerfstudio_iterations_over_the_limit_are_refused() -> None:
    """max_num_iterations above max_iterations (here set by an injection) is refused."""
    iterations = {
        "key": "n",
        "type": "number",
        "value": 30001,
        "target_path": "train.max_num_iterations",
    }
    refused(
        ns(SPEC, iterations),
        "nerfstudio.limits",
        "train.max_num_iterations 30001",
        "policy.nerfstudio.max_iterations 30000",
    )
    assert ns(SPEC, {**iterations, "value": 30000}) is None


def test_nerfstudio_points_over_the_limit_are_refused() -> None:
    """An export's num_points above max_points is refused."""
    spec = {
        **SPEC,
        "export": [{"kind": "gaussian-splat"}, {"kind": "pointcloud", "num_points": 2_000_001}],
    }
    refused(
        ns(spec),
        "nerfstudio.limits",
        "export[1].num_points 2000001",
        "policy.nerfstudio.max_points 2000000",
    )


def test_nerfstudio_frames_over_the_limit_are_refused() -> None:
    """process.num_frames_target above max_frames is refused."""
    spec = {
        **SPEC,
        "input": {"param": "scene", "kind": "video"},
        "process": {"num_frames_target": 301},
    }
    refused(
        ns(spec),
        "nerfstudio.limits",
        "process.num_frames_target 301",
        "policy.nerfstudio.max_frames 300",
    )
    spec["process"] = {"num_frames_target": 300}
    assert ns(spec) is None


def test_invalid_nerfstudio_spec_is_left_to_the_runtime() -> None:
    """A spec parse_spec refuses is no violation: the runtime fails it, running nothing."""
    assert ns({"train": {"method": "nope"}}) is None
