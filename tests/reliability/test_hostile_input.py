"""Hostile input against the REAL agent process (issue 13, part 2).

Frames: a fake gateway (:mod:`tests.reliability.fake_gateway`, a real WebSocket server) that
the real ``python -m agent run`` connects to sends hypothesis-generated hostile frames —
a wrong-typed value in every field of every gateway → agent message, huge strings, deep
nesting, unknown types, malformed JSON, binary frames, out-of-order messages — one at a time,
each followed by a probe (an unknown type, whose answer is known). The probe proves the agent
still reads, and the answers before it are exactly what the bad frame earned: the documented
``error`` code, or nothing for an ``error`` or a message about a task the agent never held.
Oversized frames close the connection with 1009 and the agent reconnects. Then the same
agent runs a valid task end to end (assign → accept → input download → upload → complete →
ack) with presigned URLs on a local file server.

Content: path-bearing fields (input ``file_key``, upload ``storage_key``, sync
``model_path``, ComfyUI output ``filename``/``subfolder``) with traversal, absolute paths, NUL,
newlines and 10 kB names; nothing is written outside the agent's directories and the tasks
fail with a bounded, clear message. A ComfyUI ``execution_error`` with a huge
``current_inputs`` is checked at unit level and through a real failing node.

The unit-level session fuzzing of ``tests/unit/test_session_properties.py`` and the codec
tests are not repeated: here everything crosses a real socket into a real process.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.runtimes.comfyui.runtime import _file_name
from agent.runtimes.comfyui.workflow import MAX_MESSAGE, OutputRef, execution_failure, output_refs
from tests.agent_process import AgentProcess, start_agent
from tests.comfyui import COMFYUI_TEST_TIMEOUT_S, ComfyUIServer
from tests.gateway_process import FAST_TIMEOUTS, GatewayProcess, gateway
from tests.reliability.fake_gateway import TS, FakeGateway, FileServer, welcome_for
from tests.reliability.ledger import record, size

pytest_plugins = ["tests.comfyui"]

AGENT_ID = "hostile-agent"
CREDENTIAL = "dk-" + "h" * 43
FRAME_CAP = 65_536
"""``limits.max_frame_bytes`` of the agent under test (the smallest allowed: cheap to exceed)."""
HOSTILE_EXAMPLES = size(sampled=150, long=3000)
OVERSIZED = size(sampled=2, long=10)
MODEL_HASH = "sha256:" + "0" * 64
SHA = "0" * 64

# Subtrees whose content the protocol does not type (``workflow`` is ``dict[str, Any]``) or
# whose strings are unbounded (injection values, upload header values): a huge string there
# is valid, so only their container is mutated.
UNTYPED = {("workflow",), ("injections", 0, "value"), ("files", 0, "upload_headers")}
KNOWN_TYPES = {"welcome", "task.assign", "task.cancel", "task.upload_urls"}
KNOWN_TYPES |= {"ack", "drain", "sync", "error"}


def _script(**inputs: Any) -> dict[str, Any]:
    node = {"steps": 2, "step_s": 0.01, "outputs": 1, "output_bytes": 2048, "image": "", **inputs}
    return {"1": {"class_type": "Script", "inputs": node}}


def baselines() -> dict[str, dict[str, Any]]:
    """One valid message of every gateway → agent type (``type`` first: see the probe)."""
    model = {
        "model_type": "checkpoints",
        "model_path": "a/b.safetensors",
        "file_size": 1,
        "file_hash": MODEL_HASH,
        "download_url": "http://127.0.0.1:9/m",
    }
    target = {
        "name": "out.png",
        "storage_key": "tasks/ghost/out.png",
        "upload_url": "http://127.0.0.1:9/u",
        "upload_headers": {"content-type": "image/png"},
        "expires_at": TS,
        "upload_id": "up-1",
        "parts": [{"part_number": 1, "upload_url": "http://127.0.0.1:9/p", "size": 1}],
    }
    assign = {
        "task_id": "ghost",
        "attempt": 0,
        "pool": "team",
        "tool": "comfyui",
        "workflow_id": "wf",
        "workflow_version": 1,
        "workflow": _script(),
        "injections": [
            {"key": "steps", "type": "number", "value": 2, "node_id": "1", "field": "f"}
        ],
        "inputs": [
            {
                "key": "image",
                "file_key": "files/x.bin",
                "download_url": "http://127.0.0.1:9/f",
                "size": 1,
                "content_type": "image/png",
                "sha256": SHA,
            }
        ],
        "required_models": ["m"],
        "min_vram_gb": 0,
        "timeout_s": 10,
        "lease_expires_at": TS,
    }
    welcome = welcome_for(AGENT_ID, "w", features=["f"], sync=[model])
    welcome["resume"] = [{"task_id": "ghost", "attempt": 0, "action": "continue"}]
    bodies: dict[str, dict[str, Any]] = {
        "welcome": welcome,
        "task.assign": assign,
        "task.cancel": {"task_id": "ghost", "attempt": 0, "reason": "r"},
        "task.upload_urls": {"re": "r1", "task_id": "ghost", "attempt": 0, "files": [target]},
        "ack": {"re": "r1", "task_id": "ghost", "attempt": 0},
        "drain": {"reason": "r"},
        "sync": {"models": [model]},
        "error": {"code": "invalid_message", "message": "m", "re": "r1"},
    }
    return {
        kind: {"type": kind, "id": "x", "ts": TS, **{k: v for k, v in body.items() if k != "type"}}
        for kind, body in bodies.items()
    }


BASELINES = baselines()


def field_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every field path of a message, into objects and the first item of lists."""
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value[:1]))
    else:
        return
    for key, inner in items:
        path = (*prefix, key)
        yield path
        if path not in UNTYPED:
            yield from field_paths(inner, path)


def get_at(message: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path``."""
    for key in path:
        message = message[key]
    return message


def set_at(message: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``message`` with ``value`` at ``path`` (same key order)."""
    copy: dict[str, Any] = json.loads(json.dumps(message))
    holder: Any = copy
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    return copy


PATHS = [(kind, path) for kind, body in BASELINES.items() for path in field_paths(body)]
STRING_PATHS = [
    (kind, path)
    for kind, path in PATHS
    if isinstance(get_at(BASELINES[kind], path), str) and path[:3] not in UNTYPED
]


def wrong_values(current: Any) -> list[Any]:
    """JSON values no lax pydantic validator turns into the type of ``current``."""
    if isinstance(current, list):
        return [7, "text", {"k": 1}, True]
    if isinstance(current, dict):
        return [[1], "text", 7, True]
    return [[1, "x"], {"k": [None]}, [], {}]


@dataclass(frozen=True)
class Case:
    """One hostile frame and the answer the protocol prescribes."""

    what: str
    frame: str | bytes
    code: str | None
    """The ``error`` code expected, or ``None``: no answer at all."""
    re: str | bool | None = False
    """The ``re`` of that answer (``False``: not checked)."""


def _frame(message: dict[str, Any], binary: bool) -> str | bytes:
    text = json.dumps(message, ensure_ascii=False)
    return text.encode() if binary else text


@st.composite
def wrong_type(draw: st.DrawFn) -> Case:
    """A wrong-typed value in one field (at any depth) of one message type."""
    kind, path = draw(st.sampled_from(PATHS))
    value = draw(st.sampled_from(wrong_values(get_at(BASELINES[kind], path))))
    ident = f"wt-{uuid.uuid4().hex[:12]}"
    message = set_at({**BASELINES[kind], "id": ident}, path, value)
    binary = draw(st.booleans())
    where = f"{kind} {'.'.join(map(str, path))}={json.dumps(value)}"
    if kind == "error" and path != ("type",):
        return Case(f"bad error: {where}", _frame(message, binary), None)
    return Case(
        where, _frame(message, binary), "invalid_message", None if path == ("id",) else ident
    )


@st.composite
def huge_string(draw: st.DrawFn) -> Case:
    """A string field (at most 16384 characters in the protocol) of 17-30 k characters."""
    kind, path = draw(st.sampled_from(STRING_PATHS))
    length = draw(st.integers(min_value=17_000, max_value=30_000))
    ident = f"hs-{uuid.uuid4().hex[:12]}"
    message = set_at({**BASELINES[kind], "id": ident}, path, "\u00e9" * length)
    where = f"{kind} {'.'.join(map(str, path))}: {length} characters"
    if path == ("type",):
        return Case(where, _frame(message, draw(st.booleans())), "unknown_type", ident)
    if kind == "error":
        return Case(where, _frame(message, draw(st.booleans())), None)
    return Case(
        where,
        _frame(message, draw(st.booleans())),
        "invalid_message",
        None if path == ("id",) else ident,
    )


@st.composite
def deep(draw: st.DrawFn) -> Case:
    """Deeply nested arrays/objects: a whole frame, or inside a field."""
    depth = draw(st.integers(min_value=50, max_value=30_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "1" + closer * depth
    if len(nested) > FRAME_CAP - 200:
        nested = opener * 5000 + "1" + closer * 5000
    if draw(st.booleans()):
        return Case(f"nested frame, depth {depth}", nested, "invalid_message", None)
    kind = draw(st.sampled_from(["task.assign", "task.cancel", "task.upload_urls", "ack"]))
    ident = f"dp-{uuid.uuid4().hex[:12]}"
    body = json.dumps({**BASELINES[kind], "id": ident, "task_id": 0})
    frame = body[:-1] + ', "task_id": ' + nested + "}"
    # parsed (then refused by validation, re = id) or too deep to parse (re unknown)
    return Case(f"{kind} task_id nested {depth}", frame, "invalid_message")


@st.composite
def unknown_type(draw: st.DrawFn) -> Case:
    """A message type no version of the protocol defines."""
    kind = draw(st.text(min_size=1, max_size=40).filter(lambda t: t not in KNOWN_TYPES))
    ident = f"ut-{uuid.uuid4().hex[:12]}"
    message = {"type": kind, "id": ident, "ts": TS, "task_id": "ghost"}
    return Case(f"type {kind!r}", _frame(message, draw(st.booleans())), "unknown_type", ident)


def _not_an_error(frame: str | bytes) -> bool:
    text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
    return '"error"' not in text


@st.composite
def malformed(draw: st.DrawFn) -> Case:
    """Text that is no JSON object, random bytes, or a truncated message."""
    choice = draw(st.integers(min_value=0, max_value=2))
    frame: str | bytes
    if choice == 0:
        frame = draw(st.text(max_size=300).filter(_not_an_error))
    elif choice == 1:
        frame = draw(st.binary(max_size=300).filter(_not_an_error))
    else:
        kind = draw(st.sampled_from(sorted(KNOWN_TYPES - {"error"})))
        text = json.dumps(BASELINES[kind])
        frame = text[: draw(st.integers(min_value=0, max_value=len(text) - 1))]
    return Case(f"malformed {frame[:40]!r}", frame, "invalid_message")


@st.composite
def out_of_order(draw: st.DrawFn) -> Case:
    """Valid messages at the wrong time: about tasks never held, a second welcome, errors."""
    kind = draw(st.sampled_from(["ack", "task.upload_urls", "task.cancel", "welcome", "error"]))
    ident = f"oo-{uuid.uuid4().hex[:12]}"
    message = {**BASELINES[kind], "id": ident}
    if kind in {"ack", "task.upload_urls", "task.cancel"}:
        message["task_id"] = draw(st.text(min_size=1, max_size=128))
        message["attempt"] = draw(st.integers(min_value=0, max_value=1_000_000))
    if kind == "error":
        message["code"] = draw(st.sampled_from(["unknown_type", "invalid_message", "unknown_task"]))
        message["message"] = draw(st.text(max_size=200))
    expected = {"task.cancel": "unknown_task", "welcome": "unexpected_message"}.get(kind)
    return Case(f"out of order {kind}", _frame(message, draw(st.booleans())), expected, ident)


HOSTILE = st.one_of(
    wrong_type(), huge_string(), deep(), unknown_type(), malformed(), out_of_order()
)


class Exchange:
    """Sends hostile frames one by one, each followed by a probe, and checks the answers."""

    def __init__(self, gw: FakeGateway, agent: AgentProcess) -> None:
        self.gw = gw
        self.agent = agent
        self.frames = 0
        self.probes = 0
        self.dirty = False

    def check(self, case: Case) -> None:
        """Send ``case`` and its probe; the answers are exactly the prescribed ones."""
        if self.dirty:  # a failed example left answers in flight: skip past them
            self._probe_answer(self._probe(), since=len(self.gw.seen))
        self.dirty = True
        self.frames += 1
        since = len(self.gw.seen)
        connection = self.gw.connections
        self.gw.send(case.frame)
        probe = self._probe()
        answer = self.gw.wait_type("error", since=since).message
        if case.code is not None:
            assert answer["code"] == case.code, (case.what, answer)
            if case.re is not False:
                assert answer.get("re") == case.re, (case.what, answer)
            assert len(answer.get("message", "")) <= 16_384
            answer = self.gw.wait_type("error", since=self.gw.matched_at + 1).message
        assert answer.get("re") == probe, f"{case.what}: unexpected answer {answer}"
        assert answer["code"] == "unknown_type"
        assert self.gw.connections == connection, f"{case.what}: the connection dropped"
        assert self.agent.process.poll() is None, f"{case.what}: the agent died"
        self.dirty = False

    def _probe(self) -> str:
        self.probes += 1
        probe = f"probe-{self.probes}"
        self.gw.send_json({"type": "cyberun.probe", "id": probe, "ts": TS})
        return probe

    def _probe_answer(self, probe: str, since: int) -> None:
        self.gw.wait_type("error", since=since, re=probe)


def _assign(task_id: str, workflow: dict[str, Any], inputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **BASELINES["task.assign"],
        "id": f"as-{task_id}",
        "task_id": task_id,
        "workflow": workflow,
        "injections": [],
        "inputs": inputs,
        "required_models": [],
    }


def drive_task(
    gw: FakeGateway,
    fs: FileServer,
    assign: dict[str, Any],
    *,
    storage_key: str | None = None,
    duplicates: bool = False,
) -> dict[str, Any]:
    """Act as the gateway for one task until its terminal message; ack it; return it."""
    task_id = assign["task_id"]
    since = len(gw.seen)
    gw.send_json(assign)
    gw.wait_type("task.accept", since=since, task_id=task_id, re=assign["id"])
    terminal = {"task.complete", "task.fail", "task.cancelled"}
    while True:
        found = gw.wait_for(
            lambda r: (
                r.message.get("task_id") == task_id
                and r.message.get("type") in {"task.upload_request", *terminal}
            ),
            since=since,
            timeout=30,
        ).message
        since = gw.matched_at + 1
        if found["type"] in terminal:
            break
        if duplicates and found["type"] == "task.upload_request":
            # still running (it waits for these URLs): a duplicate assign repeats the accept
            again = {**assign, "id": f"{assign['id']}-again"}
            gw.send_json(again)
            gw.wait_type("task.accept", since=since, task_id=task_id, re=again["id"])
        files = [
            {
                "name": f["name"],
                "storage_key": storage_key or f"tasks/{task_id}/{f['name']}",
                "upload_url": f"{fs.url}/uploads/{task_id}-{f['name']}?X-Amz-Signature=s",
                "upload_headers": {},
                "expires_at": TS,
            }
            for f in found["files"]
        ]
        gw.send_json(
            {
                "type": "task.upload_urls",
                "id": f"uu-{uuid.uuid4().hex[:8]}",
                "ts": TS,
                "re": found["id"],
                "task_id": task_id,
                "attempt": found["attempt"],
                "files": files,
            }
        )
    if duplicates:  # a duplicate assign of a finished attempt repeats its terminal message
        again = {**assign, "id": f"{assign['id']}-late"}
        gw.send_json(again)
        repeat = gw.wait_type(found["type"], since=since, task_id=task_id, id=found["id"])
        assert repeat.message == found
    ack = {"type": "ack", "id": f"ack-{task_id}", "ts": TS, "re": found["id"]}
    gw.send_json({**ack, "task_id": task_id, "attempt": found["attempt"]})
    return found


@pytest.fixture
def hostile_env(tmp_path: Path) -> Iterator[tuple[FakeGateway, FileServer, AgentProcess, Path]]:
    """A fake gateway, a file server and a real agent connected to the gateway."""
    with FakeGateway().running() as gw, FileServer().running() as fs:
        home = tmp_path / "deep" / "er" / "home"
        env = {
            "CYBERUN_AGENT_LIMITS__MAX_FRAME_BYTES": str(FRAME_CAP),
            "CYBERUN_AGENT_LIMITS__MIN_FREE_DISK_BYTES": "0",
            "CYBERUN_AGENT_LOG_LEVEL": "info",  # debug logs every 60 kB frame twice
        }
        agent = start_agent(home, gw.url, CREDENTIAL, AGENT_ID, extra_env=env)
        try:
            gw.wait_type("status", timeout=60)
            yield gw, fs, agent, tmp_path
        finally:
            agent.stop()


def stray_files(root: Path, home: Path) -> list[Path]:
    """Files under ``root`` outside the agent's own state, work and cache directories."""
    own = {home / "state", home / "work", home / "cache"}
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):  # the agent's own dirs are not entered
        subdirs[:] = [d for d in subdirs if Path(directory, d) not in own]
        found.extend(Path(directory, name) for name in files)
    return found


def test_hostile_frames_get_their_documented_answers_and_the_agent_still_works(
    hostile_env: tuple[FakeGateway, FileServer, AgentProcess, Path],
) -> None:
    """Hostile frames get exactly the documented error (or none); afterwards a task completes."""
    gw, fs, agent, root = hostile_env
    exchange = Exchange(gw, agent)

    @settings(
        max_examples=HOSTILE_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(HOSTILE)
    def hostile(case: Case) -> None:
        exchange.check(case)

    hostile()

    # oversized frames, text and binary: closed with 1009, then a fresh session
    for n in range(OVERSIZED):
        connections = gw.connections
        big = json.dumps(
            {"type": "task.cancel", "id": f"big-{n}", "ts": TS, "pad": "x" * FRAME_CAP}
        )
        gw.send(big if n % 2 == 0 else big.encode())
        assert gw.wait_close()[1] == 1009
        gw.wait_type("hello", timeout=30, since=len(gw.seen))
        gw.wait_for(lambda r: r.connection > connections and r.message.get("type") == "status")  # noqa: B023

    # before welcome: every other message is unexpected; bad frames are still invalid
    gw.hold_welcome = True
    gw.send(b"\x00" * (FRAME_CAP + 1))
    assert gw.wait_close()[1] == 1009
    since = len(gw.seen)
    gw.wait_type("hello", timeout=30, since=since)
    early = {**BASELINES["task.cancel"], "id": "early"}
    gw.send_json(early)
    assert gw.wait_type("error", since=since, re="early").message["code"] == "unexpected_message"
    gw.send("{not json")
    assert gw.wait_type("error", since=gw.matched_at + 1).message["code"] == "invalid_message"
    gw.hold_welcome = False
    gw.send_json(welcome_for(AGENT_ID, "late-welcome"))
    gw.wait_type("status", since=since)
    gw.send_json(welcome_for(AGENT_ID, "second-welcome"))
    second = gw.wait_type("error", since=since, re="second-welcome").message
    assert second["code"] == "unexpected_message"

    # a model set of hostile paths only: skipped, never written
    hostile_models = [
        {**BASELINES["sync"]["models"][0], "model_path": p, "download_url": f"{fs.url}/files/m"}
        for p in (
            "../../../escape.bin",
            "/srv/cyberun-abs.bin",
            "a/../../x",
            "a\\b",
            "a\x00b",
            "n\nl",
        )
    ]
    gw.send_json({"type": "sync", "id": "sync-1", "ts": TS, "models": hostile_models})
    exchange.check(Case("probe after a hostile sync", "{", "invalid_message"))

    # and the agent still takes and completes a valid task, duplicates answered as documented
    payload = os.urandom(3000)
    fs.files["in.bin"] = payload
    source = {
        "key": "image",
        "file_key": "files/in.bin",
        "download_url": f"{fs.url}/files/in.bin?X-Amz-Signature=abc",
        "size": len(payload),
        "content_type": "application/octet-stream",
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    done = drive_task(gw, fs, _assign("final", _script(), [source]), duplicates=True)
    assert done["type"] == "task.complete", done.get("error")
    assert [o["key"] for o in done["outputs"]] == ["1.images.0"]
    uploaded = fs.uploads[f"final-{done['outputs'][0]['storage_key'].rsplit('/', 1)[1]}"]
    assert hashlib.sha256(uploaded).hexdigest() == done["outputs"][0]["sha256"]
    agent.wait_log("report acknowledged", task_id="final")
    late = {**_assign("final", _script(), []), "id": "after-ack"}
    gw.send_json(late)
    reject = gw.wait_type("task.reject", re="after-ack").message
    assert reject["reason"] == "duplicate"
    assert agent.process.poll() is None
    assert stray_files(root, agent.home) == []
    record(
        "hostile frames",
        tasks=1,
        faults=exchange.frames + OVERSIZED + 4,
        lost=0,
        duplicated=0,
        detail=f"{HOSTILE_EXAMPLES} generated frames + oversized, early, late",
    )


def test_a_malformed_error_is_never_answered_however_it_is_spelled(
    hostile_env: tuple[FakeGateway, FileServer, AgentProcess, Path],
) -> None:
    """An invalid ``error`` frame gets no answer, whatever its whitespace, escapes or key order."""
    gw, _, agent, _ = hostile_env
    exchange = Exchange(gw, agent)
    spelled = [
        '{"type":\t"error", "id": "e1", "code": "bogus"}',
        '{"type":\n"error", "id": "e2", "code": "bogus"}',
        '{"type": "\\u0065rror", "id": "e3", "code": "bogus"}',
        json.dumps({"message": "m" * 5000, "type": "error", "id": "e4", "code": "bogus"}),
    ]
    for frame in spelled:
        exchange.check(Case(frame[:40], frame, None))


# ---------------------------------------------------------------------- hostile content

HOSTILE_NAMES = [
    "../../../../escape-a.bin",
    "/srv/cyberun-hostile-abs.bin",
    "..",
    "nul\x00byte.bin",
    "new\nline.bin",
    "n" * 10_000,
    "back\\..\\..\\slash.bin",
]


def test_hostile_input_names_stay_inside_the_workspace(
    hostile_env: tuple[FakeGateway, FileServer, AgentProcess, Path],
) -> None:
    """Traversal, absolute, NUL, newline and 10 kB input names never escape; failures are clear."""
    gw, fs, agent, root = hostile_env
    payload = b"input bytes"
    outcomes: dict[str, dict[str, Any]] = {}
    for n, file_key in enumerate(HOSTILE_NAMES):
        fs.files[f"in{n}"] = payload
        source = {
            "key": "image",
            "file_key": file_key,
            "download_url": f"{fs.url}/files/in{n}",
            "size": len(payload),
            "content_type": "application/octet-stream",
        }
        outcomes[file_key] = drive_task(gw, fs, _assign(f"name-{n}", _script(), [source]))
    for file_key, outcome in outcomes.items():
        last = file_key.rsplit("/", 1)[-1]
        if outcome["type"] == "task.fail":
            error = outcome["error"]
            assert error["code"] == "input_failed", (file_key, error)
            assert "unsafe" in error["message"], error
            assert len(error["message"]) <= 8000
        else:  # only a plain last segment is usable, and it lands inside the workspace
            assert outcome["type"] == "task.complete", outcome
            assert not set(last) & {"\\", "\x00", "\n"}
            assert last != ".."
    assert outcomes["../../../../escape-a.bin"]["type"] == "task.complete"
    assert not Path("/srv/cyberun-hostile-abs.bin").exists()
    assert stray_files(root, agent.home) == []
    assert agent.process.poll() is None
    record("hostile input names", tasks=len(outcomes), faults=len(outcomes), lost=0, duplicated=0)


def test_a_hostile_storage_key_is_only_echoed_never_written(
    hostile_env: tuple[FakeGateway, FileServer, AgentProcess, Path],
) -> None:
    """An upload ``storage_key`` with traversal is only echoed back; nothing is written locally."""
    gw, fs, agent, root = hostile_env
    key = "../../../../etc/cyberun-hostile"
    done = drive_task(gw, fs, _assign("skey", _script(), []), storage_key=key)
    assert done["type"] == "task.complete", done.get("error")
    assert done["outputs"][0]["storage_key"] == key
    assert stray_files(root, agent.home) == []
    assert not Path("/etc/cyberun-hostile").exists()


@pytest.mark.parametrize(
    ("filename", "subfolder"),
    [
        ("../../etc/x", ""),
        ("/etc/passwd", "../.."),
        ("nul\x00.png", "/abs"),
        ("n" * 10_000, "sub"),
        ("new\nline.png", "a/../../b"),
        ("..", ".."),
    ],
)
def test_comfyui_output_names_map_to_one_safe_file_in_the_workspace(
    tmp_path: Path, filename: str, subfolder: str
) -> None:
    """A hostile ComfyUI output filename/subfolder becomes one bounded name inside outputs/."""
    outputs = {"9": {"images": [{"filename": filename, "subfolder": subfolder, "type": "output"}]}}
    (ref,) = output_refs(outputs)
    assert ref == OutputRef("9.images.0", filename, subfolder, "output")
    workspace = tmp_path / "outputs"
    dest = workspace / _file_name(ref)
    assert dest.parent == workspace
    assert len(dest.name.encode()) <= 200
    assert not set(dest.name) & {"/", "\x00", "\n"}
    assert dest.name not in {".", ".."}


def test_an_execution_error_with_huge_current_inputs_gives_a_bounded_message() -> None:
    """ComfyUI's execution_error with megabytes of current_inputs yields a short node_error."""
    secret_inputs = "INPUT-" + "i" * 2_000_000
    event = {
        "prompt_id": "p",
        "node_id": "7",
        "node_type": "KSampler",
        "exception_message": "boom " + "m" * 100_000,
        "exception_type": "RuntimeError",
        "traceback": ["line\n"] * 10_000,
        "current_inputs": {"image": [secret_inputs], "nested": [[[secret_inputs]]]},
        "current_outputs": {"x": [secret_inputs]},
    }
    failure = execution_failure(event)
    assert failure.code == "node_error"
    assert failure.node_id == "7"
    assert failure.message.startswith("node 7 (KSampler): boom")
    assert len(failure.message) <= MAX_MESSAGE
    assert "INPUT-" not in failure.message


@pytest.fixture
def comfy_stack(
    tmp_path: Path, comfyui: ComfyUIServer
) -> Iterator[tuple[GatewayProcess, str, AgentProcess]]:
    """The real gateway and an agent attached to the real ComfyUI."""
    with gateway(tmp_path / "gw", *FAST_TIMEOUTS) as gw:
        dk = gw.credential("hostile-comfy")
        env = {
            "CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": comfyui.url,
            "CYBERUN_AGENT_RUNTIMES__EXTRA": "",
        }
        agent = start_agent(tmp_path / "agent", gw.url, dk, "hostile-comfy", extra_env=env)
        try:
            agent.wait_log("connected to the gateway", timeout=60)
            yield gw, dk, agent
        finally:
            agent.stop()


@pytest.mark.timeout(COMFYUI_TEST_TIMEOUT_S)
def test_a_real_failing_node_with_a_huge_input_fails_the_task_with_a_bounded_message(
    comfy_stack: tuple[GatewayProcess, str, AgentProcess],
) -> None:
    """CyberunFail raising with a 60 kB input is a failed task with a short, clear error."""
    gw, dk, agent = comfy_stack
    huge = "boom-" + "z" * 60_000
    body = {
        "name": "fail-huge",
        "workflow_json": {"1": {"class_type": "CyberunFail", "inputs": {"message": huge}}},
    }
    workflow = gw.create_workflow(dk, body)
    with gw.client(dk) as http:
        answer = http.post(f"/r/workflows/{workflow}/run", json={"parameters": {}})
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        agent.wait_log("report acknowledged", task_id=task_id, timeout=120)
        task = http.get(f"/r/tasks/{task_id}").json()
        events = http.get(f"/r/tasks/{task_id}/events", timeout=30).text
    assert task["task_status"] == "failed"
    error = task["task_error"]
    assert error.startswith("node_error: node 1 (CyberunFail): boom-"), error[:200]
    assert len(error) <= MAX_MESSAGE + 200
    assert len(events) < 100_000
    assert agent.process.poll() is None
