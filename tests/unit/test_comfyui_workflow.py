"""Pure ComfyUI graph handling: injections, validation, prompt ids, outputs and errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.runtimes.base import Injection, TaskFailure
from agent.runtimes.comfyui.workflow import (
    OutputRef,
    apply_injections,
    execution_failure,
    output_refs,
    prompt_id_for,
    prompt_rejection,
    text_outputs,
    unknown_classes,
)

GRAPH: dict[str, Any] = {
    "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "color": 0}},
    "5": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "out"}},
}


def inject(node: str | None, field: str | None, value: Any, key: str = "p") -> Injection:
    """An injection of ``value`` into ``node.field``."""
    return Injection(key=key, type="number", value=value, node_id=node, field=field)


def test_injection_sets_the_input_and_leaves_the_original_alone() -> None:
    """Values land in workflow[node].inputs[field] of a copy."""
    graph = apply_injections(
        GRAPH, [inject("3", "width", 128), inject("9", "filename_prefix", "x")]
    )
    assert graph["3"]["inputs"]["width"] == 128
    assert graph["9"]["inputs"]["filename_prefix"] == "x"
    assert GRAPH["3"]["inputs"]["width"] == 64


def test_injection_coerces_to_the_field_type() -> None:
    """An integer field takes 128.0 as 128; a float field takes 2 as 2.0."""
    graph = apply_injections(
        {**GRAPH, "7": {"class_type": "X", "inputs": {"f": 0.5}}},
        [
            inject("3", "width", 128.0),
            inject("7", "f", 2),
        ],
    )
    assert graph["3"]["inputs"]["width"] == 128
    assert isinstance(graph["3"]["inputs"]["width"], int)
    assert graph["7"]["inputs"]["f"] == 2.0


def test_injection_into_a_missing_node_or_field_is_refused() -> None:
    """Overrides of nodes or fields that do not exist fail before anything runs."""
    with pytest.raises(TaskFailure, match="node '42' not in the workflow"):
        apply_injections(GRAPH, [inject("42", "width", 1)])
    with pytest.raises(TaskFailure, match="no input 'depth'") as caught:
        apply_injections(GRAPH, [inject("3", "depth", 1)])
    assert caught.value.node_id == "3"


def test_a_non_api_graph_is_refused() -> None:
    """A UI-format export (no class_type per node) is an invalid workflow."""
    with pytest.raises(TaskFailure, match="class_type"):
        apply_injections({"nodes": [], "links": []}, [])
    with pytest.raises(TaskFailure, match="no nodes"):
        apply_injections({}, [])


def test_unknown_classes_are_listed() -> None:
    """Nodes whose class ComfyUI lacks are found (sorted by node id)."""
    info: dict[str, Any] = {"EmptyImage": {}, "SaveImage": {}}
    assert unknown_classes(GRAPH, info) == [("5", "ImageInvert")]


def test_prompt_ids_are_stable_per_attempt() -> None:
    """The same task attempt always maps to the same prompt id; another attempt does not."""
    assert prompt_id_for("t1", 0) == prompt_id_for("t1", 0)
    assert prompt_id_for("t1", 0) != prompt_id_for("t1", 1)


def test_outputs_of_every_kind_are_keyed_node_field_index() -> None:
    """Images, gifs, audio and 3d files all become outputs keyed like 9.images.0."""
    outputs = {
        "9": {
            "images": [
                {"filename": "a.png", "subfolder": "", "type": "output"},
                {"filename": "b.png"},
            ]
        },
        "12": {"gifs": [{"filename": "c.mp4", "subfolder": "v", "type": "output"}], "text": ["hi"]},
        "13": {"audio": [{"filename": "d.flac", "type": "output"}], "3d": [{"filename": "m.glb"}]},
    }
    assert [r.key for r in output_refs(outputs)] == [
        "12.gifs.0",
        "13.3d.0",
        "13.audio.0",
        "9.images.0",
        "9.images.1",
    ]
    assert output_refs(outputs)[0] == OutputRef("12.gifs.0", "c.mp4", "v", "output")
    assert text_outputs(outputs) == {"12.text.0": "hi"}


def test_a_prompt_rejection_names_node_class_and_message() -> None:
    """A 400 from /prompt becomes a failure naming the node, its class and the message."""
    body = {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
        },
        "node_errors": {
            "3": {
                "errors": [
                    {
                        "type": "value_bigger_than_max",
                        "message": "Value bigger than max",
                        "details": "width: 99999 > 16384",
                    }
                ],
                "class_type": "EmptyImage",
            }
        },
    }
    failure = prompt_rejection(body)
    assert (failure.code, failure.node_id) == ("invalid_workflow", "3")
    assert failure.message == "node 3 (EmptyImage): width: 99999 > 16384"
    assert prompt_rejection({"error": {"message": "no outputs"}}).message == "no outputs"


def test_an_execution_error_is_bounded_and_skips_current_inputs() -> None:
    """execution_error keeps node, type, message and a short traceback, never current_inputs."""
    event = {
        "node_id": "7",
        "node_type": "CyberunFail",
        "exception_message": "boom",
        "traceback": [f"line {i}\n" for i in range(100)],
        "current_inputs": {"image": ["x" * 1_000_000]},
    }
    failure = execution_failure(event)
    assert failure.node_id == "7"
    assert failure.message.startswith("node 7 (CyberunFail): boom")
    assert "line 99" in failure.message
    assert "line 10\n" not in failure.message
    assert "xxxx" not in failure.message
    assert len(failure.message) <= 4000


@given(
    st.dictionaries(
        st.text(max_size=5),
        st.recursive(
            st.none() | st.text(max_size=5) | st.integers(),
            lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=5), x, max_size=3),
            max_leaves=10,
        ),
        max_size=5,
    )
)
def test_output_parsing_never_raises_on_junk(outputs: dict[str, Any]) -> None:
    """Whatever ComfyUI's outputs look like, parsing them never raises."""
    output_refs(outputs)
    text_outputs(outputs)
