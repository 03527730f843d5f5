"""Run-request parameter validation and workflow target checks (``gateway.validation``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.messages import Injection
from gateway.models import ParameterDef, ParameterType, ToolType, Workflow, WorkflowIn
from gateway.validation import (
    MAX_STRING_LENGTH,
    FileMeta,
    ResolvedRun,
    ValidationFailure,
    accepts,
    check_workflow_targets,
    file_keys_to_lookup,
    resolve_parameters,
)

TEAM = "team-a"
OTHER_TEAM = "team-zz-other"
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)

COMFY_JSON: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": 20,
            "cfg": 7.0,
            "sampler_name": "euler",
            "model": ["4", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "9": {"class_type": "Toggle", "inputs": {"enabled": False}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
}

IMAGE_KEY = f"inputs/{TEAM}/0b7c/cat.png"
PDF_KEY = f"inputs/{TEAM}/1c8d/doc.pdf"
FOREIGN_KEY = f"inputs/{OTHER_TEAM}/2d9e/dog.png"
FILES = {
    IMAGE_KEY: FileMeta(IMAGE_KEY, TEAM, 1234, "image/png", "ab" * 32),
    PDF_KEY: FileMeta(PDF_KEY, TEAM, 99, "application/pdf"),
    FOREIGN_KEY: FileMeta(FOREIGN_KEY, OTHER_TEAM, 10, "image/png"),
}


def comfy_params() -> list[ParameterDef]:
    """Return one parameter of each type, targeting ``COMFY_JSON``."""
    return [
        ParameterDef(
            key="prompt", type=ParameterType.STRING, required=True, node_id="6", field="text"
        ),
        ParameterDef(
            key="seed",
            type=ParameterType.NUMBER,
            default=42,
            min=0,
            max=2**32,
            node_id="3",
            field="seed",
        ),
        ParameterDef(
            key="steps", type=ParameterType.NUMBER, min=1, max=150, node_id="3", field="steps"
        ),
        ParameterDef(
            key="sampler",
            type=ParameterType.SELECT,
            options=["euler", "dpmpp_2m"],
            default="euler",
            node_id="3",
            field="sampler_name",
        ),
        ParameterDef(key="hires", type=ParameterType.BOOLEAN, node_id="9", field="enabled"),
        ParameterDef(
            key="image", type=ParameterType.FILE, accept="image/*", node_id="10", field="image"
        ),
    ]


def workflow(
    params: list[ParameterDef] | None = None,
    tool: ToolType = ToolType.COMFYUI,
    workflow_json: dict[str, Any] | None = None,
) -> Workflow:
    """Build a stored workflow of team ``TEAM``."""
    return Workflow(
        id="wf-1",
        team_id=TEAM,
        version=1,
        created_at=T0,
        updated_at=T0,
        name="test",
        workflow_json=COMFY_JSON if workflow_json is None else workflow_json,
        parameters=comfy_params() if params is None else params,
        tool_type=tool,
    )


def workflow_in(params: list[ParameterDef], tool: ToolType = ToolType.COMFYUI) -> WorkflowIn:
    """Build a create/update body over ``COMFY_JSON``."""
    return WorkflowIn(name="test", workflow_json=COMFY_JSON, parameters=params, tool_type=tool)


def resolve(parameters: dict[str, Any] | None, wf: Workflow | None = None) -> ResolvedRun:
    """Resolve parameters against ``wf`` (default: ``workflow()``) with ``FILES`` known."""
    wf = wf or workflow()
    keys = file_keys_to_lookup(wf, parameters)
    found = {key: FILES[key] for key in keys if key in FILES}
    return resolve_parameters(wf, parameters, team_id=TEAM, files=found)


def failure(parameters: dict[str, Any] | None, wf: Workflow | None = None) -> ValidationFailure:
    """Return the failure a resolution raises."""
    with pytest.raises(ValidationFailure) as caught:
        resolve(parameters, wf)
    return caught.value


def by_key(run: ResolvedRun) -> dict[str, Injection]:
    """Index injections by parameter key."""
    return {inj.key: inj for inj in run.injections}


# ------------------------------------------------------------------ one test per rule


def test_more_than_100_keys_is_max_keys() -> None:
    """A parameters map with 101 keys fails on field "parameters" with rule max_keys."""
    params = {f"k{i}": i for i in range(101)}
    err = failure(params)
    assert (err.field, err.rule) == ("parameters", "max_keys")
    assert "101" in err.message
    assert "100" in err.message


def test_max_keys_is_checked_before_unknown_keys() -> None:
    """Too many keys is reported even when every key is also unknown."""
    assert failure({f"zz{i}": 0 for i in range(150)}).rule == "max_keys"


def test_unknown_key_names_the_first_sorted_unknown_key() -> None:
    """Unknown keys are refused in sorted order, naming the key in field and message."""
    err = failure({"prompt": "x", "zeta": 1, "alpha": 2})
    assert (err.field, err.rule) == ("parameters.alpha", "unknown_key")
    assert "'alpha'" in err.message


def test_unknown_key_is_checked_before_required() -> None:
    """An unknown key is reported before a missing required key."""
    assert failure({"nope": 1}).rule == "unknown_key"


def test_very_long_unknown_key_is_cut_in_field_and_message() -> None:
    """A huge unknown key is not echoed whole into the error."""
    err = failure({"x" * 5000: 1})
    assert err.rule == "unknown_key"
    assert len(err.field) < 100
    assert len(err.message) < 200


def test_missing_required_key_is_required() -> None:
    """A required key that is absent fails with rule required, naming the key."""
    err = failure({"seed": 1})
    assert (err.field, err.rule) == ("parameters.prompt", "required")
    assert "'prompt'" in err.message


def test_required_key_given_as_null_is_required() -> None:
    """A required key given as null counts as missing."""
    err = failure({"prompt": None})
    assert (err.field, err.rule) == ("parameters.prompt", "required")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("seed", "5"),
        ("seed", True),
        ("seed", float("nan")),
        ("seed", float("inf")),
        ("seed", [1]),
        ("prompt", 5),
        ("prompt", {"a": 1}),
        ("hires", "true"),
        ("hires", 1),
        ("image", 7),
        ("image", [IMAGE_KEY]),
    ],
)
def test_type_mismatch_is_type(key: str, value: object) -> None:
    """A value of the wrong JSON type (bool for number, NaN, "5"…) fails with rule type."""
    params = {"prompt": "x", key: value}
    err = failure(params)
    assert (err.field, err.rule) == (f"parameters.{key}", "type")
    assert repr(key) in err.message


def test_number_below_min_is_min() -> None:
    """A number under ``min`` fails with rule min, naming the key and the bound."""
    err = failure({"prompt": "x", "steps": 0})
    assert (err.field, err.rule) == ("parameters.steps", "min")
    assert "'steps'" in err.message
    assert "1" in err.message


def test_number_above_max_is_max() -> None:
    """A number over ``max`` fails with rule max, naming the key."""
    err = failure({"prompt": "x", "steps": 150.5})
    assert (err.field, err.rule) == ("parameters.steps", "max")
    assert "'steps'" in err.message


def test_number_bounds_are_inclusive_and_huge_ints_are_compared() -> None:
    """``min`` and ``max`` themselves pass; an int beyond float range is just too big."""
    run = resolve({"prompt": "x", "steps": 150, "seed": 0})
    assert by_key(run)["steps"].value == 150
    assert failure({"prompt": "x", "seed": 10**400}).rule == "max"


def test_select_value_not_in_options_is_options() -> None:
    """A select value outside ``options`` fails with rule options, naming the key."""
    err = failure({"prompt": "x", "sampler": "ddim"})
    assert (err.field, err.rule) == ("parameters.sampler", "options")
    assert "'sampler'" in err.message
    assert "'euler'" in err.message


@pytest.mark.parametrize("value", [1, True, 3.5, ["euler"], {"v": "euler"}])
def test_select_value_of_a_wrong_type_is_options(value: object) -> None:
    """A select value of a type no option has is also rule options."""
    assert failure({"prompt": "x", "sampler": value}).rule == "options"


def test_select_does_not_confuse_booleans_and_numbers() -> None:
    """``true`` does not match option ``1``, nor ``1`` option ``true``."""
    numeric = ParameterDef(
        key="n", type=ParameterType.SELECT, options=[0, 1], node_id="3", field="steps"
    )
    boolean = ParameterDef(
        key="b", type=ParameterType.SELECT, options=[True], node_id="3", field="cfg"
    )
    wf = workflow([numeric, boolean])
    assert failure({"n": True}, wf).field == "parameters.n"
    assert failure({"b": 1}, wf).field == "parameters.b"
    assert by_key(resolve({"n": 1, "b": True}, wf))["b"].value is True


def test_select_injects_the_declared_option() -> None:
    """A select value equal to a numeric option is injected as the option was declared."""
    param = ParameterDef(
        key="cfg", type=ParameterType.SELECT, options=[7.0, 8.5], node_id="3", field="cfg"
    )
    value = by_key(resolve({"cfg": 7}, workflow([param])))["cfg"].value
    assert value == 7.0
    assert isinstance(value, float)


def test_unknown_file_key_is_file_not_found() -> None:
    """A file_key the store does not know fails with rule file_not_found."""
    err = failure({"prompt": "x", "image": f"inputs/{TEAM}/ffff/missing.png"})
    assert (err.field, err.rule) == ("parameters.image", "file_not_found")
    assert "'image'" in err.message


def test_file_key_of_another_team_is_file_team_without_naming_it() -> None:
    """Another team's file fails with rule file_team; the message does not reveal that team."""
    err = failure({"prompt": "x", "image": FOREIGN_KEY})
    assert (err.field, err.rule) == ("parameters.image", "file_team")
    assert "'image'" in err.message
    assert OTHER_TEAM not in err.message
    assert OTHER_TEAM not in err.field


def test_file_of_a_refused_mime_type_is_accept() -> None:
    """A file whose content type misses ``accept`` fails with rule accept, naming the key."""
    err = failure({"prompt": "x", "image": PDF_KEY})
    assert (err.field, err.rule) == ("parameters.image", "accept")
    assert "'image'" in err.message
    assert "image/*" in err.message


@pytest.mark.parametrize(
    ("accept", "content_type", "expected"),
    [
        (None, "application/octet-stream", True),
        ("", "application/pdf", True),
        ("image/*", "image/png", True),
        ("IMAGE/*", "image/PNG", True),
        ("image/*", "application/pdf", False),
        ("image/*", "image", False),
        ("image/png, image/jpeg", "image/jpeg; charset=binary", True),
        ("image/png;q=0.9", "image/png", True),
        ("image/png", "image/pngx", False),
        ("*/*", "video/mp4", True),
        ("video/mp4,  ", "video/mp4", True),
    ],
)
def test_accepts_matches_mime_lists_and_wildcards(
    accept: str | None, content_type: str, expected: bool
) -> None:
    """``accept`` is a case-insensitive list of types and wildcards; ``;`` parameters drop."""
    assert accepts(accept, content_type) is expected


def test_file_without_accept_takes_any_type() -> None:
    """A file parameter without ``accept`` takes any MIME type."""
    param = ParameterDef(key="doc", type=ParameterType.FILE, node_id="10", field="image")
    run = resolve({"doc": PDF_KEY}, workflow([param]))
    assert run.files == [("doc", FILES[PDF_KEY])]


def test_string_longer_than_10000_is_max_length() -> None:
    """A string of 10001 characters fails with rule max_length; 10000 passes."""
    err = failure({"prompt": "a" * (MAX_STRING_LENGTH + 1)})
    assert (err.field, err.rule) == ("parameters.prompt", "max_length")
    assert "'prompt'" in err.message
    assert by_key(resolve({"prompt": "a" * MAX_STRING_LENGTH}))["prompt"].value == "a" * 10_000


def test_declared_parameters_are_checked_in_declaration_order() -> None:
    """With several bad values, the first declared parameter's problem is reported."""
    err = failure({"prompt": 1, "seed": "x", "steps": 0})
    assert err.field == "parameters.prompt"
    err = failure({"prompt": "x", "steps": 0, "seed": "x"})
    assert err.field == "parameters.seed"


# ------------------------------------------------------------------ defaults and results


def test_omitted_optional_keys_take_their_defaults() -> None:
    """Omitted optional keys with a default are injected with it; those without are left out."""
    injections = by_key(resolve({"prompt": "a cat"}))
    assert injections["seed"].value == 42
    assert injections["sampler"].value == "euler"
    assert {"steps", "hires", "image"}.isdisjoint(injections)


def test_optional_key_given_as_null_takes_the_default() -> None:
    """An optional key given as null is treated as omitted."""
    assert by_key(resolve({"prompt": "x", "seed": None}))["seed"].value == 42


def test_given_values_override_defaults() -> None:
    """A given value replaces the default."""
    assert by_key(resolve({"prompt": "x", "seed": 7}))["seed"].value == 7


@pytest.mark.parametrize("parameters", [{}, None])
def test_empty_or_absent_parameters_are_valid_when_nothing_is_required(
    parameters: dict[str, Any] | None,
) -> None:
    """``{}`` and no ``parameters`` at all pass when no key is required."""
    optional = [p for p in comfy_params() if not p.required]
    assert len(resolve(parameters, workflow(optional)).injections) == 2
    assert resolve(parameters, workflow([])) == ResolvedRun(injections=[], files=[])


def test_comfyui_injections_carry_node_and_field() -> None:
    """ComfyUI injections copy key, type, node_id and field, and carry the value."""
    run = resolve({"prompt": "a cat", "steps": 30, "hires": True, "image": IMAGE_KEY})
    assert run.injections == [
        Injection(key="prompt", type="string", value="a cat", node_id="6", field="text"),
        Injection(key="seed", type="number", value=42, node_id="3", field="seed"),
        Injection(key="steps", type="number", value=30, node_id="3", field="steps"),
        Injection(key="sampler", type="select", value="euler", node_id="3", field="sampler_name"),
        Injection(key="hires", type="boolean", value=True, node_id="9", field="enabled"),
        Injection(key="image", type="file", value=IMAGE_KEY, node_id="10", field="image"),
    ]
    assert run.files == [("image", FILES[IMAGE_KEY])]


def test_nerfstudio_injections_carry_target_path() -> None:
    """Nerfstudio injections copy target_path and no ComfyUI target."""
    params = [
        ParameterDef(
            key="iters",
            type=ParameterType.NUMBER,
            default=30000,
            min=1,
            target_path="train.max_num_iterations",
        ),
        ParameterDef(key="data", type=ParameterType.FILE, target_path="data.archive"),
    ]
    wf = workflow(params, ToolType.NERFSTUDIO, {"train": {"max_num_iterations": 1}})
    run = resolve({"data": PDF_KEY}, wf)
    assert run.injections == [
        Injection(key="iters", type="number", value=30000, target_path="train.max_num_iterations"),
        Injection(key="data", type="file", value=PDF_KEY, target_path="data.archive"),
    ]
    assert run.files == [("data", FILES[PDF_KEY])]


def test_file_keys_to_lookup_lists_distinct_string_file_values() -> None:
    """Lookup keys are the string values (or defaults) of file parameters, once each."""
    params = [
        ParameterDef(key="a", type=ParameterType.FILE, node_id="10", field="image"),
        ParameterDef(key="b", type=ParameterType.FILE, node_id="6", field="text"),
        ParameterDef(key="c", type=ParameterType.FILE, default=PDF_KEY, node_id="3", field="seed"),
        ParameterDef(key="d", type=ParameterType.FILE, node_id="3", field="steps"),
        ParameterDef(key="s", type=ParameterType.STRING, node_id="3", field="cfg"),
    ]
    wf = workflow(params)
    given = {"a": IMAGE_KEY, "b": IMAGE_KEY, "d": 5, "s": "not-a-file"}
    assert file_keys_to_lookup(wf, given) == [IMAGE_KEY, PDF_KEY]
    assert file_keys_to_lookup(wf, None) == [PDF_KEY]


# ------------------------------------------------------------------ check_workflow_targets


def test_check_workflow_targets_accepts_valid_targets() -> None:
    """Every parameter of the sample workflow targets an existing node input."""
    check_workflow_targets(workflow_in(comfy_params()))


def test_check_workflow_targets_allows_targeting_a_linked_input() -> None:
    """An input that is currently a link (``["4", 0]``) may be a target."""
    param = ParameterDef(key="m", type=ParameterType.STRING, node_id="3", field="model")
    check_workflow_targets(workflow_in([param]))


@pytest.mark.parametrize(
    ("workflow_json", "node_id", "field", "where", "rule"),
    [
        (COMFY_JSON, "99", "seed", "node_id", "node_not_found"),
        ({"3": "KSampler"}, "3", "seed", "node_id", "node_inputs"),
        ({"3": {"class_type": "KSampler"}}, "3", "seed", "node_id", "node_inputs"),
        ({"3": {"inputs": [1, 2]}}, "3", "seed", "node_id", "node_inputs"),
        (COMFY_JSON, "3", "sead", "field", "field_not_found"),
    ],
)
def test_check_workflow_targets_refuses_missing_nodes_and_inputs(
    workflow_json: dict[str, Any], node_id: str, field: str, where: str, rule: str
) -> None:
    """A ComfyUI target must be an existing node object whose inputs contain the field."""
    ok = ParameterDef(key="prompt", type=ParameterType.STRING, node_id="6", field="text")
    bad = ParameterDef(key="seed", type=ParameterType.NUMBER, node_id=node_id, field=field)
    body = WorkflowIn(
        name="t", workflow_json=workflow_json | {"6": COMFY_JSON["6"]}, parameters=[ok, bad]
    )
    with pytest.raises(ValidationFailure) as caught:
        check_workflow_targets(body)
    assert (caught.value.field, caught.value.rule) == (f"parameters[1].{where}", rule)
    assert "'seed'" in caught.value.message


def on_seed(kind: ParameterType, *, default: object, **rules: Any) -> ParameterDef:
    """Build parameter ``p`` of a type with a default, targeting the KSampler seed."""
    return ParameterDef.model_validate(
        {"key": "p", "type": kind, "default": default, "node_id": "3", "field": "seed"} | rules
    )


@pytest.mark.parametrize(
    ("param", "rule"),
    [
        (on_seed(ParameterType.NUMBER, default="5"), "type"),
        (on_seed(ParameterType.NUMBER, default=True), "type"),
        (on_seed(ParameterType.NUMBER, default=-1, min=0), "min"),
        (on_seed(ParameterType.NUMBER, default=9, max=8), "max"),
        (on_seed(ParameterType.SELECT, default="x", options=["a"]), "options"),
        (on_seed(ParameterType.BOOLEAN, default="no"), "type"),
        (on_seed(ParameterType.STRING, default="a" * 10_001), "max_length"),
        (on_seed(ParameterType.FILE, default=3), "type"),
    ],
)
def test_check_workflow_targets_requires_defaults_to_satisfy_the_rules(
    param: ParameterDef, rule: str
) -> None:
    """A default that breaks its own parameter's rules is refused on field default."""
    with pytest.raises(ValidationFailure) as caught:
        check_workflow_targets(workflow_in([param]))
    assert (caught.value.field, caught.value.rule) == ("parameters[0].default", rule)
    assert "'p'" in caught.value.message


def test_check_workflow_targets_refuses_two_parameters_on_one_input() -> None:
    """Two parameters injecting into the same node input are refused."""
    params = [
        ParameterDef(key="a", type=ParameterType.NUMBER, node_id="3", field="seed"),
        ParameterDef(key="b", type=ParameterType.NUMBER, node_id="3", field="seed"),
    ]
    with pytest.raises(ValidationFailure) as caught:
        check_workflow_targets(workflow_in(params))
    assert (caught.value.field, caught.value.rule) == ("parameters[1].node_id", "duplicate_target")
    assert "'a'" in caught.value.message


def test_check_workflow_targets_for_nerfstudio_checks_target_paths() -> None:
    """Nerfstudio targets need no node; over-long or shared target paths are refused."""
    good = ParameterDef(key="a", type=ParameterType.NUMBER, target_path="train.steps")
    check_workflow_targets(workflow_in([good], ToolType.NERFSTUDIO))
    with pytest.raises(pydantic.ValidationError):
        ParameterDef(key="b", type=ParameterType.NUMBER, target_path="a." + "x" * 300)
    long = ParameterDef.model_construct(
        key="b", type=ParameterType.NUMBER, target_path="a." + "x" * 300, node_id=None, field=None
    )  # bypasses the model's own limit: the check is a second line of defence
    with pytest.raises(ValidationFailure) as caught:
        check_workflow_targets(workflow_in([good, long], ToolType.NERFSTUDIO))
    assert (caught.value.field, caught.value.rule) == ("parameters[1].target_path", "max_length")
    twin = ParameterDef(key="c", type=ParameterType.STRING, target_path="train.steps")
    with pytest.raises(ValidationFailure) as caught:
        check_workflow_targets(workflow_in([good, twin], ToolType.NERFSTUDIO))
    assert caught.value.rule == "duplicate_target"


def test_validation_failure_carries_field_rule_and_message() -> None:
    """``ValidationFailure`` exposes field, rule and message; str() is the message."""
    err = ValidationFailure("parameters.seed", "type", "parameter 'seed' must be a number")
    assert (err.field, err.rule, err.message) == (
        "parameters.seed",
        "type",
        "parameter 'seed' must be a number",
    )
    assert str(err) == err.message


# ------------------------------------------------------------------ properties

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats()
    | st.text(max_size=20)
)
PLAUSIBLE = st.sampled_from([IMAGE_KEY, PDF_KEY, FOREIGN_KEY, "euler", "dpmpp_2m"]) | st.integers(
    min_value=-5, max_value=200
)
JSON = st.recursive(
    SCALARS | PLAUSIBLE | st.builds(str.__mul__, st.just("a"), st.just(MAX_STRING_LENGTH + 1)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
OPTIONAL = {param.key: PLAUSIBLE | SCALARS | JSON for param in comfy_params()}
DECLARED = st.fixed_dictionaries({}, optional=OPTIONAL) | st.fixed_dictionaries(
    {"prompt": st.text(max_size=20)}, optional={k: v for k, v in OPTIONAL.items() if k != "prompt"}
)
UNDECLARED = st.dictionaries(st.text(max_size=10), JSON, max_size=3)
PARAMETERS = st.none() | DECLARED | st.builds(dict.__or__, DECLARED, UNDECLARED)


@settings(max_examples=300, deadline=None)
@given(
    parameters=PARAMETERS,
    many=st.booleans(),
    data=st.data(),
)
def test_arbitrary_parameters_only_ever_raise_validation_failure(
    parameters: dict[str, Any] | None, many: bool, data: st.DataObject
) -> None:
    """Any JSON-like parameters map resolves or raises ValidationFailure, nothing else."""
    if many and parameters is not None:
        parameters = parameters | {f"extra{i}": i for i in range(100)}
    wf = workflow()
    files = {
        key: FileMeta(
            key,
            data.draw(st.sampled_from([TEAM, OTHER_TEAM])),
            1,
            data.draw(st.sampled_from(["image/png", "text/plain", "", "IMAGE/JPEG;x=1"])),
        )
        for key in file_keys_to_lookup(wf, parameters)
        if data.draw(st.booleans())
    }
    outcome: ResolvedRun | ValidationFailure
    try:
        outcome = resolve_parameters(wf, parameters, team_id=TEAM, files=files)
    except ValidationFailure as err:
        outcome = err
    if isinstance(outcome, ValidationFailure):
        assert outcome.field.startswith("parameters")
        assert outcome.rule
        assert outcome.message
    else:
        keys = [inj.key for inj in outcome.injections]
        assert keys == [p.key for p in wf.parameters if p.key in keys]
        assert all(meta.team_id == TEAM for _, meta in outcome.files)
